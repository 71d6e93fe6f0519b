"""No step is stranded: the raw queue functions refuse a namespace's engine queue, and
tasker.repair_messages() re-sends the message of a live step that lost it (a superuser's
DELETE on the queue table, a dropped queue) and enqueues a ready step nothing enqueued."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import InvalidStateError, ValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    drive,
    failure,
    linear,
    start,
    step_row,
    success,
    task_row,
)


def raw_calls(conn: db.Connection, msg_id: int) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "send": lambda: conn.send(NAMESPACE, {"hello": "world"}),
        "send_batch": lambda: conn.send_batch(NAMESPACE, [{"a": 1}]),
        "read": lambda: conn.read(NAMESPACE, 30, 10),
        "pop": lambda: conn.pop(NAMESPACE, 10),
        "set_vt": lambda: conn.set_vt(NAMESPACE, msg_id, 600),
        "delete": lambda: conn.delete(NAMESPACE, msg_id),
        "delete_batch": lambda: conn.delete_batch(NAMESPACE, [msg_id]),
        "archive": lambda: conn.archive(NAMESPACE, msg_id),
        "archive_batch": lambda: conn.archive_batch(NAMESPACE, [msg_id]),
        "purge_queue": lambda: conn.purge_queue(NAMESPACE),
        "drop_queue": lambda: conn.drop_queue(NAMESPACE),
    }


async def test_raw_queue_functions_refuse_an_engine_queue(conn: db.Connection) -> None:
    task = await start(conn, linear(2))
    s1 = await step_row(conn, task, "s1")
    for name, call in raw_calls(conn, s1["msg_id"]).items():
        with pytest.raises(InvalidStateError, match="engine queue of namespace") as err:
            await call()
        assert err.value.error_code == "engine_queue", name
        assert "tasker.repair_messages()" in str(err.value), name
    # nothing was taken away: the step is still claimable and the queue still there
    assert (await conn.metrics(NAMESPACE)).queue_length == 1
    await assert_healthy(conn)
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, task))["state"] == "complete"
    # a cancelled namespace stays the engine's
    with pytest.raises(InvalidStateError):
        await conn.drop_queue(NAMESPACE)


async def test_a_plain_queue_keeps_every_raw_function(conn: db.Connection) -> None:
    await start(conn, linear(1))  # an engine queue next to it
    await conn.create_queue("plain")
    msg = await conn.send("plain", {"x": 1})
    assert [m.msg_id for m in await conn.read("plain", 0, 1)] == [msg]
    assert await conn.archive("plain", msg) is True
    await conn.send_batch("plain", [{"a": 1}, {"b": 2}])
    assert len(await conn.pop("plain", 1)) == 1
    assert await conn.purge_queue("plain") == 1
    assert await conn.drop_queue("plain") is True


async def lose_messages(conn: db.Connection, task: Any) -> int:
    """What a superuser's DELETE on the queue table does: the task's messages are gone."""
    return int(
        await conn.fetchval(
            f"""
            WITH d AS (DELETE FROM tasker.q_{NAMESPACE} m
                        WHERE m.message->>'task_uuid' = $1::text RETURNING 1)
            SELECT count(*) FROM d
            """,
            str(task),
        )
    )


async def test_repair_resends_a_deleted_message_and_the_task_completes(
    conn: db.Connection,
) -> None:
    task = await start(conn, linear(2), priority=7)
    assert await conn.repair_messages() == []  # healthy: nothing to do
    assert await lose_messages(conn, task) == 1
    problems = {r["invariant"] for r in await conn.check_invariants()}
    assert problems == {"live_step_has_one_message"}
    assert await claim(conn) == []  # stranded: no worker can see it

    repaired = await conn.repair_messages()
    s1 = await step_row(conn, task, "s1")
    assert [(r["kind"], r["step_uuid"], r["step_state"]) for r in repaired] == [
        ("message_resent", s1["step_uuid"], "enqueued")
    ]
    await assert_healthy(conn)
    msg = await conn.fetchrow(
        f"SELECT priority, vt <= clock_timestamp() AS visible FROM tasker.q_{NAMESPACE}"
        " WHERE msg_id = $1",
        s1["msg_id"],
    )
    assert (msg["priority"], msg["visible"]) == (7, True)
    audit = await conn.fetchval(
        "SELECT count(*) FROM tasker.step_transitions WHERE step_uuid = $1 AND event = $2",
        s1["step_uuid"],
        "message_repaired",
    )
    assert audit == 1
    assert await conn.repair_messages() == []  # repaired once, then healthy
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_repair_keeps_the_retry_time_and_hides_a_running_step(conn: db.Connection) -> None:
    retrying = await start(conn, linear(1, name="retrying"))
    running = await start(conn, linear(1, name="running"))
    rows = {str(r["task_uuid"]): r for r in await claim(conn)}
    await complete(conn, failure(rows[str(retrying)], retry_after=3600))
    for task in (retrying, running):
        assert await lose_messages(conn, task) == 1

    repaired = {r["task_uuid"]: r for r in await conn.repair_messages()}
    assert repaired[retrying]["step_state"] == "waiting_for_retry"
    assert repaired[running]["step_state"] == "in_progress"
    await assert_healthy(conn)
    waiting = await conn.fetchrow(
        f"SELECT m.vt = s.next_attempt_at AS at_retry_time FROM tasker.steps s"
        f" JOIN tasker.q_{NAMESPACE} m ON m.msg_id = s.msg_id WHERE s.task_uuid = $1",
        retrying,
    )
    assert waiting["at_retry_time"] is True
    # the running step's lease is unknown: hidden for a while, and its holder's fenced
    # heartbeat and outcome still work on the new message
    hidden = await conn.fetchval(
        f"SELECT m.vt > clock_timestamp() + interval '4 minutes' FROM tasker.steps s"
        f" JOIN tasker.q_{NAMESPACE} m ON m.msg_id = s.msg_id WHERE s.task_uuid = $1",
        running,
    )
    assert hidden is True
    row = rows[str(running)]
    [extended] = await conn.extend_leases(
        [{"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}], 30
    )
    assert extended["extended"] is True
    answer = await complete(conn, success(row))
    assert answer[str(row["step_uuid"])]["status"] == "applied"
    assert (await task_row(conn, running))["state"] == "complete"
    await assert_healthy(conn)


async def test_repair_enqueues_a_ready_step_nothing_enqueued(conn: db.Connection) -> None:
    task = await start(conn, linear(2))
    [row] = await claim(conn)
    await complete(conn, success(row))
    # what a lost enqueue leaves behind: s1 complete, s2 pending with no pending parent
    await lose_messages(conn, task)
    await conn.execute(
        "UPDATE tasker.steps SET state = 'pending', msg_id = NULL"
        " WHERE task_uuid = $1 AND name = 's2'",
        task,
    )
    problems = {r["invariant"] for r in await conn.check_invariants()}
    assert problems == {"ready_step_is_enqueued"}

    repaired = await conn.repair_messages()
    s2 = await step_row(conn, task, "s2")
    assert [(r["kind"], r["step_uuid"]) for r in repaired] == [
        ("ready_step_enqueued", s2["step_uuid"])
    ]
    assert s2["state"] == "enqueued"
    await assert_healthy(conn)
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, task))["state"] == "complete"


async def test_repair_creates_a_dropped_queue_again(conn: db.Connection) -> None:
    task = await start(conn, linear(2))
    # a superuser drops the queue's tables behind the engine's back
    await conn.execute(
        f"""
        DROP TABLE tasker.q_{NAMESPACE};
        DROP TABLE tasker.a_{NAMESPACE};
        DELETE FROM tasker.queues WHERE queue_name = '{NAMESPACE}';
        DROP SEQUENCE tasker.q_{NAMESPACE}_seq;
        """
    )
    repaired = await conn.repair_messages()
    assert [r["kind"] for r in repaired] == ["message_resent"]
    await assert_healthy(conn)
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_only_one_session_repairs_at_a_time(dsn: str, conn: db.Connection) -> None:
    task = await start(conn, linear(1))
    await lose_messages(conn, task)
    other = await db.connect(dsn)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('tasker.repair_messages', 0))"
            )
            assert await conn.repair_messages() == []  # busy elsewhere: returns at once
        assert len(await conn.repair_messages()) == 1
    finally:
        await other.close()
    await assert_healthy(conn)


REPAIR_TASKS = 25_000  # 4 steps each: 100k steps


@pytest.mark.timeout(300)
async def test_repair_reads_only_live_tasks_at_100k_steps(conn: db.Connection) -> None:
    """With 100k steps of finished tasks and a few live ones, the candidate scan starts from
    the partial index of live tasks (never a sequential scan of tasks or steps)."""
    tpl = linear(4)
    await conn.register_template(tpl)
    tasks = await conn.create_tasks(NAMESPACE, "linear", [{}] * REPAIR_TASKS)
    # finish all but ten by hand, as a worker would have
    await conn.execute(
        f"""
        DELETE FROM tasker.q_{NAMESPACE} m
         WHERE m.message->>'task_uuid' <> ALL ($1::text[]);
        UPDATE tasker.steps s SET state = 'complete', msg_id = NULL, pending_parents = 0
         WHERE s.task_uuid <> ALL ($1::uuid[]);
        UPDATE tasker.tasks t SET state = 'complete', completed_steps = total_steps,
               completed_at = now()
         WHERE t.task_uuid <> ALL ($1::uuid[]);
        ANALYZE tasker.tasks; ANALYZE tasker.steps;
        """.replace("$1::text[]", "ARRAY[" + ",".join(f"'{t}'" for t in tasks[:10]) + "]").replace(
            "$1::uuid[]", "ARRAY[" + ",".join(f"'{t}'::uuid" for t in tasks[:10]) + "]"
        )
    )
    assert await conn.repair_messages() == []
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            """
            EXPLAIN SELECT s.step_uuid
              FROM tasker.tasks t JOIN tasker.steps s ON s.task_uuid = t.task_uuid
             WHERE t.completed_at IS NULL
               AND ((s.state IN ('enqueued', 'waiting_for_retry', 'in_progress')
                     AND t.state IN ('pending', 'steps_in_process', 'error')
                     AND NOT EXISTS (SELECT 1 FROM tasker.queue_messages m
                                      WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
                                        AND m.message->>'step_uuid' = s.step_uuid::text))
                    OR (s.state = 'pending' AND s.pending_parents <= 0
                        AND t.state IN ('pending', 'steps_in_process')))
            """
        )
    )
    assert "tasks_live_idx" in plan, plan
    assert "Seq Scan on steps" not in plan and "Seq Scan on tasks" not in plan, plan
    await assert_healthy(conn)


async def test_handler_missing_release_gives_the_attempt_back_and_backs_off(
    conn: db.Connection,
) -> None:
    task = await start(conn, linear(1))
    for round_ in range(3):
        [row] = await claim(conn, worker="old")
        assert (row["attempt"], row["claim_seq"]) == (1, round_ + 1)
        fence = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
        [released] = await conn.release_steps(
            [fence], delay_seconds=10, reason="handler_missing", worker_id="old"
        )
        assert released["released"] is True
        step = await step_row(conn, task, "s1")
        assert (step["state"], step["attempts"]) == ("enqueued", 0)
        hidden = await conn.fetchval(
            f"SELECT vt > clock_timestamp() + interval '9 seconds' FROM tasker.q_{NAMESPACE}"
        )
        assert hidden is True
        # make it visible again by hand, as if the delay had passed
        await conn.execute(f"UPDATE tasker.q_{NAMESPACE} SET vt = clock_timestamp()")
    rows = await conn.fetch(
        "SELECT worker_id, metadata FROM tasker.step_transitions"
        " WHERE task_uuid = $1 AND event = 'released' ORDER BY transition_id",
        task,
    )
    delays = [float(r["metadata"]["delay_seconds"]) for r in rows]
    assert delays == [10.0, 20.0, 40.0]  # doubling while no worker has the handler
    assert {r["worker_id"] for r in rows} == {"old"}
    for bad in ({"delay_seconds": -1}, {"delay_seconds": 3601}, {"reason": "whatever"}):
        with pytest.raises(ValidationError) as err:
            await conn.release_steps([], **bad)  # type: ignore[arg-type]
        assert err.value.error_code == "invalid_argument", bad
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)
