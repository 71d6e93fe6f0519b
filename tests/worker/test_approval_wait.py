"""`examples/approval_wait/` end to end through a real worker and PostgreSQL: an order waits for a
human approval emitted from a separate SQL session (as from psql), holding no worker slot, while
the worker runs the other orders' steps; a sleep step and a timeout with a default complete it
too."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from examples.approval_wait import handlers as approval_wait
from tasker_pg import Worker, db
from tasker_pg.errors import ConfigurationError
from tasker_pg.template import load_templates
from tests.support.worker import assert_invariants, poll, registry_of, steps_of, wait_final

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "approval_wait"
NS = "approval_wait"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def worker(dsn: str) -> AsyncIterator[Worker]:
    # one slot: a wait that held it would stop every other order
    async with Worker(
        [NS],
        registry_of(approval_wait),
        dsn=dsn,
        templates=load_templates(EXAMPLE),
        concurrency=1,
        poll_interval=0.1,
        summary_interval=0,
        wake_interval=0.1,
    ) as running:
        yield running


async def create(conn: db.Connection, context: dict[str, Any]) -> uuid.UUID:
    task: uuid.UUID = await conn.fetchval(
        "SELECT tasker.create_task($1, $2, $3::jsonb)", NS, "order_approval", context
    )
    return task


async def state_of(conn: db.Connection, task: uuid.UUID, step: str) -> str:
    return str((await steps_of(conn, task))[step]["state"])


async def test_an_order_waits_for_an_approval_emitted_from_another_session(
    worker: Worker, conn: db.Connection, dsn: str
) -> None:
    waiting = await create(conn, {"order_id": "A-1", "items": ["book", "pen"]})

    async def is_waiting() -> bool:
        return await state_of(conn, waiting, "wait_for_approval") == "waiting"

    await poll(is_waiting, what="wait_for_approval waiting")
    # the one slot is free: other orders run to their own waits meanwhile
    others = [await create(conn, {"order_id": f"B-{i}", "items": ["x"]}) for i in range(3)]
    for task in others:

        async def reached(task: uuid.UUID = task) -> bool:
            return await state_of(conn, task, "wait_for_approval") == "waiting"

        await poll(reached, what="another order waiting")
    assert worker.running_steps == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM tasker.queue_messages WHERE queue = $1", NS) == 0
    )
    explain = await conn.fetchrow(
        "SELECT reason FROM tasker.step_readiness($1) WHERE name = 'wait_for_approval'", waiting
    )
    assert explain["reason"].startswith("waiting for event 'order_approved' with key 'A-1'")

    # approved from a separate session, as from psql
    approver = await db.connect(dsn)
    try:
        row = await approver.fetchrow(
            "SELECT * FROM tasker.emit_event('order_approved', 'A-1', "
            '\'{"approved": true, "by": "ann"}\')'
        )
    finally:
        await approver.close()
    assert row["completed_steps"] == 1
    assert (await wait_final(conn, [waiting]))[waiting] == "complete"
    steps = await steps_of(conn, waiting)
    assert steps["wait_for_approval"]["results"] == {"approved": True, "by": "ann"}
    assert steps["cool_off"]["state"] == "complete"
    # the sleep ran its second between the approval and the shipping
    assert (
        steps["cool_off"]["completed_at"] - steps["cool_off"]["started_at"]
    ).total_seconds() >= 1
    assert steps["ship_or_release"]["results"] == {"shipped": 2, "approved_by": "ann"}
    assert steps["wait_for_approval"]["attempts"] == 0
    assert steps["wait_for_approval"]["claim_seq"] == 0

    # the others: one approval kept from before, one rejection by timeout
    await conn.emit_event("order_approved", "B-0", {"approved": True, "by": "bo"})
    await conn.execute(
        "UPDATE tasker.step_waits SET deadline = now(), wake_at = now() WHERE task_uuid = $1",
        others[1],
    )
    await conn.execute("SELECT tasker.cancel_task($1)", others[2])
    finals = await wait_final(conn, others)
    assert finals == {others[0]: "complete", others[1]: "complete", others[2]: "cancelled"}
    assert (await steps_of(conn, others[0]))["ship_or_release"]["results"] == {
        "shipped": 1,
        "approved_by": "bo",
    }
    assert (await steps_of(conn, others[1]))["ship_or_release"]["results"] == {
        "released": 1,
        "rejected_by": "timeout",
    }
    await assert_invariants(conn)


async def test_an_approval_emitted_before_the_order_reaches_its_wait_completes_it(
    worker: Worker, conn: db.Connection
) -> None:
    await conn.emit_event("order_approved", "C-1", {"approved": True, "by": "early"})
    task = await create(conn, {"order_id": "C-1", "items": ["y"]})
    assert (await wait_final(conn, [task]))[task] == "complete"
    steps = await steps_of(conn, task)
    assert steps["ship_or_release"]["results"] == {"shipped": 1, "approved_by": "early"}
    await assert_invariants(conn)


def test_wake_interval_defaults_to_a_second_and_zero_disables_it() -> None:
    assert Worker([NS], registry_of(approval_wait)).config.wake_interval == 1.0
    assert Worker([NS], registry_of(approval_wait), wake_interval=0).config.wake_interval == 0
    with pytest.raises(ConfigurationError, match="wake_interval"):
        Worker([NS], registry_of(approval_wait), wake_interval=-1)


async def test_a_worker_with_the_wake_off_leaves_a_due_wait_to_a_manual_call(
    dsn: str, conn: db.Connection
) -> None:
    async with Worker(
        [NS],
        registry_of(approval_wait),
        dsn=dsn,
        templates=load_templates(EXAMPLE),
        poll_interval=0.1,
        summary_interval=0,
        wake_interval=0,
    ):
        await conn.emit_event("order_approved", "D-1", {"approved": True, "by": "dee"})
        task = await create(conn, {"order_id": "D-1", "items": ["z"]})

        async def waiting() -> bool:
            return await state_of(conn, task, "wait_for_approval") == "waiting"

        await poll(waiting, what="wait_for_approval waiting")
        # the event is there and the wait is due, but this worker does not wake it
        await asyncio.sleep(1.0)
        assert await state_of(conn, task, "wait_for_approval") == "waiting"
        assert (await conn.wake_waits()).completed == 1

        async def woken_to_the_end() -> bool:
            await conn.wake_waits()  # ends cool_off once its second is over
            return (await steps_of(conn, task))["ship_or_release"]["state"] == "complete"

        await poll(woken_to_the_end, interval=0.2, what="the order shipped")
        assert (await wait_final(conn, [task]))[task] == "complete"
        await assert_invariants(conn)
