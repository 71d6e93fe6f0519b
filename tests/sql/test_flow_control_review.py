"""Review of flow control (sql/functions/55_flow.sql, _flow_admit in 50_claim.sql): cases the
first tests did not reach, most of them a bug found in review (fixed unless marked xfail).

- A saturated lane read oldest first: a step whose lease expired, or that checkpointed and waits
  to continue, has a message younger than its key's backlog, whose head a full key holds back
  at every claim; the lost lease was never recorded (nor the checkpoint continued).
- A fairness lane that is not the concurrency key (xfail): the held messages of a key at its
  limit keep their place at the head of the lane, and the other keys behind them wait.
- cancel_task / resolve_step of a running keyed step, then purge_finished: holder rows left.
- A claim deleting an idle lane, then waiting for a task row, against a completion that holds
  that row and sends a child into the lane: deadlock.
- A rate limit's parked_until outlives the held messages it was computed for (xfail).
- Steps held because another claim admits their key: nobody woke the queue.
- set_rate_limit: the steps held at the old rate kept their old times.
- The first qty + 1 lanes in turn order, all full or all empty, hid the lanes behind them.
- A hand-off into two queues charged the first queue's lane, then waited for a rate limit row
  a claim held while it waited for that lane (a cycle once the claim takes its lanes last).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.template import TaskTemplate
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    checkpoint,
    claim,
    complete,
    create_many,
    failure,
    step,
    success,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
async def _healthy_after(conn: db.Connection) -> AsyncIterator[None]:
    """Every test ends with `tasker.check_invariants()` empty."""
    yield
    await assert_healthy(conn)


def flow_template(name: str, **flow: Any) -> dict[str, Any]:
    """One step, `only`, with the given template-level flow settings."""
    raw = {
        "name": name,
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [step("only")],
        **flow,
    }
    return TaskTemplate.from_dict(raw).to_json()


async def drain(conn: db.Connection, tasks: list[uuid.UUID], *, rounds: int = 50) -> None:
    """Claims and completes until every task is complete (at most `rounds` claims)."""
    for _ in range(rounds):
        rows = await claim(conn, qty=10)
        if rows:
            await complete(conn, *[success(r) for r in rows])
        states = await conn.fetch(
            "SELECT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", tasks
        )
        if {s["state"] for s in states} == {"complete"}:
            return
    left = [s["state"] for s in states]
    raise AssertionError(f"tasks not complete after {rounds} claims: {left}")


async def test_an_expired_lease_in_a_saturated_lane_is_recorded_and_frees_the_key(
    conn: db.Connection,
) -> None:
    """Limit 1, a backlog of the key, and the one running step loses its lease: the next
    claims must record the lost lease (and go on), not read the backlog's head for ever."""
    tpl = flow_template("expiring", concurrency={"key": "$.customer", "limit": 1})
    tasks = await create_many(conn, tpl, [{"customer": "x"}] * 3)
    first = await claim(conn, qty=10, lease=0.05)
    assert len(first) == 1
    await asyncio.sleep(0.1)
    started = []
    for _ in range(5):
        started += await claim(conn, qty=10)
    row = await conn.fetchrow(
        "SELECT state, attempts FROM tasker.steps WHERE step_uuid = $1", first[0]["step_uuid"]
    )
    assert row["state"] == "waiting_for_retry", "the lost lease was never recorded"
    # the key's place is free again: one step of the backlog starts (one, the limit)
    assert len(started) == 1
    await complete(conn, *[success(r) for r in started])
    await conn.execute(
        "UPDATE tasker.queue_messages SET vt = now() WHERE msg_id ="
        " (SELECT msg_id FROM tasker.steps WHERE step_uuid = $1)",
        first[0]["step_uuid"],
    )
    await drain(conn, tasks)


async def test_a_checkpointed_step_continues_in_a_saturated_lane(conn: db.Connection) -> None:
    """Limit 1, a backlog of the key, and the running step checkpoints: the continuation is the
    key's one place, so the next claim must hand it out (run_resume)."""
    tpl = flow_template("resuming", concurrency={"key": "$.customer", "limit": 1})
    tasks = await create_many(conn, tpl, [{"customer": "y"}] * 3)
    first = await claim(conn, qty=10)
    assert len(first) == 1
    await complete(conn, checkpoint(first[0], cursor=1, items_processed=1))
    again = []
    for _ in range(5):
        again = await claim(conn, qty=10)
        if again:
            break
    assert [(r["step_uuid"], r["claim_event"]) for r in again] == [
        (first[0]["step_uuid"], "resumed")
    ]
    await complete(conn, success(again[0]))
    await drain(conn, tasks)


@pytest.mark.xfail(
    strict=True,
    reason="a key's held messages stay at the head of a fairness lane that is not the key: "
    "not fixed (see the review report)",
)
async def test_a_key_at_its_limit_does_not_starve_the_other_keys_of_its_fairness_lane(
    conn: db.Connection,
) -> None:
    """Fairness by $.tenant, limit 1 by $.customer: customer c1 (running, a backlog) must not
    keep customer c2 of the same tenant waiting."""
    tpl = flow_template(
        "tenants",
        concurrency={"key": "$.customer", "limit": 1},
        fairness={"key": "$.tenant"},
    )
    await create_many(conn, tpl, [{"tenant": "t", "customer": "c1"}] * 6)
    late = await create_many(conn, tpl, [{"tenant": "t", "customer": "c2"}])
    first = await claim(conn, qty=1)
    assert [r["task_context"]["customer"] for r in first] == ["c1"]
    got: list[Any] = []
    for _ in range(10):
        got = await claim(conn, qty=2)
        if got:
            break
    assert [r["task_uuid"] for r in got] == late, "c2's step was never claimed"
    await complete(conn, success(first[0]), success(got[0]))


async def test_purging_a_task_cancelled_while_its_keyed_step_ran_leaves_no_place_behind(
    conn: db.Connection,
) -> None:
    """A step cancelled (or resolved) while it runs leaves its flow_holders row; once its task
    is purged, nothing may still point at the step (each key would keep up to `limit` such rows
    for good when it is never full again)."""
    tpl = flow_template("purged", concurrency={"key": "$.customer", "limit": 2})
    tasks = await create_many(conn, tpl, [{"customer": "p1"}, {"customer": "p2"}])
    rows = await claim(conn, qty=10)
    assert len(rows) == 2
    await conn.cancel_task(tasks[0])
    await conn.resolve_step(next(r["step_uuid"] for r in rows if r["task_uuid"] == tasks[1]))
    await conn.fetch("SELECT * FROM tasker.set_retention_policy($1, interval '1 day')", NAMESPACE)
    await conn.execute(
        "UPDATE tasker.tasks SET completed_at = now() - interval '2 days'"
        " WHERE task_uuid = ANY($1::uuid[])",
        tasks,
    )
    assert (await conn.purge_finished(100)).tasks == 2
    left = await conn.fetch(
        "SELECT h.step_uuid FROM tasker.flow_holders h"
        " WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = h.step_uuid)"
    )
    assert left == []


async def test_a_claim_deleting_an_idle_lane_does_not_deadlock_with_a_completion_sending_into_it(
    conn: db.Connection, dsn: str
) -> None:
    """The claim deletes the idle lane x (its row locked until it commits), then waits for a
    task row (a lost lease of that task to record) that a completion holds; the completion then
    enqueues a child into lane x (_note_lanes: FOR KEY SHARE, which waits for the deletion).
    complete_steps locks its tasks (step 6) before it enqueues (step 7): the two must not wait
    for each other in a cycle. The completion is split in two calls in one transaction only to
    place the claim between its task lock and its enqueue."""
    raw = {
        "name": "mixedflow",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [
            step("a"),
            step("b"),
            step("e"),
            step("c", "a", concurrency={"key": "$.customer", "limit": 5}),
        ],
    }
    tpl = TaskTemplate.from_dict(raw).to_json()
    await conn.register_template(tpl)
    # an earlier task of customer x leaves the lane x behind, idle
    t0 = await conn.create_task(NAMESPACE, "mixedflow", {"customer": "x"})
    rows = await claim(conn, qty=10)
    await complete(conn, *[success(r) for r in rows])
    task = await conn.create_task(NAMESPACE, "mixedflow", {"customer": "x"})
    rows = {(r["task_uuid"], r["step_name"]): r for r in await claim(conn, qty=10)}
    assert set(rows) == {(t0, "c"), (task, "a"), (task, "b"), (task, "e")}
    await complete(conn, success(rows[t0, "c"]))
    assert await conn.fetchval("SELECT count(*) FROM tasker.flow_lanes WHERE lane = 'x'") == 1
    rows = {name: r for (t, name), r in rows.items() if t == task}
    # e's lease is lost: the next claim records it, under its task's row lock
    await conn.execute(
        "UPDATE tasker.queue_messages SET vt = clock_timestamp() - interval '1 second'"
        " WHERE msg_id = $1",
        rows["e"]["msg_id"],
    )
    completer, claimer = await db.connect(dsn), await db.connect(dsn)
    try:
        await completer.execute("SET deadlock_timeout = '100ms'")
        await claimer.execute("SET deadlock_timeout = '100ms'")
        async with completer.transaction():
            await complete(completer, success(rows["b"]))  # holds the task row
            claiming = asyncio.ensure_future(claim(claimer, qty=10))
            # the claim deletes lane x, then waits for the task row
            for _ in range(200):
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%claim_steps%'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert waiting == 1
            await complete(completer, success(rows["a"]))  # enqueues c into lane x
        assert await claiming == []
    finally:
        await completer.close()
        await claimer.close()
    rows = await claim(conn, qty=10)
    assert [r["step_name"] for r in rows] == ["c"]
    await complete(conn, *[success(r) for r in rows])
    assert t0 and task


def rated_template(name: str, bucket: str) -> dict[str, Any]:
    raw = {
        "name": name,
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [step("only", rate_limit=bucket)],
    }
    return TaskTemplate.from_dict(raw).to_json()


@pytest.mark.xfail(
    strict=True,
    reason="rate_limits.parked_until outlives the held messages it was computed for: not fixed "
    "(see the review report)",
)
async def test_a_held_step_waits_for_its_token_not_for_a_cancelled_backlog(
    conn: db.Connection,
) -> None:
    """10 per second, burst 1: a backlog of 50 is held (one token each, up to 5 s ahead), then
    cancelled. A step held afterwards must be due when the bucket next holds a token (0.1 s),
    not when the cancelled backlog would have ended."""
    await conn.execute("SELECT tasker.set_rate_limit('slow', 10, 1)")
    tpl = rated_template("throttled", "slow")
    backlog = await create_many(conn, tpl, [{}] * 50)
    rows = await claim(conn, qty=100)
    assert len(rows) == 1
    await complete(conn, success(rows[0]))
    for t in backlog:
        if t != rows[0]["task_uuid"]:
            await conn.cancel_task(t)
    late = await create_many(conn, tpl, [{}] * 2)
    rows = await claim(conn, qty=100)
    await complete(conn, *[success(r) for r in rows])
    wait = await conn.fetchval(
        "SELECT max(m.vt - clock_timestamp()) FROM tasker.steps s"
        " JOIN tasker.queue_messages m ON m.msg_id = s.msg_id"
        " WHERE s.task_uuid = ANY($1::uuid[]) AND s.state = 'enqueued'",
        late,
    )
    # (at most one of the two is admitted at once; the other's token is due within 0.2 s)
    assert wait is None or wait.total_seconds() <= 0.25, f"held for {wait}"
    await drain_slowly(conn, late)


async def drain_slowly(conn: db.Connection, tasks: list[uuid.UUID]) -> None:
    """Claims (as the held steps' messages become visible) until every task is complete."""
    for _ in range(200):
        rows = await claim(conn, qty=10)
        if rows:
            await complete(conn, *[success(r) for r in rows])
        states = await conn.fetch(
            "SELECT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", tasks
        )
        if {s["state"] for s in states} == {"complete"}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("tasks not complete after 10 s")


async def test_a_step_held_because_another_claim_admits_its_key_wakes_the_queue(
    conn: db.Connection, dsn: str
) -> None:
    """A claim that cannot take a key's advisory lock (another claim is admitting the key) holds
    that key's steps though the key may have room: it must notify the queue so that a worker
    asks again once the other claim is done, not when its poll interval next comes round."""
    tpl = flow_template("locked", concurrency={"key": "$.customer", "limit": 5})
    await create_many(conn, tpl, [{"customer": "busy"}] * 2)
    admitting, listener = await db.connect(dsn), await db.connect(dsn)
    seen: list[str] = []
    try:
        await listener.listen(f"tasker_{NAMESPACE}", lambda _c, p: seen.append(p))
        async with admitting.transaction():
            await admitting.execute(
                "SELECT pg_advisory_xact_lock(tasker._concurrency_lock_key($1, 'busy'))", NAMESPACE
            )
            assert await claim(conn, qty=10) == []  # held: the key's lock is taken
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen, "nobody was told that the held steps may start"
    finally:
        await admitting.close()
        await listener.close()
    rows = await claim(conn, qty=10)
    assert len(rows) == 2
    await complete(conn, *[success(r) for r in rows])


async def test_raising_a_rate_limit_lets_its_held_steps_start_at_the_new_rate(
    conn: db.Connection,
) -> None:
    """1 per second, burst 1: 19 of 20 steps are held, the last one 19 s ahead. The operator
    raises the limit to 1000 per second: the held steps must start at once (within the new
    burst), not at the times the old rate gave them."""
    await conn.execute("SELECT tasker.set_rate_limit('raised', 1, 1)")
    tpl = rated_template("raising", "raised")
    tasks = await create_many(conn, tpl, [{}] * 20)
    rows = await claim(conn, qty=100)
    assert len(rows) == 1
    await complete(conn, success(rows[0]))
    await conn.execute("SELECT tasker.set_rate_limit('raised', 1000, 100)")
    started = 0
    for _ in range(20):
        rows = await claim(conn, qty=100)
        started += len(rows)
        await complete(conn, *[success(r) for r in rows])
        if started == 19:
            break
        await asyncio.sleep(0.05)
    assert started == 19, f"{started} of the 19 held steps started within 1 s of the raise"
    await drain(conn, tasks)


async def test_lanes_at_their_limit_do_not_hide_the_lanes_behind_them(
    conn: db.Connection,
) -> None:
    """Limit 1 per customer: customers a..e each run one step and have one more queued (their
    lanes are full and keep their turn). A new customer z comes: a claim of 2 must find z's
    step, not read only the first 3 lanes in turn order (all full, or empty) and stop."""
    tpl = flow_template("crowded", concurrency={"key": "$.customer", "limit": 1})
    crowd = await create_many(conn, tpl, [{"customer": c} for c in "abcde" for _ in range(2)])
    running = await claim(conn, qty=10)
    assert sorted(r["task_context"]["customer"] for r in running) == list("abcde")
    late = await create_many(conn, tpl, [{"customer": "z"}])
    got: list[Any] = []
    for _ in range(5):
        got = await claim(conn, qty=2)
        if got:
            break
    assert [r["task_uuid"] for r in got] == late, "z's step was never claimed"
    await complete(conn, *[success(r) for r in [*running, *got]])
    await drain(conn, crowd + late)


async def test_lanes_with_nothing_visible_do_not_hide_the_lanes_behind_them(
    conn: db.Connection,
) -> None:
    """Fairness by tenant, no limit: tenants a, b and c each run one step (their messages are
    leased: nothing visible) and nothing else. A new tenant z comes: a claim of 2 reads the first
    3 lanes in turn order, finds nothing, and must move them back so that z's turn comes."""
    tpl = flow_template("tenanted", fairness={"key": "$.tenant"})
    busy = await create_many(conn, tpl, [{"tenant": t} for t in "abc"])
    running = await claim(conn, qty=10)
    assert len(running) == 3
    late = await create_many(conn, tpl, [{"tenant": "z"}])
    got: list[Any] = []
    for _ in range(5):
        got = await claim(conn, qty=2)
        if got:
            break
    assert [r["task_uuid"] for r in got] == late, "z's step was never claimed"
    await complete(conn, *[success(r) for r in [*running, *got]])
    await drain(conn, busy + late)


async def test_four_workers_with_hand_offs_keep_the_limit_and_never_deadlock(
    conn: db.Connection, dsn: str
) -> None:
    """4 sessions claim and complete with hand-offs over keyed chains (limit 2 per customer,
    lanes by customer) and plain ones (lane ''), while a sampler checks the limit: no error (a
    deadlock among claims, hand-offs and lane deletions would be one), every task complete."""
    keyed = {
        "name": "keyedchain",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "concurrency": {"key": "$.customer", "limit": 2},
        "steps": [step("s1"), step("s2", "s1"), step("s3", "s2")],
    }
    plain = {
        "name": "plainchain",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [step("s1"), step("s2", "s1")],
    }
    tasks: list[uuid.UUID] = []
    for raw, contexts in (
        (keyed, [{"customer": f"c{i % 6}"} for i in range(60)]),
        (plain, [{}] * 20),
    ):
        tasks += await create_many(conn, TaskTemplate.from_dict(raw).to_json(), contexts)
    workers = [await db.connect(dsn) for _ in range(4)]
    done = asyncio.Event()
    worst = 0

    async def work(c: db.Connection, name: str) -> None:
        held: list[Any] = []
        while not done.is_set():
            if not held:
                held = list(await claim(c, qty=3, worker=name))
                if not held:
                    await asyncio.sleep(0.01)
                    continue
            row, held = held[0], held[1:]
            _, more = await c.complete_and_claim([success(row, worker=name)], name, 2, 30.0)
            held += [
                {
                    "step_uuid": m.step_uuid,
                    "attempt": m.attempt,
                    "claim_seq": m.claim_seq,
                    "step_name": m.step_name,
                }
                for m in more
            ]

    async def sample() -> None:
        nonlocal worst
        while not done.is_set():
            worst = max(
                worst,
                await conn.fetchval(
                    "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM tasker.steps"
                    " WHERE state = 'in_progress' AND concurrency_key IS NOT NULL"
                    " GROUP BY concurrency_key) x"
                ),
            )
            states = await conn.fetch(
                "SELECT DISTINCT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", tasks
            )
            if {s["state"] for s in states} == {"complete"}:
                done.set()
            await asyncio.sleep(0.02)

    try:
        runs = [asyncio.ensure_future(work(c, f"w{i}")) for i, c in enumerate(workers)]
        await asyncio.wait_for(asyncio.gather(sample(), *runs), timeout=45)
    finally:
        done.set()
        for c in workers:
            await c.close()
    assert worst <= 2


async def test_a_task_resumed_after_an_error_sends_its_keyed_steps_into_their_lane(
    conn: db.Connection,
) -> None:
    """Limit 1 per customer, two parallel steps: a fails for good (the task goes to error), the
    claim parks b (its message is deleted, and the idle lane with it); retry_step(a) resumes the
    task: both messages come back in lane 'k', which must exist again, and run one at a time."""
    raw = {
        "name": "resumed",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "concurrency": {"key": "$.customer", "limit": 1},
        "steps": [step("a", retry={"max_attempts": 1}), step("b")],
    }
    tpl = TaskTemplate.from_dict(raw).to_json()
    [task] = await create_many(conn, tpl, [{"customer": "k"}])
    # a holds the key while b's message waits in lane 'k'
    await conn.execute(
        "UPDATE tasker.queue_messages SET priority = 1 WHERE msg_id ="
        " (SELECT msg_id FROM tasker.steps WHERE task_uuid = $1 AND name = 'a')",
        task,
    )
    first = await claim(conn, qty=10)
    assert [r["step_name"] for r in first] == ["a"]
    await complete(conn, failure(first[0], retryable=False))
    assert await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task) == (
        "error"
    )
    assert await claim(conn, qty=10) == []  # parks b (the task is in error)
    assert await conn.fetchval("SELECT count(*) FROM tasker.queue_messages") == 0
    failed = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND state = 'error' LIMIT 1", task
    )
    await conn.retry_step(failed)
    seen = 0
    for _ in range(20):
        rows = await claim(conn, qty=10)
        assert len(rows) <= 1
        seen += len(rows)
        await complete(conn, *[success(r) for r in rows])
        if await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task) == (
            "complete"
        ):
            break
    assert await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task) == (
        "complete"
    )


async def test_a_hand_off_into_two_queues_does_not_deadlock_with_a_claim_of_the_first(
    conn: db.Connection, dsn: str
) -> None:
    """complete_and_claim hands off into queue aflow (a child in lane x: the lane is charged)
    and then into zflow (a child with rate limit r: it waits for r's row). A claim of aflow holds
    r (a candidate of its own with that rate limit) and then takes the lanes it read, x among
    them. Had the hand-off kept x's row while it waited for r, the two would wait for each other.
    A third session holds r at first, only to order the two waits."""
    await conn.execute("SELECT tasker.set_rate_limit('r', 1000, 1000)")
    for q in ("aflow", "zflow"):
        await conn.create_queue(q)

    def tpl(name: str, ns: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
        raw = {"name": name, "namespace_name": ns, "version": "1.0.0", "steps": steps}
        return TaskTemplate.from_dict(raw).to_json()

    parent_a = tpl("pa", "aflow", [step("p"), step("c", "p", fairness={"key": "$.k"})])
    rated_a = tpl("ra", "aflow", [step("only", fairness={"key": "$.k"}, rate_limit="r")])
    parent_z = tpl("pz", "zflow", [step("p"), step("c", "p", rate_limit="r")])
    for t in (parent_a, rated_a, parent_z):
        await conn.register_template(t)
    ta = await conn.create_task("aflow", "pa", {"k": "x"})
    tz = await conn.create_task("zflow", "pz", {})
    pa = await claim(conn, "aflow", qty=1)
    pz = await claim(conn, "zflow", qty=1)
    assert [r["step_name"] for r in pa + pz] == ["p", "p"]
    # lane x holds a rate-limited step for the claim to read
    tr = await conn.create_task("aflow", "ra", {"k": "x"})
    holder, claimer, completer = [await db.connect(dsn) for _ in range(3)]
    try:
        for c in (claimer, completer):
            await c.execute("SET deadlock_timeout = '100ms'")
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM tasker.rate_limits WHERE name = 'r' FOR UPDATE")
            claiming = asyncio.ensure_future(claim(claimer, "aflow", qty=10))
            await wait_for_lock_waits(conn, 1)  # the claim waits for r
            completing = asyncio.ensure_future(
                completer.complete_and_claim([success(pa[0]), success(pz[0])], "w1", 10, 30.0)
            )
            await wait_for_lock_waits(conn, 2)  # the hand-off waits for r too
        claimed = await claiming
        _, handed = await completing
    finally:
        for c in (holder, claimer, completer):
            await c.close()
    assert [r["step_name"] for r in claimed] == ["only"]
    assert sorted(h.step_name for h in handed) == ["c", "c"]
    await complete(conn, success(claimed[0]))
    for h in handed:
        await complete(
            conn,
            success(
                {
                    "step_uuid": h.step_uuid,
                    "attempt": h.attempt,
                    "claim_seq": h.claim_seq,
                    "step_name": h.step_name,
                }
            ),
        )
    assert ta and tz and tr


async def wait_for_lock_waits(conn: db.Connection, n: int) -> None:
    """Until n sessions of this database wait for a lock."""
    for _ in range(250):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} sessions never waited for a lock")
