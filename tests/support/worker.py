"""Helpers shared by the worker tests: polling with deadlines, state queries, invariants."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from tasker_pg import HandlerRegistry, db
from tasker_pg.template import TaskTemplate, load_templates

T = TypeVar("T")

WORKFLOWS = Path(__file__).parent / "workflows"
FINAL_TASK_STATES = ("complete", "error", "cancelled", "resolved_manually")


async def poll(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last probe: {last!r})")
        await asyncio.sleep(interval)


def templates(*names: str) -> list[TaskTemplate]:
    """Templates from tests/support/workflows by file name (without .yaml)."""
    found: list[TaskTemplate] = []
    for name in names:
        found.extend(load_templates(WORKFLOWS / f"{name}.yaml"))
    return found


def registry_of(*modules: ModuleType | str) -> HandlerRegistry:
    registry = HandlerRegistry()
    for module in modules:
        registry.register_module(module)
    return registry


async def task_states(conn: db.Connection, tasks: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = await conn.fetch(
        "SELECT task_uuid, state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", list(tasks)
    )
    return {r["task_uuid"]: r["state"] for r in rows}


async def wait_final(
    conn: db.Connection, tasks: Iterable[uuid.UUID], *, timeout: float = 20.0
) -> dict[uuid.UUID, str]:
    """Wait until every task is in a final state; returns task -> state."""
    wanted = list(tasks)

    async def probe() -> dict[uuid.UUID, str] | None:
        states = await task_states(conn, wanted)
        if len(states) == len(wanted) and all(s in FINAL_TASK_STATES for s in states.values()):
            return states
        return None

    return await poll(probe, timeout=timeout, what=f"{len(wanted)} task(s) in a final state")


async def steps_of(conn: db.Connection, task: uuid.UUID) -> dict[str, Any]:
    """The task's steps by name (whole rows of tasker.steps)."""
    rows = await conn.fetch("SELECT * FROM tasker.steps WHERE task_uuid = $1", task)
    return {r["name"]: r for r in rows}


async def assert_invariants(conn: db.Connection) -> None:
    violations = await conn.fetch("SELECT * FROM tasker.check_invariants()")
    assert [dict(v) for v in violations] == []


async def assert_each_completed_once(conn: db.Connection, tasks: Sequence[uuid.UUID]) -> None:
    """Every step of the tasks has exactly one transition into 'complete' (committed once)."""
    rows = await conn.fetch(
        """
        SELECT s.step_uuid, s.name, s.state,
               (SELECT count(*) FROM tasker.step_transitions t
                 WHERE t.step_uuid = s.step_uuid AND t.to_state = 'complete') AS completions
          FROM tasker.steps s
         WHERE s.task_uuid = ANY($1::uuid[])
        """,
        list(tasks),
    )
    wrong = [dict(r) for r in rows if r["state"] != "complete" or r["completions"] != 1]
    assert wrong == []


async def wait_handler_missing(
    conn: db.Connection, step_uuids: Iterable[uuid.UUID], *, timeout: float = 20.0
) -> list[Any]:
    """Wait until each step was handed back by a worker lacking its handler; returns those
    `released` transitions (reason handler_missing), one per step, oldest first."""
    wanted = list(step_uuids)

    async def probe() -> list[Any] | None:
        rows = await conn.fetch(
            """
            SELECT DISTINCT ON (step_uuid) *
              FROM tasker.step_transitions
             WHERE step_uuid = ANY($1::uuid[]) AND event = 'released'
               AND metadata->>'reason' = 'handler_missing'
             ORDER BY step_uuid, transition_id
            """,
            wanted,
        )
        return list(rows) if len(rows) == len(wanted) else None

    return await poll(probe, timeout=timeout, what=f"{len(wanted)} handler_missing release(s)")


async def most_in_progress_per_key(conn: db.Connection, tasks: list[uuid.UUID]) -> dict[str, int]:
    """The largest number of steps of each concurrency key in progress at once, from the audit,
    counted in transition_id order (a step's end is numbered before its transaction commits, a
    claim's start after the claim read which steps of its key were in progress: counting in that
    order never shows more than the claims saw)."""
    rows = await conn.fetch(
        "SELECT s.concurrency_key AS key, tr.transition_id,"
        "       CASE WHEN tr.to_state = 'in_progress' THEN 1 ELSE -1 END AS delta"
        "  FROM tasker.step_transitions tr JOIN tasker.steps s USING (step_uuid)"
        " WHERE tr.task_uuid = ANY($1::uuid[])"
        "   AND (tr.to_state = 'in_progress') <> (tr.from_state IS NOT DISTINCT FROM 'in_progress')"
        " ORDER BY tr.transition_id",
        tasks,
    )
    now: collections.Counter[str] = collections.Counter()
    most: dict[str, int] = {}
    for r in rows:
        now[r["key"]] += r["delta"]
        most[r["key"]] = max(most.get(r["key"], 0), now[r["key"]])
    assert all(v == 0 for v in now.values()), now
    return most
