"""Durable waits: wait_for_event and sleep steps wait in state `waiting`, with no message, no
claim and no worker; tasker.emit_event completes the steps waiting on its event and key (in the
emitter's transaction), tasker.wake_waits ends sleeps, applies timeouts and matches events that
came first."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import InvalidStateError, ValidationError
from tasker_pg.template import TaskTemplate, TemplateValidationError
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
    step_states,
    success,
    task_row,
    template,
    transitions,
)

pytestmark = pytest.mark.timeout(60)


def wait_step(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    """A wait_for_event step on event `approval` keyed by the context's order_id."""
    raw: dict[str, Any] = {
        "name": name,
        "type": "wait_for_event",
        "event": "approval",
        "key": "$.order_id",
        "dependencies": list(deps),
    }
    raw.update(extra)
    return raw


def approval_flow(name: str = "approval", **wait: Any) -> dict[str, Any]:
    """reserve -> approve (waits for `approval`) -> ship."""
    return template(
        name,
        [step("reserve"), wait_step("approve", "reserve", **wait), step("ship", "approve")],
    )


async def wait_row(conn: db.Connection, step_uuid: uuid.UUID) -> Any:
    return await conn.fetchrow("SELECT * FROM tasker.step_waits WHERE step_uuid = $1", step_uuid)


async def reach_wait(conn: db.Connection, task: uuid.UUID) -> Any:
    """Run `reserve` of `task` so that `approve` starts to wait; returns approve's row."""
    rows = [r for r in await claim(conn) if r["task_uuid"] == task]
    assert [r["step_name"] for r in rows] == ["reserve"]
    await complete(conn, success(rows[0], {"reserved": True}))
    return await step_row(conn, task, "approve")


async def due_now(conn: db.Connection, step_uuid: uuid.UUID) -> None:
    """Move a wait's deadline (timeout or end of sleep) into the past."""
    await conn.execute(
        "UPDATE tasker.step_waits SET deadline = now() - interval '1 second',"
        " wake_at = now() - interval '1 second' WHERE step_uuid = $1",
        step_uuid,
    )


async def test_a_waiting_step_holds_no_message_and_an_emit_completes_it(
    conn: db.Connection,
) -> None:
    task = await start(conn, approval_flow(), {"order_id": 42})
    approve = await reach_wait(conn, task)
    assert (approve["state"], approve["msg_id"], approve["attempts"]) == ("waiting", None, 0)
    assert await message_count(conn, task) == 0
    assert await claim(conn) == []
    w = await wait_row(conn, approve["step_uuid"])
    assert (w["kind"], w["event_name"], w["event_key"], w["deadline"]) == (
        "event",
        "approval",
        "42",
        None,
    )
    r = (await readiness(conn, task))["approve"]
    assert r["ready"] is False
    assert r["reason"] == (
        "waiting for event 'approval' with key '42'"
        " (no worker is held; tasker.emit_event completes it)"
    )
    ctx = await conn.task_execution_context(task)
    assert ctx is not None
    assert (ctx["waiting_steps"], ctx["execution_status"]) == (1, "waiting_for_event_or_time")
    await assert_healthy(conn)

    # another key or another event completes nothing
    assert (await conn.emit_event("approval", "43", {"ok": 1})).completed_steps == 0
    assert (await conn.emit_event("payment", "42", {"ok": 1})).completed_steps == 0
    emitted = await conn.emit_event("approval", "42", {"approved_by": "ann"})
    assert emitted.completed_steps == 1
    approve = await step_row(conn, task, "approve")
    assert approve["state"] == "complete"
    assert approve["results"] == {"approved_by": "ann"}
    assert approve["metadata"]["event_id"] == emitted.event_id
    assert await wait_row(conn, approve["step_uuid"]) is None
    assert [
        (t["from_state"], t["to_state"], t["event"])
        for t in await transitions(conn, approve["step_uuid"])
    ] == [
        (None, "pending", "created"),
        ("pending", "waiting", "dependencies_satisfied"),
        ("waiting", "complete", "event_received"),
    ]
    # the payload is the result its dependents read
    rows = await claim(conn)
    assert [r["step_name"] for r in rows] == ["ship"]
    assert rows[0]["dependency_results"]["approve"] == {"approved_by": "ann"}
    await complete(conn, success(rows[0]))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_an_event_emitted_in_a_rolled_back_transaction_completes_nothing(
    conn: db.Connection,
) -> None:
    task = await start(conn, approval_flow(), {"order_id": "A-1"})
    approve = await reach_wait(conn, task)

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback):
        async with conn.transaction():
            emitted = await conn.emit_event("approval", "A-1", {"approved": True})
            assert emitted.completed_steps == 1
            assert (await step_row(conn, task, "approve"))["state"] == "complete"
            raise Rollback
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    assert await wait_row(conn, approve["step_uuid"]) is not None
    assert await conn.fetchval("SELECT count(*) FROM tasker.events") == 0
    # nor is it kept for later: the wake finds nothing to match
    assert (await conn.wake_waits()).completed == 0
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    assert await claim(conn) == []
    await assert_healthy(conn)


async def test_an_event_emitted_before_the_step_is_reached_completes_it(
    conn: db.Connection,
) -> None:
    tpl = approval_flow()
    await conn.register_template(tpl)
    # emitted before the task exists, and before its step waits
    early = await conn.emit_event("approval", "7", {"approved_by": "bob"})
    assert early.completed_steps == 0
    task = await start(conn, tpl, {"order_id": 7})
    approve = await reach_wait(conn, task)
    assert approve["state"] == "waiting"
    w = await wait_row(conn, approve["step_uuid"])
    assert w["wake_at"] is not None  # due now: the event is there
    assert "an event for it may be there" in (await readiness(conn, task))["approve"]["reason"]
    woken = await conn.wake_waits()
    assert (woken.completed, woken.timed_out) == (1, 0)
    approve = await step_row(conn, task, "approve")
    assert (approve["state"], approve["results"]) == ("complete", {"approved_by": "bob"})
    assert approve["metadata"]["event_id"] == early.event_id
    assert [r["step_name"] for r in await claim(conn)] == ["ship"]
    await assert_healthy(conn)


async def test_a_root_wait_step_waits_from_creation_and_takes_an_early_event(
    conn: db.Connection,
) -> None:
    tpl = template("rootwait", [wait_step("approve"), step("ship", "approve")])
    waiting = await start(conn, tpl, {"order_id": 1})
    assert await step_states(conn, waiting) == {"approve": "waiting", "ship": "pending"}
    assert await message_count(conn, waiting) == 0
    await conn.emit_event("approval", "2", {"n": 2})
    # create_tasks too: the second context's event is already there
    ids = await conn.fetchval(
        "SELECT array_agg(x) FROM tasker.create_tasks($1, $2, $3::jsonb) x",
        NAMESPACE,
        "rootwait",
        [{"order_id": 2}, {"order_id": 3}],
    )
    assert (await conn.wake_waits()).completed == 1
    states = {t: (await step_states(conn, t))["approve"] for t in [waiting, *ids]}
    assert states == {waiting: "waiting", ids[0]: "complete", ids[1]: "waiting"}
    assert (await conn.emit_event("approval", "1")).completed_steps == 1
    assert (await step_row(conn, waiting, "approve"))["results"] == {}
    await assert_healthy(conn)


async def test_a_bulk_create_with_many_keys_leaves_its_waits_to_wake_in_capped_batches(
    conn: db.Connection,
) -> None:
    """Over 64 keys, create_tasks takes no per-key lock (each would hold an entry of the shared
    lock table until commit): every wait is due at once; wake_waits matches at most 500 keys a
    call and says there is more."""
    tpl = template("bulkwait", [wait_step("approve")])
    await conn.register_template(tpl)
    await conn.emit_event("approval", "17", {"early": True})
    await conn.fetchval(
        "SELECT count(*) FROM tasker.create_tasks($1, $2, $3::jsonb)",
        NAMESPACE,
        "bulkwait",
        [{"order_id": i} for i in range(600)],
    )
    due = await conn.fetchval("SELECT count(*) FROM tasker.step_waits WHERE wake_at <= now()")
    assert due == 600
    first = await conn.wake_waits()
    assert (first.completed + first.rechecked, first.more) == (500, True)
    second = await conn.wake_waits()
    assert (first.completed + second.completed, second.rechecked + first.rechecked) == (1, 599)
    assert second.more is False
    assert (
        await conn.fetchval("SELECT count(*) FROM tasker.step_waits WHERE wake_at IS NOT NULL") == 0
    )
    assert (await conn.emit_event("approval", "3")).completed_steps == 1
    await assert_healthy(conn)


async def test_two_tasks_waiting_on_one_key_both_complete(conn: db.Connection) -> None:
    tpl = approval_flow()
    first = await start(conn, tpl, {"order_id": 9})
    second = await start(conn, tpl, {"order_id": 9})
    other = await start(conn, tpl, {"order_id": 10})
    rows = await claim(conn)
    await complete(conn, *[success(r) for r in rows])
    assert (await conn.emit_event("approval", "9", {"ok": True})).completed_steps == 2
    for task in (first, second):
        assert (await step_row(conn, task, "approve"))["results"] == {"ok": True}
    assert (await step_row(conn, other, "approve"))["state"] == "waiting"
    assert sorted(str(r["task_uuid"]) for r in await claim(conn)) == sorted(
        [str(first), str(second)]
    )
    await assert_healthy(conn)


async def test_a_wait_started_while_an_emit_is_uncommitted_is_matched_by_wake(
    conn: db.Connection, sessions: Opener
) -> None:
    """The emitter holds the (event, key) lock and does not see the wait that starts meanwhile;
    the starter cannot get the lock, so it leaves its wait due now and wake_waits matches it."""
    (emitter,) = await sessions(1)
    task = await start(conn, approval_flow(), {"order_id": 5})
    await emitter.execute("BEGIN")
    emitted = await emitter.emit_event("approval", "5", {"late": True})
    assert emitted.completed_steps == 0
    approve = await reach_wait(conn, task)  # commits while the emit is open
    w = await wait_row(conn, approve["step_uuid"])
    assert w["wake_at"] is not None
    # while the emitter is open, wake cannot take the key's lock and leaves the wait due
    assert (await conn.wake_waits()).completed == 0
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    await emitter.execute("COMMIT")
    assert (await conn.wake_waits()).completed == 1
    assert (await step_row(conn, task, "approve"))["results"] == {"late": True}
    await assert_healthy(conn)


async def test_a_recheck_without_an_event_waits_for_the_timeout_again(
    conn: db.Connection, sessions: Opener
) -> None:
    (emitter,) = await sessions(1)
    task = await start(conn, approval_flow(timeout_seconds=3600), {"order_id": 6})
    await emitter.execute("BEGIN")
    await emitter.emit_event("approval", "6")
    approve = await reach_wait(conn, task)
    await emitter.execute("ROLLBACK")
    woken = await conn.wake_waits()
    assert (woken.completed, woken.rechecked) == (0, 1)
    w = await wait_row(conn, approve["step_uuid"])
    assert w["wake_at"] == w["deadline"]
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    await assert_healthy(conn)


async def test_a_timeout_fails_the_step_and_a_retry_waits_again(conn: db.Connection) -> None:
    task = await start(conn, approval_flow(timeout_seconds=60), {"order_id": 11})
    approve = await reach_wait(conn, task)
    w = await wait_row(conn, approve["step_uuid"])
    assert w["deadline"] == w["wake_at"]
    assert "times out at" in (await readiness(conn, task))["approve"]["reason"]
    assert (await conn.wake_waits()).timed_out == 0  # not due yet
    await due_now(conn, approve["step_uuid"])
    woken = await conn.wake_waits()
    assert (woken.completed, woken.timed_out) == (0, 1)
    approve = await step_row(conn, task, "approve")
    assert approve["state"] == "error"
    assert approve["last_error"]["error_type"] == "wait_timeout"
    assert approve["last_error"]["message"] == "no event approval with key 11 within 60 seconds"
    assert (await task_row(conn, task))["state"] == "error"
    await assert_healthy(conn)

    retried = await conn.retry_step(approve["step_uuid"])
    assert retried["state"] == "waiting"
    assert (await task_row(conn, task))["state"] == "steps_in_process"
    assert await message_count(conn, task) == 0
    await assert_healthy(conn)
    assert (await conn.emit_event("approval", "11", {"late": 1})).completed_steps == 1
    assert [r["step_name"] for r in await claim(conn)] == ["ship"]
    await assert_healthy(conn)


async def test_a_timeout_completes_the_step_with_its_declared_default(conn: db.Connection) -> None:
    flow = approval_flow(timeout_seconds=60, on_timeout="complete", default={"approved": False})
    task = await start(conn, flow, {"order_id": 12})
    approve = await reach_wait(conn, task)
    assert "completes with its default" in (await readiness(conn, task))["approve"]["reason"]
    await due_now(conn, approve["step_uuid"])
    assert (await conn.wake_waits()).timed_out == 1
    approve = await step_row(conn, task, "approve")
    assert (approve["state"], approve["results"]) == ("complete", {"approved": False})
    assert approve["metadata"]["event"] == "approval"
    rows = await claim(conn)
    assert rows[0]["dependency_results"]["approve"] == {"approved": False}
    await assert_healthy(conn)


async def test_an_event_that_came_wins_over_a_timeout_due_at_the_same_wake(
    conn: db.Connection,
) -> None:
    task = await start(conn, approval_flow(timeout_seconds=60), {"order_id": 13})
    await conn.emit_event("approval", "13", {"first": True})
    approve = await reach_wait(conn, task)
    await due_now(conn, approve["step_uuid"])
    assert (await conn.wake_waits()).completed == 1
    assert (await step_row(conn, task, "approve"))["results"] == {"first": True}
    await assert_healthy(conn)


async def test_sleep_steps_wake_at_their_time(conn: db.Connection) -> None:
    tpl = template(
        "naps",
        [
            {"name": "nap", "type": "sleep", "duration_seconds": 3600},
            {"name": "until", "type": "sleep", "until": "$.ship_at"},
            step("after", "nap", "until"),
        ],
    )
    task = await start(conn, tpl, {"ship_at": "2000-01-01T00:00:00Z"})
    assert await step_states(conn, task) == {
        "nap": "waiting",
        "until": "waiting",
        "after": "pending",
    }
    nap = await step_row(conn, task, "nap")
    reasons = await readiness(conn, task)
    assert reasons["nap"]["reason"].startswith("sleeping until ")
    assert reasons["after"]["reason"] == "waiting for nap, until"
    # `until` is in the past: the next wake ends it; the hour's nap goes on
    woken = await conn.wake_waits()
    assert woken.completed == 1
    until = await step_row(conn, task, "until")
    assert until["state"] == "complete"
    assert list(until["results"]) == ["slept_until"]
    assert datetime.fromisoformat(until["results"]["slept_until"]) == datetime(
        2000, 1, 1, tzinfo=UTC
    )
    assert (await step_row(conn, task, "nap"))["state"] == "waiting"
    await due_now(conn, nap["step_uuid"])
    assert (await conn.wake_waits()).completed == 1
    assert [r["step_name"] for r in await claim(conn)] == ["after"]
    assert await claim(conn) == []
    await assert_healthy(conn)


async def test_create_refuses_a_context_without_what_its_waits_read(conn: db.Connection) -> None:
    tpl = approval_flow()
    await conn.register_template(tpl)
    for ctx in ({}, {"order_id": None}, {"order_id": {"a": 1}}, {"order_id": [1]}):
        with pytest.raises(
            ValidationError,
            match=r"step 'approve' waits for event 'approval' keyed by \$\.order_id",
        ) as e:
            await conn.create_task(NAMESPACE, "approval", ctx)
        assert e.value.error_code == "invalid_context"
    with pytest.raises(ValidationError, match="task context #2: step 'approve'"):
        await conn.fetchval(
            "SELECT count(*) FROM tasker.create_tasks($1, $2, $3::jsonb)",
            NAMESPACE,
            "approval",
            [{"order_id": 1}, {"order": 2}],
        )
    with pytest.raises(ValidationError) as big:
        await conn.create_task(NAMESPACE, "approval", {"order_id": "x" * 2000})
    assert big.value.error_code == "payload_too_large"
    sleeper = template("sleeper", [{"name": "nap", "type": "sleep", "until": "$.at"}])
    await conn.register_template(sleeper)
    for at in ("tomorrow", "2030-02-30T00:00:00Z", "2030-01-01T00:00:00", 5, "now"):
        with pytest.raises(ValidationError, match="sleeps until \\$\\.at"):
            await conn.create_task(NAMESPACE, "sleeper", {"at": at})
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_emit_event_refuses_bad_input(conn: db.Connection) -> None:
    for name, key in (("", "1"), ("approval", ""), (None, "1"), ("approval", None)):
        with pytest.raises(ValidationError) as e:
            await conn.fetchrow("SELECT * FROM tasker.emit_event($1, $2)", name, key)
        assert e.value.error_code == "invalid_argument"
    for name, key, payload in (
        ("x" * 1025, "1", {}),
        ("a", "k" * 1025, {}),
        ("a", "1", {"x": "y" * 1048576}),
    ):
        with pytest.raises(ValidationError) as big:
            await conn.emit_event(name, key, payload)
        assert big.value.error_code == "payload_too_large"
    for batch in (0, 100001):
        with pytest.raises(ValidationError):
            await conn.wake_waits(batch)
    assert await conn.fetchval("SELECT count(*) FROM tasker.events") == 0


async def test_events_are_kept_for_the_configured_window(conn: db.Connection) -> None:
    await conn.execute("UPDATE tasker.settings SET value = 0 WHERE name = 'event_keep_seconds'")
    tpl = approval_flow()
    await conn.emit_event("approval", "21", {"early": True})
    task = await start(conn, tpl, {"order_id": 21})
    await reach_wait(conn, task)
    woken = await conn.wake_waits()
    assert (woken.completed, woken.events_deleted) == (0, 1)
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    await conn.execute(
        "UPDATE tasker.settings SET value = 604800 WHERE name = 'event_keep_seconds'"
    )
    emitted = await conn.emit_event("approval", "22")
    kept = await conn.fetchrow("SELECT * FROM tasker.events WHERE event_id = $1", emitted.event_id)
    assert (kept["expires_at"] - kept["emitted_at"]).total_seconds() == 604800
    await assert_healthy(conn)


async def test_cancel_and_resolve_end_a_wait(conn: db.Connection) -> None:
    tpl = approval_flow()
    cancelled = await start(conn, tpl, {"order_id": 31})
    resolved = await start(conn, tpl, {"order_id": 32})
    await complete(conn, *[success(r) for r in await claim(conn)])
    await conn.cancel_task(cancelled)
    approve = await step_row(conn, cancelled, "approve")
    assert approve["state"] == "cancelled"
    assert await wait_row(conn, approve["step_uuid"]) is None
    assert (await conn.emit_event("approval", "31")).completed_steps == 0
    step_uuid = (await step_row(conn, resolved, "approve"))["step_uuid"]
    await conn.resolve_step(step_uuid, {"by": "hand"})
    assert await wait_row(conn, step_uuid) is None
    rows = await claim(conn)
    assert [r["step_name"] for r in rows] == ["ship"]
    assert rows[0]["dependency_results"]["approve"] == {"by": "hand"}
    with pytest.raises(InvalidStateError):
        await conn.retry_step(step_uuid)
    await assert_healthy(conn)


async def test_invariants_report_a_wait_out_of_step(conn: db.Connection) -> None:
    task = await start(conn, approval_flow(), {"order_id": 41})
    approve = await reach_wait(conn, task)
    await conn.execute("DELETE FROM tasker.step_waits WHERE step_uuid = $1", approve["step_uuid"])
    rows = await conn.fetch("SELECT * FROM tasker.check_invariants()")
    assert [r["invariant"] for r in rows] == ["waiting_step_has_its_wait"]
    await conn.execute(
        "UPDATE tasker.steps SET state = 'enqueued', claim_seq = 1 WHERE step_uuid = $1",
        approve["step_uuid"],
    )
    rows = await conn.fetch("SELECT * FROM tasker.check_invariants()")
    assert "wait_step_never_queued" in {r["invariant"] for r in rows}


WAIT_TEMPLATES_BAD: list[tuple[str, dict[str, Any]]] = [
    (
        "handler",
        {"type": "wait_for_event", "event": "e", "key": "$.k", "handler": {"callable": "h"}},
    ),
    ("no event", {"type": "wait_for_event", "key": "$.k"}),
    ("bad event", {"type": "wait_for_event", "event": "a b", "key": "$.k"}),
    ("no key", {"type": "wait_for_event", "event": "e"}),
    ("bad key", {"type": "wait_for_event", "event": "e", "key": "order_id"}),
    ("bad key path", {"type": "wait_for_event", "event": "e", "key": "$.a[0]"}),
    ("on_timeout", {"type": "wait_for_event", "event": "e", "key": "$.k", "on_timeout": "skip"}),
    (
        "complete without timeout",
        {"type": "wait_for_event", "event": "e", "key": "$.k", "on_timeout": "complete"},
    ),
    (
        "default with fail",
        {"type": "wait_for_event", "event": "e", "key": "$.k", "timeout_seconds": 5, "default": {}},
    ),
    (
        "default not object",
        {
            "type": "wait_for_event",
            "event": "e",
            "key": "$.k",
            "timeout_seconds": 5,
            "on_timeout": "complete",
            "default": [1],
        },
    ),
    (
        "sleep fields on event",
        {"type": "wait_for_event", "event": "e", "key": "$.k", "duration_seconds": 5},
    ),
    ("sleep neither", {"type": "sleep"}),
    ("sleep both", {"type": "sleep", "duration_seconds": 5, "until": "$.at"}),
    ("sleep zero", {"type": "sleep", "duration_seconds": 0}),
    ("sleep too long", {"type": "sleep", "duration_seconds": 31536001}),
    ("sleep bool", {"type": "sleep", "duration_seconds": True}),
    ("sleep bad until", {"type": "sleep", "until": "at"}),
    ("sleep timeout", {"type": "sleep", "duration_seconds": 5, "timeout_seconds": 5}),
    ("sleep event", {"type": "sleep", "duration_seconds": 5, "event": "e"}),
    ("event on standard", {"handler": {"callable": "h"}, "event": "e"}),
    ("until on standard", {"handler": {"callable": "h"}, "until": "$.x"}),
    ("no handler on standard", {}),
]

WAIT_TEMPLATES_GOOD: list[dict[str, Any]] = [
    {"type": "wait_for_event", "event": "payment.settled", "key": "$.order.id"},
    {
        "type": "wait_for_event",
        "event": "e",
        "key": "$.k",
        "timeout_seconds": 0.5,
        "on_timeout": "fail",
    },
    {
        "type": "wait_for_event",
        "event": "e",
        "key": "$.k",
        "timeout_seconds": 5,
        "on_timeout": "complete",
    },
    {
        "type": "wait_for_event",
        "event": "e",
        "key": "$.k",
        "timeout_seconds": 5,
        "on_timeout": "complete",
        "default": {"approved": False, "why": None},
    },
    {"type": "wait_for_event", "event": "e", "key": "$.k", "handler": None},
    {"type": "sleep", "duration_seconds": 1.5},
    {"type": "sleep", "until": "$.when"},
    {"handler": {"callable": "h"}, "event": None, "until": None},
]


@pytest.mark.parametrize(
    ("why", "fields"), WAIT_TEMPLATES_BAD, ids=[w for w, _ in WAIT_TEMPLATES_BAD]
)
async def test_sql_and_python_refuse_the_same_wait_steps(
    conn: db.Connection, why: str, fields: dict[str, Any]
) -> None:
    raw = {
        "name": "t",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [{"name": "w", **fields}],
    }
    with pytest.raises(TemplateValidationError):
        TaskTemplate.from_dict(raw)
    with pytest.raises(ValidationError) as e:
        await conn.register_template(raw)
    assert e.value.error_code == "invalid_template"


@pytest.mark.parametrize("fields", WAIT_TEMPLATES_GOOD)
async def test_sql_and_python_normalise_wait_steps_alike(
    conn: db.Connection, fields: dict[str, Any]
) -> None:
    raw = {
        "name": "t",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [{"name": "w", **fields}],
    }
    body = TaskTemplate.from_dict(raw).to_json()
    await conn.register_template(raw)
    stored = await conn.fetchval(
        "SELECT template FROM tasker.named_tasks WHERE namespace = $1 AND name = 't'", NAMESPACE
    )
    assert json.loads(json.dumps(stored)) == json.loads(json.dumps(body))
    # the Python body registers as the same version (same normalised body)
    await conn.register_template(body)


async def test_the_purge_keeps_a_task_in_error_while_a_step_of_it_waits(
    conn: db.Connection,
) -> None:
    """A waiting step is live (an emit or a timeout can still complete it): a task in error with
    one is not purged however old; once the wait ends, the task goes like any."""
    tpl = template("errwait", [step("x"), wait_step("approve")], retry={"backoff": "none"})
    task = await start(conn, tpl, {"order_id": 51})
    [row] = await claim(conn)
    await complete(conn, failure(row, "bad", retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    assert (await step_row(conn, task, "approve"))["state"] == "waiting"
    await conn.execute(
        "SELECT * FROM tasker.set_retention_policy($1, interval '1 day', interval '1 day')",
        NAMESPACE,
    )

    async def age() -> None:
        await conn.execute(
            "UPDATE tasker.tasks SET updated_at = updated_at - interval '10 days'"
            " WHERE task_uuid = $1",
            task,
        )
        for table in ("task_transitions", "step_transitions"):
            await conn.execute(
                f"UPDATE tasker.{table} SET created_at = created_at - interval '10 days'"
                " WHERE task_uuid = $1",
                task,
            )

    await age()
    assert (await conn.purge_finished()).tasks == 0
    # the event still completes it while the task is in error; its task stays in error
    assert (await conn.emit_event("approval", "51", {"late": True})).completed_steps == 1
    assert (await task_row(conn, task))["state"] == "error"
    await assert_healthy(conn)
    await age()
    assert (await conn.purge_finished()).tasks == 1
    await assert_healthy(conn)


async def test_emits_racing_waits_that_start_miss_no_event(
    conn: db.Connection, sessions: Opener
) -> None:
    """One session completes `reserve` of 40 orders one at a time (each commit starts a wait),
    two others emit the 40 approvals meanwhile, in opposite orders: whatever interleaving the
    commits take, each approval completes its order, by the emit or by wake_waits after it."""
    tpl = approval_flow()
    tasks = [await start(conn, tpl, {"order_id": i}) for i in range(40)]
    worker, up, down = await sessions(3)
    rows = {r["task_uuid"]: r for r in await claim(conn)}
    assert len(rows) == 40

    async def reserve() -> None:
        for task in tasks:
            await complete(worker, success(rows[task]))

    async def emit(conn_: db.Connection, keys: list[int]) -> int:
        done = 0
        for key in keys:
            done += (await conn_.emit_event("approval", str(key), {"key": key})).completed_steps
        return done

    _, by_up, by_down = await asyncio.gather(
        reserve(), emit(up, list(range(0, 40, 2))), emit(down, list(range(39, 0, -2)))
    )
    woken = 0
    while True:
        counts = await conn.wake_waits()
        woken += counts.completed
        if not counts.more:
            break
    assert by_up + by_down + woken == 40
    for i, task in enumerate(tasks):
        approve = await step_row(conn, task, "approve")
        assert (approve["state"], approve["results"]) == ("complete", {"key": i})
    await assert_healthy(conn)


async def test_a_wait_step_a_decision_creates_waits_like_a_static_one(conn: db.Connection) -> None:
    tpl = template(
        "decided",
        [
            step("check"),
            step("route", "check", type="decision"),
            wait_step("approve", "route"),
            step("auto", "route"),
        ],
    )
    task = await start(conn, tpl, {"order_id": 61})
    [check] = await claim(conn)
    await complete(conn, success(check))
    [route] = await claim(conn)
    outcome = {"decision_point_outcome": {"type": "create_steps", "step_names": ["approve"]}}
    await complete(conn, success(route, outcome))
    assert await step_states(conn, task) == {
        "check": "complete",
        "route": "complete",
        "approve": "waiting",
    }
    assert await claim(conn) == []
    assert (await conn.emit_event("approval", "61", {"ok": 1})).completed_steps == 1
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)
