"""The SQL workflow engine driven through asyncpg (no worker): DAG flows and readiness, retries
and backoff, failures and operators, leases, checkpoints, task creation, template registration,
bad input and the DBA views. Every test ends with `tasker.check_invariants()`."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import InvalidStateError, NotFoundError, ValidationError
from tasker_pg.template import TaskTemplate
from tests.support.engine import (
    NAMESPACE,
    ancestors_of,
    assert_healthy,
    checkpoint,
    claim,
    complete,
    diamond,
    drive,
    failure,
    linear,
    message_count,
    mixed,
    parents_of,
    readiness,
    ready_names,
    single,
    start,
    step,
    step_row,
    step_states,
    success,
    task_row,
    template,
    transitions,
    tree,
    wait_for_claim,
)

pytestmark = pytest.mark.timeout(60)

FAST = {"backoff": "none"}  # retries claimable at once


def seconds(delta: timedelta) -> float:
    return delta.total_seconds()


async def wait_for(predicate: Any, *, deadline: float = 5.0, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy (deadline, no fixed sleep)."""
    end = time.monotonic() + deadline
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"{what} did not happen within {deadline}s")
        await asyncio.sleep(0.02)


async def exec_status(conn: db.Connection, task: uuid.UUID) -> str:
    ctx = await conn.task_execution_context(task)
    assert ctx is not None
    return str(ctx["execution_status"])


async def assert_complete(conn: db.Connection, task: uuid.UUID) -> None:
    t = await task_row(conn, task)
    assert t["state"] == "complete"
    # the moment of the task's one transition to complete
    assert t["completed_at"] == await conn.fetchval(
        "SELECT created_at FROM tasker.task_transitions"
        " WHERE task_uuid = $1 AND to_state = 'complete'",
        task,
    )
    v = await conn.fetchrow("SELECT * FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert v is not None and v["state"] == "complete" and v["completion_percentage"] == 100
    ctx = await conn.task_execution_context(task)
    assert ctx is not None
    assert ctx["execution_status"] == "all_complete"
    assert ctx["completion_percentage"] == 100
    assert ctx["complete_steps"] + ctx["resolved_steps"] == ctx["total_steps"]
    assert await message_count(conn, task) == 0


# --- flows and readiness ----------------------------------------------------------------------


async def test_linear_chain_exactly_the_next_step_is_ready(conn: db.Connection) -> None:
    tpl = linear(4)
    task = await start(conn, tpl, {"order": 7})
    names = ["s1", "s2", "s3", "s4"]
    results: dict[str, Any] = {}

    r = await readiness(conn, task)
    assert [n for n in names if r[n]["ready"]] == ["s1"]
    assert r["s1"]["reason"] == "ready: waiting for a worker"
    assert r["s1"]["dependencies_satisfied"] and r["s1"]["parents_total"] == 0
    for prev, nxt in itertools.pairwise(names):
        assert r[nxt]["state"] == "pending"
        assert r[nxt]["reason"] == f"waiting for {prev}"
        assert not r[nxt]["dependencies_satisfied"]
        assert (r[nxt]["parents_total"], r[nxt]["parents_completed"]) == (1, 0)
    ctx = await conn.task_execution_context(task)
    assert ctx is not None
    assert (ctx["state"], ctx["execution_status"]) == ("pending", "has_ready_steps")

    for i, name in enumerate(names):
        [row] = await claim(conn)
        assert row["step_name"] == name
        assert row["task_uuid"] == task
        assert row["attempt"] == 1 and row["claim_event"] == "claimed"
        assert row["handler"] == f"handlers.{name}"
        assert row["config"] == {"step": name}
        assert row["task_context"] == {"order": 7}
        # every ancestor's result, by name (not just the direct parent's)
        assert row["dependency_results"] == {n: results[n] for n in names[:i]}
        r = await readiness(conn, task)
        assert not any(x["ready"] for x in r.values())
        assert r[name]["reason"] == "running on w1 (attempt 1 of 3)"
        assert await exec_status(conn, task) == "processing"
        assert (await conn.task_execution_context(task))["state"] == "steps_in_process"  # type: ignore[index]
        assert await claim(conn) == []

        results[name] = {"value": i, "from": name}
        answer = await complete(conn, success(row, results[name]))
        assert answer[str(row["step_uuid"])]["status"] == "applied"
        assert answer[str(row["step_uuid"])]["detail"] == "complete"

        r = await readiness(conn, task)
        ready = [n for n in names if r[n]["ready"]]
        assert ready == names[i + 1 : i + 2], f"after {name}: ready {ready}"
        assert r[name]["reason"] == "complete"
        if i + 2 < len(names):
            assert r[names[i + 2]]["reason"] == f"waiting for {names[i + 1]}"
        if i + 1 < len(names):
            assert r[names[i + 1]]["dependencies_satisfied"]
            assert await exec_status(conn, task) == "has_ready_steps"

    await assert_complete(conn, task)
    stored = await conn.fetch(
        "SELECT name, results FROM tasker.steps WHERE task_uuid = $1 ORDER BY name", task
    )
    assert {r["name"]: r["results"] for r in stored} == results
    await assert_healthy(conn)


async def run_dag_checking_readiness(
    conn: db.Connection, tpl: dict[str, Any], task: uuid.UUID
) -> list[list[str]]:
    """Drive `task` to completion one completion at a time, checking after every change that
    step_readiness calls ready exactly the steps whose parents are all done, that a claim
    returns exactly those, that waiting steps name the parents they wait for, and that every
    claim carries each ancestor's result. Returns the names claimed per round."""
    parents = parents_of(tpl)
    done: dict[str, Any] = {}
    running: set[str] = set()
    rounds: list[list[str]] = []

    def expected_ready() -> set[str]:
        return {
            n
            for n, ps in parents.items()
            if n not in done and n not in running and all(p in done for p in ps)
        }

    async def check(stage: str) -> None:
        r = await readiness(conn, task)
        ready = {n for n, x in r.items() if x["ready"]}
        assert ready == expected_ready(), f"{stage}: ready {sorted(ready)}"
        for n, x in r.items():
            if x["state"] == "pending":
                waiting = sorted(p for p in parents[n] if p not in done)
                assert x["reason"] == "waiting for " + ", ".join(waiting), (stage, n, x["reason"])
                assert x["parents_completed"] == len(parents[n]) - len(waiting)
        status = await exec_status(conn, task)
        if len(done) == len(parents):
            assert status == "all_complete"
        elif ready:
            assert status == "has_ready_steps", stage
        elif running:
            assert status == "processing", stage
        else:
            assert status == "waiting_for_dependencies", stage

    await check("start")
    while len(done) < len(parents):
        rows = await claim(conn)
        names = sorted(r["step_name"] for r in rows)
        assert set(names) == expected_ready(), f"claimed {names}"
        rounds.append(names)
        running |= set(names)
        await check(f"claimed {names}")
        assert await claim(conn) == []
        for row in sorted(rows, key=lambda x: x["step_name"]):
            name = row["step_name"]
            assert row["dependency_results"] == {a: done[a] for a in ancestors_of(tpl, name)}
            result = {"step": name, "seq": len(done)}
            answer = await complete(conn, success(row, result))
            assert answer[str(row["step_uuid"])]["status"] == "applied"
            done[name] = result
            running.discard(name)
            await check(f"completed {name}")
    return rounds


@pytest.mark.parametrize(
    ("build", "stages"),
    [
        (diamond, [["start"], ["b", "c"], ["end"]]),
        (tree, [["root"], ["a", "b"], ["a1", "a2", "b1", "b2"], ["end"]]),
        (
            mixed,
            [["init"], ["left", "right"], ["analyze", "transform", "validate"], ["finalize"]],
        ),
    ],
    ids=["diamond", "tree", "mixed"],
)
async def test_dag_runs_to_completion_with_readiness_at_every_stage(
    conn: db.Connection, build: Any, stages: list[list[str]]
) -> None:
    tpl = build()
    task = await start(conn, tpl, {"k": "v"})
    assert (await task_row(conn, task))["state"] == "pending"
    assert await run_dag_checking_readiness(conn, tpl, task) == stages
    await assert_complete(conn, task)
    # the first completion moved the task pending -> steps_in_process, the last one -> complete
    events = await conn.fetch(
        "SELECT from_state, to_state FROM tasker.task_transitions WHERE task_uuid = $1 "
        "ORDER BY transition_id",
        task,
    )
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "pending"),
        ("pending", "steps_in_process"),
        ("steps_in_process", "complete"),
    ]
    await assert_healthy(conn)


async def test_drive_helper_runs_a_mixed_dag(conn: db.Connection) -> None:
    """The shared `drive` helper: rounds of claims, results flow to descendants."""
    tpl = mixed()
    task = await start(conn, tpl)
    log = await drive(conn, NAMESPACE, lambda row: {"n": row["step_name"]})
    assert log.names == [
        ["init"],
        ["left", "right"],
        ["analyze", "transform", "validate"],
        ["finalize"],
    ]
    [fin] = log.claimed("finalize")
    assert fin["dependency_results"] == {
        n: {"n": n} for n in ["init", "left", "right", "validate", "transform", "analyze"]
    }
    await assert_complete(conn, task)
    await assert_healthy(conn)


# --- retries and backoff ----------------------------------------------------------------------


RETRY_BOUNDARIES: list[tuple[str, dict[str, Any], dict[str, Any], int]] = [
    # (case, template retry settings, failure options, how many runs before error)
    ("max_attempts_1", {"max_attempts": 1}, {}, 1),
    ("max_attempts_3", {"max_attempts": 3}, {}, 3),
    ("step_not_retryable", {"max_attempts": 3, "retryable": False}, {}, 1),
    ("failure_not_retryable", {"max_attempts": 3}, {"retryable": False}, 1),
]


async def test_retry_boundaries(conn: db.Connection) -> None:
    # one task per case, each in its own namespace (queue), in one database
    for case, retry, error_kw, runs in RETRY_BOUNDARIES:
        task = await start(conn, single(namespace=case, retry={**FAST, **retry}))
        log = await drive(conn, case, lambda row, kw=error_kw: failure(row, **kw))
        assert [c["attempt"] for c in log.claims] == list(range(1, runs + 1)), case
        s = await step_row(conn, task, "only")
        assert (s["state"], s["attempts"], s["msg_id"]) == ("error", runs, None), case
        assert (await task_row(conn, task))["state"] == "error", case
        assert await exec_status(conn, task) == "blocked_by_failures", case
        r = (await readiness(conn, task))["only"]
        assert not r["ready"], case
        assert r["reason"].startswith("failed: RuntimeError: boom"), case
        assert r["retry_eligible"] is (
            retry.get("retryable", True) and runs < retry["max_attempts"]
        )
        events = [t["event"] for t in await transitions(conn, s["step_uuid"])]
        expected = ["created"] + ["claimed", "retry_scheduled"] * (runs - 1) + ["claimed", "failed"]
        assert events == expected, case
        assert await message_count(conn, task) == 0, case
    await assert_healthy(conn)


async def readiness_now(conn: db.Connection, task: uuid.UUID, name: str) -> tuple[Any, Any]:
    """The step_readiness row of `name` and the DB clock right after it was computed."""
    row = await conn.fetchrow(
        "SELECT r.*, clock_timestamp() AS now FROM tasker.step_readiness($1) r WHERE r.name = $2",
        task,
        name,
    )
    assert row is not None
    return row, row["now"]


async def status_now(conn: db.Connection, task: uuid.UUID) -> tuple[str, Any]:
    """task_execution_context's execution_status and the DB clock right after it."""
    row = await conn.fetchrow(
        "SELECT c.execution_status, clock_timestamp() AS now "
        "FROM tasker.task_execution_context($1) c",
        task,
    )
    assert row is not None
    return row["execution_status"], row["now"]


async def fast_forward(conn: db.Connection, step_uuid: uuid.UUID) -> None:
    """Make a waiting step's moment come now: what the clock would do after the wait."""
    await conn.execute(
        """
        WITH s AS (
            UPDATE tasker.steps SET next_attempt_at = least(next_attempt_at, clock_timestamp())
             WHERE step_uuid = $1 RETURNING msg_id, task_uuid)
        UPDATE tasker.queue_messages m SET vt = clock_timestamp()
          FROM s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
        """,
        step_uuid,
    )


async def test_retry_after_is_respected(conn: db.Connection) -> None:
    # the template's backoff would wait a minute: retry_after (an hour) wins
    task = await start(conn, single(retry={"backoff": "fixed", "backoff_base_ms": 60000}))
    [row] = await claim(conn)
    answer = await complete(conn, failure(row, retry_after=3600))
    assert answer[str(row["step_uuid"])]["detail"] == "waiting_for_retry"
    s = await step_row(conn, task, "only")
    due = s["next_attempt_at"]
    assert s["state"] == "waiting_for_retry"
    assert seconds(due - s["updated_at"]) == pytest.approx(3600, abs=0.001)
    r, _ = await readiness_now(conn, task, "only")
    assert r["reason"].startswith("retry at ") and r["reason"].endswith("(attempt 2 of 3)")
    assert r["retry_eligible"] and r["next_attempt_at"] == due
    assert not r["ready"]
    assert await claim(conn) == []  # nothing before retry_after
    status, _ = await status_now(conn, task)
    assert status == "waiting_for_retry"

    await fast_forward(conn, row["step_uuid"])
    assert (await readiness(conn, task))["only"]["ready"]
    [again] = await claim(conn)
    assert again["attempt"] == 2 and again["claim_event"] == "claimed"
    await complete(conn, success(again, {"ok": True}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


BACKOFFS = {
    # base 100 ms, cap 250 ms: the delay after attempts 1, 2, 3
    "exponential": [0.1, 0.2, 0.25],
    "linear": [0.1, 0.2, 0.25],
    "fixed": [0.1, 0.1, 0.1],
    "none": [0.0, 0.0, 0.0],
}


async def test_backoff_grows_and_stops_at_cap(conn: db.Connection) -> None:
    # one task per backoff kind, each in its own namespace, failed in lock step
    tasks = {}
    for kind in BACKOFFS:
        retry = {"backoff": kind, "backoff_base_ms": 100, "max_backoff_ms": 250, "max_attempts": 4}
        tasks[kind] = await start(conn, single(namespace=f"bo_{kind}", retry=retry))
    delays: dict[str, list[float]] = {kind: [] for kind in BACKOFFS}
    for attempt in range(1, 4):
        for kind, task in tasks.items():
            [row] = await wait_for_claim(conn, f"bo_{kind}")
            assert row["attempt"] == attempt
            assert (row["backoff"], row["backoff_base_ms"], row["max_backoff_ms"]) == (
                kind,
                100,
                250,
            )
            await complete(conn, failure(row))
            s = await step_row(conn, task, "only")
            assert s["state"] == "waiting_for_retry"
            delays[kind].append(seconds(s["next_attempt_at"] - s["updated_at"]))
            msg_vt = await conn.fetchval(
                "SELECT vt FROM tasker.queue_messages WHERE queue = $1 AND msg_id = $2",
                f"bo_{kind}",
                s["msg_id"],
            )
            assert msg_vt == s["next_attempt_at"]  # the message wakes exactly then
    for kind, expected in BACKOFFS.items():
        assert delays[kind] == pytest.approx(expected, abs=0.001), kind
    for kind, task in tasks.items():
        [row] = await wait_for_claim(conn, f"bo_{kind}")
        await complete(conn, success(row, {}))
        await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_backoff_jitter_stays_within_bounds(conn: db.Connection) -> None:
    rows = await conn.fetch(
        "SELECT n, tasker._backoff_seconds('exponential', 100, 1000, 0.5, n) AS d "
        "FROM generate_series(1, 6) n, generate_series(1, 50) k"
    )
    for r in rows:
        delay = min(0.1 * 2 ** (r["n"] - 1), 1.0)
        assert delay * 0.5 - 1e-9 <= r["d"] <= delay + 1e-9, (r["n"], r["d"])
    # jitter actually spreads the delays
    assert len({round(r["d"], 6) for r in rows if r["n"] == 3}) > 10

    # and end to end, through a failing step
    retry = {"backoff_base_ms": 200, "max_backoff_ms": 1000, "jitter": 0.5}
    task = await start(conn, single(retry=retry))
    [row] = await claim(conn)
    await complete(conn, failure(row))
    s = await step_row(conn, task, "only")
    assert 0.1 - 1e-6 <= seconds(s["next_attempt_at"] - s["updated_at"]) <= 0.2 + 1e-6
    await assert_healthy(conn)


# --- failure details and audit ----------------------------------------------------------------


async def test_failure_details_and_transitions_are_stored(conn: db.Connection) -> None:
    task = await start(conn, single(retry={**FAST, "max_attempts": 2}))
    [row] = await claim(conn, worker="w-a")
    err = failure(
        row,
        "card declined",
        error_type="PaymentError",
        context={"card": "4242"},
        traceback="Traceback (most recent call last): ...",
        worker="w-a",
    )
    err["duration_ms"] = 12.5
    await complete(conn, err)
    s = await step_row(conn, task, "only")
    le = s["last_error"]
    assert le["message"] == "card declined"
    assert le["error_type"] == "PaymentError"
    assert le["error_code"] == "paymenterror"
    assert le["retryable"] is True
    assert le["context"] == {"card": "4242"}
    assert le["traceback"].startswith("Traceback")
    assert le["attempt"] == 1
    assert le["worker_id"] == "w-a"

    [row2] = await claim(conn, worker="w-b")
    await complete(conn, failure(row2, "still declined", retryable=False, worker="w-b"))
    s = await step_row(conn, task, "only")
    assert s["state"] == "error"
    assert s["last_error"]["attempt"] == 2 and s["last_error"]["retryable"] is False

    trs = await transitions(conn, s["step_uuid"])
    got = [(t["from_state"], t["to_state"], t["event"], t["attempt"], t["worker_id"]) for t in trs]
    assert got == [
        (None, "enqueued", "created", 0, None),
        ("enqueued", "in_progress", "claimed", 1, "w-a"),
        ("in_progress", "waiting_for_retry", "retry_scheduled", 1, "w-a"),
        ("waiting_for_retry", "in_progress", "claimed", 2, "w-b"),
        ("in_progress", "error", "failed", 2, "w-b"),
    ]
    assert trs[2]["duration_ms"] == 12.5
    assert trs[2]["error_summary"] == "PaymentError: card declined"
    assert trs[4]["error_summary"] == "RuntimeError: still declined"
    assert trs[1]["duration_ms"] is None and trs[1]["error_summary"] is None
    task_events = await conn.fetch(
        "SELECT from_state, to_state, event FROM tasker.task_transitions WHERE task_uuid = $1 "
        "ORDER BY transition_id",
        task,
    )
    assert [(e["from_state"], e["to_state"]) for e in task_events] == [
        (None, "pending"),
        ("pending", "steps_in_process"),
        ("steps_in_process", "error"),
    ]
    await assert_healthy(conn)


# --- permanent failure, retry_step, resolve_step ----------------------------------------------


def branches() -> dict[str, Any]:
    """root -> p, q, r; p -> p2; q -> q2; r -> r2; p2, q2, r2 -> join."""
    return template(
        "branches",
        [
            step("root"),
            step("p", "root"),
            step("q", "root"),
            step("r", "root"),
            step("p2", "p"),
            step("q2", "q"),
            step("r2", "r"),
            step("join", "p2", "q2", "r2"),
        ],
        retry=FAST,
    )


async def test_permanent_failure_holds_every_branch_until_retry_step(
    conn: db.Connection,
) -> None:
    tpl = branches()
    task = await start(conn, tpl)
    [root] = await claim(conn)
    await complete(conn, success(root, {"root": 1}))
    first_two = await claim(conn, qty=2)
    assert len(first_two) == 2
    failing, running = first_two
    parked = ({"p", "q", "r"} - {failing["step_name"], running["step_name"]}).pop()
    fname, rname = failing["step_name"], running["step_name"]

    answer = await complete(conn, failure(failing, "no such customer", retryable=False))
    assert answer[str(failing["step_uuid"])]["detail"] == "error"
    assert (await task_row(conn, task))["state"] == "error"

    # the enqueued sibling is not handed out while the task is in error: its message is parked
    # (taken out of the queue; the step row keeps its state)
    assert await claim(conn) == []
    parked_row = await step_row(conn, task, parked)
    assert (parked_row["state"], parked_row["msg_id"]) == ("enqueued", None)
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tasker.queue_messages WHERE message->>'step_uuid' = $1::text",
            str(parked_row["step_uuid"]),
        )
        == 0
    )

    # the step already running finishes and keeps its result; its child is not enqueued
    answer = await complete(conn, success(running, {"kept": rname}))
    assert answer[str(running["step_uuid"])]["status"] == "applied"
    assert (await step_row(conn, task, rname))["results"] == {"kept": rname}
    assert (await task_row(conn, task))["state"] == "error"
    assert await claim(conn) == []

    states = await step_states(conn, task)
    assert states[fname] == "error" and states[rname] == "complete"
    assert states[rname + "2"] == "pending"  # held back although its parent completed
    assert states[fname + "2"] == "pending" and states["join"] == "pending"
    r = await readiness(conn, task)
    assert not any(x["ready"] for x in r.values())
    for name in (rname + "2", parked, "join", fname + "2"):
        assert r[name]["reason"] == "task is in error", (name, r[name]["reason"])
    assert r[rname + "2"]["dependencies_satisfied"]
    assert r[fname]["reason"].startswith("failed: RuntimeError: no such customer")
    assert await exec_status(conn, task) == "blocked_by_failures"
    await assert_healthy(conn)

    # retry_step: the task goes on; the held-back child and the parked sibling run
    out = await conn.retry_step(failing["step_uuid"])
    assert out["state"] == "enqueued" and out["task_state"] == "steps_in_process"
    assert (await task_row(conn, task))["state"] == "steps_in_process"
    s = await step_row(conn, task, fname)
    assert (s["state"], s["attempts"]) == ("enqueued", 0)
    held = await step_row(conn, task, rname + "2")
    assert held["state"] == "enqueued"
    assert [t["event"] for t in await transitions(conn, held["step_uuid"])] == [
        "created",
        "task_resumed",
    ]
    assert await ready_names(conn, task) == {fname, parked, rname + "2"}
    await assert_healthy(conn)

    log = await drive(conn, NAMESPACE, lambda row: {"n": row["step_name"]})
    assert log.names[0] == sorted([fname, parked, rname + "2"])
    [retried] = log.claimed(fname)
    assert retried["attempt"] == 1  # attempts were reset
    [j] = log.claimed("join")
    assert j["dependency_results"][rname] == {"kept": rname}
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_resolve_step_unblocks_children(conn: db.Connection) -> None:
    task = await start(conn, diamond(retry=FAST))
    [s] = await claim(conn)
    await complete(conn, success(s, {"start": True}))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, failure(rows["b"], retryable=False))
    await complete(conn, success(rows["c"], {"c": 3}))
    assert (await task_row(conn, task))["state"] == "error"
    assert (await step_states(conn, task))["end"] == "pending"

    out = await conn.resolve_step(rows["b"]["step_uuid"], {"manual": "yes"})
    assert out["previous_state"] == "error" and out["state"] == "resolved_manually"
    assert out["task_state"] == "steps_in_process"
    assert await ready_names(conn, task) == {"end"}
    [end] = await claim(conn)
    assert end["dependency_results"] == {
        "start": {"start": True},
        "b": {"manual": "yes"},
        "c": {"c": 3},
    }
    await complete(conn, success(end, {"end": 1}))
    await assert_complete(conn, task)
    ctx = await conn.task_execution_context(task)
    assert ctx is not None and ctx["resolved_steps"] == 1 and ctx["complete_steps"] == 3
    events = [t["event"] for t in await transitions(conn, rows["b"]["step_uuid"])]
    assert events[-1] == "resolved"
    await assert_healthy(conn)


async def test_resolve_step_on_a_running_step_makes_the_late_result_stale(
    conn: db.Connection,
) -> None:
    task = await start(conn, linear(2))
    [s1] = await claim(conn)
    out = await conn.resolve_step(s1["step_uuid"], {"by": "operator"})
    assert out["previous_state"] == "in_progress"
    answer = await complete(conn, success(s1, {"by": "worker"}))
    assert answer[str(s1["step_uuid"])]["status"] == "stale"
    assert (await step_row(conn, task, "s1"))["results"] == {"by": "operator"}
    [s2] = await claim(conn)
    assert s2["dependency_results"] == {"s1": {"by": "operator"}}
    await complete(conn, success(s2, {}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_operators_refuse_wrong_state_and_unknown_ids(conn: db.Connection) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    await complete(conn, success(row, {}))

    with pytest.raises(InvalidStateError) as exc:
        await conn.retry_step(row["step_uuid"])
    assert "is complete" in str(exc.value) and exc.value.error_code == "step_not_in_error"
    with pytest.raises(InvalidStateError) as exc:
        await conn.resolve_step(row["step_uuid"], {"x": 1})
    assert "is complete" in str(exc.value) and exc.value.error_code == "step_finished"
    with pytest.raises(InvalidStateError) as exc:
        await conn.cancel_task(task)
    assert "is complete" in str(exc.value) and exc.value.error_code == "task_finished"

    ghost = uuid.uuid4()
    for call, code in [
        (conn.retry_step, "step_not_found"),
        (conn.resolve_step, "step_not_found"),
        (conn.cancel_task, "task_not_found"),
        (conn.step_readiness, "task_not_found"),
        (conn.task_execution_context, "task_not_found"),
    ]:
        with pytest.raises(NotFoundError) as nf:
            await call(ghost)
        assert str(ghost) in str(nf.value) and nf.value.error_code == code

    # retry_step refuses a running step too, naming its state
    task2 = await start(conn, single())
    [running] = await claim(conn)
    with pytest.raises(InvalidStateError, match="is in_progress"):
        await conn.retry_step(running["step_uuid"])
    await complete(conn, success(running, {}))
    await assert_complete(conn, task2)
    await assert_healthy(conn)


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_makes_a_late_success_stale(conn: db.Connection) -> None:
    task = await start(conn, linear(3))
    [s1] = await claim(conn)
    out = await conn.cancel_task(task, "customer asked")
    assert out["state"] == "cancelled" and out["cancelled_steps"] == 3
    answer = await complete(conn, success(s1, {"late": True}))
    a = answer[str(s1["step_uuid"])]
    assert a["status"] == "stale"
    assert "cancelled" in a["detail"]
    assert set((await step_states(conn, task)).values()) == {"cancelled"}
    assert (await step_row(conn, task, "s1"))["results"] is None
    t = await task_row(conn, task)
    assert t["state"] == "cancelled" and t["completed_steps"] == 0
    assert await message_count(conn) == 0
    assert await claim(conn) == []
    assert await exec_status(conn, task) == "cancelled"
    assert {x["reason"] for x in (await readiness(conn, task)).values()} == {"cancelled"}
    trs = await transitions(conn, s1["step_uuid"])
    assert (trs[-1]["from_state"], trs[-1]["to_state"], trs[-1]["event"]) == (
        "in_progress",
        "cancelled",
        "task_cancelled",
    )
    assert trs[-1]["metadata"] == {"reason": "customer asked"}
    with pytest.raises(InvalidStateError, match="is cancelled"):
        await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_cancel_a_task_in_error(conn: db.Connection) -> None:
    task = await start(conn, diamond(retry=FAST))
    [s] = await claim(conn)
    await complete(conn, success(s, {}))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, failure(rows["b"], retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    out = await conn.cancel_task(task)
    assert out["previous_state"] == "error" and out["cancelled_steps"] == 3
    answer = await complete(conn, success(rows["c"], {}))
    assert answer[str(rows["c"]["step_uuid"])]["status"] == "stale"
    assert await step_states(conn, task) == {
        "start": "complete",
        "b": "cancelled",
        "c": "cancelled",
        "end": "cancelled",
    }
    t = await task_row(conn, task)
    assert (t["state"], t["error_steps"], t["completed_steps"]) == ("cancelled", 0, 1)
    assert await message_count(conn) == 0
    await assert_healthy(conn)


# --- leases -----------------------------------------------------------------------------------


SLOW_RETRY = {"backoff": "fixed", "backoff_base_ms": 600_000, "max_backoff_ms": 600_000}  # 10 min


async def expire_lease(conn: db.Connection, step_uuid: Any) -> None:
    """Make a step's lease (its message's visibility time) lapse now, as if time passed."""
    await conn.execute(
        "UPDATE tasker.queue_messages m SET vt = clock_timestamp() - interval '1 second' "
        "FROM tasker.steps s WHERE s.step_uuid = $1 AND m.msg_id = s.msg_id",
        step_uuid,
    )


async def test_lost_lease_is_recorded_and_retried_after_backoff(conn: db.Connection) -> None:
    task = await start(conn, single(retry=SLOW_RETRY))
    [old] = await claim(conn, lease=30, worker="zombie")
    assert old["attempt"] == 1
    await expire_lease(conn, old["step_uuid"])
    reason = (await readiness(conn, task))["only"]["reason"]
    assert reason.startswith("lease of zombie expired at"), reason
    assert reason.endswith(
        "; recorded at the next claim, retried after backoff (attempt 2 of 3)"
    ), reason

    # the claim that meets the lost lease records it and does not run the step again at once
    assert await claim(conn, worker="w2") == []
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"]) == ("waiting_for_retry", 1)
    assert s["last_error"]["error_code"] == "lease_expired"
    assert s["last_error"]["worker_id"] == "zombie"
    assert s["last_error"]["retryable"] is True
    assert s["last_error"]["message"].startswith("lease of worker zombie expired at ")
    # the step's backoff applies: fixed 10 minutes, and the message waits for it
    assert seconds(s["next_attempt_at"] - s["updated_at"]) > 590
    vt = await conn.fetchval("SELECT vt FROM tasker.queue_messages WHERE msg_id = $1", s["msg_id"])
    assert vt == s["next_attempt_at"]
    trs = await transitions(conn, old["step_uuid"])
    assert [
        (t["event"], t["from_state"], t["to_state"], t["attempt"], t["worker_id"]) for t in trs
    ] == [
        ("created", None, "enqueued", 0, None),
        ("claimed", "enqueued", "in_progress", 1, "zombie"),
        ("lease_expired", "in_progress", "waiting_for_retry", 1, "zombie"),
    ]
    assert (await readiness(conn, task))["only"]["reason"].startswith("retry at ")
    await assert_healthy(conn)

    # the zombie's outcome is stale already
    answer = await complete(conn, success(old, {"from": "zombie"}))
    a = answer[str(old["step_uuid"])]
    assert (
        a["status"] == "stale" and a["detail"] == "step is waiting_for_retry at attempt 1, claim 1"
    )

    # after the backoff (brought forward here) the next claim starts attempt 2
    await expire_lease(conn, old["step_uuid"])
    [new] = await claim(conn, worker="w2")
    assert (new["attempt"], new["claim_event"], new["claim_seq"]) == (2, "claimed", 2)
    answer = await complete(conn, failure(old, retryable=False))
    assert answer[str(old["step_uuid"])]["status"] == "stale"
    answer = await complete(conn, success(new, {"from": "w2"}, worker="w2"))
    assert answer[str(new["step_uuid"])]["status"] == "applied"
    assert (await step_row(conn, task, "only"))["results"] == {"from": "w2"}
    trs = await transitions(conn, new["step_uuid"])
    assert [(t["event"], t["attempt"], t["worker_id"]) for t in trs][2:] == [
        ("lease_expired", 1, "zombie"),
        ("claimed", 2, "w2"),
        ("succeeded", 2, "w2"),
    ]
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_lost_leases_do_not_burn_attempts_back_to_back(conn: db.Connection) -> None:
    """Each lost lease costs one attempt and a backoff; claims in between get nothing."""
    task = await start(conn, single(retry=SLOW_RETRY))
    for attempt in (1, 2, 3):
        [row] = await claim(conn, worker=f"w{attempt}")
        assert row["attempt"] == attempt
        await expire_lease(conn, row["step_uuid"])
        assert await claim(conn, worker="other") == []  # records the loss, runs nothing
        assert await claim(conn, worker="other") == []  # still waiting for the backoff
        s = await step_row(conn, task, "only")
        assert s["attempts"] == attempt
        assert s["last_error"]["worker_id"] == f"w{attempt}"
        if attempt < 3:
            assert s["state"] == "waiting_for_retry"
            await expire_lease(conn, row["step_uuid"])  # the backoff, brought forward
    assert s["state"] == "error"
    assert s["last_error"]["retryable"] is False
    events = [
        (t["event"], t["attempt"], t["worker_id"])
        for t in await transitions(conn, row["step_uuid"])
    ]
    assert events[1:] == [
        ("claimed", 1, "w1"),
        ("lease_expired", 1, "w1"),
        ("claimed", 2, "w2"),
        ("lease_expired", 2, "w2"),
        ("claimed", 3, "w3"),
        ("lease_expired", 3, "w3"),
    ]
    assert (await task_row(conn, task))["state"] == "error"
    assert await message_count(conn, task) == 0
    await assert_healthy(conn)


async def test_lost_lease_without_attempts_left_is_an_error(conn: db.Connection) -> None:
    task = await start(conn, single(retry={"max_attempts": 1}))
    [old] = await claim(conn, lease=0.3, worker="zombie")

    async def expired() -> bool:
        reason = (await readiness(conn, task))["only"]["reason"]
        return reason.startswith("lease of zombie expired at")

    # step_readiness does not promise a retry that will not happen
    await wait_for(expired, what="lease expiry")
    reason = (await readiness(conn, task))["only"]["reason"]
    assert reason.endswith("; no attempts left (1 of 1): the next claim marks it failed"), reason

    async def errored() -> bool:
        assert await claim(conn) == []
        return (await step_row(conn, task, "only"))["state"] == "error"

    await wait_for(errored, what="lease expiry to error")
    s = await step_row(conn, task, "only")
    assert s["last_error"]["error_type"] == "lease_expired"
    assert s["last_error"]["retryable"] is False
    assert "zombie" in s["last_error"]["message"]
    assert (await task_row(conn, task))["state"] == "error"
    assert await message_count(conn) == 0
    trs = await transitions(conn, old["step_uuid"])
    assert (trs[-1]["from_state"], trs[-1]["to_state"], trs[-1]["event"]) == (
        "in_progress",
        "error",
        "lease_expired",
    )
    answer = await complete(conn, success(old, {}))
    assert answer[str(old["step_uuid"])]["status"] == "stale"
    await assert_healthy(conn)


def unfenced(outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome without its claim token, as a caller that skips the fence would send it."""
    return {k: v for k, v in outcome.items() if k != "claim_seq"}


async def test_a_zombie_without_claim_seq_cannot_win_after_retry_step(conn: db.Connection) -> None:
    """W1's lease expires and the step fails for good; an operator retries it; W3 claims attempt
    1 again. Zombie W1's outcome repeats (step_uuid, attempt 1): without the claim token it
    would be taken for W3's. The token is required, so it is refused and W3's success wins."""
    task = await start(conn, single(retry={"max_attempts": 1}))
    [zombie] = await claim(conn, lease=0.2, worker="w1")

    async def errored() -> bool:
        await claim(conn, worker="sweeper")  # the claim that finds the expired lease
        return (await step_row(conn, task, "only"))["state"] == "error"

    await wait_for(errored, what="lease expiry to error")
    await conn.retry_step(zombie["step_uuid"])
    [current] = await claim(conn, worker="w3")
    assert (current["attempt"], current["claim_seq"]) == (1, zombie["claim_seq"] + 1)

    for call in (
        complete(conn, unfenced(success(zombie, {"from": "zombie"}))),
        complete(conn, {**success(zombie, {"from": "zombie"}), "claim_seq": None}),
        conn.extend_leases([unfenced(success(zombie))], 60),
        conn.release_steps([{"step_uuid": str(zombie["step_uuid"]), "attempt": 1}]),
    ):
        with pytest.raises(ValidationError, match="claim_seq is required"):
            await call
    answer = await complete(conn, success(current, {"from": "w3"}))
    assert answer[str(current["step_uuid"])]["status"] == "applied"
    assert (await step_row(conn, task, "only"))["results"] == {"from": "w3"}
    await assert_healthy(conn)


async def test_a_checkpointed_claim_without_claim_seq_cannot_take_the_continuation(
    conn: db.Connection,
) -> None:
    """A continuation keeps the attempt number: only the claim token tells the claim that
    checkpointed from the one that continues it."""
    task = await start(conn, single())
    [first] = await claim(conn)
    await complete(conn, checkpoint(first, cursor=1, items_processed=1))
    [cont] = await claim(conn, worker="w2")
    assert cont["attempt"] == first["attempt"]
    with pytest.raises(ValidationError, match="claim_seq is required"):
        await complete(conn, unfenced(success(first, {"from": "first"})))
    answer = await complete(conn, success(cont, {"from": "w2"}))
    assert answer[str(cont["step_uuid"])]["status"] == "applied"
    assert (await step_row(conn, task, "only"))["results"] == {"from": "w2"}
    await assert_healthy(conn)


async def test_extend_leases_keeps_a_claim_alive(conn: db.Connection) -> None:
    task = await start(conn, single())
    claimed_at = time.monotonic()
    [row] = await claim(conn, lease=0.5)
    fence = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
    stale = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": 0}
    ghost = {"step_uuid": str(uuid.uuid4()), "attempt": 1, "claim_seq": 1}
    [bad] = await conn.extend_leases([stale], 30)
    assert (bad["extended"], bad["lease_expires_at"]) == (False, None)
    [unknown] = await conn.extend_leases([ghost], 30)
    assert unknown["extended"] is False
    [ok] = await conn.extend_leases([fence], 30)
    assert ok["extended"] is True
    left = await conn.fetchval(
        "SELECT vt - clock_timestamp() FROM tasker.queue_messages WHERE msg_id = $1",
        row["msg_id"],
    )
    assert 29 < seconds(left) <= 30
    v = await conn.fetchrow(
        "SELECT lease_expires_at FROM tasker.v_steps WHERE step_uuid = $1", row["step_uuid"]
    )
    assert v is not None and v["lease_expires_at"] == ok["lease_expires_at"]

    # past the original lease the step is still held: nobody can reclaim it
    while time.monotonic() - claimed_at < 0.7:
        assert await claim(conn, worker="w2") == []
        await asyncio.sleep(0.05)
    assert (await readiness(conn, task))["only"]["reason"] == "running on w1 (attempt 1 of 3)"
    answer = await complete(conn, success(row, {"ok": 1}))
    assert answer[str(row["step_uuid"])]["status"] == "applied"
    # a finished claim cannot be extended
    [after] = await conn.extend_leases([fence], 30)
    assert after["extended"] is False
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_release_steps_hands_back_unstarted_claims(conn: db.Connection) -> None:
    task = await start(conn, single(retry=FAST))
    [row] = await claim(conn)
    fence = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
    [out] = await conn.release_steps([fence])
    assert out["released"] is True
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"], s["worker_id"]) == ("enqueued", 0, None)
    assert await ready_names(conn, task) == {"only"}
    [again] = await claim(conn, worker="w2")
    assert (again["attempt"], again["claim_event"]) == (1, "claimed")
    assert again["claim_seq"] == row["claim_seq"] + 1
    # the old claim is gone: releasing it again does nothing, its outcome is stale
    [out] = await conn.release_steps([fence])
    assert out["released"] is False
    answer = await complete(conn, success(row, {}))
    assert answer[str(row["step_uuid"])]["status"] == "stale"

    # released after a retry: back to waiting_for_retry with the spent attempts only
    await complete(conn, failure(again))
    [third] = await claim(conn)
    assert third["attempt"] == 2
    [out] = await conn.release_steps(
        [{"step_uuid": str(third["step_uuid"]), "attempt": 2, "claim_seq": third["claim_seq"]}]
    )
    assert out["released"] is True
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"]) == ("waiting_for_retry", 1)
    [fourth] = await claim(conn)
    assert (fourth["attempt"], fourth["claim_event"]) == (2, "claimed")
    events = [t["event"] for t in await transitions(conn, row["step_uuid"])]
    assert events.count("released") == 2
    await complete(conn, success(fourth, {}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


# --- checkpoints ------------------------------------------------------------------------------


async def test_checkpoint_continues_the_same_attempt(conn: db.Connection) -> None:
    task = await start(conn, single())
    [first] = await claim(conn)
    assert first["checkpoint"] is None
    answer = await complete(
        conn, checkpoint(first, cursor=100, items_processed=100, accumulated_results={"sum": 5050})
    )
    assert answer[str(first["step_uuid"])]["status"] == "applied"
    assert answer[str(first["step_uuid"])]["detail"] == "in_progress"
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"]) == ("in_progress", 1)
    expected_cp = {"cursor": 100, "items_processed": 100, "accumulated_results": {"sum": 5050}}
    assert s["checkpoint"] == expected_cp
    r = (await readiness(conn, task))["only"]
    assert r["ready"] and r["reason"] == "checkpointed: waiting to continue"

    [cont] = await claim(conn, worker="w2")  # at once: no delay
    assert cont["claim_event"] == "resumed"
    assert cont["attempt"] == 1
    assert cont["claim_seq"] == first["claim_seq"] + 1
    assert cont["checkpoint"] == expected_cp

    # the first claim's checkpoint (and any other outcome of it) arriving again is stale
    answer = await complete(conn, checkpoint(first, cursor=100, items_processed=100))
    assert answer[str(first["step_uuid"])]["status"] == "stale"
    answer = await complete(conn, success(first, {"from": "first"}))
    assert answer[str(first["step_uuid"])]["status"] == "stale"

    answer = await complete(conn, success(cont, {"total": 5050}))
    assert answer[str(cont["step_uuid"])]["status"] == "applied"
    events = [(t["event"], t["attempt"]) for t in await transitions(conn, first["step_uuid"])]
    assert events == [
        ("created", 0),
        ("claimed", 1),
        ("checkpointed", 1),
        ("resumed", 1),
        ("succeeded", 1),
    ]
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_checkpoint_then_lost_lease_resumes_from_checkpoint_as_new_attempt(
    conn: db.Connection,
) -> None:
    task = await start(conn, single())
    [first] = await claim(conn)
    await complete(conn, checkpoint(first, cursor="page-2", items_processed=50))
    [cont] = await claim(conn, worker="zombie")
    assert (cont["claim_event"], cont["attempt"]) == ("resumed", 1)
    await expire_lease(conn, cont["step_uuid"])
    # the lost lease of the continuation is a failed attempt: backoff, checkpoint kept
    assert await claim(conn, worker="w3") == []
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"], s["continuation"]) == ("waiting_for_retry", 1, False)
    assert s["last_error"]["worker_id"] == "zombie"
    assert s["checkpoint"]["cursor"] == "page-2"
    [again] = await wait_for_claim(conn, worker="w3")
    assert (again["claim_event"], again["attempt"]) == ("claimed", 2)
    assert again["checkpoint"] == {
        "cursor": "page-2",
        "items_processed": 50,
        "accumulated_results": None,
    }
    answer = await complete(conn, success(cont, {}))
    assert answer[str(cont["step_uuid"])]["status"] == "stale"
    await complete(conn, success(again, {"done": True}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_release_of_a_continuation_keeps_the_attempt(conn: db.Connection) -> None:
    task = await start(conn, single())
    [first] = await claim(conn)
    await complete(conn, checkpoint(first, cursor=1))
    [cont] = await claim(conn)
    [out] = await conn.release_steps(
        [{"step_uuid": str(cont["step_uuid"]), "attempt": 1, "claim_seq": cont["claim_seq"]}]
    )
    assert out["released"] is True
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"], s["continuation"]) == ("in_progress", 1, True)
    [again] = await claim(conn)
    assert (again["claim_event"], again["attempt"]) == ("resumed", 1)
    assert again["checkpoint"]["cursor"] == 1
    await complete(conn, success(again, {}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


# --- create_task ------------------------------------------------------------------------------


async def count_everything(conn: db.Connection) -> dict[str, int]:
    tables = [
        "tasks",
        "steps",
        "step_edges",
        "queue_messages",
        "step_transitions",
        "task_transitions",
    ]
    return {t: int(await conn.fetchval(f"SELECT count(*) FROM tasker.{t}")) for t in tables}


async def test_create_task_in_a_rolled_back_transaction_leaves_nothing(
    conn: db.Connection, dsn: str
) -> None:
    tpl = diamond()
    await conn.register_template(tpl)
    before = await count_everything(conn)
    assert before == dict.fromkeys(before, 0)
    other = await db.connect(dsn)
    try:

        class Rollback(Exception):
            pass

        with pytest.raises(Rollback):
            async with conn.transaction():
                task = await conn.create_task(NAMESPACE, "diamond", {"a": 1})
                assert (await task_row(conn, task))["state"] == "pending"
                # workers see nothing before commit
                assert await claim(other) == []
                raise Rollback
        assert await count_everything(conn) == before
        assert await claim(other) == []

        # committed, it is there for the other session
        async with conn.transaction():
            task = await conn.create_task(NAMESPACE, "diamond", {"a": 1})
        [row] = await claim(other)
        assert row["task_uuid"] == task and row["step_name"] == "start"
        await complete(other, success(row, {}))
    finally:
        await other.close()
    await assert_healthy(conn)


async def test_idempotency_key_returns_the_same_task(conn: db.Connection) -> None:
    tpl = diamond()
    first = await start(conn, tpl, {"n": 1}, idempotency_key="order-42")
    counts = await count_everything(conn)
    again = await start(conn, tpl, {"n": 2}, idempotency_key="order-42")
    assert again == first
    assert await count_everything(conn) == counts  # nothing new at all
    assert (await task_row(conn, first))["context"] == {"n": 1}
    other = await start(conn, tpl, {"n": 3}, idempotency_key="order-43")
    assert other != first
    # create_or_get_task says which of the two happened; create_task keeps its uuid answer
    template_name = (await task_row(conn, first))["name"]
    opts = {"idempotency_key": "order-42"}
    assert await conn.create_or_get_task(NAMESPACE, template_name, {}, options=opts) == (
        first,
        False,
    )
    made, created = await conn.create_or_get_task(
        NAMESPACE, template_name, {}, options={"idempotency_key": "order-44"}
    )
    assert created is True and made not in (first, other)
    # the key is scoped to the template: the same key elsewhere is another task
    elsewhere = await start(conn, linear(2), idempotency_key="order-42")
    assert elsewhere != first
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 4
    await assert_healthy(conn)


async def test_version_null_picks_newest_by_semver(conn: db.Connection) -> None:
    for version in ["1.2.0", "1.10.0", "1.9.0", "1.10.0-rc.1"]:
        await conn.register_template(single(version=version))
    newest = await conn.create_task(NAMESPACE, "single", {})
    assert (await task_row(conn, newest))["version"] == "1.10.0"
    explicit = await conn.create_task(NAMESPACE, "single", {}, version="1.9.0")
    assert (await task_row(conn, explicit))["version"] == "1.9.0"
    rc = await conn.create_task(NAMESPACE, "single", {}, version="1.10.0-rc.1")
    assert (await task_row(conn, rc))["version"] == "1.10.0-rc.1"
    [row] = await claim(conn, qty=1)
    assert row["task_version"] == "1.10.0"
    await complete(conn, success(row, {}))
    await assert_healthy(conn)


async def test_version_null_orders_prereleases_by_semver(conn: db.Connection) -> None:
    for version in ["2.0.0-rc.9", "2.0.0-rc.10", "1.10.0"]:
        await conn.register_template(single(version=version))
    task = await conn.create_task(NAMESPACE, "single", {})
    assert (await task_row(conn, task))["version"] == "2.0.0-rc.10"
    await assert_healthy(conn)


async def test_create_task_bad_inputs(conn: db.Connection) -> None:
    for version in ["1.2.0", "1.10.0", "1.9.0"]:
        await conn.register_template(single(version=version))

    with pytest.raises(NotFoundError) as exc:
        await conn.create_task(NAMESPACE, "single", {}, version="3.0.0")
    assert exc.value.error_code == "template_not_found"
    assert "no version '3.0.0'" in str(exc.value)
    assert "registered versions: 1.2.0, 1.9.0, 1.10.0" in str(exc.value)

    with pytest.raises(NotFoundError) as exc:
        await conn.create_task(NAMESPACE, "nope", {})
    assert "no template flows/nope is registered" in str(exc.value)
    assert "single" in str(exc.value)  # what does exist in the namespace
    with pytest.raises(NotFoundError) as exc:
        await conn.create_task("nowhere", "single", {})
    assert "no template nowhere/single is registered" in str(exc.value)
    assert "none" in str(exc.value)

    sql = "SELECT tasker.create_task($1, $2, $3::jsonb, NULL, $4::jsonb)"
    for context, kind in [([1, 2], "array"), ("text", "string"), (5, "number")]:
        with pytest.raises(ValidationError) as exc:
            await conn.fetchval(sql, NAMESPACE, "single", context, {})
        assert exc.value.error_code == "invalid_context"
        assert f"task context must be a JSON object, got a JSON {kind}" in str(exc.value)

    await conn.execute("UPDATE tasker.settings SET value = 1024 WHERE name = 'max_payload_bytes'")
    with pytest.raises(ValidationError) as exc:
        await conn.create_task(NAMESPACE, "single", {"blob": os.urandom(2000).hex()})
    assert exc.value.error_code == "payload_too_large"
    assert "more than the limit of 1024 bytes" in str(exc.value)
    assert "max_payload_bytes in tasker.settings" in str(exc.value)
    await conn.execute(
        "UPDATE tasker.settings SET value = 1048576 WHERE name = 'max_payload_bytes'"
    )

    with pytest.raises(ValidationError) as exc:
        await conn.create_task(NAMESPACE, "single", {}, options={"colour": "red"})
    assert exc.value.error_code == "invalid_option"
    assert "unknown option 'colour'" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        await conn.create_task(NAMESPACE, "single", {}, options={"delay_seconds": -1})
    assert exc.value.error_code == "invalid_option"
    assert "delay_seconds must be a number of seconds between 0 and a year" in str(exc.value)

    assert await count_everything(conn) == dict.fromkeys(await count_everything(conn), 0)
    await assert_healthy(conn)


async def test_delay_seconds_holds_the_root_back(conn: db.Connection) -> None:
    task = await start(conn, linear(2), delay_seconds=3600)
    s = await step_row(conn, task, "s1")
    due = await conn.fetchval("SELECT vt FROM tasker.queue_messages WHERE msg_id = $1", s["msg_id"])
    assert seconds(due - s["created_at"]) == pytest.approx(3600, abs=0.001)
    r, _ = await readiness_now(conn, task, "s1")
    assert not r["ready"] and r["reason"].startswith("scheduled to start at ")
    status, _ = await status_now(conn, task)
    assert status == "waiting_for_dependencies"
    assert await claim(conn) == []

    await fast_forward(conn, s["step_uuid"])
    [row] = await claim(conn)
    assert row["step_name"] == "s1"
    await complete(conn, success(row, {}))
    [row] = await claim(conn)  # children are not delayed
    await complete(conn, success(row, {}))
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_priority_claims_the_higher_priority_task_first(conn: db.Connection) -> None:
    low = await start(conn, linear(2), priority=0)
    high = await start(conn, linear(2), priority=5)
    [row] = await claim(conn, qty=1)
    assert row["task_uuid"] == high
    await complete(conn, success(row, {}))
    # the child of the high-priority task inherits its priority and overtakes the older root
    [row] = await claim(conn, qty=1)
    assert (row["task_uuid"], row["step_name"]) == (high, "s2")
    await complete(conn, success(row, {}))
    await drive(conn, NAMESPACE, lambda row: None)
    await assert_complete(conn, low)
    await assert_complete(conn, high)
    await assert_healthy(conn)


# --- register_template ------------------------------------------------------------------------


async def test_register_template_is_idempotent_and_versions_are_immutable(
    conn: db.Connection,
) -> None:
    tpl = diamond()
    first = await conn.register_template(tpl)
    assert await conn.register_template(tpl) == first
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_tasks") == 1
    changed = diamond()
    changed["steps"][1]["handler"]["callable"] = "handlers.other"
    with pytest.raises(ValidationError) as exc:
        await conn.register_template(changed)
    assert exc.value.error_code == "template_version_conflict"
    assert "version 1.0.0" in str(exc.value)
    assert "already registered with a different body" in str(exc.value)
    # a new version is fine
    assert await conn.register_template(diamond(version="1.0.1")) != first
    # a minimal raw body (SQL users) and the Python model's canonical body are the same template
    raw = {
        "name": "minimal",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "steps": [
            {"name": "a", "handler": {"callable": "h.a"}},
            {"name": "b", "handler": {"callable": "h.b"}, "depends_on": ["a"]},
        ],
    }
    raw_id = await conn.register_template(raw)
    assert await conn.register_template(TaskTemplate.from_dict(raw).to_json()) == raw_id
    await assert_healthy(conn)


def raw_template(steps: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "raw", "namespace_name": "rawns", "version": "1.0.0"}
    body["steps"] = steps
    body.update(top)
    return body


def raw_step(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "handler": {"callable": f"h.{name}"}, "dependencies": list(deps), **extra}


# (case, body, words the error message must contain), sent raw: no Python model in between
INVALID_TEMPLATES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "unknown_dependency",
        raw_template([raw_step("a"), raw_step("b", "ghost")]),
        ["step 'b' depends on unknown step 'ghost'", "steps: a, b"],
    ),
    ("self_dependency", raw_template([raw_step("a", "a")]), ["step 'a' depends on itself"]),
    (
        "cycle",
        raw_template([raw_step("a", "b"), raw_step("b", "c"), raw_step("c", "a")]),
        ["dependency cycle a -> b -> c -> a"],
    ),
    (
        "cycle_behind_a_step",
        raw_template(
            [raw_step("d", "a"), raw_step("a", "b"), raw_step("b", "c"), raw_step("c", "a")]
        ),
        ["dependency cycle a -> b -> c -> a"],
    ),
    ("no_steps", raw_template([]), ["template raw has no steps"]),
    ("invalid_version", raw_template([raw_step("a")], version="1.0"), ["version '1.0' is invalid"]),
    (
        "max_attempts_0",
        raw_template([raw_step("a", retry={"max_attempts": 0})]),
        ["step 'a'", "max_attempts must be an integer >= 1, got 0"],
    ),
    ("unknown_key", raw_template([raw_step("a")], colour="red"), ["unknown key 'colour'"]),
    (
        "unknown_step_key",
        raw_template([raw_step("a", retries=3)]),
        ["step 'a'", "unknown key 'retries'"],
    ),
    (
        "unknown_type",
        raw_template([raw_step("a", type="deferred")]),
        ["step type 'deferred' is not valid"],
    ),
    (
        "invalid_namespace",
        raw_template([raw_step("a")], namespace_name="Bad-NS"),
        ["namespace_name 'Bad-NS' is invalid"],
    ),
    ("duplicate_step", raw_template([raw_step("a"), raw_step("a")]), ["duplicate step name 'a'"]),
    ("no_handler", raw_template([{"name": "a", "handler": {}}]), ["handler.callable is required"]),
]


async def test_register_template_sql_validation(conn: db.Connection) -> None:
    for case, body, words in INVALID_TEMPLATES:
        try:
            await conn.register_template(body)
        except ValidationError as exc:
            assert exc.error_code == "invalid_template", case
            for w in words:
                assert w in str(exc), f"{case}: {w!r} not in {exc}"
        else:
            raise AssertionError(f"{case}: register_template accepted {body}")
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_steps") == 0
    await assert_healthy(conn)


async def test_register_template_refuses_bad_retry_numbers_clearly(conn: db.Connection) -> None:
    problems = []
    for retry in [{"max_attempts": 2.0}, {"max_attempts": 1e10}, {"backoff_base_ms": 1e10}]:
        try:
            await conn.register_template(raw_template([raw_step("a", retry=retry)]))
        except ValidationError as exc:
            assert "step 'a'" in str(exc)
        except Exception as exc:
            problems.append(f"{retry}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{retry}: accepted")
    assert not problems, "\n".join(problems)
    await assert_healthy(conn)


# --- complete_steps bad input -----------------------------------------------------------------


async def test_complete_steps_refuses_malformed_batches_and_changes_nothing(
    conn: db.Connection,
) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    good = success(row, {"ok": True})

    with pytest.raises(ValidationError) as exc:
        await conn.fetch("SELECT * FROM tasker.complete_steps($1::jsonb)", {"not": "an array"})
    assert exc.value.error_code == "invalid_outcome"
    assert "outcomes must be a JSON array" in str(exc.value)

    no_uuid = {k: v for k, v in good.items() if k != "step_uuid"}
    with pytest.raises(ValidationError) as exc:
        await conn.complete_steps([good, no_uuid])
    assert "outcome #2: step_uuid must be a uuid" in str(exc.value)

    with pytest.raises(ValidationError) as exc:
        await conn.complete_steps([good, {**good, "kind": "maybe"}])
    assert "outcome #2: kind must be success, failure or checkpoint" in str(exc.value)

    with pytest.raises(ValidationError) as exc:
        await conn.complete_steps([{**good, "kind": "failure"}])
    assert "outcome #1: a failure needs an error object" in str(exc.value)

    with pytest.raises(ValidationError) as exc:
        await conn.complete_steps([{**good, "attempt": "1"}])
    assert "outcome #1: attempt must be an integer" in str(exc.value)

    s = await step_row(conn, task, "only")
    assert (s["state"], s["results"], s["attempts"]) == ("in_progress", None, 1)
    assert [t["event"] for t in await transitions(conn, s["step_uuid"])] == ["created", "claimed"]
    answer = await complete(conn, good)
    assert answer[str(row["step_uuid"])]["status"] == "applied"
    await assert_complete(conn, task)
    await assert_healthy(conn)


@pytest.mark.parametrize("kind", ["result", "checkpoint"])
async def test_oversized_result_fails_the_step_permanently(conn: db.Connection, kind: str) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    await conn.execute("UPDATE tasker.settings SET value = 1024 WHERE name = 'max_payload_bytes'")
    blob = {"blob": os.urandom(2000).hex()}
    outcome = success(row, blob) if kind == "result" else checkpoint(row, cursor=blob)
    answer = await complete(conn, outcome)
    a = answer[str(row["step_uuid"])]
    assert (a["status"], a["detail"]) == ("applied", "error")
    s = await step_row(conn, task, "only")
    assert s["state"] == "error" and s["results"] is None and s["checkpoint"] is None
    assert s["last_error"]["error_type"] == "result_too_large"
    assert s["last_error"]["retryable"] is False
    assert f"the step's {kind} is" in s["last_error"]["message"]
    assert "more than the limit of 1024 bytes" in s["last_error"]["message"]
    assert (await task_row(conn, task))["state"] == "error"
    assert await message_count(conn) == 0
    await assert_healthy(conn)


async def test_outcome_for_an_unknown_step_is_stale(conn: db.Connection) -> None:
    ghost = str(uuid.uuid4())
    [a] = await conn.complete_steps(
        [{"step_uuid": ghost, "attempt": 1, "claim_seq": 1, "kind": "success", "result": {}}]
    )
    assert (str(a["step_uuid"]), a["status"], a["detail"]) == (ghost, "stale", "no such step")
    await assert_healthy(conn)


# --- views ------------------------------------------------------------------------------------


async def test_views_show_what_a_dba_needs(conn: db.Connection) -> None:
    task = await start(conn, linear(2, retry=FAST))
    v = await conn.fetchrow("SELECT * FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert v is not None and v["state"] == "pending" and v["completion_percentage"] == 0

    [row] = await claim(conn)
    # no task-row write at the first claim, but the view shows it in process
    assert (await task_row(conn, task))["state"] == "pending"
    v = await conn.fetchrow("SELECT * FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert v is not None and v["state"] == "steps_in_process"

    await complete(conn, failure(row, "flaky upstream"))
    vs = await conn.fetchrow(
        "SELECT * FROM tasker.v_steps WHERE task_uuid = $1 AND name = 's1'", task
    )
    assert vs is not None
    assert vs["handler"] == "handlers.s1"
    assert vs["state"] == "waiting_for_retry"
    assert (vs["attempts"], vs["max_attempts"]) == (1, 3)
    assert vs["last_error_message"] == "flaky upstream"
    assert vs["last_error_type"] == "RuntimeError"
    assert vs["task_name"] == "linear" and vs["namespace"] == NAMESPACE

    [row] = await claim(conn)
    await complete(conn, success(row, {"rows": 3}, metadata={"source": "api"}))
    vs = await conn.fetchrow(
        "SELECT * FROM tasker.v_steps WHERE task_uuid = $1 AND name = 's1'", task
    )
    assert vs is not None and vs["state"] == "complete" and vs["attempts"] == 2
    assert vs["results"] == {"rows": 3} and vs["metadata"] == {"source": "api"}
    assert vs["last_run_duration"] == vs["completed_at"] - vs["started_at"]  # attempt 2's run
    assert vs["started_at"] > vs["created_at"]
    v = await conn.fetchrow("SELECT * FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert v is not None and v["completion_percentage"] == 50
    await drive(conn, NAMESPACE, lambda row: None)
    await assert_complete(conn, task)
    await assert_healthy(conn)


# --- more error-state paths -------------------------------------------------------------------


async def test_two_steps_in_error_need_both_handled(conn: db.Connection) -> None:
    tpl = template("pair", [step("x"), step("y"), step("z", "x", "y")], retry=FAST)
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, failure(rows["x"], retryable=False), failure(rows["y"], retryable=False))
    t = await task_row(conn, task)
    assert (t["state"], t["error_steps"]) == ("error", 2)

    # retrying one of them is not enough: the task stays in error, the retried step waits
    out = await conn.retry_step(rows["x"]["step_uuid"])
    assert out["task_state"] == "error"
    assert await claim(conn) == []
    r = await readiness(conn, task)
    assert r["x"]["state"] == "enqueued" and r["x"]["reason"] == "task is in error"
    await assert_healthy(conn)

    # resolving the other one lets the task go on: the parked retry runs
    out = await conn.resolve_step(rows["y"]["step_uuid"], {"y": "by hand"})
    assert out["task_state"] == "steps_in_process"
    log = await drive(conn, NAMESPACE, lambda row: {"n": row["step_name"]})
    assert log.names == [["x"], ["z"]]
    assert log.claimed("z")[0]["dependency_results"] == {"x": {"n": "x"}, "y": {"y": "by hand"}}
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_lease_lost_while_task_in_error_waits_for_the_operator(conn: db.Connection) -> None:
    tpl = template("pair", [step("x"), step("y")], retry=FAST)
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn, lease=0.3)}
    await complete(conn, failure(rows["y"], retryable=False))

    async def charged() -> bool:
        assert await claim(conn) == []  # never handed out while the task is in error
        return (await step_row(conn, task, "x"))["state"] == "waiting_for_retry"

    await wait_for(charged, what="the lost lease to be charged")
    x = await step_row(conn, task, "x")
    assert x["attempts"] == 1 and x["last_error"]["error_type"] == "lease_expired"
    assert x["msg_id"] is None and await message_count(conn, task) == 0  # parked
    assert (await readiness(conn, task))["x"]["reason"] == "task is in error"
    await assert_healthy(conn)

    await conn.retry_step(rows["y"]["step_uuid"])
    got = {r["step_name"]: r for r in await claim(conn)}
    assert {n: (r["attempt"], r["claim_event"]) for n, r in got.items()} == {
        "x": (2, "claimed"),
        "y": (1, "claimed"),
    }
    await complete(conn, *[success(r) for r in got.values()])
    await assert_complete(conn, task)
    await assert_healthy(conn)


async def test_readiness_agrees_with_claim_for_a_checkpointed_step_in_an_error_task(
    conn: db.Connection,
) -> None:
    tpl = template("pair", [step("x"), step("y")], retry=FAST)
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, checkpoint(rows["x"], cursor=1))
    await complete(conn, failure(rows["y"], retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    ready = (await readiness(conn, task))["x"]["ready"]
    claimed = [r["step_name"] for r in await claim(conn)]
    # the running step finishing is fine (steps already running finish); what is
    # wrong is that the two functions disagree
    # the checkpointed step goes on (steps already running finish), and both functions say so
    assert (ready, claimed) == (True, ["x"])
    await assert_healthy(conn)


# --- notifications ----------------------------------------------------------------------------


async def test_task_state_changes_are_notified(conn: db.Connection, dsn: str) -> None:
    events: list[dict[str, Any]] = []
    listener = await db.connect(dsn)
    try:
        await listener.listen("tasker_task_events", lambda _c, p: events.append(json.loads(p)))
        done = await start(conn, linear(2))
        await drive(conn, NAMESPACE, lambda row: None)
        cancelled = await start(conn, single())
        await conn.cancel_task(cancelled)

        async def all_seen() -> bool:
            return len(events) >= 3

        await wait_for(all_seen, what="three task notifications")
        got = [(e["task_uuid"], e["previous_state"], e["state"]) for e in events]
        assert got == [
            (str(done), "pending", "steps_in_process"),
            (str(done), "steps_in_process", "complete"),
            (str(cancelled), "pending", "cancelled"),
        ]
    finally:
        await listener.close()
    await assert_healthy(conn)


# --- bad input that should be refused clearly -------------------------------------------------


BAD_OUTCOME_FIELDS: list[tuple[str, dict[str, Any], bool]] = [
    # (case, change, goes into the error object)
    ("retry_after text", {"retry_after": "soon"}, True),
    ("retryable text", {"retryable": "maybe"}, True),
    ("duration_ms text", {"duration_ms": "fast"}, False),
    ("attempt out of range", {"attempt": 1e12}, False),
    ("attempt 0.6 (rounded to 1 and applied)", {"attempt": 0.6}, False),
]


async def test_malformed_outcome_fields_are_refused_naming_the_entry(conn: db.Connection) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    problems = []
    for case, change, in_error in BAD_OUTCOME_FIELDS:
        outcome = failure(row) if in_error else success(row)
        (outcome["error"] if in_error else outcome).update(change)
        try:
            answer = await conn.complete_steps([outcome])
        except ValidationError as exc:
            if "outcome #1: " not in str(exc):
                problems.append(f"{case}: {exc}")
        except Exception as exc:
            problems.append(f"{case}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{case}: accepted, answer {[dict(a) for a in answer]}")
        s = await step_row(conn, task, "only")
        if (s["state"], s["attempts"]) != ("in_progress", 1):
            problems.append(f"{case}: the step changed to {s['state']}")
            break
    assert not problems, "\n".join(problems)
    await assert_healthy(conn)


BAD_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("priority out of range", {"priority": 1e12}),
    ("priority 1.5 (rounded to 2)", {"priority": 1.5}),
    ("delay_seconds out of range", {"delay_seconds": 1e300}),
]


async def test_bad_numeric_options_are_refused(conn: db.Connection) -> None:
    await conn.register_template(single())
    problems = []
    for case, options in BAD_OPTIONS:
        try:
            await conn.create_task(NAMESPACE, "single", {}, options=options)
        except ValidationError as exc:
            assert exc.error_code == "invalid_option"
        except Exception as exc:
            problems.append(f"{case}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{case}: accepted")
    assert not problems, "\n".join(problems)
    await assert_healthy(conn)


async def test_lease_calls_answer_each_claim_on_its_own(conn: db.Connection) -> None:
    await start(conn, single())
    [row] = await claim(conn)
    current = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
    stale = {**current, "claim_seq": row["claim_seq"] - 1}
    extended = [r["extended"] for r in await conn.extend_leases([current, stale], 30)]
    released = [r["released"] for r in await conn.release_steps([current, stale])]
    assert sorted(extended) == [False, True] and sorted(released) == [False, True]
    await assert_healthy(conn)
