"""Bulk redrive of dead letters: tasker.retry_failed retries every step in error of the tasks
in error of a namespace (and template) that entered error in a window, oldest first, a bounded
number per call, with retry_step's semantics; a dry run changes nothing; concurrent operator
calls on the same tasks wait for each other instead of deadlocking."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import NotFoundError, ValidationError
from tests.sql.conftest import Opener
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    drive,
    failure,
    message_count,
    single,
    start,
    step,
    step_states,
    success,
    task_row,
    template,
    transitions,
)

pytestmark = pytest.mark.timeout(120)

ONCE = {"max_attempts": 1, "backoff": "none"}


async def fail_all(conn: db.Connection, queue: str = NAMESPACE) -> list[uuid.UUID]:
    """Claim everything ready in `queue` and fail it for good; the tasks of the failed steps."""
    rows = await claim(conn, queue)
    assert rows, f"nothing to claim in {queue}"
    await complete(conn, *[failure(r, "boom", retryable=False) for r in rows])
    return sorted({r["task_uuid"] for r in rows})


async def failed_task(conn: db.Connection, tpl: dict[str, Any]) -> uuid.UUID:
    """A task of `tpl` whose root steps failed for good (the task is in error)."""
    task = await start(conn, tpl)
    assert await fail_all(conn, tpl["namespace_name"]) == [task]
    assert (await task_row(conn, task))["state"] == "error"
    return task


async def snapshot(conn: db.Connection) -> dict[str, Any]:
    """Everything retry_failed could change."""
    return {
        "steps": [
            dict(r)
            for r in await conn.fetch(
                "SELECT step_uuid, state, attempts, msg_id, updated_at FROM tasker.steps"
                " ORDER BY step_uuid"
            )
        ],
        "tasks": [
            dict(r)
            for r in await conn.fetch(
                "SELECT task_uuid, state, error_steps, updated_at FROM tasker.tasks"
                " ORDER BY task_uuid"
            )
        ],
        "step_transitions": await conn.fetchval("SELECT count(*) FROM tasker.step_transitions"),
        "task_transitions": await conn.fetchval("SELECT count(*) FROM tasker.task_transitions"),
        "messages": await message_count(conn),
    }


async def test_only_tasks_in_error_of_the_namespace_template_and_window_are_retried(
    conn: db.Connection,
) -> None:
    a = single(name="orders", retry=ONCE)
    b = single(name="refunds", retry=ONCE)
    other = single(name="orders", namespace="billing", retry=ONCE)
    old = await failed_task(conn, a)
    since = await conn.database_now()
    fresh = await failed_task(conn, a)
    refund = await failed_task(conn, b)
    elsewhere = await failed_task(conn, other)
    cancelled = await failed_task(conn, a)
    await conn.cancel_task(cancelled)
    running = await start(conn, a)  # enqueued, not in error

    rows = await conn.retry_failed(NAMESPACE, "orders", since=since)
    assert [r["task_uuid"] for r in rows] == [fresh]
    [row] = rows
    assert (row["name"], row["steps"], row["retried"], row["task_state"]) == (
        "orders",
        ["only"],
        True,
        "steps_in_process",
    )
    assert row["failed_at"] >= since
    states = {t: (await task_row(conn, t))["state"] for t in (old, refund, elsewhere)}
    assert states == {old: "error", refund: "error", elsewhere: "error"}
    assert (await task_row(conn, running))["state"] == "pending"
    assert (await task_row(conn, cancelled))["state"] == "cancelled"

    # the whole namespace, any template, any time: the two left in it, oldest first
    rows = await conn.retry_failed(NAMESPACE)
    assert [(r["task_uuid"], r["name"], r["retried"]) for r in rows] == [
        (old, "orders", True),
        (refund, "refunds", True),
    ]
    assert (await task_row(conn, elsewhere))["state"] == "error"
    assert await conn.retry_failed(NAMESPACE) == []
    await assert_healthy(conn)


async def test_failed_at_is_when_the_task_entered_error_and_before_bounds_it(
    conn: db.Connection,
) -> None:
    tpl = single(retry=ONCE)
    first = await failed_task(conn, tpl)
    cut = await conn.database_now()
    second = await failed_task(conn, tpl)
    entered = await conn.fetchval(
        "SELECT created_at FROM tasker.task_transitions"
        " WHERE task_uuid = $1 AND to_state = 'error'",
        first,
    )
    rows = await conn.retry_failed(NAMESPACE, dry_run=True)
    assert (rows[0]["task_uuid"], rows[0]["failed_at"]) == (first, entered)
    assert [r["task_uuid"] for r in rows] == [first, second]
    rows = await conn.retry_failed(NAMESPACE, before=cut)
    assert [r["task_uuid"] for r in rows] == [first]
    assert (await task_row(conn, second))["state"] == "error"
    await assert_healthy(conn)


async def test_a_decision_applied_while_in_error_does_not_move_failed_at(
    conn: db.Connection,
) -> None:
    """A decision that completes after its task went to error writes an error -> error task
    transition (decision_applied); the task entered error earlier, when x failed."""
    tpl = template(
        "decides",
        [step("s"), step("x"), step("d", "s", type="decision"), step("a", "d")],
        retry=ONCE,
    )
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, success(rows["s"]))
    [d] = await claim(conn)
    assert d["step_name"] == "d"
    await complete(conn, failure(rows["x"], "boom", retryable=False))
    entered = await conn.database_now()
    await complete(
        conn, success(d, {"decision_point_outcome": {"type": "create_steps", "step_names": ["a"]}})
    )
    moves = await conn.fetch(
        "SELECT from_state, to_state, event FROM tasker.task_transitions"
        " WHERE task_uuid = $1 ORDER BY transition_id",
        task,
    )
    assert [tuple(m) for m in moves][-1] == ("error", "error", "decision_applied")
    assert await conn.retry_failed(NAMESPACE, since=entered) == []
    [row] = await conn.retry_failed(NAMESPACE, before=entered)
    assert (row["task_uuid"], row["steps"], row["retried"]) == (task, ["x"], True)
    assert row["failed_at"] < entered
    log = await drive(conn, NAMESPACE, lambda r: None)
    assert sorted(r["step_name"] for r in log.claims) == ["a", "x"]
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_limit_is_respected_oldest_first(conn: db.Connection) -> None:
    tpl = single(retry=ONCE)
    tasks = [await failed_task(conn, tpl) for _ in range(5)]  # each fails after the one before
    batches = []
    for _ in range(3):
        rows = await conn.retry_failed(NAMESPACE, limit=2)
        assert all(r["retried"] for r in rows)
        batches.append([r["task_uuid"] for r in rows])
    assert batches == [tasks[0:2], tasks[2:4], tasks[4:5]]
    assert await conn.retry_failed(NAMESPACE, limit=2) == []
    await assert_healthy(conn)


async def test_dry_run_changes_nothing_and_says_what_it_would_retry(conn: db.Connection) -> None:
    tpl = template("pair", [step("x"), step("y"), step("z", "x", "y")], retry=ONCE)
    task = await failed_task(conn, tpl)
    before = await snapshot(conn)
    rows = await conn.retry_failed(NAMESPACE, "pair", dry_run=True)
    assert [
        (r["task_uuid"], r["steps"], len(r["step_uuids"]), r["retried"], r["task_state"])
        for r in rows
    ] == [(task, ["x", "y"], 2, False, "error")]
    assert await snapshot(conn) == before
    await assert_healthy(conn)


async def test_a_task_with_two_failed_steps_gets_both_retried_and_then_completes(
    conn: db.Connection,
) -> None:
    tpl = template("pair", [step("x"), step("y"), step("z", "x", "y")], retry=ONCE)
    task = await failed_task(conn, tpl)
    assert (await task_row(conn, task))["error_steps"] == 2

    [row] = await conn.retry_failed(NAMESPACE, reason="upstream fixed")
    assert (row["steps"], row["retried"]) == (["x", "y"], True)
    assert row["task_state"] == "steps_in_process"
    assert await step_states(conn, task) == {"x": "enqueued", "y": "enqueued", "z": "pending"}
    t = await task_row(conn, task)
    assert (t["state"], t["error_steps"]) == ("steps_in_process", 0)
    user = await conn.fetchval("SELECT session_user::text")
    for step_uuid in row["step_uuids"]:
        last = (await transitions(conn, step_uuid))[-1]
        assert (last["from_state"], last["to_state"], last["event"], last["attempt"]) == (
            "error",
            "enqueued",
            "retry_requested",
            1,
        )
        assert last["metadata"] == {
            "operation": "retry_failed",
            "by": user,
            "reason": "upstream fixed",
        }
    moves = await conn.fetch(
        "SELECT from_state, to_state, event FROM tasker.task_transitions"
        " WHERE task_uuid = $1 ORDER BY transition_id",
        task,
    )
    assert [tuple(m) for m in moves][-1] == ("error", "steps_in_process", "step_retried")
    assert sum(1 for m in moves if m["event"] == "step_retried") == 1
    await assert_healthy(conn)

    log = await drive(conn, NAMESPACE, lambda r: None)
    assert log.names == [["x", "y"], ["z"]]
    assert [r["attempt"] for r in log.claims] == [1, 1, 1]  # attempts started again
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_bad_arguments_are_refused_with_clear_errors(conn: db.Connection) -> None:
    await conn.register_template(single(retry=ONCE))
    for kwargs, match in [
        ({"limit": 0}, "limit must be between 1 and 1000, got 0"),
        ({"limit": 1001}, "limit must be between 1 and 1000, got 1001"),
        ({"name": "bad name"}, "template name 'bad name' is invalid"),
        ({"dry_run": None}, "dry_run must be true or false"),
        (
            {
                "since": datetime.fromisoformat("2026-01-02T00:00:00+00:00"),
                "before": datetime.fromisoformat("2026-01-01T00:00:00+00:00"),
            },
            "must be earlier than before",
        ),
    ]:
        with pytest.raises(ValidationError, match=match) as exc:
            await conn.retry_failed(NAMESPACE, **kwargs)
        assert exc.value.error_code == "invalid_argument"
    for namespace in ["Flows", "", "x" * 48]:
        with pytest.raises(ValidationError, match=r"namespace .* is invalid") as exc:
            await conn.retry_failed(namespace)
        assert exc.value.error_code == "invalid_argument"
    with pytest.raises(ValidationError, match="namespace NULL is invalid"):
        await conn.fetch("SELECT * FROM tasker.retry_failed(NULL)")
    with pytest.raises(ValidationError) as too_long:
        await conn.retry_failed(NAMESPACE, reason="r" * 70000)
    assert too_long.value.error_code == "payload_too_large"
    with pytest.raises(NotFoundError, match="no template is registered in namespace 'nowhere'"):
        await conn.retry_failed("nowhere")
    with pytest.raises(NotFoundError, match=r"no template flows/missing is registered") as nf:
        await conn.retry_failed(NAMESPACE, "missing")
    assert nf.value.error_code == "template_not_found"


async def _wait_until_blocked(watcher: db.Connection, pid: int, fut: asyncio.Future[Any]) -> bool:
    """True once backend `pid` waits for a lock (False if `fut` finished first)."""
    while not fut.done():
        if await watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid
        ):
            return True
        await asyncio.sleep(0.005)
    return False


async def test_a_concurrent_cancel_waits_for_the_bulk_retry_and_the_reverse(
    conn: db.Connection, sessions: Opener
) -> None:
    tpl = template("pair", [step("x"), step("y"), step("z", "x", "y")], retry=ONCE)
    tasks = [await failed_task(conn, tpl) for _ in range(6)]
    by_uuid = sorted(tasks)
    bulk, operator, watcher = await sessions(3)

    # 1. a cancel holds the task in the middle (by uuid); the bulk retry takes the operator
    # locks of the tasks before it, waits for it, then leaves the cancelled task alone
    middle = by_uuid[3]
    tx = operator.raw.transaction()
    await tx.start()
    assert (await operator.cancel_task(middle, "not needed"))["state"] == "cancelled"
    retry = asyncio.ensure_future(bulk.retry_failed(NAMESPACE))
    assert await _wait_until_blocked(watcher, bulk.backend_pid, retry)
    await tx.commit()
    rows = await retry
    assert [r["task_uuid"] for r in rows] == tasks
    got = {r["task_uuid"]: (r["retried"], r["task_state"], tuple(r["steps"])) for r in rows}
    assert got.pop(middle) == (False, "cancelled", ())
    assert set(got.values()) == {(True, "steps_in_process", ("x", "y"))}
    await assert_healthy(conn)

    # 2. the other way round: the bulk retry holds its tasks, a cancel of one waits for it
    for t in tasks:
        if t != middle:
            await conn.cancel_task(t)
    again = [await failed_task(conn, tpl) for _ in range(4)]
    tx = bulk.raw.transaction()
    await tx.start()
    rows = await bulk.retry_failed(NAMESPACE)
    assert [r["task_uuid"] for r in rows] == again and all(r["retried"] for r in rows)
    cancel = asyncio.ensure_future(operator.cancel_task(sorted(again)[0], "changed my mind"))
    assert await _wait_until_blocked(watcher, operator.backend_pid, cancel)
    await tx.commit()
    out = await cancel
    assert (out["previous_state"], out["state"]) == ("steps_in_process", "cancelled")
    await assert_healthy(conn)


async def test_two_bulk_retries_and_cancels_at_once_all_finish(
    conn: db.Connection, sessions: Opener
) -> None:
    """Two bulk retries over the same tasks and cancels of some of them, all at once: every
    call finishes (none is chosen as a deadlock victim), and every task is retried once or
    cancelled."""
    tpl = template("pair", [step("x"), step("y"), step("z", "x", "y")], retry=ONCE)
    tasks = [await failed_task(conn, tpl) for _ in range(20)]
    s1, s2, s3, s4 = await sessions(4)
    doomed = tasks[5::4]

    async def cancel_each(session: db.Connection, which: list[uuid.UUID]) -> None:
        for t in which:
            await session.cancel_task(t)

    results = await asyncio.gather(
        s1.retry_failed(NAMESPACE),
        s2.retry_failed(NAMESPACE),
        cancel_each(s3, doomed[0::2]),
        cancel_each(s4, doomed[1::2][::-1]),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    first, second = results[0], results[1]
    assert isinstance(first, list) and isinstance(second, list)
    retried = [r["task_uuid"] for r in first + second if r["retried"]]
    assert len(retried) == len(set(retried))  # no task retried twice
    for t in tasks:
        state = (await task_row(conn, t))["state"]
        assert state == ("cancelled" if t in doomed else "steps_in_process")
        assert (t in retried) or (t in doomed)
    await assert_healthy(conn)
