"""Workers call tasker.repair_messages() periodically and say loudly what they repaired: a step
whose message a superuser deleted from the queue table runs after all."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tasker_pg import Worker, db
from tasker_pg.errors import ConfigurationError
from tests.support.worker import registry_of, templates, wait_final
from tests.support.workflows import timing_handlers

NAMESPACE = "timing_async"


async def test_a_worker_repairs_a_lost_message_and_the_task_completes(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.register_template(templates("quick")[0].to_json())
    task = await conn.create_task(NAMESPACE, "quick", {})
    await conn.execute(f"DELETE FROM tasker.q_{NAMESPACE}")  # the step is stranded
    caplog.set_level(logging.WARNING, logger="tasker_pg.worker.maintenance")
    async with Worker(
        [NAMESPACE],
        registry_of(timing_handlers),
        dsn=dsn,
        poll_interval=0.1,
        summary_interval=0,
        repair_interval=0.2,
    ):
        assert (await wait_final(conn, [task]))[task] == "complete"
    warnings = [r.getMessage() for r in caplog.records if "repaired 1 stranded" in r.getMessage()]
    assert len(warnings) == 1 and f"task {task}" in warnings[0], warnings


async def test_repair_interval_zero_disables_repair(dsn: str, conn: db.Connection) -> None:
    worker = Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, repair_interval=0)
    assert worker.config.repair_interval == 0
    with pytest.raises(ConfigurationError, match="repair_interval"):
        Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, repair_interval=-1)
    with pytest.raises(ConfigurationError, match="missing_handler_delay"):
        Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, missing_handler_delay=7200)


def test_worker_cli_repair_and_missing_handler_options() -> None:
    from tasker_pg import worker_cli

    parser = worker_cli.build_parser()
    defaults = parser.parse_args(["--namespace", "x"])
    assert (defaults.repair_interval, defaults.missing_handler_delay) == (60.0, 10.0)
    args = parser.parse_args(
        ["--namespace", "x", "--repair-interval", "0", "--missing-handler-delay", "2.5"]
    )
    assert (args.repair_interval, args.missing_handler_delay) == (0.0, 2.5)


async def test_a_worker_purges_what_the_retention_policy_no_longer_keeps(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.register_template(templates("quick")[0].to_json())
    old = [await conn.create_task(NAMESPACE, "quick", {"i": i}) for i in range(3)]
    caplog.set_level(logging.INFO, logger="tasker_pg.worker.maintenance")
    async with Worker(
        [NAMESPACE],
        registry_of(timing_handlers),
        dsn=dsn,
        poll_interval=0.1,
        summary_interval=0,
        repair_interval=0,
        retention_interval=0.2,
    ):
        assert set((await wait_final(conn, old)).values()) == {"complete"}
        await conn.execute(
            "UPDATE tasker.tasks SET completed_at = completed_at - interval '2 days'"
        )
        await conn.execute("SELECT tasker.set_retention_policy($1, interval '1 day')", NAMESPACE)
        for _ in range(200):
            if not await conn.fetchval("SELECT count(*) FROM tasker.tasks"):
                break
            await asyncio.sleep(0.05)
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM tasker.steps") == 0
    lines = [r.getMessage() for r in caplog.records if "retention deleted" in r.getMessage()]
    assert lines and "retention deleted 3 task(s)" in lines[0], lines
    assert await conn.check_invariants() == []


async def test_retention_interval_zero_disables_the_purge(dsn: str) -> None:
    worker = Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, retention_interval=0)
    assert worker.config.retention_interval == 0
    assert (
        Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn).config.retention_interval == 300
    )
    with pytest.raises(ConfigurationError, match="retention_interval"):
        Worker([NAMESPACE], registry_of(timing_handlers), dsn=dsn, retention_interval=-1)


def test_worker_cli_retention_interval_option() -> None:
    from tasker_pg import worker_cli

    parser = worker_cli.build_parser()
    assert parser.parse_args(["--namespace", "x"]).retention_interval == 300.0
    args = parser.parse_args(["--namespace", "x", "--retention-interval", "0"])
    assert args.retention_interval == 0.0
