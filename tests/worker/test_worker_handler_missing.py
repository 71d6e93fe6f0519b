"""A worker without a step's handler (a rolling deploy: an older worker meets a newer template)
hands the step back without spending an attempt, and a worker that has the handler runs it;
`step explain` names the worker that lacked it. Every worker keeps a bounded tasker.workers row."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tasker_pg import AsyncTaskerClient, Worker, db
from tasker_pg.errors import ValidationError
from tests.support.worker import (
    poll,
    registry_of,
    steps_of,
    templates,
    wait_final,
    wait_handler_missing,
)
from tests.support.workflows import math_handlers, timing_handlers

NAMESPACE = "timing_async"
FAST = {"poll_interval": 0.1, "summary_interval": 0, "repair_interval": 0}


async def test_a_worker_without_the_handler_hands_the_step_to_one_that_has_it(
    dsn: str, conn: db.Connection
) -> None:
    def lacking_worker() -> Worker:
        return Worker(
            [NAMESPACE],
            registry_of(math_handlers),  # no timing.quick_async here
            dsn=dsn,
            templates=templates("quick"),
            worker_id="old-worker",
            missing_handler_delay=0.3,
            **FAST,
        )

    lacking = lacking_worker()
    async with lacking:
        task = await conn.create_task(NAMESPACE, "quick", {})
        step = (await steps_of(conn, task))["quick"]
        [released] = await wait_handler_missing(conn, [step["step_uuid"]])
        assert released["worker_id"] == "old-worker"
        assert "timing.quick_async" in released["error_summary"]
        assert (
            await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task)
        ) in (
            "pending",
            "steps_in_process",
        )
        # the worker's row says what it lacks, and since when
        row = await poll(
            lambda: conn.fetchrow(
                "SELECT * FROM tasker.workers WHERE worker_id = 'old-worker'"
                " AND missing_handlers ? 'timing.quick_async'"
            ),
            what="the missing handler in tasker.workers",
        )
        assert "timing.quick_async" not in row["handlers"]
        # the health check shows the worker, alive, and what it lacks
        async with AsyncTaskerClient(dsn) as client:
            health = await client.health_check()
        [seen] = [w for w in health.workers if w.worker_id == "old-worker"]
        assert (seen.status, seen.namespaces) == ("alive", [NAMESPACE])
        assert list(seen.missing_handlers) == ["timing.quick_async"]
        assert health.to_dict()["workers"][0]["worker_id"] == "old-worker"
    assert lacking.stats.failed == 0
    step = (await steps_of(conn, task))["quick"]
    assert (step["state"], step["attempts"], step["last_error"]) == ("enqueued", 0, None)

    # explain names the worker that lacked the handler, and since when
    [readiness] = await conn.step_readiness(task)
    assert readiness["reason"].startswith(
        "worker old-worker has no handler timing.quick_async (missing there since "
    ), readiness["reason"]
    explained = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tasker_pg.cli", "step", "explain", str(step["step_uuid"])],
        env={**os.environ, "TASKER_DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert explained.returncode == 0, explained.stderr
    assert "worker old-worker has no handler timing.quick_async" in explained.stdout

    # a worker that has the handler completes the step once its delay has passed. (It runs
    # alone: each release by the lacking worker doubles the delay, so a test racing the two
    # would wait 0.3 s * 2^n for every claim the lacking worker wins; CI lost such a race.)
    hidden_for = await conn.fetchval(
        "SELECT greatest(extract(epoch FROM m.vt - clock_timestamp()), 0)::float8"
        "  FROM tasker.queue_messages m JOIN tasker.steps s ON s.msg_id = m.msg_id"
        " WHERE s.step_uuid = $1",
        step["step_uuid"],
    )
    assert hidden_for is not None  # the message is still queued
    async with Worker(
        [NAMESPACE], registry_of(timing_handlers), dsn=dsn, worker_id="new-worker", **FAST
    ):
        final = await wait_final(conn, [task], timeout=20.0 + float(hidden_for))
        assert final[task] == "complete"
    step = (await steps_of(conn, task))["quick"]
    assert step["attempts"] == 1  # the releases gave their attempts back
    completed_by = await conn.fetchval(
        "SELECT worker_id FROM tasker.step_transitions"
        " WHERE step_uuid = $1 AND to_state = 'complete'",
        step["step_uuid"],
    )
    assert completed_by == "new-worker"


async def test_the_workers_row_is_written_and_bounded(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        [NAMESPACE],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("quick"),
        worker_id="row-writer",
        **FAST,
    ):
        row = await poll(
            lambda: conn.fetchrow("SELECT * FROM tasker.v_workers WHERE worker_id = 'row-writer'"),
            what="the worker's row",
        )
        assert row["namespaces"] == [NAMESPACE]
        assert "timing.quick_async" in row["handlers"]
        assert row["status"] == "alive" and row["in_flight"] == 0
        assert row["missing_handlers"] == {}

    ok = {
        "worker_id": "w",
        "host": "h",
        "pid": 1,
        "namespaces": ["ns"],
        "handlers": ["a.b"],
        "in_flight": 0,
        "missing_handlers": {},
    }
    import datetime

    started = datetime.datetime.now(datetime.UTC)
    await conn.worker_heartbeat(started_at=started, **ok)  # type: ignore[arg-type]
    too_big = [
        {"worker_id": "w" * 201},
        {"host": "h" * 201},
        {"namespaces": ["n"] * 1001},
        {"handlers": ["x" * 501]},
        {"handlers": [""]},
        {"pid": -1},
        {"in_flight": 1_000_001},
        {"missing_handlers": {f"h{i}": "2026-01-01" for i in range(1001)}},
        {"missing_handlers": {"h": "x" * 65}},
    ]
    for change in too_big:
        with pytest.raises(ValidationError) as err:
            await conn.worker_heartbeat(started_at=started, **{**ok, **change})  # type: ignore[arg-type]
        assert err.value.error_code == "invalid_argument", change

    # stale rows are kept, marked by age, and cleaned up after the cut-off
    await conn.execute(
        "UPDATE tasker.workers SET last_heartbeat_at = now() - interval '8 days'"
        " WHERE worker_id = 'row-writer'"
    )
    assert (
        await conn.fetchval("SELECT status FROM tasker.v_workers WHERE worker_id = 'row-writer'")
        == "stale"
    )
    assert await conn.fetchval("SELECT tasker.cleanup_workers()") == 1
    assert await conn.fetchval("SELECT count(*) FROM tasker.workers") == 1  # 'w' stays
