"""Bad input to the SQL API, drawn by hypothesis: a clear error each time, and no partial state.

Every entry point (register_template, create_task, create_or_get_task, create_tasks,
claim_steps, complete_steps, extend_leases, release_steps, retry_step, resolve_step,
cancel_task) gets malformed JSON shapes, wrong types, out-of-range and unrepresentable numbers
(1e400, 1e-400, 2^31, 30-digit integers), oversized strings, unknown keys and NULLs. Each call
either succeeds (the input was acceptable after all) or is refused with a SQLSTATE of the
engine's own classes (TV invalid input, TN not found, TS wrong state), never a numeric overflow,
a cast failure or an internal error from deep inside a function. A refused call leaves the row
count of every tasker table as it was.

Each example runs in a transaction that is rolled back afterwards, so examples do not see each
other's effects; the call itself runs in a savepoint. The JSON is sent as text (`$1::text::jsonb`)
so numbers Python cannot hold (1e400) reach the database as written.

Also here: semantic versions (SQL order and validity agree with a reference implementation of
semver 2.0.0 and with tasker_pg.template.parse_version), register_template's numeric checks, and
ancestors of large and random DAGs (register_template computes them in one topological pass).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasker_pg import db
from tasker_pg.template import TaskTemplate, TemplateValidationError, parse_version

if TYPE_CHECKING:
    from tests.support.pgserver import TestServer

T = TypeVar("T")

OWN_CLASSES = ("TV", "TN", "TS")
NS = "badin"

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- raw JSON ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text inserted as written (numbers Python cannot hold, such as 1e400)."""

    text: str


def dump(value: Any) -> str:
    """JSON text of `value`, with Raw parts inserted verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


HUGE_TEXT = "x" * 20_000
BAD_NUMBERS = [
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    Raw("-1e-400"),
    Raw("123456789012345678901234567890"),
    Raw("2147483648"),
    Raw("-2147483649"),
    Raw("2.5"),
    Raw("-1"),
    Raw("0"),
    Raw("1e15"),
    Raw("0.0000001"),
]
BAD_VALUES: list[Any] = [
    *BAD_NUMBERS,
    None,
    True,
    "",
    "1e400",
    "NaN",
    HUGE_TEXT,
    [],
    [1, "a", None],
    {},
    {"unexpected": {"deeply": [1, 2, {"x": None}]}},
]
bad_values = st.sampled_from(BAD_VALUES)
bad_keys = st.sampled_from(["colour", "", "x" * 300, "retries", "Name", "steps "])


def mutate(draw: Callable[[st.SearchStrategy[Any]], Any], base: Any, max_depth: int = 4) -> Any:
    """`base` with one place replaced by a bad value, or given an unknown key."""
    if max_depth == 0 or not isinstance(base, dict | list) or not base:
        return draw(bad_values)
    if draw(st.integers(0, 5)) == 0:
        return draw(bad_values)
    if isinstance(base, dict):
        if draw(st.integers(0, 6)) == 0:
            return {**base, draw(bad_keys): draw(bad_values)}
        key = draw(st.sampled_from(sorted(base)))
        return {**base, key: mutate(draw, base[key], max_depth - 1)}
    index = draw(st.integers(0, len(base) - 1))
    return [*base[:index], mutate(draw, base[index], max_depth - 1), *base[index + 1 :]]


# --- the database -----------------------------------------------------------------------------


def template_body(version: str = "1.0.0", name: str = "flow") -> dict[str, Any]:
    return {
        "name": name,
        "namespace_name": NS,
        "version": version,
        "description": "bad input target",
        "metadata": {"owner": "tests"},
        "steps": [
            {
                "name": "a",
                "handler": {"callable": "h.a", "initialization": {"k": 1}},
                "retry": {
                    "retryable": True,
                    "max_attempts": 3,
                    "backoff": "fixed",
                    "backoff_base_ms": 10,
                    "max_backoff_ms": 100,
                    "jitter": 0.5,
                },
                "timeout_seconds": 30,
            },
            {"name": "b", "handler": {"callable": "h.b"}, "dependencies": ["a"]},
        ],
    }


class Env:
    """One database for a test: a registered template, a task whose step `a` is claimed."""

    def __init__(self, server: TestServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.dsn = self.run(server.create_database())
        self.conn: db.Connection = self.run(db.connect(self.dsn))
        self.run(self._setup())

    async def _setup(self) -> None:
        await self.conn.register_template(template_body())
        await self.conn.execute("SELECT tasker.create_queue('plain')")
        await self.conn.execute("SELECT tasker.send('plain', '{\"m\": 1}'::jsonb)")
        self.task = await self.conn.fetchval(
            "SELECT tasker.create_task($1, 'flow', '{\"n\": 1}'::jsonb)", NS
        )
        claim = await self.conn.fetchrow("SELECT * FROM tasker.claim_steps($1, 'w1', 1, 60)", NS)
        assert claim is not None
        self.claim = {
            "step_uuid": str(claim["step_uuid"]),
            "attempt": claim["attempt"],
            "claim_seq": claim["claim_seq"],
        }
        self.step_b = await self.conn.fetchval(
            "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 'b'", self.task
        )
        tables = await self.conn.fetch(
            """SELECT format('SELECT %L AS t, count(*) AS n FROM %I.%I',
                          c.relname, n.nspname, c.relname) AS q
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'tasker' AND c.relkind IN ('r', 'p') ORDER BY c.relname"""
        )
        self.count_query = " UNION ALL ".join(r["q"] for r in tables)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    async def counts(self) -> dict[str, int]:
        return {r["t"]: r["n"] for r in await self.conn.fetch(self.count_query)}

    def call(self, sql: str, *args: Any) -> tuple[str, Any]:
        """Run `sql` in a savepoint of a rolled-back transaction: ('ok', rows) or ('error', exc).

        A refusal must carry one of our SQLSTATE classes and leave every table's row count as
        it was."""
        return self.run(self._call(sql, *args))

    async def _call(self, sql: str, *args: Any) -> tuple[str, Any]:
        raw = self.conn.raw
        tx = raw.transaction()
        await tx.start()
        try:
            before = await self.counts()
            try:
                async with raw.transaction():
                    rows = await raw.fetch(sql, *args)
            except asyncpg.PostgresError as exc:
                state = exc.sqlstate or ""
                assert state[:2] in OWN_CLASSES, (
                    f"{sql} refused with SQLSTATE {state} (not one of ours): "
                    f"{type(exc).__name__}: {str(exc)[:500]}"
                )
                message = str(exc)
                assert message and len(message) < 2000, f"unclear error ({len(message)} chars)"
                assert await self.counts() == before
                return "error", exc
            return "ok", rows
        finally:
            await tx.rollback()

    def close(self) -> None:
        self.run(self.conn.close())
        self.run(self.server.drop_database(self.dsn))
        self.loop.close()


@pytest.fixture(scope="module")
def env(pg_server: TestServer) -> Iterator[Env]:
    environment = Env(pg_server)
    try:
        yield environment
    finally:
        environment.close()


def refused(result: tuple[str, Any]) -> asyncpg.PostgresError:
    kind, value = result
    assert kind == "error", f"accepted: {value}"
    assert isinstance(value, asyncpg.PostgresError)
    return value


# --- register_template: numbers and structure -------------------------------------------------


def python_refuses(body: Any) -> bool:
    try:
        TaskTemplate.from_dict(json.loads(dump(body)))
    except TemplateValidationError:
        return True
    return False


def underflows(text: str) -> bool:
    """Whether the JSON text holds a number other than 0 that reads as 0.0 (1e-400): the
    Python loader only ever sees it as 0.0 (json and PyYAML read it so, and send 0.0 on),
    while SQL, given the text itself, refuses it as out of range."""
    found = False

    def parse_float(literal: str) -> float:
        nonlocal found
        value = float(literal)
        if value == 0.0 and any(c in "123456789" for c in literal.lower().split("e")[0]):
            found = True
        return value

    json.loads(text, parse_float=parse_float)
    return found


@SETTINGS
@given(data=st.data())
def test_register_template_bad_input(env: Env, data: st.DataObject) -> None:
    body = mutate(data.draw, template_body(version="2.0.0"))
    kind, value = env.call("SELECT tasker.register_template($1::text::jsonb)", dump(body))
    if kind == "error":
        # TV021: a value over its size limit (tasker.settings), which the Python loader leaves
        # to the database
        assert value.sqlstate in ("TV010", "TV021"), value
        if value.sqlstate == "TV021":
            return
    if underflows(dump(body)):
        # SQL refuses it where it checks a number (the cases below name the field); the
        # Python loader never sees it
        return
    # the Python loader and the SQL function agree on what is a valid template
    assert (kind == "error") == python_refuses(body), (kind, str(value)[:300], dump(body)[:500])


def with_step_a(**changes: Any) -> dict[str, Any]:
    body = template_body(version="2.0.0")
    body["steps"][0] = {**body["steps"][0], **changes}
    return body


def with_retry(**changes: Any) -> dict[str, Any]:
    body = template_body(version="2.0.0")
    body["steps"][0]["retry"] = {**body["steps"][0]["retry"], **changes}
    return body


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (with_step_a(timeout_seconds=Raw("1e400")), "step 'a': timeout_seconds must be"),
        (
            with_step_a(handler={"callable": "h.a", "colour": 1}),
            "step 'a': unknown key 'colour' in the handler",
        ),
        (with_step_a(timeout_seconds=Raw("1e-400")), "step 'a': timeout_seconds must be"),
        (with_step_a(timeout_seconds=Raw("1e300")), "at most 31536000"),
        (with_step_a(timeout_seconds=Raw("-1e400")), "step 'a': timeout_seconds must be"),
        (with_step_a(timeout_seconds="NaN"), "step 'a': timeout_seconds must be"),
        (with_retry(jitter=Raw("1e-400")), "step 'a': retry.jitter must be a number from 0 to 1"),
        (with_retry(jitter=Raw("1e400")), "step 'a': retry.jitter must be"),
        (with_retry(max_attempts=Raw("1e400")), "step 'a': retry.max_attempts must be"),
        (with_retry(max_attempts=Raw("1" * 30)), "step 'a': retry.max_attempts must be"),
        (with_retry(backoff_base_ms=Raw("1e400")), "step 'a': retry.backoff_base_ms must be"),
        (with_retry(max_backoff_ms=Raw("-1")), "step 'a': retry.max_backoff_ms must be"),
        (with_retry(retryable="yes"), "step 'a': retry.retryable must be true or false"),
        ({**template_body(), "name": HUGE_TEXT}, "template name 'xxxx"),
        ({**template_body(), "metadata": {"owner": Raw("1e400")}}, "metadata holds a number too"),
        (with_step_a(name=HUGE_TEXT), "step #1 has an invalid name 'xxxx"),
        # a JSON true or number reads as the text 'true' / '12' (found by hypothesis)
        (with_step_a(name=True), "step #1 has an invalid name true"),
        (with_step_a(name=12), "step #1 has an invalid name 12"),
        (with_step_a(type=HUGE_TEXT), "step type 'xxxx"),
        (
            with_retry(backoff=None),
            "step 'a': retry.backoff must be exponential, linear, fixed or none",
        ),
        (with_retry(backoff=HUGE_TEXT), "retry.backoff must be"),
        (
            with_step_a(handler={"callable": "h", "initialization": {"k": [Raw("-1e400")]}}),
            "step 'a'",
        ),
        ({**template_body(), "version": None}, "template version null is invalid"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_register_template_refuses_bad_numbers_naming_step_and_field(
    env: Env, body: dict[str, Any], words: str
) -> None:
    error = refused(env.call("SELECT tasker.register_template($1::text::jsonb)", dump(body)))
    assert error.sqlstate == "TV010"
    assert words in str(error), str(error)
    assert len(str(error)) < 1000


# --- semantic versions ------------------------------------------------------------------------


def reference_compare(a: str, b: str) -> int:
    """semver 2.0.0 precedence (section 11), written out rule by rule; -1, 0 or 1."""

    def split(v: str) -> tuple[list[int], list[str] | None]:
        core, _, pre = v.partition("-")
        return [int(x) for x in core.split(".")], (pre.split(".") if pre else None)

    (core_a, pre_a), (core_b, pre_b) = split(a), split(b)
    if core_a != core_b:
        return -1 if core_a < core_b else 1
    if pre_a is None or pre_b is None:  # a release is above its pre-releases
        return (pre_a is None) - (pre_b is None)
    for x, y in zip(pre_a, pre_b, strict=False):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit() != y.isdigit():  # numeric identifiers are below alphanumeric ones
            return -1 if x.isdigit() else 1
        return -1 if x.encode() < y.encode() else 1  # ASCII order
    return (len(pre_a) > len(pre_b)) - (len(pre_a) < len(pre_b))


numeric_ids = st.one_of(
    st.integers(0, 30).map(str),
    st.integers(10**25, 10**30).map(str),  # more digits than an integer or a bigint holds
)
alnum_ids = st.from_regex(r"[0-9]{0,2}[A-Za-z-][0-9A-Za-z-]{0,3}", fullmatch=True)
pre_releases = st.lists(st.one_of(numeric_ids, alnum_ids), min_size=1, max_size=4).map(".".join)


@st.composite
def versions(draw: st.DrawFn) -> str:
    core = ".".join(str(draw(st.integers(0, 3))) for _ in range(3))
    pre = draw(st.none() | pre_releases)
    version = core if pre is None else f"{core}-{pre}"
    return version if len(version) <= 64 else core


SQL_ORDER = """
SELECT v FROM unnest($1::text[]) v
 CROSS JOIN LATERAL (SELECT tasker._semver_parts(v) AS p) x
 ORDER BY (x.p)[1]::integer, (x.p)[2]::integer, (x.p)[3]::integer, (x.p)[4] IS NULL,
          tasker._semver_pre_key((x.p)[4]), v
"""


@SETTINGS
@given(vs=st.lists(versions(), min_size=2, max_size=8, unique=True))
@example(vs=["1.0.0-rc.10", "1.0.0-rc.9", "1.0.0-rc.1a", "1.0.0", "1.0.0-rc"])
@example(vs=["1.0.0-" + "9" * 30, "1.0.0-" + "1" + "0" * 30, "1.0.0-" + "9" * 29])
@example(vs=["1.0.0-a", "1.0.0-B", "1.0.0-a.b", "1.0.0--", "1.0.0-0", "1.0.0-a-"])
@example(
    vs=[
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
    ]
)
def test_semver_order_sql_python_and_reference_agree(env: Env, vs: list[str]) -> None:
    expected = sorted(vs, key=functools.cmp_to_key(reference_compare))
    assert sorted(vs, key=lambda v: parse_version(v) or ()) == expected
    _, rows = env.call(SQL_ORDER, vs)
    assert [r["v"] for r in rows] == expected
    # the key orders the same under a linguistic collation (where 'a' < 'B')
    _, icu = env.call("SELECT count(*) AS n FROM pg_collation WHERE collname = 'und-x-icu'")
    if icu[0]["n"]:
        collated = SQL_ORDER.replace(
            "tasker._semver_pre_key((x.p)[4])",
            'tasker._semver_pre_key((x.p)[4]) COLLATE "und-x-icu"',
        )
        _, rows = env.call(collated, vs)
        assert [r["v"] for r in rows] == expected


invalid_versions = st.one_of(
    st.text(alphabet="0123456789.-+abZ", max_size=20),
    st.builds(lambda pre: f"1.0.0-{pre}", st.text(alphabet="0123456789.-aZ_", max_size=12)),
)


@SETTINGS
@given(version=st.one_of(invalid_versions, versions()))
@example(version="1.0.0-01")
@example(version="1.0.0-")
@example(version="1.0.0-a..b")
@example(version="1.0.0-a.")
@example(version="1.0.0-.a")
@example(version="1.0.0+build")
@example(version="2147483648.0.0")
@example(version="1.0.0-" + "1" * 30)
@example(version="1.0.0-0a")
def test_semver_validity_sql_and_python_agree(env: Env, version: str) -> None:
    python_ok = parse_version(version) is not None
    _, rows = env.call("SELECT tasker._semver_parts($1) IS NOT NULL AS ok", version)
    assert rows[0]["ok"] == python_ok, version
    body = template_body(version=version, name="semver")
    kind, value = env.call("SELECT tasker.register_template($1::text::jsonb)", dump(body))
    assert (kind == "ok") == python_ok, (version, value)
    if not python_ok:
        assert "version" in str(value) and "is invalid" in str(value)


def test_newest_version_is_picked_by_semver_precedence(env: Env) -> None:
    async def newest() -> str:
        raw = env.conn.raw
        async with raw.transaction():
            for v in ["1.0.0-" + "9" * 25, "1.0.0-" + "1" + "0" * 25, "1.0.0-B", "1.0.0-a"]:
                await raw.fetchval(
                    "SELECT tasker.register_template($1::text::jsonb)",
                    dump(template_body(version=v, name="pick")),
                )
            task = await raw.fetchval("SELECT tasker.create_task($1, 'pick')", NS)
            version = await raw.fetchval(
                "SELECT version FROM tasker.tasks WHERE task_uuid = $1", task
            )
            try:
                await raw.fetchval("SELECT tasker.create_task($1, 'pick', '{}', '9.9.9')", NS)
            except asyncpg.PostgresError as exc:
                listed = str(exc)
            raise _Rollback(version, listed)

    with pytest.raises(_Rollback) as caught:
        env.run(newest())
    version, listed = caught.value.args
    # alphanumeric identifiers are above numeric ones, and 'a' > 'B' in ASCII
    assert version == "1.0.0-a"
    assert listed.endswith(
        f"(registered versions: 1.0.0-{'9' * 25}, 1.0.0-1{'0' * 25}, 1.0.0-B, 1.0.0-a)"
    )


class _Rollback(Exception):
    pass


# --- ancestors --------------------------------------------------------------------------------


def chain(n: int, *, reverse: bool = False) -> dict[str, Any]:
    steps = [
        {"name": f"s{i}", "handler": {"callable": "h"}, "dependencies": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]
    if reverse:
        steps.reverse()
    return {"name": "chain", "namespace_name": NS, "version": "1.0.0", "steps": steps}


@pytest.mark.parametrize("reverse", [False, True])
def test_a_1000_step_chain_registers_with_its_ancestors(env: Env, reverse: bool) -> None:
    async def ancestors() -> dict[str, list[str]]:
        raw = env.conn.raw
        async with raw.transaction():
            tpl = await raw.fetchval(
                "SELECT tasker.register_template($1::text::jsonb)",
                dump(chain(1000, reverse=reverse)),
            )
            rows = await raw.fetch(
                "SELECT name, ancestor_names, parent_names FROM tasker.named_steps"
                " WHERE named_task_id = $1",
                tpl,
            )
            raise _Rollback({r["name"]: (r["ancestor_names"], r["parent_names"]) for r in rows})

    with pytest.raises(_Rollback) as caught:
        env.run(ancestors())
    steps = caught.value.args[0]
    assert len(steps) == 1000
    for i in (0, 1, 2, 500, 999):
        names, parents = steps[f"s{i}"]
        assert sorted(names) == sorted(f"s{j}" for j in range(i))
        assert parents == ([f"s{i - 1}"] if i else [])


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    size = draw(st.integers(1, 25))
    order = draw(st.permutations(list(range(size))))  # declared order differs from the DAG order
    deps = {
        f"n{i}": [f"n{j}" for j in draw(st.lists(st.integers(0, i - 1), unique=True, max_size=4))]
        if i
        else []
        for i in range(size)
    }
    return {f"n{i}": deps[f"n{i}"] for i in order}


STEP_TYPES = [
    "standard",
    "decision",
    "batchable",
    "batch_worker",
    "deferred_convergence",
    "wait_for_event",
    "sleep",
]
# what each wait type needs instead of a handler
WAIT_SETTINGS: dict[str, dict[str, Any]] = {
    "wait_for_event": {"event": "approval", "key": "$.order_id"},
    "sleep": {"duration_seconds": 30},
}


@SETTINGS
@given(deps=dags(), cycle=st.booleans(), typed=st.booleans(), data=st.data())
def test_ancestors_and_cycles_match_the_python_model(
    env: Env, deps: dict[str, list[str]], cycle: bool, typed: bool, data: st.DataObject
) -> None:
    """SQL and the Python loader give the same verdict on random DAGs, their steps of random
    types when `typed` (mostly refused by the step-type rules: both name the same first
    problem), and store the same ancestors, body and dynamic steps when they accept."""
    types = {n: data.draw(st.sampled_from(STEP_TYPES)) if typed else "standard" for n in deps}
    if cycle:
        # make some step depend on one of its descendants (or itself for a one-step template)
        pairs = sorted(
            (a, d) for d in deps for a in TaskTemplate.from_dict(body_of(deps)).ancestors(d)
        )
        if not pairs:
            return
        ancestor, descendant = data.draw(st.sampled_from(pairs))
        deps = {**deps, ancestor: [*deps[ancestor], descendant]}
    body = body_of(deps, types)

    async def registered() -> dict[str, list[str]]:
        raw = env.conn.raw
        async with raw.transaction():
            tpl = await raw.fetchval("SELECT tasker.register_template($1::text::jsonb)", dump(body))
            rows = await raw.fetch(
                "SELECT name, ancestor_names, is_dynamic FROM tasker.named_steps"
                " WHERE named_task_id = $1",
                tpl,
            )
            stored = await raw.fetchval(
                "SELECT template::text FROM tasker.named_tasks WHERE named_task_id = $1", tpl
            )
            raise _Rollback(
                {r["name"]: r["ancestor_names"] for r in rows},
                {r["name"] for r in rows if r["is_dynamic"]},
                json.loads(stored),
            )

    if cycle:
        error = refused(env.call("SELECT tasker.register_template($1::text::jsonb)", dump(body)))
        assert "dependency cycle" in str(error)
        path = re.search(r"dependency cycle (.*)$", str(error))
        assert path is not None
        names = path.group(1).split(" -> ")
        assert names[0] == names[-1] and len(names) == len(set(names)) + 1
        for child, parent in itertools.pairwise(names):
            assert parent in deps[child], f"{child} -> {parent} is not an edge"
        assert python_refuses(body)
        return
    try:
        model = TaskTemplate.from_dict(body)
    except TemplateValidationError as refusal:
        assert typed
        error = refused(env.call("SELECT tasker.register_template($1::text::jsonb)", dump(body)))
        assert error.sqlstate == "TV010"
        # Python lists every problem ("steps[i] (name): step 'name': ..."), SQL the first
        first = refusal.problems[0].split(": ", 1)[1]
        assert str(error).endswith(first), (str(error), refusal.problems)
        return
    with pytest.raises(_Rollback) as caught:
        env.run(registered())
    ancestors, dynamic, stored = caught.value.args
    assert {k: sorted(v) for k, v in ancestors.items()} == {
        name: sorted(model.ancestors(name)) for name in deps
    }
    assert dynamic == set(model.dynamic_steps)
    assert stored == model.to_json()


def body_of(deps: dict[str, list[str]], types: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": "dag",
        "namespace_name": NS,
        "version": "1.0.0",
        "steps": [_step_of(n, d, (types or {}).get(n, "standard")) for n, d in deps.items()],
    }


def _step_of(name: str, deps: list[str], type_: str) -> dict[str, Any]:
    """A step of `type_`: a handler, or the settings of a wait type (which has none)."""
    step: dict[str, Any] = {"name": name, "dependencies": deps, "type": type_}
    if type_ in WAIT_SETTINGS:
        step.update(WAIT_SETTINGS[type_])
    else:
        step["handler"] = {"callable": "h"}
    return step


# --- create_task, create_or_get_task, create_tasks ----------------------------------------------

GOOD_OPTIONS = {
    "initiator": "tests",
    "source_system": "ci",
    "reason": "bad input",
    "tags": ["a"],
    "priority": 5,
    "idempotency_key": "k1",
    "correlation_id": "c1",
    "delay_seconds": 1.5,
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


@pytest.mark.parametrize("fn", ["create_task", "create_or_get_task", "create_tasks"])
@pytest.mark.parametrize(
    "options",
    [
        {"delay_seconds": Raw("1e-400")},
        {"delay_seconds": Raw("1e400")},
        {"delay_seconds": Raw("-1e-400")},
        {"priority": Raw("1e400")},
        {"priority": Raw("2147483648")},
        {"priority": 2.5},
    ],
    ids=dump,
)
def test_create_refuses_option_numbers_it_cannot_store(
    env: Env, fn: str, options: dict[str, Any]
) -> None:
    context = "'[{}]'" if fn == "create_tasks" else "'{}'"
    sql = f"SELECT * FROM tasker.{fn}($1, 'flow', {context}::jsonb, NULL, $2::text::jsonb)"
    error = refused(env.call(sql, NS, dump(options)))
    assert error.sqlstate == "TV022"
    assert f"option {next(iter(options))} must be" in str(error)


@SETTINGS
@given(data=st.data(), fn=st.sampled_from(["create_task", "create_or_get_task"]))
def test_create_task_bad_input(env: Env, data: st.DataObject, fn: str) -> None:
    which = data.draw(st.sampled_from(["context", "options", "names"]))
    context: Any = {"order": 1}
    options: Any = GOOD_OPTIONS
    namespace, name, version = NS, "flow", None
    if which == "context":
        context = mutate(data.draw, {"order": 1, "items": [1, 2]})
    elif which == "options":
        options = mutate(data.draw, GOOD_OPTIONS)
    else:
        namespace = data.draw(st.sampled_from([NS, "", "Bad NS", "x" * 300, "nope"]))
        name = data.draw(st.sampled_from(["flow", "", "x" * 300]))
        version = data.draw(st.sampled_from([None, "", "1.0.0", "9.9.9", "x" * 300]))
    env.call(
        f"SELECT * FROM tasker.{fn}($1, $2, $3::text::jsonb, $4, $5::text::jsonb)",
        namespace,
        name,
        None if context is None else dump(context),
        version,
        None if options is None else dump(options),
    )


@SETTINGS
@given(data=st.data())
def test_create_tasks_bad_input(env: Env, data: st.DataObject) -> None:
    contexts: Any = [{"n": 1}, {"n": 2}]
    options: Any = {"priority": 1}
    which = data.draw(st.sampled_from(["contexts", "options", "per_task_options"]))
    if which == "contexts":
        contexts = mutate(data.draw, contexts)
    elif which == "options":
        options = mutate(data.draw, {"priority": 1, "delay_seconds": 2, "tags": ["x"]})
    else:
        options = mutate(data.draw, [{"idempotency_key": "a"}, {"idempotency_key": "b"}])
    env.call(
        "SELECT * FROM tasker.create_tasks($1, 'flow', $2::text::jsonb, NULL, $3::text::jsonb)",
        NS,
        None if contexts is None else dump(contexts),
        None if options is None else dump(options),
    )


# --- claims and outcomes ----------------------------------------------------------------------


@SETTINGS
@given(
    qty=st.sampled_from([-1, 0, 1, 2**31 - 1, None]),
    lease=st.sampled_from([-1.0, 0.0, 1e-300, 30.0, 1e300, float("inf"), float("nan"), None]),
    queue=st.sampled_from([NS, "", "x" * 300, "nope", None]),
)
@example(qty=1, lease=1e300, queue=NS)
@example(qty=1, lease=float("nan"), queue=NS)
def test_claim_steps_bad_input(
    env: Env, qty: int | None, lease: float | None, queue: str | None
) -> None:
    kind, _ = env.call("SELECT * FROM tasker.claim_steps($1, 'w2', $2, $3)", queue, qty, lease)
    if qty is None or qty < 1 or lease is None or not 0 < lease <= 31536000:
        assert kind == "error"


def outcome(env: Env) -> dict[str, Any]:
    return {
        **env.claim,
        "kind": "success",
        "result": {"ok": True},
        "metadata": {"m": 1},
        "duration_ms": 12.5,
        "worker_id": "w1",
    }


def failure(env: Env) -> dict[str, Any]:
    return {
        **env.claim,
        "kind": "failure",
        "error": {"message": "boom", "retryable": True, "retry_after": 1.5},
        "duration_ms": 1,
    }


@pytest.mark.parametrize(
    "change",
    [
        {"duration_ms": Raw("1e-400")},
        {"duration_ms": Raw("1e400")},
        {"kind": "failure", "error": {"message": "x", "retry_after": Raw("1e-400")}},
        {"attempt": Raw("1e400")},
        {"claim_seq": Raw("123456789012345678901234567890")},
    ],
    ids=dump,
)
def test_complete_steps_refuses_numbers_it_cannot_store(env: Env, change: dict[str, Any]) -> None:
    batch = [{**outcome(env), **change}]
    error = refused(env.call("SELECT * FROM tasker.complete_steps($1::text::jsonb)", dump(batch)))
    assert error.sqlstate == "TV030"


@SETTINGS
@given(data=st.data())
def test_complete_steps_bad_input(env: Env, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([outcome(env), failure(env)]))
    batch = mutate(data.draw, [base, {**base, "step_uuid": str(uuid.uuid4())}])
    env.call("SELECT * FROM tasker.complete_steps($1::text::jsonb)", dump(batch))


@SETTINGS
@given(
    data=st.data(),
    fn=st.sampled_from(["extend_leases", "release_steps"]),
    lease=st.sampled_from([30.0, -1.0, 0.0, 1e300, float("nan"), float("inf"), None]),
)
def test_extend_and_release_bad_input(
    env: Env, data: st.DataObject, fn: str, lease: float | None
) -> None:
    claims = mutate(data.draw, [env.claim, {**env.claim, "step_uuid": str(uuid.uuid4())}])
    if fn == "extend_leases":
        kind, _ = env.call(
            "SELECT * FROM tasker.extend_leases($1::text::jsonb, $2)", dump(claims), lease
        )
        if lease is None or not 0 < lease <= 31536000:
            assert kind == "error"
    else:
        env.call("SELECT * FROM tasker.release_steps($1::text::jsonb)", dump(claims))


# --- queue calls (a plain queue, not an engine one) -------------------------------------------

QUEUE_CALLS = {
    "send": "SELECT tasker.send('plain', '{}'::jsonb, $1)",
    "send_batch": "SELECT tasker.send_batch('plain', ARRAY['{}'::jsonb], $1)",
    "read": "SELECT * FROM tasker.read('plain', $1, 1)",
    "set_vt": "SELECT * FROM tasker.set_vt('plain', 1, $1)",
}


@pytest.mark.parametrize("fn", sorted(QUEUE_CALLS))
@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 1e300, 31536001.0, -1.0, None])
def test_queue_calls_refuse_seconds_an_interval_cannot_hold(
    env: Env, fn: str, seconds: float | None
) -> None:
    # before: NaN, infinity and 1e300 failed deep inside with 22008 ("interval out of range",
    # "timestamp out of range")
    error = refused(env.call(QUEUE_CALLS[fn], seconds))
    assert error.sqlstate == "TV002"
    assert "seconds must be a number of seconds from 0 to 31536000" in str(error)


# --- operator calls ---------------------------------------------------------------------------


@SETTINGS
@given(
    fn=st.sampled_from(["retry_step", "resolve_step", "cancel_task"]),
    target=st.sampled_from(["random", "claimed", "pending", "task", "null"]),
    payload=st.sampled_from([None, {}, {"ok": 1}, [1], "x", Raw("1e400"), HUGE_TEXT]),
)
def test_operator_calls_bad_input(env: Env, fn: str, target: str, payload: Any) -> None:
    ids = {
        "random": uuid.uuid4(),
        "claimed": uuid.UUID(env.claim["step_uuid"]),
        "pending": env.step_b,
        "task": env.task,
        "null": None,
    }
    if fn == "retry_step":
        kind, _ = env.call("SELECT tasker.retry_step($1)", ids[target])
        assert kind == "error"  # no step here is in error
    elif fn == "resolve_step":
        env.call(
            "SELECT tasker.resolve_step($1, $2::text::jsonb)",
            ids[target],
            None if payload is None else dump(payload),
        )
    else:
        reason = payload if isinstance(payload, str) else None
        env.call("SELECT tasker.cancel_task($1, $2)", ids[target], reason)
