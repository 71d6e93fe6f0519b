"""The worker claims within claim windows (tasker_pg.worker.window) once a claim has taken
everything visible, and a message stamped before its window (a task created in a transaction
that stayed open) is still run, by the claim without a window that comes every few seconds."""

from __future__ import annotations

import asyncio

from tasker_pg import Worker, db
from tasker_pg.worker import window
from tests.support.worker import registry_of, templates, wait_final
from tests.support.workflows import timing_handlers

NAMESPACE = "timing_async"
FAST = {"poll_interval": 0.1, "summary_interval": 0, "repair_interval": 0}


async def test_claims_use_windows_and_a_late_commit_is_still_run(
    dsn: str, conn: db.Connection
) -> None:
    other = await db.connect(dsn)
    try:
        async with Worker(
            [NAMESPACE],
            registry_of(timing_handlers),
            dsn=dsn,
            templates=templates("quick"),
            worker_id="windowed",
            **FAST,
        ) as worker:
            tasks = []
            for _ in range(5):
                tasks.append(await conn.create_task(NAMESPACE, "quick", {}))
                await asyncio.sleep(0.2)
            await wait_final(conn, tasks)
            stats = worker.stats
            # the polls and wake-ups after the first drained claim read within a window
            assert stats.claim_calls > stats.full_claims >= 1, stats

            # A task whose transaction stays open past the margin: its message is stamped
            # when it is created, the worker's empty polls move the window past that stamp,
            # and only a claim without a window can see it once it commits.
            async with other.transaction():
                late = await other.create_task(NAMESPACE, "quick", {})
                await asyncio.sleep(window.MARGIN + 0.5)
            full_before = worker.stats.full_claims
            final = await wait_final(conn, [late], timeout=window.FULL_MAX + 10)
            assert final[late] == "complete"
            assert worker.stats.full_claims > full_before
    finally:
        await other.close()
