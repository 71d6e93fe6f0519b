"""Parked work: the messages of a task in error leave the queue, cost nothing while it stays in
error (no periodic rewrite, nothing for claims to pass over), and come back from the step rows
when an operator lets the task go on, whatever locks other sessions hold on messages."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tasker_pg import db
from tests.sql.conftest import Opener
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    failure,
    message_count,
    readiness,
    start,
    step,
    step_row,
    success,
    task_row,
    template,
)

pytestmark = pytest.mark.timeout(60)


FAST = {"backoff": "none"}


async def task_in_error(conn: db.Connection, name: str) -> tuple[uuid.UUID, dict[str, Any]]:
    """A task of three roots x, w, z: x failed permanently (task in error), w failed retryably
    and retries in an hour, z is enqueued and not claimed yet. Returns the task and the claims."""
    tpl = template(name, [step("x"), step("w"), step("z")], retry=FAST)
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn, qty=2)}
    assert set(rows) == {"x", "w"}
    await complete(
        conn,
        failure(rows["x"], "no such customer", retryable=False),
        failure(rows["w"], "try later", retry_after=3600),
    )
    assert (await task_row(conn, task))["state"] == "error"
    return task, rows


async def xmins(conn: db.Connection, task: uuid.UUID) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT name, xmin::text AS xmin FROM tasker.steps WHERE task_uuid = $1", task
    )
    return {r["name"]: r["xmin"] for r in rows}


async def messages_of(conn: db.Connection, task: uuid.UUID) -> dict[str, Any]:
    """Step name -> (msg_id, vt, xmin) of the task's messages in its queue."""
    rows = await conn.fetch(
        "SELECT s.name, m.msg_id, m.vt, m.xmin::text AS xmin FROM tasker.queue_messages m "
        "JOIN tasker.steps s ON s.step_uuid::text = m.message->>'step_uuid' "
        "WHERE s.task_uuid = $1",
        task,
    )
    return {r["name"]: (r["msg_id"], r["vt"], r["xmin"]) for r in rows}


async def pass_time(conn: db.Connection) -> None:
    """What the passing of time does to the queue: every message's visibility time lapses (a
    message parked for 5 minutes, say), so the next claims meet each of them again."""
    await conn.execute(
        "UPDATE tasker.queue_messages SET vt = clock_timestamp() - interval '1 second' "
        "WHERE queue = $1",
        NAMESPACE,
    )


async def test_parked_work_leaves_the_queue_and_is_never_rewritten(conn: db.Connection) -> None:
    task, rows = await task_in_error(conn, "parked_quiet")
    # the first claim that meets z's message parks it: out of the queue, step unchanged
    assert await claim(conn) == []
    z = await step_row(conn, task, "z")
    assert (z["state"], z["msg_id"]) == ("enqueued", None)
    assert set(await messages_of(conn, task)) == {"w"}  # not visible yet: not met yet
    await assert_healthy(conn)

    # w's retry time comes: the claim that meets it parks it too
    await pass_time(conn)
    assert await claim(conn) == []
    w = await step_row(conn, task, "w")
    assert (w["state"], w["msg_id"], w["attempts"]) == ("waiting_for_retry", None, 1)
    assert await messages_of(conn, task) == {}
    assert await message_count(conn, task) == 0
    r = await readiness(conn, task)
    assert r["z"]["reason"] == "task is in error" and r["w"]["reason"] == "task is in error"
    await assert_healthy(conn)

    # from now on nothing is written for this task, however much time passes and however
    # many claims run: no re-park, no message for claims to pass over
    before = await xmins(conn, task)
    for _ in range(3):
        await pass_time(conn)
        assert await claim(conn) == []
    assert await messages_of(conn, task) == {}
    assert await xmins(conn, task) == before
    await assert_healthy(conn)

    # the operator's retry lets the task go on: every parked step is claimable again
    out = await conn.retry_step(rows["x"]["step_uuid"])
    assert out["task_state"] == "steps_in_process"
    await assert_healthy(conn)
    got = {r["step_name"]: r for r in await claim(conn)}
    assert {n: (r["attempt"], r["claim_event"]) for n, r in got.items()} == {
        "x": (1, "claimed"),
        "z": (1, "claimed"),
    }
    # w's new message comes from its step row: visible at its retry time, an hour from now
    w = await step_row(conn, task, "w")
    assert (await messages_of(conn, task))["w"][1] == w["next_attempt_at"]
    assert (await readiness(conn, task))["w"]["reason"].startswith("retry at ")
    await complete(conn, *[success(r) for r in got.values()])
    await pass_time(conn)
    [last] = await claim(conn)
    assert (last["step_name"], last["attempt"]) == ("w", 2)
    await complete(conn, success(last))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_resume_is_not_stopped_by_a_locked_message(
    conn: db.Connection, sessions: Opener
) -> None:
    task, rows = await task_in_error(conn, "parked_locked")
    assert await claim(conn) == []  # parks z
    w_msg = await messages_of(conn, task)

    # another session holds every message of the queue (w's, waiting for its retry time)
    [other] = await sessions(1)
    tx = other.raw.transaction()
    await tx.start()
    held = await other.fetch(
        "SELECT msg_id FROM tasker.queue_messages WHERE queue = $1 FOR UPDATE", NAMESPACE
    )
    assert len(held) >= 1
    out = await asyncio.wait_for(conn.retry_step(rows["x"]["step_uuid"]), 10)
    assert out["task_state"] == "steps_in_process"
    await tx.commit()

    # every step the resume owed a message has one, and it is due now
    got = {r["step_name"]: r for r in await claim(conn)}
    assert set(got) == {"x", "z"}
    assert set(w_msg) == {"w"}  # z had been parked: out of the queue
    # w keeps its message, untouched, at its retry time
    w = await step_row(conn, task, "w")
    assert (await messages_of(conn, task))["w"] == w_msg["w"]
    assert w_msg["w"][1] == w["next_attempt_at"]
    assert (await readiness(conn, task))["w"]["reason"].startswith("retry at ")
    await assert_healthy(conn)
    await complete(conn, *[success(r) for r in got.values()])
    await pass_time(conn)
    [last] = await claim(conn)
    assert (last["step_name"], last["attempt"]) == ("w", 2)
    await complete(conn, success(last))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_resume_racing_a_claim_that_parks(conn: db.Connection, sessions: Opener) -> None:
    """A claim parks z's message in an open transaction while the operator's retry runs: the
    retry waits for it, then finds z parked and gives it a message. Nothing is left behind."""
    task, rows = await task_in_error(conn, "parked_race")
    z_msg = (await step_row(conn, task, "z"))["msg_id"]
    assert (
        await conn.fetchval(  # not parked yet: z's message is in the queue
            "SELECT count(*) FROM tasker.queue_messages WHERE msg_id = $1", z_msg
        )
        == 1
    )
    claimer, watcher = await sessions(2)
    tx = claimer.raw.transaction()
    await tx.start()
    assert await claimer.claim_step_rows(NAMESPACE, "w2", 10, 30.0) == []  # parks z, uncommitted

    done = asyncio.Event()

    async def retry() -> Any:
        try:
            return await conn.retry_step(rows["x"]["step_uuid"])
        finally:
            done.set()

    call = asyncio.create_task(retry())
    blocked = False
    pid = conn.backend_pid
    for _ in range(2000):
        if done.is_set():
            break
        if await watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid
        ):
            blocked = True
            break
        await asyncio.sleep(0.005)
    await tx.commit()
    out = await asyncio.wait_for(call, 10)
    assert out["task_state"] == "steps_in_process"
    got = {r["step_name"] for r in await claim(conn)}
    assert got == {"x", "z"}
    assert blocked  # the retry waited for the claim's decision on the task
    assert (await task_row(conn, task))["state"] == "steps_in_process"
    await assert_healthy(conn)


async def test_repair_leaves_parked_steps_parked(conn: db.Connection) -> None:
    task, rows = await task_in_error(conn, "parked_repair")
    await pass_time(conn)
    assert await claim(conn) == []  # parks z and w
    parked = await xmins(conn, task)
    assert await conn.fetch("SELECT * FROM tasker.repair_messages()") == []
    assert await messages_of(conn, task) == {}
    assert await xmins(conn, task) == parked
    await assert_healthy(conn)
    # the operator lets the task go on: the parked steps come back from their rows
    await conn.retry_step(rows["x"]["step_uuid"])
    assert set(await messages_of(conn, task)) == {"x", "w", "z"}
    await assert_healthy(conn)
