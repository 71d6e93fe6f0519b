"""Flow control in the claim (sql/functions/55_flow.sql): concurrency limits per key, fairness
across keys (lanes served in turn) and rate limits (token buckets).

Covered: a limit holds the extra steps back without a lease, an attempt or an audit row, and lets
the next one start when a step of its key ends (by claim and by hand-off); keys are independent;
claims take turns between lanes (a skewed backlog); a rate limit hands out its burst and makes
the rest visible when their tokens are due; what `step_readiness` says holds a step; bad
templates, contexts and rate limits; lanes are cleaned up when they drain. Every test ends with
`tasker.check_invariants()` empty (the autouse fixture `_healthy_after` checks it).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import TaskerError, ValidationError
from tasker_pg.template import TaskTemplate, TemplateValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    create_many,
    linear,
    step,
    success,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
async def _healthy_after(conn: db.Connection) -> AsyncIterator[None]:
    """Every test ends with `tasker.check_invariants()` empty."""
    yield
    await assert_healthy(conn)


def limited(limit: int = 2, *, name: str = "limited", **flow: Any) -> dict[str, Any]:
    """One step; at most `limit` per `$.customer` in progress."""
    raw = {
        "name": name,
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "concurrency": {"key": "$.customer", "limit": limit},
        "steps": [step("only")],
        **flow,
    }
    return TaskTemplate.from_dict(raw).to_json()


def customer_of(rows: list[Any]) -> list[str]:
    return [r["task_context"]["customer"] for r in rows]


async def test_a_limit_holds_the_extra_steps_of_a_key_without_a_lease_or_an_attempt(
    conn: db.Connection,
) -> None:
    tpl = limited(2)
    tasks = await create_many(conn, tpl, [{"customer": "a"}] * 5 + [{"customer": "b"}])
    rows = await claim(conn, qty=100)
    assert collections.Counter(customer_of(rows)) == {"a": 2, "b": 1}
    held = await conn.fetch(
        "SELECT s.state, s.attempts, s.claim_seq, m.read_ct, m.vt <= clock_timestamp() AS visible"
        " FROM tasker.steps s JOIN tasker.queue_messages m ON m.msg_id = s.msg_id"
        " WHERE s.task_uuid = ANY($1::uuid[]) AND s.state <> 'in_progress'",
        tasks,
    )
    assert len(held) == 3
    assert all(
        h["state"] == "enqueued" and h["attempts"] == 0 and h["claim_seq"] == 0 for h in held
    )
    assert all(h["read_ct"] == 0 and h["visible"] for h in held)
    claimed_events = await conn.fetchval(
        "SELECT count(*) FROM tasker.step_transitions"
        " WHERE task_uuid = ANY($1::uuid[]) AND event = 'claimed'",
        tasks,
    )
    assert claimed_events == 3
    # nothing more while both of a's places are taken
    assert await claim(conn, qty=100) == []
    # one of a's steps ends: exactly one more starts
    a_rows = [r for r in rows if r["task_context"]["customer"] == "a"]
    await complete(conn, *[success(a_rows[0])])
    again = await claim(conn, qty=100)
    assert customer_of(again) == ["a"]
    assert await claim(conn, qty=100) == []
    await complete(conn, *[success(r) for r in [*rows[1:], *again]])
    while rest := await claim(conn, qty=100):
        assert len(rest) <= 2
        await complete(conn, *[success(r) for r in rest])
    states = await conn.fetch(
        "SELECT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", tasks
    )
    assert {s["state"] for s in states} == {"complete"}


async def test_readiness_says_which_limit_holds_a_step(conn: db.Connection) -> None:
    tpl = limited(1)
    tasks = await create_many(conn, tpl, [{"customer": "acme"}] * 2)
    rows = await claim(conn, qty=10)
    assert len(rows) == 1
    held_task = next(t for t in tasks if t != rows[0]["task_uuid"])
    reason = await conn.fetchval("SELECT reason FROM tasker.step_readiness($1)", held_task)
    assert reason == (
        "held by its concurrency limit: 1 of 1 steps with $.customer = 'acme' are in progress; "
        "it starts when one of them ends"
    )
    await complete(conn, *[success(rows[0])])
    reason = await conn.fetchval("SELECT reason FROM tasker.step_readiness($1)", held_task)
    assert reason.startswith("ready: waiting for a worker (fairness lane 'acme'")
    rest = await claim(conn, qty=10)
    await complete(conn, *[success(r) for r in rest])


async def test_a_failure_with_a_retry_gives_the_place_back(conn: db.Connection) -> None:
    tpl = limited(1, name="retrying")
    tasks = await create_many(conn, tpl, [{"customer": "c"}] * 2)
    first = await claim(conn, qty=10)
    assert len(first) == 1
    await complete(
        conn,
        *[
            {
                "step_uuid": str(first[0]["step_uuid"]),
                "attempt": first[0]["attempt"],
                "claim_seq": first[0]["claim_seq"],
                "kind": "failure",
                "worker_id": "w1",
                "duration_ms": 1.0,
                "error": {
                    "message": "later",
                    "error_type": "E",
                    "error_code": "e",
                    "retryable": True,
                },
                "retry_after_seconds": 30,
            }
        ],
    )
    second = await claim(conn, qty=10)
    assert [r["task_uuid"] for r in second] == [t for t in tasks if t != first[0]["task_uuid"]]
    await complete(conn, *[success(second[0])])
    await conn.execute("SELECT tasker.resolve_step($1, '{}'::jsonb)", first[0]["step_uuid"])


async def test_keys_are_independent_and_a_lane_of_many_does_not_starve_a_lane_of_few(
    conn: db.Connection,
) -> None:
    raw = {
        "name": "fair",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "fairness": {"key": "$.customer"},
        "steps": [step("only")],
    }
    tpl = TaskTemplate.from_dict(raw).to_json()
    # a skewed backlog: a has 300 queued before b's 20 and c's 10
    await create_many(conn, tpl, [{"customer": "a"}] * 300)
    await create_many(conn, tpl, [{"customer": "b"}] * 20 + [{"customer": "c"}] * 10)
    got: collections.Counter[str] = collections.Counter()
    first_rounds: list[collections.Counter[str]] = []
    for _ in range(4):
        rows = await claim(conn, qty=15)
        round_ = collections.Counter(customer_of(rows))
        first_rounds.append(round_)
        got += round_
        await complete(conn, *[success(r) for r in rows])
    # turns: the three lanes (and '', empty) share each claim while all have work
    assert first_rounds[0] == {"a": 5, "b": 5, "c": 5}
    assert got["c"] == 10 and got["b"] >= 20 - 5
    while rows := await claim(conn, qty=100):
        await complete(conn, *[success(r) for r in rows])
    # drained: the lanes are gone, the queue is claimed plainly again
    assert await conn.fetchval("SELECT count(*) FROM tasker.flow_lanes") == 0


async def test_the_hand_off_applies_the_limit_and_the_next_held_step_starts_after_it(
    conn: db.Connection,
) -> None:
    raw = {
        "name": "chain",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "concurrency": {"key": "$.customer", "limit": 1},
        "steps": [step("s1"), step("s2", "s1")],
    }
    tpl = TaskTemplate.from_dict(raw).to_json()
    t1, t2 = await create_many(conn, tpl, [{"customer": "x"}, {"customer": "x"}])
    rows = await claim(conn, qty=10)
    assert [r["task_uuid"] for r in rows] == [t1]
    # s1 of t1 ends: its s2 (same key, the place just freed) is handed to the worker; t2's s1
    # stays held
    out = await conn.fetch(
        "SELECT * FROM tasker.complete_and_claim($1::jsonb, 'w1', 5, 30)", [success(rows[0])]
    )
    handed = [r for r in out if r["status"] == "claimed"]
    assert [(r["task_uuid"], r["step_name"]) for r in handed] == [(t1, "s2")]
    # the hand-off was a turn of the lane, like the claim before it
    assert await conn.fetchval("SELECT vtime FROM tasker.flow_lanes WHERE lane = 'x'") == 2
    assert await claim(conn, qty=10) == []
    await complete(conn, *[success(handed[0])])
    nxt = await claim(conn, qty=10)
    assert [(r["task_uuid"], r["step_name"]) for r in nxt] == [(t2, "s1")]
    out = await conn.fetch(
        "SELECT * FROM tasker.complete_and_claim($1::jsonb, 'w1', 5, 30)", [success(nxt[0])]
    )
    last = [r for r in out if r["status"] == "claimed"]
    await complete(conn, *[success(r) for r in last])
    states = await conn.fetch(
        "SELECT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", [t1, t2]
    )
    assert {s["state"] for s in states} == {"complete"}


async def test_a_rate_limit_hands_out_its_burst_then_one_step_per_token(
    conn: db.Connection,
) -> None:
    await conn.execute("SELECT tasker.set_rate_limit('api', 20, 2)")
    raw = {
        "name": "rated",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [step("only", rate_limit="api")],
    }
    tpl = TaskTemplate.from_dict(raw).to_json()
    tasks = await create_many(conn, tpl, [{}] * 6)
    rows = await claim(conn, qty=10)
    assert len(rows) == 2
    # the wait of each held step from the claim's time (the bucket was refilled then)
    held = await conn.fetch(
        "SELECT s.step_uuid, s.attempts, m.vt - r.refilled_at AS wait"
        " FROM tasker.steps s JOIN tasker.queue_messages m ON m.msg_id = s.msg_id"
        " JOIN tasker.rate_limits r ON r.name = 'api'"
        " WHERE s.task_uuid = ANY($1::uuid[]) AND s.state = 'enqueued' ORDER BY m.vt",
        tasks,
    )
    assert len(held) == 4 and all(h["attempts"] == 0 for h in held)
    waits = [h["wait"].total_seconds() for h in held]
    # one token per 50 ms, in the order they were held
    assert [round(w, 3) for w in waits] == [0.05, 0.1, 0.15, 0.2]
    reason = await conn.fetchval(
        "SELECT r.reason FROM tasker.step_readiness("
        " (SELECT task_uuid FROM tasker.steps WHERE step_uuid = $1)) r",
        held[-1]["step_uuid"],
    )
    assert reason.startswith(
        "held by rate limit 'api' (20 per second, burst 2): its token is due at "
    )
    await complete(conn, *[success(r) for r in rows])
    started = len(rows)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while started < 6:
        more = await claim(conn, qty=10)
        started += len(more)
        await complete(conn, *[success(r) for r in more])
        await asyncio.sleep(0.01)
    # 4 more tokens at 20/s take at least ~0.15 s after the burst
    assert loop.time() - t0 >= 0.12


async def test_bad_flow_settings_are_refused(conn: db.Connection) -> None:
    base = {"name": "bad", "namespace_name": NAMESPACE, "version": "1.0.0", "steps": [step("only")]}
    bad: list[tuple[dict[str, Any], str]] = [
        (
            {"concurrency": {"key": "$.c", "limit": 0}},
            "concurrency.limit must be an integer from 1 to 1000000",
        ),
        (
            {"concurrency": {"key": "customer", "limit": 2}},
            "concurrency.key must be a path into the task context",
        ),
        (
            {"concurrency": {"key": "$.c"}},
            "concurrency.limit must be an integer from 1 to 1000000, got nothing",
        ),
        ({"concurrency": {"key": "$.c", "limit": 2, "per": 1}}, "unknown key 'per' in concurrency"),
        ({"fairness": {"key": 3}}, "fairness.key must be a path into the task context"),
        ({"rate_limit": "no such"}, "rate_limit must be the name of a rate limit"),
    ]
    for extra, message in bad:
        with pytest.raises(ValidationError, match=message):
            await conn.register_template({**base, **extra})
        with pytest.raises(TemplateValidationError):
            TaskTemplate.from_dict({**base, **extra})
    with pytest.raises(
        ValidationError, match=r"rate limit 'nope' .* does not exist: create it first"
    ):
        await conn.register_template(
            TaskTemplate.from_dict({**base, "rate_limit": "nope"}).to_json()
        )
    wait = {
        **base,
        "steps": [
            {
                "name": "w",
                "type": "sleep",
                "duration_seconds": 1,
                "concurrency": {"key": "$.c", "limit": 1},
            }
        ],
    }
    with pytest.raises(
        ValidationError,
        match="a sleep step runs no handler: concurrency, fairness and rate_limit do not apply",
    ):
        await conn.register_template(wait)
    with pytest.raises(
        TemplateValidationError, match="concurrency, fairness and rate_limit do not apply"
    ):
        TaskTemplate.from_dict(wait)


async def test_a_context_without_the_key_is_refused_before_anything_is_written(
    conn: db.Connection,
) -> None:
    tpl = limited(2)
    await conn.register_template(tpl)
    for context, what in [
        ({}, "does not hold"),
        ({"customer": ""}, "does not hold"),
        ({"customer": {"id": 1}}, "does not hold"),
    ]:
        with pytest.raises(
            TaskerError,
            match=f"step 'only' has the concurrency key \\$.customer, which the context {what}",
        ):
            await conn.create_task(NAMESPACE, "limited", context)
    with pytest.raises(TaskerError, match="task context #2: step 'only' has the concurrency key"):
        await conn.create_tasks(NAMESPACE, "limited", [{"customer": 1}, {"other": 2}])
    with pytest.raises(TaskerError, match="max_name_bytes"):
        await conn.create_task(NAMESPACE, "limited", {"customer": "x" * 5000})
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0
    # a number is a key too
    task = await conn.create_task(NAMESPACE, "limited", {"customer": 42})
    assert (
        await conn.fetchval("SELECT concurrency_key FROM tasker.steps WHERE task_uuid = $1", task)
        == "42"
    )
    rows = await claim(conn)
    await complete(conn, *[success(r) for r in rows])


async def test_rate_limits_are_checked_and_cannot_be_deleted_while_used(
    conn: db.Connection,
) -> None:
    for args, message in [
        (("", 1.0, 1), "rate limit name '' is invalid"),
        (("ok", 0.0, 1), "per_second must be > 0"),
        (("ok", float("nan"), 1), "per_second must be > 0"),
        (("ok", 1.0, 0), "burst must be from 1 to 1000000"),
    ]:
        with pytest.raises(ValidationError, match=message):
            await conn.execute("SELECT tasker.set_rate_limit($1, $2, $3)", *args)
    row = await conn.fetchrow("SELECT * FROM tasker.set_rate_limit('mail', 2.5)")
    assert (row["per_second"], row["burst"], row["tokens"]) == (2.5, 3, 3.0)
    raw = {
        "name": "m",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "rate_limit": "mail",
        "steps": [step("only")],
    }
    await conn.register_template(TaskTemplate.from_dict(raw).to_json())
    with pytest.raises(ValidationError, match="rate limit 'mail' is used by template"):
        await conn.execute("SELECT tasker.delete_rate_limit('mail')")
    await conn.execute("SELECT tasker.set_rate_limit('spare', 1)")
    assert await conn.fetchval("SELECT tasker.delete_rate_limit('spare')") is True
    assert await conn.fetchval("SELECT tasker.delete_rate_limit('spare')") is False


async def test_the_template_level_settings_apply_to_each_step_unless_it_declares_its_own(
    conn: db.Connection,
) -> None:
    raw = {
        "name": "levels",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "concurrency": {"key": "$.customer", "limit": 3},
        "steps": [
            step("a"),
            step(
                "b",
                "a",
                concurrency={"key": "$.region", "limit": 1},
                fairness={"key": "$.customer"},
            ),
            {"name": "pause", "type": "sleep", "duration_seconds": 1, "dependencies": ["b"]},
        ],
    }
    tpl = TaskTemplate.from_dict(raw)
    assert TaskTemplate.from_dict(tpl.to_json()) == tpl
    await conn.register_template(tpl.to_json())
    rows = await conn.fetch(
        "SELECT n.name, n.concurrency_path, n.concurrency_limit, n.lane_path"
        " FROM tasker.named_steps n JOIN tasker.named_tasks t USING (named_task_id)"
        " WHERE t.name = 'levels' ORDER BY n.step_index"
    )
    assert [tuple(r) for r in rows] == [
        ("a", "$.customer", 3, "$.customer"),
        ("b", "$.region", 1, "$.customer"),
        ("pause", None, None, None),
    ]
    # the same body again is the same template
    stored = await conn.fetchval("SELECT template FROM tasker.named_tasks WHERE name = 'levels'")
    assert stored == tpl.to_json()
    with pytest.raises(TaskerError, match=r"step 'b' has the concurrency key \$.region"):
        await conn.create_task(NAMESPACE, "levels", {"customer": "c1"})


async def test_a_lane_and_its_messages_survive_a_concurrent_claim_that_finds_it_idle(
    conn: db.Connection, dsn: str
) -> None:
    """A transaction that sends into a lane holds it: a claim cannot delete it under it."""
    tpl = linear(2, name="lanes")
    raw = {**tpl, "fairness": {"key": "$.k"}}
    await conn.register_template(raw)
    await conn.create_task(NAMESPACE, "lanes", {"k": "only"})
    first = await claim(conn)
    other = await db.connect(dsn)
    try:
        async with other.transaction():
            # the second task's lane row is noted (KEY SHARE) but not committed yet
            await other.create_task(NAMESPACE, "lanes", {"k": "later"})
            await complete(conn, *[success(r) for r in first])
            # claims meanwhile: the lane 'later' has no committed message; it must stay
            for _ in range(3):
                for r in await claim(conn):
                    await complete(conn, *[success(r)])
        assert (
            await conn.fetchval("SELECT count(*) FROM tasker.flow_lanes WHERE lane = 'later'") == 1
        )
        rows = await claim(conn)
        assert [r["task_context"] for r in rows] == [{"k": "later"}]
        await complete(conn, *[success(r) for r in rows])
        while rows := await claim(conn):
            await complete(conn, *[success(r) for r in rows])
    finally:
        await other.close()


async def test_a_step_released_or_whose_lease_expired_gives_its_place_back(
    conn: db.Connection,
) -> None:
    """Only a completion deletes its step's record at once; a step that left in_progress
    otherwise must not hold its key's place for good."""
    tpl = limited(1, name="released")
    tasks = await create_many(conn, tpl, [{"customer": "r"}] * 2)
    first = await claim(conn, qty=10)
    assert len(first) == 1
    fence = {
        "step_uuid": str(first[0]["step_uuid"]),
        "attempt": first[0]["attempt"],
        "claim_seq": first[0]["claim_seq"],
    }
    await conn.release_steps([fence], worker_id="w1")
    assert await conn.fetchval("SELECT count(*) FROM tasker.flow_holders") == 1  # stale
    again = await claim(conn, qty=10)
    assert len(again) == 1
    # a lost lease: the step stays in_progress (its place taken) until a claim records the loss
    expiring = await claim(conn, qty=10, lease=0.05)
    assert expiring == []  # the key's one place is taken
    await complete(conn, success(again[0]))
    expiring = await claim(conn, qty=10, lease=0.05)
    assert len(expiring) == 1
    await asyncio.sleep(0.1)
    # the next claim records the lost lease (a retry after backoff), and the key is free again
    assert await claim(conn, qty=10) == []
    row = await conn.fetchrow(
        "SELECT state, attempts FROM tasker.steps WHERE step_uuid = $1", expiring[0]["step_uuid"]
    )
    assert tuple(row) == ("waiting_for_retry", 1)
    await conn.execute(
        "UPDATE tasker.steps SET next_attempt_at = now() WHERE step_uuid = $1",
        expiring[0]["step_uuid"],
    )
    await conn.execute(
        "UPDATE tasker.queue_messages SET vt = now() WHERE msg_id ="
        " (SELECT msg_id FROM tasker.steps WHERE step_uuid = $1)",
        expiring[0]["step_uuid"],
    )
    last = await claim(conn, qty=10)
    assert [r["step_uuid"] for r in last] == [expiring[0]["step_uuid"]]
    await complete(conn, success(last[0]))
    states = await conn.fetch(
        "SELECT state FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[])", tasks
    )
    assert {s["state"] for s in states} == {"complete"}
