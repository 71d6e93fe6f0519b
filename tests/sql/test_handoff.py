"""The hand-off: `tasker.complete_and_claim` claims the children an outcome makes ready for the
worker that sent it, in the same transaction, and returns them as claim rows.

Covered: what is handed (up to the slots asked for, the rest enqueued and notified), the claim
it makes (fence, lease, audit row), priorities (a visible message of a higher priority waiting
in the queue stops it), a re-sent batch after a lost answer (the children handed to that worker
are released at once, not left until their lease ends), the fence of a handed claim, and bad
input. Every test ends with `tasker.check_invariants()` empty (the conn fixture checks it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    diamond,
    failure,
    linear,
    single,
    start,
    step,
    step_row,
    step_states,
    success,
    template,
    transitions,
)

pytestmark = pytest.mark.timeout(60)

W = "w1"


async def complete_and_claim(
    conn: db.Connection,
    outcomes: Sequence[Mapping[str, Any]],
    handoff: int,
    *,
    worker: str | None = W,
    lease: float | None = 30.0,
) -> tuple[list[Any], list[Any]]:
    """One call: (outcome rows, claim rows)."""
    rows = await conn.fetch(
        "SELECT * FROM tasker.complete_and_claim($1::jsonb, $2, $3, $4)",
        [dict(o) for o in outcomes],
        worker,
        handoff,
        lease,
    )
    return [r for r in rows if r["status"] != "claimed"], [
        r for r in rows if r["status"] == "claimed"
    ]


class Notifications:
    """The notifications of one queue's channel that reached a listening session."""

    def __init__(self) -> None:
        self.count = 0
        self.arrived = asyncio.Event()

    def __call__(self, *_args: Any) -> None:
        self.count += 1
        self.arrived.set()


async def _listen(dsn: str) -> tuple[db.Connection, Notifications]:
    listener = await db.connect(dsn)
    seen = Notifications()
    await listener.listen(f"tasker_{NAMESPACE}", seen)
    return listener, seen


async def _settle(listener: db.Connection) -> None:
    """A round trip on the listening session: notifications committed before it have arrived."""
    await listener.execute("SELECT 1")


async def test_a_success_hands_its_ready_child_to_the_worker_with_a_fenced_lease(
    conn: db.Connection, dsn: str
) -> None:
    tpl = linear(2)
    task = await start(conn, tpl)
    (s1,) = await claim(conn)
    listener, seen = await _listen(dsn)
    try:
        answers, claims = await complete_and_claim(conn, [success(s1, {"v": 1})], 5)
        await _settle(listener)
        await _settle(listener)
        assert seen.count == 0  # nothing was left for other workers: no wake-up
    finally:
        await listener.close()
    assert [(a["step_uuid"], a["attempt"], a["status"], a["detail"]) for a in answers] == [
        (s1["step_uuid"], 1, "applied", "complete")
    ]
    (s2,) = claims
    row = await step_row(conn, task, "s2")
    assert (s2["step_name"], s2["step_uuid"], s2["attempt"], s2["claim_seq"]) == (
        "s2",
        row["step_uuid"],
        1,
        1,
    )
    assert s2["dependency_results"] == {"s1": {"v": 1}}
    assert s2["claim_event"] == "claimed" and s2["dependents"] == 0
    assert (row["state"], row["worker_id"], row["attempts"]) == ("in_progress", W, 1)
    lease = await conn.fetchval(
        "SELECT vt FROM tasker.queue_messages WHERE queue = $1 AND msg_id = $2",
        NAMESPACE,
        s2["msg_id"],
    )
    assert lease == s2["lease_expires_at"]
    completed_at = (await step_row(conn, task, "s1"))["completed_at"]
    assert row["started_at"] == completed_at  # claimed in the completing transaction
    audit = [
        (t["event"], t["worker_id"], t["metadata"])
        for t in await transitions(conn, s2["step_uuid"])
    ]
    assert audit == [
        ("created", None, None),
        ("dependencies_satisfied", None, None),
        ("claimed", W, {"handoff": True}),
    ]
    # nothing else can claim it; its outcome applies under the returned fence
    assert await claim(conn, worker="w2") == []
    done = await complete(conn, success(s2))
    assert done[str(s2["step_uuid"])]["status"] == "applied"
    assert (await conn.fetchrow("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task))[
        "state"
    ] == "complete"


async def test_the_claim_rows_say_how_many_steps_wait_on_each_step(conn: db.Connection) -> None:
    await start(conn, diamond())
    (first,) = await claim(conn)
    assert (first["step_name"], first["dependents"]) == ("start", 2)
    _, claims = await complete_and_claim(conn, [success(first)], 2)
    assert sorted((c["step_name"], c["dependents"]) for c in claims) == [("b", 1), ("c", 1)]


async def test_no_more_than_the_slots_asked_for_are_handed_and_the_rest_wake_the_queue(
    conn: db.Connection, dsn: str
) -> None:
    task = await start(conn, diamond())
    (first,) = await claim(conn)
    listener, seen = await _listen(dsn)
    try:
        _, claims = await complete_and_claim(conn, [success(first)], 1)
        await asyncio.wait_for(seen.arrived.wait(), 10)
    finally:
        await listener.close()
    assert len(claims) == 1
    states = await step_states(conn, task)
    handed = claims[0]["step_name"]
    other = ({"b", "c"} - {handed}).pop()
    assert (states[handed], states[other]) == ("in_progress", "enqueued")
    (rest,) = await claim(conn, worker="w2")
    assert rest["step_name"] == other


async def test_two_children_are_both_handed_without_a_wake_up_or_both_kept_behind_a_priority(
    conn: db.Connection, dsn: str
) -> None:
    """Two children of one outcome (the ranking query, not the one-child shortcut): with two
    slots both are handed and nobody is woken; with a visible message of a higher priority
    waiting, neither is handed and the queue is woken."""
    task = await start(conn, diamond())
    (first,) = await claim(conn)
    listener, seen = await _listen(dsn)
    try:
        _, claims = await complete_and_claim(conn, [success(first)], 2)
        await _settle(listener)
        await _settle(listener)
        assert seen.count == 0
    finally:
        await listener.close()
    assert sorted(c["step_name"] for c in claims) == ["b", "c"]
    states = await step_states(conn, task)
    assert (states["b"], states["c"]) == ("in_progress", "in_progress")
    await complete(conn, *(success(c) for c in claims))
    (end,) = await claim(conn)
    await complete(conn, success(end))

    await conn.register_template(single())
    other = await start(conn, diamond())
    (a,) = await claim(conn, qty=1)
    assert a["task_uuid"] == other
    urgent = await conn.create_task(NAMESPACE, "single", {}, options={"priority": 5})
    listener, seen = await _listen(dsn)
    try:
        _, claims = await complete_and_claim(conn, [success(a)], 2)
        await asyncio.wait_for(seen.arrived.wait(), 10)
    finally:
        await listener.close()
    assert claims == []
    states = await step_states(conn, other)
    assert (states["b"], states["c"]) == ("enqueued", "enqueued")
    rest = await claim(conn, qty=10)
    assert rest[0]["task_uuid"] == urgent and len(rest) == 3
    await complete(conn, *(success(r) for r in rest))


async def test_without_slots_nothing_is_handed_and_the_queue_is_notified(
    conn: db.Connection, dsn: str
) -> None:
    task = await start(conn, linear(2))
    (s1,) = await claim(conn)
    listener, seen = await _listen(dsn)
    try:
        answers, claims = await complete_and_claim(conn, [success(s1)], 0, worker=None, lease=None)
        await asyncio.wait_for(seen.arrived.wait(), 10)
    finally:
        await listener.close()
    assert [a["status"] for a in answers] == ["applied"] and claims == []
    assert (await step_states(conn, task))["s2"] == "enqueued"


async def test_a_visible_message_of_a_higher_priority_stops_the_hand_off(
    conn: db.Connection,
) -> None:
    """A claim would take the waiting higher-priority step first, so the child is not handed;
    a higher priority that is not visible (leased), or a lower one waiting, does not stop it."""
    await conn.register_template(single())
    chain = await start(conn, linear(2))
    (s1,) = await claim(conn)
    urgent_single = await conn.create_task(NAMESPACE, "single", {}, options={"priority": 5})
    _, claims = await complete_and_claim(conn, [success(s1)], 5)
    assert claims == []
    assert (await step_states(conn, chain))["s2"] == "enqueued"
    # the priority-5 step is taken (leased: not visible), then the chain's s2
    (only,) = await claim(conn, qty=1)
    assert only["task_uuid"] == urgent_single
    (s2,) = await claim(conn, qty=1)
    assert s2["task_uuid"] == chain
    chain2 = await start(conn, linear(2, name="chain2"))
    (c1,) = await claim(conn, qty=1)
    assert c1["task_uuid"] == chain2
    _, claims = await complete_and_claim(conn, [success(c1)], 5)
    assert [(c["task_uuid"], c["step_name"]) for c in claims] == [(chain2, "s2")]
    # a priority-0 step waiting does not stop a priority-5 task's child
    waiting = await start(conn, linear(2, name="chain3"))
    await conn.register_template(linear(2, name="urgent"))
    urgent = await conn.create_task(
        NAMESPACE, "urgent", {}, version="1.0.0", options={"priority": 5}
    )
    (u1,) = await claim(conn, qty=1)
    assert u1["task_uuid"] == urgent
    _, handed = await complete_and_claim(conn, [success(u1)], 5)
    assert [(c["task_uuid"], c["step_name"]) for c in handed] == [(urgent, "s2")]
    assert (await step_states(conn, waiting))["s1"] == "enqueued"
    await complete(conn, success(only), success(s2), success(claims[0]), success(handed[0]))


async def test_a_resent_batch_releases_the_children_its_lost_answer_handed_off(
    conn: db.Connection,
) -> None:
    """The first delivery committed and handed s2 to the worker; the answer was lost, so the
    worker sends the same outcome again: it is stale, and s2 goes back to its queue at once with
    its attempt given back, ready for any worker."""
    task = await start(conn, linear(3))
    (s1,) = await claim(conn)
    _, claims = await complete_and_claim(conn, [success(s1)], 5)
    (lost,) = claims
    answers, again = await complete_and_claim(conn, [success(s1)], 5)
    assert [a["status"] for a in answers] == ["stale"] and again == []
    row = await step_row(conn, task, "s2")
    assert (row["state"], row["attempts"], row["worker_id"]) == ("enqueued", 0, None)
    audit = [(t["event"], t["metadata"]) for t in await transitions(conn, lost["step_uuid"])]
    assert audit[-1][0] == "released" and audit[-1][1]["reason"] == "handoff_lost"
    (s2,) = await claim(conn, worker="w2")
    assert (s2["step_uuid"], s2["attempt"], s2["claim_seq"]) == (lost["step_uuid"], 1, 2)
    # the lost claim's fence no longer holds
    stale = await complete(conn, success(lost))
    assert stale[str(lost["step_uuid"])]["status"] == "stale"
    await complete(conn, success(s2, worker="w2"))


async def test_a_resend_releases_only_that_workers_hand_off_and_only_once(
    conn: db.Connection,
) -> None:
    """Sent again by another worker id, the outcome releases nothing (that worker was handed
    nothing); a handed child that has since been completed or released is left alone."""
    task = await start(conn, linear(3))
    (s1,) = await claim(conn)
    _, (s2,) = await complete_and_claim(conn, [success(s1)], 5)
    await complete_and_claim(conn, [success(s1, worker="w9")], 5, worker="w9")
    assert (await step_row(conn, task, "s2"))["state"] == "in_progress"
    _, (s3,) = await complete_and_claim(conn, [success(s2)], 5)
    # s1's and s2's outcomes sent again: s2 is complete, s3 was handed by s2's delivery
    answers, _ = await complete_and_claim(conn, [success(s1), success(s2)], 5)
    assert [a["status"] for a in answers] == ["stale", "stale"]
    states = await step_states(conn, task)
    assert (states["s2"], states["s3"]) == ("complete", "enqueued")
    released = [t for t in await transitions(conn, s3["step_uuid"]) if t["event"] == "released"]
    assert len(released) == 1
    answers, _ = await complete_and_claim(conn, [success(s2)], 5)
    assert [t["event"] for t in await transitions(conn, s3["step_uuid"])].count("released") == 1


async def test_a_failure_or_a_task_in_error_hands_nothing(conn: db.Connection) -> None:
    tpl = template("fork", [step("a"), step("b"), step("after_a", "a")], retry={"max_attempts": 1})
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    answers, claims = await complete_and_claim(
        conn, [failure(rows["b"], retryable=False), success(rows["a"])], 5
    )
    assert [a["detail"] for a in answers] == ["error", "complete"]
    assert claims == []  # the task went to error: nothing new starts
    assert (await step_states(conn, task))["after_a"] == "pending"


@pytest.mark.parametrize(
    ("handoff", "worker", "lease", "message"),
    [
        (-1, W, 30.0, "handoff must be between 0 and 1000, got -1"),
        (1001, W, 30.0, "handoff must be between 0 and 1000, got 1001"),
        (None, W, 30.0, "handoff must be between 0 and 1000, got NULL"),
        (1, None, 30.0, "a hand-off needs the worker_id to claim for"),
        (1, W, 0.0, "lease_seconds must be > 0 and at most a year, got 0"),
        (1, W, None, "lease_seconds must be > 0 and at most a year, got NULL"),
        (1, "w" * 5000, 30.0, "worker_id is 5000 bytes"),
    ],
)
async def test_bad_hand_off_arguments_are_refused_before_anything_changes(
    conn: db.Connection, handoff: int | None, worker: str | None, lease: float | None, message: str
) -> None:
    task = await start(conn, linear(2))
    (s1,) = await claim(conn)
    with pytest.raises(ValidationError) as err:
        await conn.fetch(
            "SELECT * FROM tasker.complete_and_claim($1::jsonb, $2, $3, $4)",
            [success(s1)],
            worker,
            handoff,
            lease,
        )
    assert message in str(err.value)
    assert (await step_states(conn, task)) == {"s1": "in_progress", "s2": "pending"}


async def test_complete_steps_is_complete_and_claim_without_a_hand_off(conn: db.Connection) -> None:
    task = await start(conn, linear(2))
    (s1,) = await claim(conn)
    rows = await conn.complete_steps([success(s1)])
    assert [(r["step_uuid"], r["attempt"], r["status"], r["detail"]) for r in rows] == [
        (s1["step_uuid"], 1, "applied", "complete")
    ]
    assert (await step_states(conn, task))["s2"] == "enqueued"
    assert list(rows[0].keys()) == ["step_uuid", "attempt", "status", "detail"]
    await assert_healthy(conn)
