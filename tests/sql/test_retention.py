"""Retention (sql/functions/85_retention.sql): a policy per namespace and tasker.purge_finished().

Ages are moved by UPDATE as the superuser (completed_at, updated_at, transition times), never
by sleeping. Every test counts the rows of each per-task table before and after a purge.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from datetime import timedelta
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
    diamond,
    drive,
    failure,
    linear,
    single,
    start,
    success,
    task_row,
)

OTHER = "elsewhere"
SET_POLICY = (
    "SELECT * FROM tasker.set_retention_policy("
    "$1, $2::text::interval, $3::text::interval, $4::text::interval)"
)

# rows of one task, per table: (table, SQL counting them for task $1)
PER_TASK = {
    "tasks": "SELECT count(*) FROM tasker.tasks WHERE task_uuid = $1",
    "steps": "SELECT count(*) FROM tasker.steps WHERE task_uuid = $1",
    "step_edges": "SELECT count(*) FROM tasker.step_edges e JOIN tasker.steps s"
    " ON s.step_uuid = e.parent_uuid WHERE s.task_uuid = $1",
    "step_transitions": "SELECT count(*) FROM tasker.step_transitions WHERE task_uuid = $1",
    "task_transitions": "SELECT count(*) FROM tasker.task_transitions WHERE task_uuid = $1",
}
TABLES = ("tasks", "steps", "step_edges", "step_transitions", "task_transitions")


async def rows_of(conn: db.Connection, task: uuid.UUID) -> dict[str, int]:
    return {name: int(await conn.fetchval(sql, task)) for name, sql in PER_TASK.items()}


async def table_counts(conn: db.Connection) -> dict[str, int]:
    return {t: int(await conn.fetchval(f"SELECT count(*) FROM tasker.{t}")) for t in TABLES}


async def age_finished(conn: db.Connection, tasks: Sequence[uuid.UUID], days: float) -> None:
    """Move the tasks' completion `days` into the past (as if they finished that long ago)."""
    await conn.execute(
        "UPDATE tasker.tasks SET completed_at = completed_at - make_interval(secs => $2)"
        " WHERE task_uuid = ANY ($1::uuid[])",
        list(tasks),
        days * 86400,
    )


async def age_everything(conn: db.Connection, tasks: Sequence[uuid.UUID], days: float) -> None:
    """Move every timestamp of the tasks (row, completion, transitions) `days` back."""
    secs = days * 86400
    await conn.execute(
        "UPDATE tasker.tasks SET updated_at = updated_at - make_interval(secs => $2),"
        " completed_at = completed_at - make_interval(secs => $2)"
        " WHERE task_uuid = ANY ($1::uuid[])",
        list(tasks),
        secs,
    )
    for table in ("task_transitions", "step_transitions"):
        await conn.execute(
            f"UPDATE tasker.{table} SET created_at = created_at - make_interval(secs => $2)"
            " WHERE task_uuid = ANY ($1::uuid[])",
            list(tasks),
            secs,
        )


async def set_policy(
    conn: db.Connection,
    namespace: str = NAMESPACE,
    keep: str = "30 days",
    error_after: str | None = None,
    keys: str = "7 days",
) -> None:
    await conn.execute(
        SET_POLICY,
        namespace,
        keep,
        error_after,
        keys,
    )


async def purge(conn: db.Connection, batch: int = 1000) -> db.PurgeCounts:
    return await conn.purge_finished(batch)


async def run_to_completion(conn: db.Connection, tpl: dict[str, Any], n: int) -> list[uuid.UUID]:
    tasks = [await start(conn, tpl, {"i": i}) for i in range(n)]
    await drive(conn, tpl["namespace_name"], lambda row: {"ok": True})
    for t in tasks:
        assert (await task_row(conn, t))["state"] == "complete"
    return tasks


async def fail_for_good(conn: db.Connection, tpl: dict[str, Any]) -> uuid.UUID:
    """A task whose first step fails permanently: the task is in error."""
    task = await start(conn, tpl)
    rows = [r for r in await claim(conn, tpl["namespace_name"]) if r["task_uuid"] == task]
    await complete(conn, *(failure(r, retryable=False) for r in rows))
    assert (await task_row(conn, task))["state"] == "error"
    return task


def expected(counts: dict[uuid.UUID, dict[str, int]], tasks: Sequence[uuid.UUID]) -> dict[str, int]:
    return {t: sum(counts[x][t] for x in tasks) for t in TABLES}


# --- policies ---------------------------------------------------------------------------------


async def test_policies_are_set_listed_replaced_and_cleared(conn: db.Connection) -> None:
    assert await conn.fetch("SELECT * FROM tasker.retention_policies()") == []
    row = await conn.fetchrow(
        "SELECT * FROM tasker.set_retention_policy('flows', interval '30 days')"
    )
    assert row is not None
    assert (row["namespace"], row["keep_finished"], row["purge_error_after"]) == (
        "flows",
        timedelta(days=30),
        None,
    )
    assert row["keep_idempotency_keys"] == timedelta(days=7)
    await set_policy(conn, NAMESPACE, "2 days", "10 days", "1 day")
    await set_policy(conn, OTHER, "1 hour", None, "0")
    listed = await conn.fetch("SELECT * FROM tasker.retention_policies()")
    assert [
        (r["namespace"], r["keep_finished"], r["purge_error_after"], r["keep_idempotency_keys"])
        for r in listed
    ] == [
        (OTHER, timedelta(hours=1), None, timedelta(0)),
        (NAMESPACE, timedelta(days=2), timedelta(days=10), timedelta(days=1)),
    ]
    assert await conn.fetchval("SELECT tasker.clear_retention_policy($1)", OTHER) is True
    assert await conn.fetchval("SELECT tasker.clear_retention_policy($1)", OTHER) is False
    assert [
        r["namespace"] for r in await conn.fetch("SELECT * FROM tasker.retention_policies()")
    ] == [NAMESPACE]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("Bad-NS", "30 days", None, "7 days"), "invalid_queue_name", "invalid queue name"),
        ((None, "30 days", None, "7 days"), "invalid_queue_name", "invalid queue name"),
        (("flows", None, None, "7 days"), "invalid_argument", "keep_finished must be"),
        (("flows", "59 minutes", None, "7 days"), "invalid_argument", "keep_finished must be"),
        (("flows", "-1 day", None, "7 days"), "invalid_argument", "keep_finished must be"),
        (("flows", "101 years", None, "7 days"), "invalid_argument", "keep_finished must be"),
        (("flows", "1 day", "30 minutes", "7 days"), "invalid_argument", "purge_error_after"),
        (("flows", "1 day", None, "-1 second"), "invalid_argument", "keep_idempotency_keys"),
        (("flows", "1 day", None, None), "invalid_argument", "keep_idempotency_keys"),
    ],
)
async def test_policy_arguments_are_bounded(
    conn: db.Connection, args: tuple[Any, ...], code: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        await conn.execute(
            SET_POLICY,
            *args,
        )
    assert err.value.error_code == code
    assert await conn.fetch("SELECT * FROM tasker.retention_policies()") == []


@pytest.mark.parametrize("batch", [0, -1, 100001, None])
async def test_purge_batch_is_bounded(conn: db.Connection, batch: int | None) -> None:
    with pytest.raises(ValidationError, match="batch must be an integer from 1 to 100000") as err:
        await conn.fetch("SELECT * FROM tasker.purge_finished($1)", batch)
    assert err.value.error_code == "invalid_argument"


# --- what is purged ---------------------------------------------------------------------------


async def test_without_a_policy_everything_is_kept(conn: db.Connection) -> None:
    tasks = await run_to_completion(conn, diamond(), 3)
    cancelled = await start(conn, single())
    await conn.cancel_task(cancelled)
    broken = await fail_for_good(conn, single(name="broken", retry={"max_attempts": 1}))
    await age_everything(conn, [*tasks, cancelled, broken], 3650)
    await conn.execute(
        "INSERT INTO tasker.queue_archive (queue, msg_id, read_ct, enqueued_at, archived_at, vt,"
        " priority, message)"
        " VALUES ($1, -1, 0, now(), now() - interval '10 years', now(), 0, '{}')",
        NAMESPACE,
    )
    before = await table_counts(conn)
    counts = await purge(conn)
    assert counts == db.PurgeCounts()
    assert await table_counts(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM tasker.queue_archive") == 1
    await assert_healthy(conn)


async def test_policy_purges_exactly_the_old_finished_tasks_and_all_of_theirs(
    conn: db.Connection,
) -> None:
    tpl = diamond()
    old_done = await run_to_completion(conn, tpl, 3)
    young_done = await run_to_completion(conn, tpl, 2)
    old_cancelled = await start(conn, tpl)
    await conn.cancel_task(old_cancelled, "no longer needed")
    # a resolved task: every step resolved by hand, the last one finishes it
    old_resolved = await start(conn, single(name="resolved"))
    only = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1", old_resolved
    )
    await conn.resolve_step(only, {"by": "hand"})
    old_error = await fail_for_good(conn, single(name="broken", retry={"max_attempts": 1}))
    running = await start(conn, linear(3))
    await complete(conn, *(success(r) for r in await claim(conn)))
    pending = await start(conn, tpl)
    other_ns = await run_to_completion(conn, single(namespace=OTHER), 2)

    everyone = [
        *old_done,
        *young_done,
        old_cancelled,
        old_resolved,
        old_error,
        running,
        pending,
        *other_ns,
    ]
    # everything is old except the young finished tasks, which finished 29 days ago
    await age_everything(conn, [t for t in everyone if t not in young_done], 31)
    await age_everything(conn, young_done, 29)
    before = {t: await rows_of(conn, t) for t in everyone}
    assert before[old_done[0]] == {
        "tasks": 1,
        "steps": 4,
        "step_edges": 4,
        "step_transitions": 15,
        "task_transitions": 3,
    }
    totals = await table_counts(conn)

    await set_policy(conn, NAMESPACE, "30 days")
    gone = [*old_done, old_cancelled, old_resolved]
    counts = await purge(conn)
    want = expected(before, gone)
    assert counts == db.PurgeCounts(
        tasks=len(gone),
        steps=want["steps"],
        step_edges=want["step_edges"],
        step_transitions=want["step_transitions"],
        task_transitions=want["task_transitions"],
    )
    for t in everyone:
        after = await rows_of(conn, t)
        assert after == ({k: 0 for k in TABLES} if t in gone else before[t]), t
    assert await table_counts(conn) == {k: totals[k] - want[k] for k in TABLES}
    # nothing left to do
    assert await purge(conn) == db.PurgeCounts()
    await assert_healthy(conn)
    # what is left still runs
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, running))["state"] == "complete"
    assert (await task_row(conn, pending))["state"] == "complete"
    await assert_healthy(conn)


async def test_error_tasks_only_with_the_option_and_after_their_last_change(
    conn: db.Connection,
) -> None:
    tpl = single(name="broken", retry={"max_attempts": 1})
    broken = await fail_for_good(conn, tpl)
    await age_everything(conn, [broken], 40)
    before = await rows_of(conn, broken)

    await set_policy(conn, NAMESPACE, "1 day")
    assert (await purge(conn)).tasks == 0
    await set_policy(conn, NAMESPACE, "1 day", "45 days")
    assert (await purge(conn)).tasks == 0
    await set_policy(conn, NAMESPACE, "1 day", "39 days")
    counts = await purge(conn)
    assert (counts.tasks, counts.steps, counts.step_transitions, counts.task_transitions) == (
        1,
        before["steps"],
        before["step_transitions"],
        before["task_transitions"],
    )
    assert await rows_of(conn, broken) == {k: 0 for k in TABLES}
    await assert_healthy(conn)


async def test_a_recent_step_transition_keeps_an_error_task(conn: db.Connection) -> None:
    # diamond: start succeeds, b fails for good while c is still to run
    tpl = diamond(retry={"max_attempts": 1})
    task = await start(conn, tpl)
    await complete(conn, *(success(r) for r in await claim(conn)))
    rows = await claim(conn)
    by_name = {r["step_name"]: r for r in rows}
    await complete(conn, failure(by_name["b"], retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    # c is still in progress: its task is not taken, however old
    await age_everything(conn, [task], 100)
    await set_policy(conn, NAMESPACE, "1 day", "10 days")
    assert (await purge(conn)).tasks == 0
    # c finishes now (a recent step transition); the task stays in error and is young again
    await complete(conn, success(by_name["c"]))
    await conn.execute(
        "UPDATE tasker.tasks SET updated_at = updated_at - interval '100 days'"
        " WHERE task_uuid = $1",
        task,
    )
    await conn.execute(
        "UPDATE tasker.task_transitions SET created_at = created_at - interval '100 days'"
        " WHERE task_uuid = $1",
        task,
    )
    assert (await purge(conn)).tasks == 0
    await age_everything(conn, [task], 11)
    assert (await purge(conn)).tasks == 1
    await assert_healthy(conn)


async def test_an_error_task_with_a_waiting_message_is_kept(conn: db.Connection) -> None:
    # b fails for good while c waits for a retry: c keeps its message until a claim parks it
    tpl = diamond(
        retry={
            "max_attempts": 3,
            "backoff": "fixed",
            "backoff_base_ms": 3600000,
            "max_backoff_ms": 3600000,
        }
    )
    task = await start(conn, tpl)
    await complete(conn, *(success(r) for r in await claim(conn)))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, failure(rows["b"], retryable=False), failure(rows["c"]))
    assert (await task_row(conn, task))["state"] == "error"
    await age_everything(conn, [task], 100)
    await set_policy(conn, NAMESPACE, "1 day", "10 days")
    assert (await purge(conn)).tasks == 0
    assert (await rows_of(conn, task))["steps"] == 4
    await assert_healthy(conn)


async def test_a_retried_error_task_is_live_again_and_kept(conn: db.Connection) -> None:
    broken = await fail_for_good(conn, single(name="broken", retry={"max_attempts": 1}))
    await age_everything(conn, [broken], 100)
    await set_policy(conn, NAMESPACE, "1 day", "10 days")
    step = await conn.fetchval("SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1", broken)
    await conn.retry_step(step)
    await age_everything(conn, [broken], 100)  # even when nothing changed for long after
    assert (await purge(conn)).tasks == 0
    await drive(conn, NAMESPACE, lambda row: None)
    assert (await task_row(conn, broken))["state"] == "complete"
    await assert_healthy(conn)


async def test_a_task_an_operator_or_a_session_holds_is_left_without_waiting(
    conn: db.Connection, sessions: Opener
) -> None:
    held_step, held_row, free = await run_to_completion(conn, single(), 3)
    await age_finished(conn, [held_step, held_row, free], 40)
    await set_policy(conn, NAMESPACE, "30 days")
    (other,) = await sessions(1)
    async with other.transaction():
        # an operator call holds a step of held_step (retry and resolve lock the step first);
        # another session holds held_row's task row
        await other.execute("SELECT 1 FROM tasker.steps WHERE task_uuid = $1 FOR UPDATE", held_step)
        await other.execute("SELECT 1 FROM tasker.tasks WHERE task_uuid = $1 FOR UPDATE", held_row)
        counts = await purge(conn)
        assert counts.tasks == 1
        assert (await rows_of(conn, free))["tasks"] == 0
        assert (await rows_of(conn, held_step))["steps"] == 1
    assert (await purge(conn)).tasks == 2
    await assert_healthy(conn)


async def _wait_until_blocked(conn: db.Connection, who: db.Connection) -> None:
    """Until `who` waits for a lock (pg_locks, not granted)."""
    for _ in range(1000):
        if await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", who.backend_pid
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session never waited for a lock")


async def test_operator_calls_waiting_on_a_task_being_purged_find_it_gone(
    conn: db.Connection, sessions: Opener
) -> None:
    """cancel_task and resolve_step read the task or step, then wait for the rows the purge
    holds; once it commits they answer "does not exist" and write nothing (no transition of a
    task or step that is gone). A retry of a step in error likewise."""
    done = await run_to_completion(conn, single(), 2)
    broken = await fail_for_good(conn, single(name="broken", retry={"max_attempts": 1}))
    await age_everything(conn, [*done, broken], 40)
    await set_policy(conn, NAMESPACE, "30 days", "30 days")
    steps = {
        t: await conn.fetchval("SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1", t)
        for t in (*done, broken)
    }
    canceller, resolver, retrier, purger = await sessions(4)
    async with purger.transaction():
        assert (await purge(purger)).tasks == 3
        cancel = asyncio.ensure_future(canceller.cancel_task(done[0]))
        await _wait_until_blocked(conn, canceller)
        resolve = asyncio.ensure_future(resolver.resolve_step(steps[done[1]], {"by": "hand"}))
        await _wait_until_blocked(conn, resolver)
        retry = asyncio.ensure_future(retrier.retry_step(steps[broken]))
        await _wait_until_blocked(conn, retrier)
    with pytest.raises(NotFoundError, match="does not exist") as cancelled:
        await cancel
    assert cancelled.value.error_code == "task_not_found"
    for call in (resolve, retry):
        with pytest.raises(NotFoundError, match="does not exist") as err:
            await call
        assert err.value.error_code == "step_not_found"
    assert await table_counts(conn) == {k: 0 for k in TABLES}
    assert await conn.fetchval("SELECT count(*) FROM tasker.queue_messages") == 0
    await assert_healthy(conn)


async def test_batches_are_bounded_and_more_says_when_to_call_again(conn: db.Connection) -> None:
    tasks = await run_to_completion(conn, single(), 25)
    await age_finished(conn, tasks, 40)
    await set_policy(conn, NAMESPACE, "30 days")
    first = await purge(conn, 10)
    second = await purge(conn, 10)
    third = await purge(conn, 10)
    assert [(c.tasks, c.steps, c.more) for c in (first, second, third)] == [
        (10, 10, True),
        (10, 10, True),
        (5, 5, False),
    ]
    assert await table_counts(conn) == {k: 0 for k in TABLES}
    assert first + second + third == db.PurgeCounts(
        tasks=25, steps=25, step_transitions=75, task_transitions=50
    )
    await assert_healthy(conn)


async def test_a_second_purge_at_once_returns_zeros(conn: db.Connection, sessions: Opener) -> None:
    tasks = await run_to_completion(conn, single(), 2)
    await age_finished(conn, tasks, 40)
    await set_policy(conn, NAMESPACE, "30 days")
    (other,) = await sessions(1)
    async with other.transaction():
        assert (await purge(other)).tasks == 2
        assert await purge(conn) == db.PurgeCounts()
    await assert_healthy(conn)


async def test_old_archived_messages_of_a_policy_namespace_are_purged(conn: db.Connection) -> None:
    await conn.register_template(single())
    await conn.register_template(single(namespace=OTHER))
    for queue in (NAMESPACE, OTHER):
        await conn.execute(
            "INSERT INTO tasker.queue_archive"
            " (queue, msg_id, read_ct, enqueued_at, archived_at, vt,"
            " priority, message) SELECT $1, -i, 0, now(), now() - make_interval(days => i * 10),"
            " now(), 0, '{}' FROM generate_series(1, 5) i",
            queue,
        )
    await set_policy(conn, NAMESPACE, "25 days")
    counts = await purge(conn, 2)
    assert (counts.archived_messages, counts.more) == (2, True)
    assert (await purge(conn, 2)).archived_messages == 1
    remaining = await conn.fetch(
        "SELECT queue, -msg_id AS i FROM tasker.queue_archive ORDER BY queue, i"
    )
    assert [(r["queue"], r["i"]) for r in remaining] == [
        (OTHER, 1),
        (OTHER, 2),
        (OTHER, 3),
        (OTHER, 4),
        (OTHER, 5),
        (NAMESPACE, 1),
        (NAMESPACE, 2),
    ]


# --- idempotency keys -------------------------------------------------------------------------


async def test_a_purged_tasks_key_returns_its_uuid_inside_the_window(conn: db.Connection) -> None:
    tpl = single()
    await conn.register_template(tpl)
    name = tpl["name"]
    original = await conn.create_task(NAMESPACE, name, {}, options={"idempotency_key": "k1"})
    unkeyed = await conn.create_task(NAMESPACE, name, {})
    await drive(conn, NAMESPACE, lambda row: None)
    await age_finished(conn, [original, unkeyed], 40)
    await set_policy(conn, NAMESPACE, "30 days", keys="7 days")
    counts = await purge(conn)
    assert (counts.tasks, counts.idempotency_keys_kept) == (2, 1)
    key = await conn.fetchrow("SELECT * FROM tasker.idempotency_keys")
    assert key is not None
    assert (key["namespace"], key["name"], key["idempotency_key"], key["task_uuid"]) == (
        NAMESPACE,
        name,
        "k1",
        original,
    )
    tasks_before = await table_counts(conn)

    # every create path answers with the purged task and creates nothing
    assert (
        await conn.create_task(NAMESPACE, name, {}, options={"idempotency_key": "k1"}) == original
    )
    assert await conn.create_or_get_task(
        NAMESPACE, name, {}, options={"idempotency_key": "k1"}
    ) == (original, False)
    many = await conn.create_tasks(
        NAMESPACE, name, [{}, {}], options=[{"idempotency_key": "k1"}, {"idempotency_key": "k2"}]
    )
    assert many[0] == original and many[1] != original
    after = await table_counts(conn)
    assert after["tasks"] == tasks_before["tasks"] + 1  # k2 only

    # past the window the key is free: a new task, and the purge forgets the old key
    await conn.execute(
        "UPDATE tasker.idempotency_keys SET expires_at = now() - interval '1 second'"
    )
    fresh, created = await conn.create_or_get_task(
        NAMESPACE, name, {}, options={"idempotency_key": "k1"}
    )
    assert created and fresh != original
    assert await conn.create_tasks(NAMESPACE, name, [{}], options=[{"idempotency_key": "k1"}]) == [
        fresh
    ]
    assert (await purge(conn)).idempotency_keys_expired == 1
    assert await conn.fetchval("SELECT count(*) FROM tasker.idempotency_keys") == 0
    await drive(conn, NAMESPACE, lambda row: None)
    await assert_healthy(conn)


async def test_create_tasks_path_after_purge_with_one_options_object(conn: db.Connection) -> None:
    tpl = single()
    await conn.register_template(tpl)
    (original,) = await conn.create_tasks(
        NAMESPACE, tpl["name"], [{}], options={"idempotency_key": "same"}
    )
    await drive(conn, NAMESPACE, lambda row: None)
    await age_finished(conn, [original], 40)
    await set_policy(conn, NAMESPACE, "30 days")
    assert (await purge(conn)).idempotency_keys_kept == 1
    assert await conn.create_tasks(
        NAMESPACE, tpl["name"], [{}], options={"idempotency_key": "same"}
    ) == [original]
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_a_zero_key_window_forgets_the_key_with_its_task(conn: db.Connection) -> None:
    tpl = single()
    await conn.register_template(tpl)
    original = await conn.create_task(NAMESPACE, tpl["name"], {}, options={"idempotency_key": "k"})
    await drive(conn, NAMESPACE, lambda row: None)
    await age_finished(conn, [original], 40)
    await set_policy(conn, NAMESPACE, "30 days", keys="0")
    assert (await purge(conn)).idempotency_keys_kept == 0
    again = await conn.create_task(NAMESPACE, tpl["name"], {}, options={"idempotency_key": "k"})
    assert again != original


async def test_creates_racing_purges_of_the_same_key_never_make_two_tasks(
    conn: db.Connection, sessions: Opener
) -> None:
    """Per round: a finished task with key kN is purged by one session, which commits while
    three others create with kN (each starting after its own short delay, so the creates
    read before, during and after the commit); each must answer the original uuid and none
    creates a task. First, the two sides of the commit: while the purge has not committed a
    create finds the task, once it has the saved key."""
    tpl = single()
    await conn.register_template(tpl)
    name = tpl["name"]
    await set_policy(conn, NAMESPACE, "30 days")
    purger, *creators = await sessions(4)
    held = await conn.create_task(NAMESPACE, name, {}, options={"idempotency_key": "held"})
    await drive(conn, NAMESPACE, lambda row: None)
    await age_finished(conn, [held], 40)
    async with purger.transaction():
        assert (await purger.purge_finished(10)).tasks == 1
        assert (
            await creators[0].create_task(NAMESPACE, name, {}, options={"idempotency_key": "held"})
            == held
        )
    assert (
        await creators[0].create_task(NAMESPACE, name, {}, options={"idempotency_key": "held"})
        == held
    )

    pids = [c.backend_pid for c in creators]
    rng = random.Random(12)
    rounds = 40
    for i in range(rounds):
        key = f"k{i}"
        original = await conn.create_task(NAMESPACE, name, {}, options={"idempotency_key": key})
        await drive(conn, NAMESPACE, lambda row: None)
        await age_finished(conn, [original], 40)

        async def create(c: db.Connection, how: int, key: str = key) -> uuid.UUID:
            await asyncio.sleep(rng.uniform(0, 0.002))
            options = {"idempotency_key": key}
            if how == 0:
                return await c.create_task(NAMESPACE, name, {}, options=options)
            if how == 1:
                return (await c.create_or_get_task(NAMESPACE, name, {}, options=options))[0]
            return (await c.create_tasks(NAMESPACE, name, [{}], options=[options]))[0]

        # the purge deletes, then commits while the creates run: as soon as one of them is
        # seen running (or has finished), after a short random delay
        async with purger.transaction():
            assert (await purger.purge_finished(10)).tasks == 1
            creates = asyncio.gather(*(create(c, n) for n, c in enumerate(creators)))
            for _ in range(10000):
                if creates.done() or await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY ($1::int[])"
                    " AND state = 'active'",
                    pids,
                ):
                    break
            await asyncio.sleep(rng.uniform(0, 0.002))
        assert await creates == [original] * len(creators), i
        assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0, i
        assert (
            await conn.create_task(NAMESPACE, name, {}, options={"idempotency_key": key})
            == original
        )
    assert await conn.fetchval("SELECT count(*) FROM tasker.idempotency_keys") == rounds + 1
    await assert_healthy(conn)


# --- racing live work -------------------------------------------------------------------------


async def test_a_purge_racing_live_workers_deletes_nothing_live(
    conn: db.Connection, sessions: Opener
) -> None:
    """One session creates, claims and completes (a third of the tasks fail for good, and an
    operator retries some of those), while another purges in a loop with a policy that takes
    every finished task and every task in error at once (their times are moved back as they
    finish). Every outcome must apply (a purged live task would make it stale), every retry
    of a task that still exists must leave it live, and the invariants must hold."""
    tpl = linear(3, retry={"max_attempts": 1})
    await conn.register_template(tpl)
    name = tpl["name"]
    await set_policy(conn, NAMESPACE, "1 hour", "1 hour")
    driver, purger, ager = await sessions(3)
    stop = asyncio.Event()
    purged = 0
    retried_live: set[uuid.UUID] = set()

    async def purge_loop() -> None:
        nonlocal purged
        while not stop.is_set():
            purged += (await purger.purge_finished(7)).tasks
            await asyncio.sleep(0)

    async def age_loop() -> None:
        # finished and errored tasks become old at once; the ager locks the tasks it ages
        # (skipping locked ones, like the purge) and changes nothing of any other task
        while not stop.is_set():
            async with ager.transaction():
                aged = await ager.fetchval(
                    "SELECT coalesce(array_agg(task_uuid), '{}') FROM ("
                    " SELECT task_uuid FROM tasker.tasks"
                    "  WHERE state IN ('complete', 'cancelled', 'error')"
                    "    AND updated_at > now() - interval '1 hour'"
                    "  ORDER BY task_uuid FOR UPDATE SKIP LOCKED) t"
                )
                await age_everything(ager, aged, 2 / 24)
            await asyncio.sleep(0.01)

    async def work() -> None:
        n = 0
        for _ in range(40):
            await driver.create_tasks(NAMESPACE, name, [{"i": n + k} for k in range(5)])
            n += 5
            rows = await claim(driver, qty=50)
            outcomes = [
                failure(r, retryable=False)
                if (r["step_name"] == "s2" and hash(r["task_uuid"]) % 3 == 0)
                else success(r)
                for r in rows
            ]
            answers = await driver.complete_steps(outcomes)
            assert [a["status"] for a in answers] == ["applied"] * len(answers)
            # the operator retries some steps in error; a purged one is simply gone
            for step in await driver.fetch(
                "SELECT step_uuid, task_uuid FROM tasker.steps WHERE state = 'error' LIMIT 2"
            ):
                try:
                    result = await driver.retry_step(step["step_uuid"])
                except NotFoundError:
                    continue
                assert result["task_state"] in ("pending", "steps_in_process")
                retried_live.add(step["task_uuid"])
        # finish what is left (retried steps included)
        for _ in range(100):
            rows = await claim(driver, qty=100)
            if not rows:
                break
            answers = await driver.complete_steps([success(r) for r in rows])
            assert [a["status"] for a in answers] == ["applied"] * len(answers)

    loops = [asyncio.ensure_future(purge_loop()), asyncio.ensure_future(age_loop())]
    try:
        await work()
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert purged > 0
    # every task left is consistent, nothing of a purged task is left
    await assert_healthy(conn)
    # nothing live is left behind: the rest finished or waits in error
    left = await conn.fetch("SELECT task_uuid, state FROM tasker.tasks")
    assert {r["state"] for r in left} <= {"complete", "error"}
    assert retried_live  # the operator's retries raced the purge too
