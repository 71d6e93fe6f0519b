"""Edge cases found in review: concurrent idempotency keys in create_tasks, foreign and copied
messages on a namespace queue, and operator calls on one task serialised."""

from __future__ import annotations

import asyncio
import time

import pytest

from tasker_pg import db
from tests.support.engine import NAMESPACE, assert_healthy, claim, linear, start, success


async def wait_for_lock_wait(
    conn: db.Connection, waiter: db.Connection, locktype: str, deadline_s: float = 10
) -> None:
    """Poll from `conn` until session `waiter` waits for a lock of type `locktype`."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = $2 AND NOT granted",
            waiter.backend_pid,
            locktype,
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"session {waiter.backend_pid} never waited on a {locktype} lock")


async def test_concurrent_idempotency_key_returns_the_original_task(dsn: str) -> None:
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        await a.register_template(linear(2))
        tx = a.raw.transaction()
        await tx.start()
        [first] = await a.create_tasks(NAMESPACE, "linear", [{}], options={"idempotency_key": "k"})
        second = asyncio.create_task(
            b.create_tasks(NAMESPACE, "linear", [{}], options={"idempotency_key": "k"})
        )
        await wait_for_lock_wait(a, b, "transactionid")  # b waits on a's uncommitted key
        await tx.commit()
        assert await asyncio.wait_for(second, timeout=10) == [first]
        assert await a.fetchval("SELECT count(*) FROM tasker.tasks") == 1
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


async def test_foreign_and_copied_messages_do_not_stop_or_steal_claims(conn: db.Connection) -> None:
    task = await start(conn, linear(2))
    [row] = await claim(conn)
    # a message that is not the engine's, one with a malformed step_uuid, and a copy of the
    # claimed step's own message (tasker.send refuses an engine queue, so written by hand, as
    # a superuser could, or sent before the namespace's first template was registered)
    for message in (
        {"hello": "world"},
        {"step_uuid": "not-a-uuid"},
        {"step_uuid": str(row["step_uuid"]), "task_uuid": str(task)},
    ):
        await conn.execute(
            "INSERT INTO tasker.queue_messages (queue, msg_id, vt, message)"
            f" VALUES ($1, nextval('tasker.q_{NAMESPACE}_seq'), clock_timestamp(), $2::jsonb)",
            NAMESPACE,
            message,
        )
    assert await claim(conn) == []  # nothing real is ready; the claim does not fail
    step = await conn.fetchrow(
        "SELECT attempts, claim_seq, state FROM tasker.steps WHERE step_uuid = $1", row["step_uuid"]
    )
    assert (step["attempts"], step["claim_seq"], step["state"]) == (1, 1, "in_progress")
    archived = await conn.fetchval(f"SELECT count(*) FROM tasker.a_{NAMESPACE}")
    assert archived == 3  # kept for inspection, not deleted
    await conn.complete_steps([success(row, {"ok": 1})])
    [nxt] = await claim(conn)
    assert nxt["step_name"] == "s2"
    await conn.complete_steps([success(nxt, {"ok": 2})])
    assert await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task) == (
        "complete"
    )
    await assert_healthy(conn)


async def test_operator_calls_on_one_task_wait_for_each_other(dsn: str) -> None:
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        task = await start(a, linear(3))
        s2 = await a.fetchval(
            "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 's2'", task
        )
        tx = a.raw.transaction()
        await tx.start()
        await a.resolve_step(s2, {"by": "hand"})
        cancel = asyncio.create_task(b.cancel_task(task, "operator"))
        await wait_for_lock_wait(a, b, "advisory")  # serialised, not deadlocked
        await tx.commit()
        summary = await asyncio.wait_for(cancel, timeout=10)
        assert summary["state"] == "cancelled"
        states = dict(
            await a.fetch("SELECT name, state FROM tasker.steps WHERE task_uuid = $1", task)
        )
        assert states == {"s1": "cancelled", "s2": "resolved_manually", "s3": "cancelled"}
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


async def test_namespace_queue_cannot_be_purged_or_dropped(conn: db.Connection) -> None:
    from tasker_pg.errors import InvalidStateError

    task = await start(conn, linear(2))
    for call in (conn.purge_queue(NAMESPACE), conn.drop_queue(NAMESPACE)):
        with pytest.raises(InvalidStateError, match="engine queue of namespace") as err:
            await call
        assert err.value.error_code == "engine_queue"
    await conn.cancel_task(task)
    # still the engine's queue once nothing lives in it: its templates are registered
    with pytest.raises(InvalidStateError, match="engine queue of namespace"):
        await conn.drop_queue(NAMESPACE)
    await assert_healthy(conn)


async def test_a_dropped_namespace_queue_cannot_strand_a_ready_step(conn: db.Connection) -> None:
    """A superuser can still take a step's message away and drop the queue's tables behind
    the engine's back; a resolve that makes a child ready must then fail loudly instead of
    leaving it pending (tasker.repair_messages() creates the queue again)."""
    from tasker_pg.errors import NotFoundError

    task = await start(conn, linear(2))
    await conn.execute(f"DELETE FROM tasker.q_{NAMESPACE}")
    problems = {r["invariant"] for r in await conn.check_invariants()}
    assert problems == {"live_step_has_one_message"}
    await conn.execute(
        f"""
        DROP TABLE tasker.q_{NAMESPACE};
        DROP TABLE tasker.a_{NAMESPACE};
        DELETE FROM tasker.queues WHERE queue_name = '{NAMESPACE}';
        """
    )
    s1 = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 's1'", task
    )
    with pytest.raises(NotFoundError, match=f"queue '{NAMESPACE}' of task {task} does not exist"):
        await conn.resolve_step(s1, {"by": "hand"})
    states = await conn.fetch(
        "SELECT name, state FROM tasker.steps WHERE task_uuid = $1 ORDER BY name", task
    )
    assert [(r["name"], r["state"]) for r in states] == [("s1", "enqueued"), ("s2", "pending")]
    await conn.execute(f"DROP SEQUENCE tasker.q_{NAMESPACE}_seq")
    assert [r["kind"] for r in await conn.repair_messages()] == ["message_resent"]
    await assert_healthy(conn)


async def test_check_invariants_reports_a_ready_step_nothing_will_enqueue(
    conn: db.Connection,
) -> None:
    task = await start(conn, linear(2))
    await assert_healthy(conn)
    # what a lost enqueue would leave behind: the child's parents satisfied, the child pending
    await conn.execute(
        "UPDATE tasker.steps SET pending_parents = 0 WHERE task_uuid = $1 AND name = 's2'", task
    )
    rows = [r for r in await conn.check_invariants() if r["invariant"] == "ready_step_is_enqueued"]
    assert len(rows) == 1 and "s2" in rows[0]["detail"], rows
