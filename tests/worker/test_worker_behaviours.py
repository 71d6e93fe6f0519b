"""Worker behaviours with one test each: the grace period and a second stop request, round-robin
across namespaces, a queue that appears after start, the claim size cap, and start-up against
an outdated schema."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tasker_pg import Worker, db
from tasker_pg.errors import SchemaError
from tasker_pg.template import TaskTemplate
from tests.support.worker import poll, registry_of, templates, wait_final
from tests.support.workflows import timing_handlers

FAST = {"poll_interval": 0.1, "summary_interval": 0}


def quick_template(namespace: str, name: str = "quick") -> TaskTemplate:
    return TaskTemplate.from_dict(
        {
            "name": name,
            "namespace_name": namespace,
            "version": "1.0.0",
            "steps": [{"name": "quick", "handler": {"callable": "timing.quick_async"}}],
        }
    )


async def step_state(conn: db.Connection, task: uuid.UUID) -> Any:
    return await conn.fetchrow(
        "SELECT state, attempts FROM tasker.steps WHERE task_uuid = $1", task
    )


# --- stopping -----------------------------------------------------------------------------------


async def test_a_step_outliving_the_grace_period_is_abandoned_to_lease_expiry(
    dsn: str, conn: db.Connection
) -> None:
    worker = Worker(
        ["timing"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("sleepy"),
        grace_seconds=0.5,
        **FAST,
    )
    async with worker:
        task = await conn.create_task("timing", "sleepy", {"seconds": 30})

        async def running() -> bool:
            return worker.running_steps == 1

        await poll(running, what="the sleeper running")
        await worker.stop()  # returns after the grace period, not after 30 s
    assert worker.stats.abandoned == 1
    assert worker.stats.succeeded == 0 and worker.stats.released == 0
    # the claim was neither completed nor handed back: its lease runs out, then another worker
    # takes the step
    step = await step_state(conn, task)
    assert (step["state"], step["attempts"]) == ("in_progress", 1)
    await conn.cancel_task(task, "test over")


async def test_a_second_stop_request_abandons_running_steps_at_once(
    dsn: str, conn: db.Connection
) -> None:
    worker = Worker(
        ["timing"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("sleepy"),
        grace_seconds=600,  # the first request alone would wait ten minutes
        **FAST,
    )
    async with worker:
        task = await conn.create_task("timing", "sleepy", {"seconds": 30})

        async def running() -> bool:
            return worker.running_steps == 1

        await poll(running, what="the sleeper running")
        worker.request_stop(reason="first")
        assert worker.stop_requested
        worker.request_stop(reason="second")
        await asyncio.wait_for(worker.stop(), timeout=20)
    assert worker.stats.abandoned == 1 and worker.stats.succeeded == 0
    assert (await step_state(conn, task))["state"] == "in_progress"
    await conn.cancel_task(task, "test over")


# --- claiming -----------------------------------------------------------------------------------


async def test_namespaces_are_claimed_round_robin(dsn: str, conn: db.Connection) -> None:
    registry = registry_of(timing_handlers)
    tpls = [quick_template("rr_a"), quick_template("rr_b")]
    for tpl in tpls:
        await conn.register_template(tpl.to_json())
    # both queues hold a backlog before the worker starts
    tasks_a = await conn.create_tasks("rr_a", "quick", [{} for _ in range(6)])
    tasks_b = await conn.create_tasks("rr_b", "quick", [{} for _ in range(6)])
    async with Worker(["rr_a", "rr_b"], registry, dsn=dsn, concurrency=1, max_batch=1, **FAST):
        await wait_final(conn, [*tasks_a, *tasks_b])
    rows = await conn.fetch(
        "SELECT t.namespace FROM tasker.steps s JOIN tasker.tasks t USING (task_uuid)"
        " WHERE t.namespace IN ('rr_a', 'rr_b') ORDER BY s.started_at"
    )
    order = [r["namespace"] for r in rows]
    # with one slot, the claims alternate while both queues have work
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1)), order


async def test_a_queue_created_after_start_is_served(dsn: str, conn: db.Connection) -> None:
    async with Worker(["late"], registry_of(timing_handlers), dsn=dsn, **FAST):
        # the namespace has no template and no queue yet
        assert await conn.fetchval("SELECT to_regclass('tasker.q_late')") is None
        await conn.register_template(quick_template("late").to_json())
        task = await conn.create_task("late", "quick", {})
        assert (await wait_final(conn, [task]))[task] == "complete"


async def test_a_claim_takes_at_most_max_batch_steps(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(quick_template("capped").to_json())
    tasks = await conn.create_tasks("capped", "quick", [{} for _ in range(10)])
    async with Worker(
        ["capped"], registry_of(timing_handlers), dsn=dsn, concurrency=10, max_batch=3, **FAST
    ) as worker:
        await wait_final(conn, tasks)
    # steps of one claim_steps call share their started_at
    sizes = await conn.fetch(
        "SELECT count(*) AS n FROM tasker.steps s JOIN tasker.tasks t USING (task_uuid)"
        " WHERE t.namespace = 'capped' GROUP BY s.started_at"
    )
    assert max(r["n"] for r in sizes) == 3  # ten free slots, ten ready steps: the cap binds
    assert worker.stats.claimed == 10


# --- start-up -----------------------------------------------------------------------------------


async def test_a_worker_refuses_to_start_against_an_outdated_schema(
    dsn: str, conn: db.Connection
) -> None:
    await conn.execute(
        "UPDATE tasker.schema_functions SET checksum = 'stale' WHERE file = ("
        "SELECT min(file) FROM tasker.schema_functions)"
    )
    worker = Worker(["x"], registry_of(timing_handlers), dsn=dsn, **FAST)
    with pytest.raises(SchemaError) as exc:
        async with worker:
            pass
    assert "tasker-pg migrate" in str(exc.value)
