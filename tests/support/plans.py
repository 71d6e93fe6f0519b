"""The plans the engine's own SQL functions run, collected while they run.

A plpgsql function cannot be EXPLAINed from outside (EXPLAIN of `SELECT f(...)` shows one
Function Scan). `collect_plans(conn)` loads the `auto_explain` module into the session and
makes it log the plan of every statement, nested ones included, as a JSON LOG message sent to
the client; the context manager gathers them into a `PlanLog`. The plans are the ones the
statements really executed with (generic or custom, as plan_cache_mode chose in the function).

    async with collect_plans(conn) as log:
        await conn.claim_steps(...)
    [claim] = log.executions("locked_steps AS MATERIALIZED")  # the statement with this text
    assert "steps_pkey" in claim.indexes()

`problems(log, expected, big_tables=...)` checks a set of statements at once and returns what
is wrong in words (an empty list when nothing is).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from tasker_pg import db

SETTINGS = {
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_analyze": "off",
    # VERBOSE shows every expression, so a parameter ($n) shows wherever the plan uses one
    "auto_explain.log_verbose": "on",
    "auto_explain.log_format": "json",
    "auto_explain.log_level": "log",
    "client_min_messages": "log",
}

# A parameter reference in a plan: how a generic plan shows a plpgsql variable or argument.
_PARAM = re.compile(r"\$\d+")


def squash(text: str) -> str:
    """`text` with every run of white space folded into one space."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class StatementPlan:
    """One executed statement: its text (as the function holds it) and its plan tree."""

    query: str
    plan: Mapping[str, Any]

    def nodes(self) -> Iterator[Mapping[str, Any]]:
        """Every node of the plan, depth first (init plans and sub plans included)."""
        todo = [self.plan]
        while todo:
            node = todo.pop()
            yield node
            todo.extend(reversed(node.get("Plans", [])))

    def seq_scanned(self) -> set[str]:
        """Relations read by a Seq Scan."""
        return {n["Relation Name"] for n in self.nodes() if n["Node Type"] == "Seq Scan"}

    def indexes(self) -> set[str]:
        """Indexes the plan scans (Index Scan, Index Only Scan, Bitmap Index Scan)."""
        return {n["Index Name"] for n in self.nodes() if "Index Name" in n}

    def is_generic(self) -> bool:
        """True when the plan refers to the statement's parameters (the function's arguments
        and variables) instead of their values in this call. An init plan's result shows as a
        parameter too (before PostgreSQL 17), declared in its node's name ("InitPlan 1
        (returns $0)"): those are not counted."""
        declared = {p for n in self.nodes() for p in _PARAM.findall(n.get("Subplan Name", ""))}
        return bool(set(_PARAM.findall(json.dumps(self.plan))) - declared)

    def describe(self) -> str:
        """The statement's first words and its scans, for failure messages."""
        scans = sorted(
            f"{n['Node Type']} {n.get('Index Name') or n.get('Relation Name', '')}".strip()
            for n in self.nodes()
            if "Scan" in n["Node Type"]
        )
        return f"{squash(self.query)[:80]!r}: {', '.join(scans)}"


@dataclass
class PlanLog:
    """The statement plans auto_explain reported, in execution order."""

    statements: list[StatementPlan] = field(default_factory=list)

    def matching(self, fragment: str) -> list[StatementPlan]:
        """Every executed statement whose text contains `fragment` (white space folded)."""
        wanted = squash(fragment)
        return [s for s in self.statements if wanted in squash(s.query)]

    def executions(self, fragment: str) -> list[StatementPlan]:
        """Every execution of the statement whose text contains `fragment`: it must have run,
        and exactly one distinct statement text may contain the fragment."""
        found = self.matching(fragment)
        texts = {squash(s.query) for s in found}
        seen = "\n".join(f"  {squash(s.query)[:100]}" for s in self.statements)
        assert found, f"no executed statement contains {fragment!r}; statements seen:\n{seen}"
        assert len(texts) == 1, f"{len(texts)} different statements contain {fragment!r}"
        return found

    def _add(self, message: str) -> None:
        # "duration: 0.030 ms  plan:\n{...}"; other LOG messages are not plans
        head, _, body = message.partition("plan:")
        if not body or "duration:" not in head:
            return
        explained = json.loads(body)
        self.statements.append(StatementPlan(explained["Query Text"], explained["Plan"]))


async def require_auto_explain(conn: db.Connection) -> None:
    """LOAD auto_explain into `conn`'s session, or skip the test when the server has none
    (plan fixtures call it before seeding, so a server without it skips at once)."""
    try:
        await conn.raw.execute("LOAD 'auto_explain'")
    except asyncpg.UndefinedFileError as exc:  # a server built without contrib modules
        pytest.skip(f"this PostgreSQL ships no auto_explain module, which plan tests need: {exc}")


@contextlib.asynccontextmanager
async def collect_plans(conn: db.Connection) -> AsyncIterator[PlanLog]:
    """Log the plan of every statement `conn` runs inside the block into the yielded PlanLog.

    Needs a superuser session (LOAD of a module that is not in session_preload_libraries).
    """
    log = PlanLog()
    raw: asyncpg.Connection = conn.raw

    def on_log(_conn: object, message: Any) -> None:
        if getattr(message, "severity_en", None) == "LOG":
            log._add(str(message.message))

    await require_auto_explain(conn)
    for name, value in SETTINGS.items():
        await raw.execute(f"SET {name} = {value}")
    raw.add_log_listener(on_log)
    try:
        yield log
    finally:
        # The server sends a statement's LOG messages before its result, and asyncpg
        # schedules the listener calls (loop.call_soon) as they arrive: the block's calls have
        # all run by the time its last statement returned.
        raw.remove_log_listener(on_log)
        for name in reversed(SETTINGS):
            await raw.execute(f"RESET {name}")


@dataclass(frozen=True)
class Expected:
    """What one statement of a function must look like: the fragment that identifies it, and
    the indexes its plan must scan."""

    fragment: str
    indexes: frozenset[str]

    @classmethod
    def of(cls, fragment: str, *indexes: str) -> Expected:
        return cls(fragment, frozenset(indexes))


def problems(
    log: PlanLog,
    expected: Mapping[str, Expected],
    *,
    big_tables: Iterable[str],
    big_prefixes: Iterable[str] = (),
    generic: bool | None = None,
) -> list[str]:
    """What is wrong with the logged plans, in words: an expected statement that never ran
    (or whose fragment is found in more than one statement), that ran with different plans,
    that does not scan every index it should, or whose plan is not generic (`generic` True) or
    not custom (False); and any logged statement, expected or not, that reads one of
    `big_tables` (or a relation whose name starts with one of `big_prefixes`) by a sequential
    scan."""
    found: list[str] = []
    for name, want in expected.items():
        try:
            runs = log.executions(want.fragment)
        except AssertionError as exc:
            found.append(f"{name}: {exc}")
            continue
        distinct = list({json.dumps(r.plan, sort_keys=True): r for r in runs}.values())
        if len(distinct) > 1:
            found.append(f"{name}: {len(runs)} executions ran with {len(distinct)} plans")
        for stmt in distinct:
            missing = sorted(want.indexes - stmt.indexes())
            if missing:
                found.append(f"{name}: no scan of {missing} in {stmt.describe()}")
            if generic is not None and stmt.is_generic() != generic:
                kind = "generic" if generic else "custom"
                found.append(f"{name}: not a {kind} plan: {stmt.describe()}")
    big = set(big_tables)
    prefixes = tuple(big_prefixes)
    for stmt in log.statements:
        for rel in sorted(stmt.seq_scanned()):
            if rel in big or rel.startswith(prefixes):
                found.append(f"Seq Scan on {rel}: {stmt.describe()}")
    return sorted(set(found))


async def partition_index(conn: db.Connection, parent_index: str, partition: str) -> str:
    """The name of `partition`'s index attached to the partitioned index `parent_index`
    (both schema-qualified)."""
    name = await conn.fetchval(
        """
        SELECT c.relname
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_index x ON x.indexrelid = c.oid
         WHERE i.inhparent = $1::regclass AND x.indrelid = $2::regclass
        """,
        parent_index,
        partition,
    )
    assert name is not None, f"{partition} has no index attached to {parent_index}"
    return str(name)
