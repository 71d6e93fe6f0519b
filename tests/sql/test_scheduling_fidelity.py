"""What the queue message says (visibility, priority, lease) matches the step on every path.

Each test here pins one rule that a wrong constant or a dropped clause would break while every
task still completes: the delay and priority of tasks created in bulk, the priority of a step an
operator retries, the backoff a waiting step keeps when its task resumes, the lease a checkpoint
hands on, and the bounds of a heartbeat's lease.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    checkpoint,
    claim,
    complete,
    diamond,
    failure,
    single,
    start,
    step,
    step_row,
    success,
    template,
)


async def message_of(conn: db.Connection, step_uuid: uuid.UUID) -> Any:
    """The step's live queue message, with its visibility in seconds from now."""
    return await conn.fetchrow(
        """SELECT m.priority, extract(epoch FROM m.vt - clock_timestamp()) AS visible_in
             FROM tasker.steps s
             JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
             JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id
            WHERE s.step_uuid = $1""",
        step_uuid,
    )


# --- create_tasks: the message carries the options ---------------------------------------------


async def test_create_tasks_messages_carry_priority_and_delay(conn: db.Connection) -> None:
    await conn.register_template(single())
    delayed, urgent = await conn.create_tasks(
        NAMESPACE,
        "single",
        [{"n": 1}, {"n": 2}],
        options=[{"delay_seconds": 3600, "priority": 2}, {"priority": 7}],
    )
    held = await message_of(conn, (await step_row(conn, delayed, "only"))["step_uuid"])
    assert held["priority"] == 2
    assert 3500 < held["visible_in"] <= 3600
    now = await message_of(conn, (await step_row(conn, urgent, "only"))["step_uuid"])
    assert now["priority"] == 7 and now["visible_in"] <= 0
    rows = await claim(conn)
    assert [r["task_uuid"] for r in rows] == [urgent]  # the delayed root stays hidden


async def test_create_tasks_priority_decides_the_claim_order(conn: db.Connection) -> None:
    await conn.register_template(single())
    low = await conn.create_tasks(NAMESPACE, "single", [{}], options={"priority": 1})
    high = await conn.create_tasks(NAMESPACE, "single", [{}], options={"priority": 5})
    rows = await claim(conn, qty=1)
    assert [r["task_uuid"] for r in rows] == high
    rows = await claim(conn, qty=1)
    assert [r["task_uuid"] for r in rows] == low


# --- operators keep the task's priority and the steps' backoff ---------------------------------


async def test_retry_step_re_enqueues_at_the_task_priority(conn: db.Connection) -> None:
    once = {"max_attempts": 1}
    failing = await start(conn, single(name="urgent", retry=once), priority=9)
    [row] = await claim(conn)
    await complete(conn, failure(row, retryable=False))
    # an older, lower-priority message is waiting when the operator retries
    waiting = await start(conn, single(name="routine"), priority=3)
    await conn.retry_step(row["step_uuid"])
    msg = await message_of(conn, row["step_uuid"])
    assert msg["priority"] == 9
    [first] = await claim(conn, qty=1)
    assert first["task_uuid"] == failing
    [second] = await claim(conn, qty=1)
    assert second["task_uuid"] == waiting


def _branchy() -> dict[str, Any]:
    """start -> b, c -> end, b fails for good at once, c retries after an hour."""
    return template(
        "branchy",
        [
            step("start"),
            step("b", "start", retry={"max_attempts": 1}),
            step("c", "start", retry={"max_attempts": 3}),
            step("end", "b", "c"),
        ],
    )


async def _b_in_error_c_backing_off(conn: db.Connection) -> tuple[uuid.UUID, Any, Any]:
    task = await start(conn, _branchy())
    [root] = await claim(conn)
    await complete(conn, success(root))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(
        conn,
        failure(rows["c"], retry_after=3600),
        failure(rows["b"], retryable=False),
    )
    c = await step_row(conn, task, "c")
    assert c["state"] == "waiting_for_retry"
    assert (await step_row(conn, task, "b"))["state"] == "error"
    return task, rows["b"], c


@pytest.mark.parametrize("operator", ["retry_step", "resolve_step"])
async def test_a_resumed_task_keeps_the_backoff_of_its_waiting_steps(
    conn: db.Connection, operator: str
) -> None:
    task, b, c = await _b_in_error_c_backing_off(conn)
    if operator == "retry_step":
        await conn.retry_step(b["step_uuid"])
    else:
        await conn.resolve_step(b["step_uuid"], {"by": "hand"})
    assert (await conn.task_row(task) or {})["state"] != "error"
    msg = await message_of(conn, c["step_uuid"])
    assert 3500 < msg["visible_in"] <= 3600  # c waits out its hour
    claimed = sorted(r["step_name"] for r in await claim(conn))
    assert claimed == (["b"] if operator == "retry_step" else [])
    await assert_healthy(conn)


# --- leases -------------------------------------------------------------------------------------


async def test_a_checkpointed_claim_cannot_extend_the_continuation_lease(
    conn: db.Connection,
) -> None:
    await start(conn, single())
    [first] = await claim(conn, worker="w1")
    await complete(conn, checkpoint(first, cursor=10, items_processed=10))
    # w1's heartbeat still runs for the claim it just checkpointed
    fence = [
        {
            "step_uuid": str(first["step_uuid"]),
            "attempt": first["attempt"],
            "claim_seq": first["claim_seq"],
        }
    ]
    [answer] = await conn.extend_leases(fence, 3600)
    assert answer["extended"] is False and answer["lease_expires_at"] is None
    [cont] = await claim(conn, worker="w2")  # the continuation is visible at once
    assert cont["step_uuid"] == first["step_uuid"] and cont["checkpoint"]["cursor"] == 10
    await complete(conn, success(cont, worker="w2"))
    await assert_healthy(conn)


@pytest.mark.parametrize("lease", [0.0, -1.0, 31536000.5, 1e12, float("inf"), float("nan")])
async def test_extend_leases_refuses_a_lease_out_of_bounds(
    conn: db.Connection, lease: float
) -> None:
    await start(conn, single())
    [row] = await claim(conn)
    fence = [
        {
            "step_uuid": str(row["step_uuid"]),
            "attempt": row["attempt"],
            "claim_seq": row["claim_seq"],
        }
    ]
    with pytest.raises(ValidationError) as exc:
        await conn.extend_leases(fence, lease)
    assert exc.value.error_code == "invalid_argument"
    assert "lease_seconds must be > 0 and at most a year" in str(exc.value)
    # the lease is what the claim gave it, untouched
    msg = await message_of(conn, row["step_uuid"])
    assert 0 < msg["visible_in"] <= 30


async def test_extend_leases_sets_exactly_the_asked_lease(conn: db.Connection) -> None:
    await start(conn, diamond())
    [row] = await claim(conn)
    fence = [
        {
            "step_uuid": str(row["step_uuid"]),
            "attempt": row["attempt"],
            "claim_seq": row["claim_seq"],
        }
    ]
    [answer] = await conn.extend_leases(fence, 31536000)  # a year is the bound, and allowed
    assert answer["extended"] is True
    msg = await message_of(conn, row["step_uuid"])
    assert 31536000 - 60 < msg["visible_in"] <= 31536000
    [answer] = await conn.extend_leases(fence, 5)
    msg = await message_of(conn, row["step_uuid"])
    assert 0 < msg["visible_in"] <= 5
