"""Workers call tasker.fire_due_schedules() every `schedule_interval` seconds, one at a time:
with three workers running, every due slot of a schedule creates one task, and the tasks run."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging

import pytest

from tasker_pg import Worker, db
from tasker_pg.errors import ConfigurationError
from tests.support.worker import (
    assert_each_completed_once,
    assert_invariants,
    poll,
    registry_of,
    templates,
    wait_final,
)
from tests.support.workflows import timing_handlers

NAMESPACE = "timing_async"


async def test_three_workers_fire_each_due_slot_once_and_run_its_task(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.register_template(templates("quick")[0].to_json())
    await conn.create_schedule("minutely", NAMESPACE, "quick", "* * * * *", overlap="allow")
    # ten minutes of downtime: the slots since then are due
    await conn.execute(
        "UPDATE tasker.schedules SET next_fire_at = date_trunc('minute', now())"
        " - interval '10 minutes'"
    )
    first = await conn.fetchval("SELECT next_fire_at FROM tasker.schedules")
    caplog.set_level(logging.INFO, logger="tasker_pg.worker.maintenance")
    workers = [
        Worker(
            [NAMESPACE],
            registry_of(timing_handlers),
            dsn=dsn,
            poll_interval=0.1,
            summary_interval=0,
            repair_interval=0,
            retention_interval=0,
            schedule_interval=0.05,
        )
        for _ in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)

        async def caught_up() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT next_fire_at > now() FROM tasker.schedules WHERE name = 'minutely'"
                )
            )

        await poll(caught_up, what="the schedule caught up")
        rows = await conn.fetch(
            "SELECT idempotency_key, task_uuid FROM tasker.tasks ORDER BY idempotency_key"
        )
        tasks = [r["task_uuid"] for r in rows]
        assert set((await wait_final(conn, tasks)).values()) == {"complete"}
    last = await conn.fetchval("SELECT last_slot FROM tasker.schedules")
    minutes = int((last - first) / dt.timedelta(minutes=1))
    assert minutes >= 10
    assert [r["idempotency_key"] for r in rows] == [
        "schedule:minutely:"
        + (first + dt.timedelta(minutes=i)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for i in range(minutes + 1)
    ]
    await assert_each_completed_once(conn, tasks)
    await assert_invariants(conn)
    logged = [r.getMessage() for r in caplog.records if "schedules created" in r.getMessage()]
    assert sum(int(m.split("created ")[1].split(" ")[0]) for m in logged) == len(tasks)


async def test_schedule_interval_zero_disables_firing(dsn: str) -> None:
    worker = Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, schedule_interval=0)
    assert worker.config.schedule_interval == 0
    assert Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn).config.schedule_interval == 10
    with pytest.raises(ConfigurationError, match="schedule_interval"):
        Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, schedule_interval=-1)


def test_worker_cli_schedule_interval_option() -> None:
    from tasker_pg import worker_cli

    parser = worker_cli.build_parser()
    assert parser.parse_args(["--namespace", "x"]).schedule_interval == 10.0
    args = parser.parse_args(["--namespace", "x", "--schedule-interval", "2.5"])
    assert args.schedule_interval == 2.5
