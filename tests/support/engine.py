"""Shared helpers for the SQL workflow-engine tests (flows, concurrency).

Stable API (other test modules import it; extend it, do not change what is here):

Templates (canonical JSON bodies built through `TaskTemplate`, ready for `register_template`):
  `template(name, steps, *, namespace=NAMESPACE, version="1.0.0", retry=None)`
  `step(name, *deps, retry=None, handler=None, **extra)` -> one step dict
  `single(**kw)`, `linear(n=4, **kw)`, `diamond(**kw)`, `tree(**kw)`, `mixed(**kw)`
      each takes `namespace`, `name`, `version`, `retry` (a retry dict applied to every step).
      Step names: single: `only`; linear: `s1`..`sN`; diamond: start, b, c, end;
      tree: root, a, b, a1, a2, b1, b2, end; mixed: init, left, right, validate, transform,
      analyze, finalize.
  `parents_of(tpl)` -> {step: [parents]}, `ancestors_of(tpl, name)` -> set of step names.

Database shortcuts (all take a `db.Connection`):
  `start(conn, tpl, context=None, **options)` -> task uuid (registers the template first)
  `claim(conn, queue=NAMESPACE, *, qty=100, lease=30.0, worker="w1")` -> claim rows
  `wait_for_claim(conn, queue=NAMESPACE, *, deadline=5.0, qty=100, lease=30.0, worker="w1")`
      polls (no fixed sleep) until a claim returns rows; AssertionError at the deadline
  `complete(conn, *outcomes)` -> {step_uuid: result row of complete_steps}
  `success(row, result=None, *, worker="w1", **extra)`, `failure(row, message="boom", *,
      retryable=True, retry_after=None, error_type="RuntimeError", worker="w1", **error_extra)`,
      `checkpoint(row, cursor, items_processed=0, accumulated_results=None, *, worker="w1")`
      -> outcome dicts fenced by the claim row's step_uuid/attempt/claim_seq
  `readiness(conn, task)` -> {step name: step_readiness row}
  `ready_names(conn, task)` -> set of step names step_readiness calls ready
  `step_row(conn, task, name)`, `task_row(conn, task)` -> rows of tasker.steps / tasker.tasks
  `step_states(conn, task)` -> {step name: state}
  `transitions(conn, step_uuid)` -> step_transitions rows in order
  `message_count(conn, task=None)` -> live queue messages (of a task, or in total)
  `drive(conn, queue, handler_fn, *, worker="driver", qty=100, lease=30.0, settle=0.0,
      max_rounds=1000, allow_stale=False, on_round=None)` -> DriveLog: claims everything
      ready, asks `handler_fn(row)` for each outcome (an outcome dict from the builders above,
      or a plain JSON value = success result, None = default result), completes the round in
      one call, loops until nothing is claimable (polling up to `settle` seconds first)
  `assert_healthy(conn)` -> asserts `tasker.check_invariants()` returns no rows

Claim rows are asyncpg Records: index them by column name (`row["step_name"]`, `row["attempt"]`,
`row["claim_seq"]`, `row["dependency_results"]`, ...), as `tasker.claim_steps` names them.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tasker_pg import db
from tasker_pg.template import TaskTemplate

NAMESPACE = "flows"
"""Default namespace (and so queue) of the templates built here."""

Row = Mapping[str, Any]
Template = dict[str, Any]


# --- templates --------------------------------------------------------------------------------


def step(
    name: str,
    *deps: str,
    retry: Mapping[str, Any] | None = None,
    handler: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One raw step dict: handler `handlers.<name>` unless given, dependencies `deps`."""
    raw: dict[str, Any] = {
        "name": name,
        "handler": {"callable": handler or f"handlers.{name}", "initialization": {"step": name}},
        "dependencies": list(deps),
    }
    if retry is not None:
        raw["retry"] = dict(retry)
    raw.update(extra)
    return raw


def template(
    name: str,
    steps: Iterable[Mapping[str, Any]],
    *,
    namespace: str = NAMESPACE,
    version: str = "1.0.0",
    retry: Mapping[str, Any] | None = None,
) -> Template:
    """A canonical template body, validated by the Python model (`TaskTemplate.to_json`).

    `retry` is applied to every step that does not set its own.
    """
    raw_steps = []
    for s in steps:
        s = dict(s)
        if retry is not None and "retry" not in s:
            s["retry"] = dict(retry)
        raw_steps.append(s)
    raw = {"name": name, "namespace_name": namespace, "version": version, "steps": raw_steps}
    return TaskTemplate.from_dict(raw).to_json()


def single(*, name: str = "single", **kw: Any) -> Template:
    """One step, `only`."""
    return template(name, [step("only")], **kw)


def linear(n: int = 4, *, name: str = "linear", **kw: Any) -> Template:
    """A chain s1 -> s2 -> ... -> sN."""
    steps = [step("s1")] + [step(f"s{i}", f"s{i - 1}") for i in range(2, n + 1)]
    return template(name, steps, **kw)


def diamond(*, name: str = "diamond", **kw: Any) -> Template:
    """start -> b, c -> end."""
    steps = [step("start"), step("b", "start"), step("c", "start"), step("end", "b", "c")]
    return template(name, steps, **kw)


def tree(*, name: str = "tree", **kw: Any) -> Template:
    """root -> a, b; a -> a1, a2; b -> b1, b2; a1, a2, b1, b2 -> end (8 steps)."""
    steps = [
        step("root"),
        step("a", "root"),
        step("b", "root"),
        step("a1", "a"),
        step("a2", "a"),
        step("b1", "b"),
        step("b2", "b"),
        step("end", "a1", "a2", "b1", "b2"),
    ]
    return template(name, steps, **kw)


def mixed(*, name: str = "mixed", **kw: Any) -> Template:
    """init -> left, right; left, right -> validate; left -> transform; right -> analyze;
    validate, transform, analyze -> finalize."""
    steps = [
        step("init"),
        step("left", "init"),
        step("right", "init"),
        step("validate", "left", "right"),
        step("transform", "left"),
        step("analyze", "right"),
        step("finalize", "validate", "transform", "analyze"),
    ]
    return template(name, steps, **kw)


def parents_of(tpl: Mapping[str, Any]) -> dict[str, list[str]]:
    """{step name: its direct dependencies} of a canonical template body."""
    return {s["name"]: list(s["dependencies"]) for s in tpl["steps"]}


def ancestors_of(tpl: Mapping[str, Any], name: str) -> set[str]:
    """Every transitive dependency of step `name`."""
    parents = parents_of(tpl)
    seen: set[str] = set()
    todo = list(parents[name])
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(parents[p])
    return seen


# --- database shortcuts -----------------------------------------------------------------------


async def start(
    conn: db.Connection,
    tpl: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
    **options: Any,
) -> uuid.UUID:
    """Register `tpl` (a no-op when already registered) and create a task from it."""
    await conn.register_template(tpl)
    return await conn.create_task(
        tpl["namespace_name"], tpl["name"], context or {}, version=tpl["version"], options=options
    )


async def create_many(
    conn: db.Connection, tpl: Mapping[str, Any], contexts: list[dict[str, Any]]
) -> list[uuid.UUID]:
    """Register `tpl` (a no-op when already registered) and create one task per context in one
    `create_tasks` call; their uuids in order."""
    await conn.register_template(tpl)
    return list(
        await conn.create_tasks(
            tpl["namespace_name"], tpl["name"], contexts, version=tpl["version"]
        )
    )


async def claim(
    conn: db.Connection,
    queue: str = NAMESPACE,
    *,
    qty: int = 100,
    lease: float = 30.0,
    worker: str = "w1",
    since: datetime.datetime | None = None,
) -> list[Row]:
    """One `claim_steps` call (with a claim window when `since` is given)."""
    return await conn.claim_step_rows(queue, worker, qty, lease, visible_since=since)


async def wait_for_claim(
    conn: db.Connection,
    queue: str = NAMESPACE,
    *,
    deadline: float = 5.0,
    qty: int = 100,
    lease: float = 30.0,
    worker: str = "w1",
    interval: float = 0.02,
) -> list[Row]:
    """Claim until something comes back (polling with a deadline, never a fixed sleep)."""
    end = time.monotonic() + deadline
    while True:
        rows = await claim(conn, queue, qty=qty, lease=lease, worker=worker)
        if rows:
            return rows
        if time.monotonic() >= end:
            raise AssertionError(f"nothing became claimable in queue {queue} within {deadline}s")
        await asyncio.sleep(interval)


def _fence(row: Row, kind: str, worker: str) -> dict[str, Any]:
    return {
        "step_uuid": str(row["step_uuid"]),
        "attempt": row["attempt"],
        "claim_seq": row["claim_seq"],
        "kind": kind,
        "worker_id": worker,
        "duration_ms": 1.5,
    }


def success(row: Row, result: Any = None, *, worker: str = "w1", **extra: Any) -> dict[str, Any]:
    """A success outcome for claim `row` (result defaults to {"step": name}); `extra` keys
    (e.g. metadata) go into the outcome."""
    out = _fence(row, "success", worker)
    out["result"] = {"step": row["step_name"]} if result is None else result
    out.update(extra)
    return out


def failure(
    row: Row,
    message: str = "boom",
    *,
    retryable: bool = True,
    retry_after: float | None = None,
    error_type: str = "RuntimeError",
    worker: str = "w1",
    **extra: Any,
) -> dict[str, Any]:
    """A failure outcome for claim `row`; `extra` keys (context, traceback...) go into the
    error object."""
    out = _fence(row, "failure", worker)
    error: dict[str, Any] = {
        "message": message,
        "error_type": error_type,
        "error_code": error_type.lower(),
        "retryable": retryable,
    }
    if retry_after is not None:
        error["retry_after"] = retry_after
    error.update(extra)
    out["error"] = error
    return out


def checkpoint(
    row: Row,
    cursor: Any,
    items_processed: int = 0,
    accumulated_results: Any = None,
    *,
    worker: str = "w1",
) -> dict[str, Any]:
    """A checkpoint outcome for claim `row`."""
    out = _fence(row, "checkpoint", worker)
    out["checkpoint"] = {
        "cursor": cursor,
        "items_processed": items_processed,
        "accumulated_results": accumulated_results,
    }
    return out


async def complete(conn: db.Connection, *outcomes: Mapping[str, Any]) -> dict[str, Row]:
    """One `complete_steps` call; its answer keyed by step uuid (str)."""
    rows = await conn.complete_steps(list(outcomes))
    return {str(r["step_uuid"]): r for r in rows}


async def readiness(conn: db.Connection, task: uuid.UUID | str) -> dict[str, Row]:
    """`step_readiness(task)` keyed by step name."""
    return {r["name"]: r for r in await conn.step_readiness(task)}


async def ready_names(conn: db.Connection, task: uuid.UUID | str) -> set[str]:
    """Names of the steps `step_readiness` calls ready."""
    return {name for name, r in (await readiness(conn, task)).items() if r["ready"]}


async def step_row(conn: db.Connection, task: uuid.UUID | str, name: str) -> Row:
    """The tasker.steps row of step `name` of `task`."""
    row = await conn.fetchrow(
        "SELECT * FROM tasker.steps WHERE task_uuid = $1::uuid AND name = $2", str(task), name
    )
    assert row is not None, f"task {task} has no step {name!r}"
    return row


async def task_row(conn: db.Connection, task: uuid.UUID | str) -> Row:
    """The tasker.tasks row of `task`."""
    row = await conn.fetchrow("SELECT * FROM tasker.tasks WHERE task_uuid = $1::uuid", str(task))
    assert row is not None, f"no task {task}"
    return row


async def step_states(conn: db.Connection, task: uuid.UUID | str) -> dict[str, str]:
    """{step name: state} of `task`."""
    rows = await conn.fetch(
        "SELECT name, state FROM tasker.steps WHERE task_uuid = $1::uuid", str(task)
    )
    return {r["name"]: r["state"] for r in rows}


async def transitions(conn: db.Connection, step_uuid: uuid.UUID | str) -> list[Row]:
    """The step's audit rows, oldest first."""
    return await conn.fetch(
        "SELECT * FROM tasker.step_transitions WHERE step_uuid = $1::uuid ORDER BY transition_id",
        str(step_uuid),
    )


async def message_count(conn: db.Connection, task: uuid.UUID | str | None = None) -> int:
    """Live queue messages of `task` (all of them when None)."""
    if task is None:
        return int(await conn.fetchval("SELECT count(*) FROM tasker.queue_messages"))
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM tasker.queue_messages WHERE message->>'task_uuid' = $1",
            str(task),
        )
    )


# --- driving a workflow -----------------------------------------------------------------------


HandlerFn = Callable[[Row], Any]
"""`handler_fn(claim_row)` -> an outcome from `success`/`failure`/`checkpoint` (a mapping with
`kind` and `step_uuid`), or any other JSON value, which becomes the success result. It may be
async. Returning None means success with the default result {"step": name}."""


@dataclass
class DriveLog:
    """What `drive` did: one entry per claim round."""

    rounds: list[list[Row]] = field(default_factory=list)
    """The claim rows of each round, in claim order."""
    answers: list[list[Row]] = field(default_factory=list)
    """complete_steps' answer rows of each round."""

    @property
    def claims(self) -> list[Row]:
        """Every claim row, in order."""
        return [r for rnd in self.rounds for r in rnd]

    @property
    def names(self) -> list[list[str]]:
        """Step names claimed in each round (sorted within a round)."""
        return [sorted(r["step_name"] for r in rnd) for rnd in self.rounds]

    def claimed(self, step_name: str) -> list[Row]:
        """Every claim row of step `step_name`."""
        return [r for r in self.claims if r["step_name"] == step_name]


def _as_outcome(row: Row, value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping) and "kind" in value and "step_uuid" in value:
        return value
    return success(row, value)


async def drive(
    conn: db.Connection,
    queue: str,
    handler_fn: HandlerFn,
    *,
    worker: str = "driver",
    qty: int = 100,
    lease: float = 30.0,
    settle: float = 0.0,
    max_rounds: int = 1000,
    allow_stale: bool = False,
    on_round: Callable[[int, list[Row]], Awaitable[None] | None] | None = None,
) -> DriveLog:
    """Claim everything ready, decide each outcome with `handler_fn`, complete, repeat.

    Stops when a claim returns nothing; with `settle` > 0 it keeps polling that long first
    (for steps waiting for a short retry delay). `on_round(index, rows)` (sync or async) runs
    after each round's outcomes were applied, for checks between stages. Asserts that every
    outcome was applied (none stale) unless `allow_stale`.
    """
    log = DriveLog()
    for index in range(max_rounds):
        rows = await claim(conn, queue, qty=qty, lease=lease, worker=worker)
        if not rows and settle > 0:
            end = time.monotonic() + settle
            while not rows and time.monotonic() < end:
                await asyncio.sleep(0.02)
                rows = await claim(conn, queue, qty=qty, lease=lease, worker=worker)
        if not rows:
            return log
        outcomes = []
        for row in rows:
            value = handler_fn(row)
            if inspect.isawaitable(value):
                value = await value
            outcome = dict(_as_outcome(row, value))
            outcome["worker_id"] = worker
            outcomes.append(outcome)
        answer = await conn.complete_steps(outcomes)
        stale = [a for a in answer if a["status"] != "applied"]
        assert allow_stale or not stale, (
            f"drive: outcomes came back stale: {[dict(a) for a in stale]}"
        )
        log.rounds.append(list(rows))
        log.answers.append(list(answer))
        if on_round is not None:
            maybe = on_round(index, list(rows))
            if inspect.isawaitable(maybe):
                await maybe
    raise AssertionError(f"drive: still claiming after {max_rounds} rounds")


# --- invariants -------------------------------------------------------------------------------


async def assert_healthy(conn: db.Connection) -> None:
    """Assert `tasker.check_invariants()` finds nothing, listing every violation otherwise."""
    rows = await conn.check_invariants()
    if rows:
        lines = "\n".join(f"  {r['invariant']}: {r['detail']}" for r in rows)
        raise AssertionError(f"engine invariants violated ({len(rows)}):\n{lines}")
