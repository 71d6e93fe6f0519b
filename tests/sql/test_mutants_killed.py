"""Checks the mutation campaign (`make mutate`, tests/mutation) found missing at the SQL level:
each test kills the SQL mutant named in its docstring (re-run one with
`python -m tests.mutation.sql_mutants --only ID`)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from tasker_pg import db
from tasker_pg.errors import InvalidStateError, ValidationError
from tests.sql.test_engine_edge_cases import wait_for_lock_wait
from tests.sql.test_engine_flows import wait_for
from tests.support.engine import (
    NAMESPACE,
    Row,
    assert_healthy,
    checkpoint,
    claim,
    complete,
    drive,
    failure,
    readiness,
    single,
    start,
    step,
    step_row,
    success,
    task_row,
    template,
)


async def test_extend_leases_refuses_a_zero_or_over_a_year_lease(conn: db.Connection) -> None:
    """70_leases:74:le_to_lt:0 (`p_lease_seconds < 0`): a 0 s heartbeat was accepted and made
    the claimed message visible at once, handing the running step to the next claimer."""
    await start(conn, single())
    [row] = await claim(conn, lease=30)
    fence = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
    for bad in (0, -1, 31536000.5):
        with pytest.raises(ValidationError, match="lease_seconds must be > 0") as err:
            await conn.extend_leases([fence], bad)
        assert err.value.error_code == "invalid_argument"
    [ok] = await conn.extend_leases([fence], 31536000)
    assert ok["extended"] is True
    await assert_healthy(conn)


async def test_read_and_pop_take_the_highest_priority_first_when_limited(
    conn: db.Connection,
) -> None:
    """10_queues:203:desc_to_asc:0 and 10_queues:238:desc_to_asc:0 (read's and pop's
    candidates ORDER BY priority ASC): read re-sorts what it picked, so only a read of fewer
    messages than are visible shows which ones were picked."""
    await conn.create_queue("jobs")
    for take in ("read", "pop"):
        low = await conn.send("jobs", {"p": 0})
        high = await conn.send("jobs", {"p": 5}, priority=5)
        if take == "read":
            [first] = await conn.read("jobs", vt_seconds=30, qty=1)
        else:
            [first] = await conn.pop("jobs", qty=1)
        assert first.msg_id == high
        await conn.purge_queue("jobs")
        assert low != high


async def test_pop_passes_over_a_message_another_session_is_popping(dsn: str) -> None:
    """10_queues:240:del_skip_locked:0 (pop without SKIP LOCKED): a second pop waited for the
    first one's row lock and then came back empty, instead of taking the next message."""
    first = await db.connect(dsn)
    second = await db.connect(dsn)
    try:
        await first.create_queue("jobs")
        m1 = await first.send("jobs", {"n": 1})
        m2 = await first.send("jobs", {"n": 2})
        # a lock wait fails at once instead of hanging the test: SKIP LOCKED never waits
        await second.execute("SET lock_timeout = '2s'")
        async with first.transaction():
            [held] = await first.pop("jobs", qty=1)
            assert held.msg_id == m1
            [got] = await second.pop("jobs", qty=1)
            assert got.msg_id == m2
    finally:
        await first.close()
        await second.close()


async def test_a_copy_with_the_same_msg_id_does_not_pin_another_queue(
    conn: db.Connection,
) -> None:
    """Issue 17 item 3 (found by 10_queues:392:del_and:0): drop_queue / purge_queue matched
    queue messages to steps on (step_uuid in the message, msg_id) alone, across queues, so a
    message in a plain queue naming a live step and carrying, by chance, the same msg_id as the
    step's own message pinned that queue (TS004). A step's message lives in its task's
    namespace queue: only (queue = namespace, msg_id) is the step's. Fails on the engine before
    239d861 (`_refuse_if_live_steps`), which is gone: the raw functions now refuse a
    namespace's engine queue by name (TS005) and leave every other queue alone."""
    task = await start(conn, single())
    [row] = await claim(conn)
    await conn.create_queue("other")
    # msg_ids count per queue: fill "other" up to the step's msg_id, then send the copy
    filler = row["msg_id"] - 1
    if filler:
        await conn.send_batch("other", [{"filler": i} for i in range(filler)])
    copy = await conn.send("other", {"step_uuid": str(row["step_uuid"]), "task_uuid": str(task)})
    assert copy == row["msg_id"]
    assert await conn.purge_queue("other") == filler + 1
    again = await conn.send("other", {"step_uuid": str(row["step_uuid"]), "task_uuid": str(task)})
    await conn.execute(
        "UPDATE tasker.queue_messages SET msg_id = $1 WHERE queue = 'other' AND msg_id = $2",
        row["msg_id"],
        again,
    )
    assert await conn.drop_queue("other") is True
    # the step's own queue stays guarded, whoever asks
    with pytest.raises(InvalidStateError) as err:
        await conn.purge_queue(NAMESPACE)
    assert err.value.error_code == "engine_queue"
    await assert_healthy(conn)


async def test_register_template_refuses_an_empty_step_list(conn: db.Connection) -> None:
    """20_templates:64:int_minus1:0 (`jsonb_array_length(v_steps) = -1`): SQL validates the
    templates it is sent again, but no test sent it one with no steps."""
    body = dict(single())
    body["steps"] = []
    with pytest.raises(ValidationError, match="has no steps") as err:
        await conn.register_template(body)
    assert err.value.error_code == "invalid_template"


async def test_register_template_accepts_steps_listed_before_their_parents(
    conn: db.Connection,
) -> None:
    """20_templates:107:true_to_false:0 (the cycle check's peel loop stopped after one pass):
    every template the tests registered listed parents first, so one pass always sufficed."""
    body = dict(template("backwards", [step("a"), step("b", "a"), step("c", "b")]))
    body["steps"] = list(reversed(body["steps"]))
    assert [s["name"] for s in body["steps"]] == ["c", "b", "a"]
    await conn.register_template(body)
    task = await conn.create_task(NAMESPACE, "backwards", {})
    [row] = await claim(conn)
    assert row["step_name"] == "a"
    assert (await task_row(conn, task))["state"] in ("pending", "steps_in_process")
    await assert_healthy(conn)


async def test_newest_version_orders_minor_and_patch_numerically(conn: db.Connection) -> None:
    """30_create:103:desc_to_asc:1 (create_tasks, minor ASC) and 30_create:277:desc_to_asc:2
    (create_task, patch ASC): the semver tests varied only major/minor for create_task and
    nothing for create_tasks."""
    for version in ["1.2.0", "1.10.2", "1.10.10", "1.10.10-rc.1", "1.9.99"]:
        await conn.register_template(single(version=version))
    one = await conn.create_task(NAMESPACE, "single", {})
    assert (await task_row(conn, one))["version"] == "1.10.10"
    many = await conn.create_tasks(NAMESPACE, "single", [{}, {}])
    assert [(await task_row(conn, t))["version"] for t in many] == ["1.10.10", "1.10.10"]
    await assert_healthy(conn)


async def test_check_invariants_reports_a_task_in_error_with_no_step_in_error(
    conn: db.Connection,
) -> None:
    """95_invariants:97:int_minus1:0 (`c.errors = -1`): the invariant that a task in error has
    a step in error was never seen to fire."""
    task = await start(conn, single())
    await assert_healthy(conn)
    await conn.execute("UPDATE tasker.tasks SET state = 'error' WHERE task_uuid = $1", task)
    rows = [r for r in await conn.check_invariants() if r["invariant"] == "task_state_matches"]
    assert [r["detail"] for r in rows] == [
        f"task {task} is error with 0 of 1 steps done and 0 in error"
    ]


async def test_a_losing_concurrent_creator_is_told_it_did_not_create(dsn: str) -> None:
    """30_create:316:false_to_true:0 (`created := true` on the ON CONFLICT path): a second
    create_or_get_task with the same key, waiting on the first one's uncommitted insert, said
    it had created the task the first one made."""
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        await a.register_template(single())
        opts = {"idempotency_key": "k"}
        tx = a.raw.transaction()
        await tx.start()
        first, made = await a.create_or_get_task(NAMESPACE, "single", {}, options=opts)
        assert made is True
        second = asyncio.create_task(b.create_or_get_task(NAMESPACE, "single", {}, options=opts))
        await wait_for_lock_wait(a, b, "transactionid")  # b waits on a's uncommitted key
        await tx.commit()
        assert await asyncio.wait_for(second, timeout=30) == (first, False)
        assert await a.fetchval("SELECT count(*) FROM tasker.tasks") == 1
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("held", ["step", "message"])
async def test_claim_passes_over_a_step_or_message_another_session_holds(
    dsn: str, held: str
) -> None:
    """50_claim:83:del_skip_locked:0 (steps locked without SKIP LOCKED) and
    50_claim:70:del_skip_locked:0 (messages): a claim waited for the row an operator call
    (cancel, resolve) or another claimer holds instead of taking the next ready step."""
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        task = await start(a, template("pair", [step("x"), step("y")]))
        x = await step_row(a, task, "x")
        # a lock wait fails at once instead of hanging the test: SKIP LOCKED never waits
        await b.execute("SET lock_timeout = '2s'")
        async with a.transaction():
            if held == "step":
                await a.execute(
                    "SELECT 1 FROM tasker.steps WHERE step_uuid = $1 FOR UPDATE", x["step_uuid"]
                )
            else:
                await a.execute(
                    "SELECT 1 FROM tasker.queue_messages WHERE queue = $1 AND msg_id = $2"
                    " FOR UPDATE",
                    NAMESPACE,
                    x["msg_id"],
                )
            got = await claim(b, worker="b")
            assert [r["step_name"] for r in got] == ["y"]
        [later] = await claim(b, worker="b")
        assert later["step_name"] == "x"
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("kind", ["result", "checkpoint"])
async def test_a_result_or_checkpoint_of_exactly_the_limit_is_stored(
    conn: db.Connection, kind: str
) -> None:
    """60_complete:124:gt_to_ge:0 and :1 (`rbytes >= v_limit`, `cbytes >= v_limit`): only
    payloads well over the limit were tested, so a limit one byte stricter passed."""
    await conn.execute("UPDATE tasker.settings SET value = 1024 WHERE name = 'max_payload_bytes'")

    async def size(value: object) -> int:
        text = await conn.fetchval("SELECT (($1::text)::jsonb)::text", json.dumps(value))
        return len(text.encode())

    for extra, expected in ((0, "complete"), (1, "error")):
        task = await start(conn, single())
        [row] = await claim(conn)
        if kind == "result":
            value: dict[str, object] = {"blob": ""}
            value["blob"] = "x" * (1024 - await size(value) + extra)
            assert await size(value) == 1024 + extra
            outcome = success(row, value)
        else:
            outcome = checkpoint(row, cursor="")
            base = await size(outcome["checkpoint"])
            outcome = checkpoint(row, cursor="x" * (1024 - base + extra))
            assert await size(outcome["checkpoint"]) == 1024 + extra
        await complete(conn, outcome)
        s = await step_row(conn, task, "only")
        if expected == "error":
            assert s["state"] == "error"
            assert s["last_error"]["message"] == (
                f"the step's {kind} is 1025 bytes, more than the limit of 1024 bytes"
                " (max_payload_bytes in tasker.settings)"
            )
        elif kind == "result":
            assert (s["state"], s["results"]) == ("complete", value)
        else:
            assert (s["state"], s["checkpoint"]["cursor"]) == (
                "in_progress",
                outcome["checkpoint"]["cursor"],
            )
            [cont] = await claim(conn)  # the continuation resumes from the checkpoint
            await complete(conn, success(cont, {}))
            assert (await step_row(conn, task, "only"))["state"] == "complete"
    await assert_healthy(conn)


async def test_a_failure_that_does_not_say_retryable_is_retried(conn: db.Connection) -> None:
    """60_complete:149:true_to_false:0 (`coalesce(retryable, false)`): an error object without
    `retryable` is retryable by contract (DESIGN: the default is true), but every test sent it."""
    task = await start(conn, single())
    [row] = await claim(conn)
    outcome = failure(row, "flaky")
    del outcome["error"]["retryable"]
    await complete(conn, outcome)
    s = await step_row(conn, task, "only")
    assert (s["state"], s["attempts"]) == ("waiting_for_retry", 1)
    assert s["next_attempt_at"] is not None
    await assert_healthy(conn)


async def test_number_and_version_bounds_are_inclusive(conn: db.Connection) -> None:
    """05_helpers:50:ge_to_gt:0 (`abs(x) > 2.5e-324`): the smallest magnitude that double
    precision does not round to 0 was refused; 05_helpers:68:le_to_lt:0 (`major < 2147483647`):
    a major version of exactly the integer maximum was refused (and the 64-character limit)."""
    check = "SELECT tasker._is_number_json($1::text::jsonb, 0, 1)"
    assert await conn.fetchval(check, "2.5e-324") is True
    assert await conn.fetchval(check, "2.4e-324") is False
    assert await conn.fetchval("SELECT '2.5e-324'::double precision > 0") is True
    parts = "SELECT tasker._semver_parts($1) IS NOT NULL"
    exact = "1.0.0-" + "a" * 58
    assert len(exact) == 64
    assert await conn.fetchval(parts, exact) is True
    assert await conn.fetchval(parts, exact + "a") is False
    assert await conn.fetchval(parts, "2147483647.2147483647.2147483647") is True
    assert await conn.fetchval(parts, "2147483648.0.0") is False


@pytest.mark.timeout(60)  # the mutant loops forever: fail instead of hanging
async def test_register_template_names_the_cycle_behind_placed_steps(conn: db.Connection) -> None:
    """20_templates:214:true_to_false:0 (the cycle search started at a placed step): every
    cyclic template the tests sent had all its steps on the cycle, so the start was never
    chosen among placed ones. The code is pinned, and the cycle named."""
    body = dict(single())
    body["steps"] = [
        {**single()["steps"][0], "name": "a", "dependencies": []},
        {**single()["steps"][0], "name": "b", "dependencies": ["a", "c"]},
        {**single()["steps"][0], "name": "c", "dependencies": ["b"]},
    ]
    with pytest.raises(ValidationError) as err:
        await conn.register_template(body)
    assert err.value.error_code == "invalid_template"
    assert "dependency cycle b -> c -> b" in str(err.value)


async def test_create_tasks_marks_only_root_steps_enqueued(conn: db.Connection) -> None:
    """30_create:180:int_plus1:0 (`enqueued_at` set for steps with one parent instead of the
    roots): create_tasks' step rows were only checked for their state."""
    await conn.register_template(template("chain", [step("a"), step("b", "a")]))
    [task] = await conn.create_tasks(NAMESPACE, "chain", [{}])
    a, b = await step_row(conn, task, "a"), await step_row(conn, task, "b")
    assert a["enqueued_at"] == a["created_at"]
    assert b["enqueued_at"] is None
    [one] = await claim(conn)
    await complete(conn, success(one))
    b = await step_row(conn, task, "b")
    assert b["state"] == "enqueued" and b["enqueued_at"] is not None
    await assert_healthy(conn)


def _fence(row: Row) -> dict[str, object]:
    return {
        "step_uuid": str(row["step_uuid"]),
        "attempt": row["attempt"],
        "claim_seq": row["claim_seq"],
    }


async def test_a_release_sets_a_retry_time_only_on_a_step_waiting_for_retry(
    conn: db.Connection,
) -> None:
    """70_leases:165:int_minus1:0 (`s.attempts - 0 > 0`): a release that gave back a first
    attempt left the enqueued step with the delay's end as its next_attempt_at (v_steps and
    `tasker-pg step` show it as a retry time)."""
    task = await start(conn, single())
    [row] = await claim(conn)
    [released] = await conn.release_steps([_fence(row)], delay_seconds=60)
    assert released["released"] is True
    view = "SELECT state, attempts, next_attempt_at FROM tasker.v_steps WHERE task_uuid = $1"
    s = await conn.fetchrow(view, task)
    assert (s["state"], s["attempts"], s["next_attempt_at"]) == ("enqueued", 0, None)
    # a second attempt given back waits for the delay: the retry time is the message's
    await conn.execute(f"UPDATE tasker.q_{NAMESPACE} SET vt = clock_timestamp()")
    [row] = await claim(conn)
    await complete(conn, failure(row, retry_after=0))
    [row] = await claim(conn)
    assert row["attempt"] == 2
    [released] = await conn.release_steps([_fence(row)], delay_seconds=60)
    assert released["released"] is True
    s = await conn.fetchrow(view, task)
    vt = await conn.fetchval(f"SELECT vt FROM tasker.q_{NAMESPACE}")
    assert (s["state"], s["attempts"], s["next_attempt_at"]) == ("waiting_for_retry", 1, vt)
    await assert_healthy(conn)


async def test_a_release_without_delay_wakes_the_workers_and_a_delayed_one_does_not(
    conn: db.Connection, dsn: str
) -> None:
    """70_leases:203:int_minus1:0 (`WHERE p_delay_seconds = -1`): release_steps never
    notified, so workers waiting on the queue's channel did not see a step released for
    immediate reuse until their next poll."""
    await start(conn, single())
    await start(conn, single())
    first, second = await claim(conn)
    listener = await db.connect(dsn)
    received: list[tuple[str, str]] = []
    try:
        await listener.listen(f"tasker_{NAMESPACE}", lambda c, p: received.append((c, p)))
        [held] = await conn.release_steps([_fence(first)], delay_seconds=30)
        assert held["released"] is True
        await listener.execute("SELECT 1")  # a round trip on the listener flushes
        assert received == []
        [back] = await conn.release_steps([_fence(second)], delay_seconds=0)
        assert back["released"] is True

        async def seen() -> bool:
            await listener.execute("SELECT 1")
            return bool(received)

        await wait_for(seen, what="the release's notification")
        assert received == [(f"tasker_{NAMESPACE}", "")]
    finally:
        await listener.close()
    await assert_healthy(conn)


async def test_repair_passes_over_a_step_another_session_holds(dsn: str) -> None:
    """75_maintenance:80:del_skip_locked:0 (repair locked its steps without SKIP LOCKED):
    repair_messages waited for a step row another session held instead of leaving that step
    for its next call."""
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        task = await start(a, single())
        await a.execute(f"DELETE FROM tasker.q_{NAMESPACE}")
        s = await step_row(a, task, "only")
        # a lock wait fails at once instead of hanging the test: SKIP LOCKED never waits
        await b.execute("SET lock_timeout = '2s'")
        async with a.transaction():
            await a.execute(
                "SELECT 1 FROM tasker.steps WHERE step_uuid = $1 FOR UPDATE", s["step_uuid"]
            )
            assert await b.repair_messages() == []
        repaired = await b.repair_messages()
        assert [(r["kind"], r["step_uuid"]) for r in repaired] == [
            ("message_resent", s["step_uuid"])
        ]
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("meanwhile", ["failed", "parked"])
async def test_repair_rechecks_a_lost_step_under_its_lock(dsn: str, meanwhile: str) -> None:
    """75_maintenance:98:del_and:0 (no state re-check) and 75_maintenance:100:del_and:0 (no
    parked re-check): repair picks its candidates from one snapshot and locks them later; a
    step that failed, or was parked, in between got a message again (a message for a step in
    error; a parked step unparked while its task is in error).

    The window is held open by the repair's step 2: it creates the dropped queue of another
    task's namespace, and waits there on that queue's creation lock, held by session `a`."""
    a, b = await db.connect(dsn), await db.connect(dsn)
    try:
        other = await start(a, template("elsewhere", [step("e")], namespace="elsewhere"))
        await a.execute(
            """
            DROP TABLE tasker.q_elsewhere;
            DROP TABLE tasker.a_elsewhere;
            DELETE FROM tasker.queues WHERE queue_name = 'elsewhere';
            DROP SEQUENCE tasker.q_elsewhere_seq;
            """
        )
        task = await start(a, template("pair", [step("x"), step("y")]))
        rows = {r["step_name"]: r for r in await claim(a)}
        await complete(a, failure(rows["y"], retryable=False))  # the task is in error
        x = await step_row(a, task, "x")
        assert x["state"] == "in_progress"
        await a.execute(f"DELETE FROM tasker.q_{NAMESPACE} WHERE msg_id = $1", x["msg_id"])
        lock = "SELECT pg_advisory_lock(hashtextextended('tasker.create_queue:elsewhere', 0))"
        await a.execute(lock)
        repair = asyncio.create_task(b.repair_messages())
        await wait_for_lock_wait(a, b, "advisory")  # b has its candidates, x among them
        await complete(a, failure(rows["x"], retryable=False))
        if meanwhile == "parked":
            await a.retry_step(x["step_uuid"])  # enqueued with a message; y keeps the task in error
            assert await claim(a) == []  # the claim meets the message and parks x
        await a.execute("SELECT pg_advisory_unlock_all()")
        repaired = await asyncio.wait_for(repair, timeout=30)
        e = await step_row(a, other, "e")
        assert [(r["kind"], r["step_uuid"]) for r in repaired] == [
            ("message_resent", e["step_uuid"])
        ]
        x = await step_row(a, task, "x")
        expected = ("error", None) if meanwhile == "failed" else ("enqueued", None)
        assert (x["state"], x["msg_id"]) == expected
        assert (await task_row(a, task))["state"] == "error"
        await assert_healthy(a)
    finally:
        await a.close()
        await b.close()


async def test_readiness_of_an_enqueued_step_that_lost_its_message_is_false(
    conn: db.Connection,
) -> None:
    """90_inspection:40:coalesce_drop:0 and 90_inspection:40:false_to_true:0: an enqueued
    step whose message is gone (no claim can see it) was reported ready NULL, or ready."""
    task = await start(conn, single())
    assert (await readiness(conn, task))["only"]["ready"] is True
    await conn.execute(f"DELETE FROM tasker.q_{NAMESPACE}")
    r = (await readiness(conn, task))["only"]
    assert (r["state"], r["ready"], r["next_attempt_at"]) == ("enqueued", False, None)


async def test_readiness_names_no_worker_for_a_claim_without_a_worker_id(
    conn: db.Connection,
) -> None:
    """90_inspection:76:coalesce_drop:0 (`'running on ' || s.worker_id`): a step claimed
    without a worker id (claim_steps accepts NULL) was described as NULL."""
    task = await start(conn, single())
    [row] = await conn.fetch("SELECT * FROM tasker.claim_steps($1, NULL, 1, 30)", NAMESPACE)
    assert row["step_name"] == "only"
    r = (await readiness(conn, task))["only"]
    assert (r["state"], r["ready"], r["reason"]) == (
        "in_progress",
        False,
        f"running on ? (attempt 1 of {r['max_attempts']})",
    )
    await complete(conn, success(row))
    await assert_healthy(conn)


# --- bounds that are inclusive and defaults (found by the campaign on 82a3038) ---------------


async def test_batch_config_upper_bounds_are_inclusive(conn: db.Connection) -> None:
    """20_templates:532:le_to_lt:0 (`batch_size < 1000000`) and 20_templates:537:int_minus1:0
    (`parallelism <= 999`): the documented maxima (1000000, 1000) were refused."""
    tpl = template(
        "batch_bounds",
        [
            step("analyze", type="batchable"),
            step(
                "process_batch",
                "analyze",
                type="batch_worker",
                batch_config={"batch_size": 1000000, "parallelism": 1000},
            ),
            step("aggregate", "process_batch", type="deferred_convergence"),
        ],
    )
    await conn.register_template(tpl)
    stored = await conn.fetchval(
        "SELECT template FROM tasker.v_templates WHERE namespace = $1 AND name = 'batch_bounds'",
        NAMESPACE,
    )
    body = json.loads(stored) if isinstance(stored, str) else stored
    [worker] = [s for s in body["steps"] if s["name"] == "process_batch"]
    assert (worker["batch_config"]["batch_size"], worker["batch_config"]["parallelism"]) == (
        1000000,
        1000,
    )
    for key, bad in (("batch_size", 1000001), ("parallelism", 1001)):
        raw = json.loads(json.dumps(tpl))
        raw["name"] = f"batch_bounds_{key}"
        raw["steps"][1]["batch_config"][key] = bad
        with pytest.raises(ValidationError, match=f"batch_config.{key} must be an integer"):
            await conn.register_template(raw)


async def test_a_worker_id_of_exactly_the_limit_is_accepted(conn: db.Connection) -> None:
    """60_complete:85:gt_to_ge:0 (`octet_length(worker_id) >= max_name_bytes`) and
    70_leases:145:gt_to_ge:0 (release_steps' `>= 200`): a worker id of exactly the limit was
    refused by complete_steps / release_steps."""
    limit = await conn.fetchval("SELECT value FROM tasker.settings WHERE name = 'max_name_bytes'")
    task = await start(conn, single())
    [row] = await claim(conn)
    released = await conn.release_steps([_fence(row)], worker_id="w" * 200)
    assert [r["released"] for r in released] == [True]
    with pytest.raises(ValidationError, match="worker_id must be at most 200 bytes"):
        await conn.release_steps([_fence(row)], worker_id="w" * 201)
    [row] = await claim(conn)
    answer = await complete(conn, success(row, worker="w" * limit))
    assert answer[str(row["step_uuid"])]["detail"] == "complete"
    assert (await step_row(conn, task, "only"))["state"] == "complete"
    await assert_healthy(conn)


async def test_an_error_of_exactly_the_limit_is_stored(conn: db.Connection) -> None:
    """60_complete:94:gt_to_ge:0 (`octet_length(error::text) >= max_error_bytes`): an error
    object of exactly max_error_bytes was refused as too large."""
    limit = await conn.fetchval("SELECT value FROM tasker.settings WHERE name = 'max_error_bytes'")

    async def size(value: object) -> int:
        text = await conn.fetchval("SELECT (($1::text)::jsonb)::text", json.dumps(value))
        return len(text.encode())

    task = await start(conn, single())
    [row] = await claim(conn)
    outcome = failure(row, "", retryable=False)
    outcome["error"]["message"] = "x" * (limit - await size(outcome["error"]))
    assert await size(outcome["error"]) == limit
    await complete(conn, outcome)
    s = await step_row(conn, task, "only")
    assert (s["state"], s["last_error"]["message"]) == ("error", outcome["error"]["message"])
    await assert_healthy(conn)


async def test_a_claim_row_holding_exactly_the_limit_is_complete(conn: db.Connection) -> None:
    """50_claim:180:le_to_lt:0 (`FILTER (WHERE total < lim)`): with the workers' results
    adding up to exactly max_claim_dependency_bytes, the last one was left out of the claim
    row while the row said it was not partial."""
    tpl = template(
        "claim_exact",
        [
            step("analyze", type="batchable"),
            step("process_batch", "analyze", type="batch_worker"),
            step("aggregate", "process_batch", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    [a] = await claim(conn)
    configs = [
        {"batch_id": b, "start_cursor": i, "end_cursor": i + 1, "batch_size": 1}
        for i, b in enumerate(("1", "2"))
    ]
    outcome = {
        "type": "create_batches",
        "worker_template_name": "process_batch",
        "cursor_configs": configs,
        "total_items": 2,
    }
    await complete(conn, success(a, {"batch_processing_outcome": outcome}))
    workers = await claim(conn)
    assert sorted(w["step_name"] for w in workers) == ["process_batch_1", "process_batch_2"]
    await complete(conn, *(success(w, {"pad": "x" * 600}) for w in workers))
    total = await conn.fetchval(
        "SELECT sum(octet_length(results::text)) FROM tasker.steps"
        " WHERE task_uuid = $1 AND name LIKE 'process_batch_%'",
        task,
    )
    assert total > 1024  # the smallest limit the settings accept
    await conn.execute(
        "UPDATE tasker.settings SET value = $1 WHERE name = 'max_claim_dependency_bytes'", total
    )
    [agg] = await claim(conn)
    assert agg["step_name"] == "aggregate"
    assert agg["dependency_results_partial"] is False
    assert set(agg["dependency_results"]) == {"analyze", "process_batch_1", "process_batch_2"}
    await complete(conn, success(agg))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def _task_in_error(conn: db.Connection) -> uuid.UUID:
    task = await start(conn, single())
    [row] = await claim(conn)
    await complete(conn, failure(row, "broken", retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    return task


async def test_retry_failed_retries_unless_told_dry_run(conn: db.Connection) -> None:
    """80_operators:204:false_to_true:0 (`p_dry_run DEFAULT true`): a call of the SQL function
    that leaves dry_run out (the operator's plain `SELECT tasker.retry_failed('ns')`) only
    reported what it would retry."""
    task = await _task_in_error(conn)
    [r] = await conn.fetch("SELECT * FROM tasker.retry_failed($1)", NAMESPACE)
    assert (r["task_uuid"], r["retried"]) == (task, True)
    assert (await step_row(conn, task, "only"))["state"] == "enqueued"
    [row] = await claim(conn)
    await complete(conn, success(row))
    await assert_healthy(conn)


async def test_retry_failed_limit_one_and_since_are_inclusive(conn: db.Connection) -> None:
    """80_operators:227:lt_to_le:0 and 80_operators:227:int_plus1:0 (`p_limit <= 1`,
    `p_limit < 2`): a limit of 1 was refused; 80_operators:266:ge_to_gt:0
    (`failed_at > p_since`): a task that entered error exactly at `since` was left out of
    [since, before)."""
    first = await _task_in_error(conn)
    second = await _task_in_error(conn)
    [r] = await conn.retry_failed(NAMESPACE, limit=1, dry_run=True)
    assert (r["task_uuid"], r["retried"]) == (first, False)
    with pytest.raises(ValidationError, match="limit must be between 1 and 1000, got 0"):
        await conn.retry_failed(NAMESPACE, limit=0, dry_run=True)
    rows = await conn.retry_failed(NAMESPACE, since=r["failed_at"], dry_run=True)
    assert [x["task_uuid"] for x in rows] == [first, second]
    [later] = [x for x in rows if x["task_uuid"] == second]
    rows = await conn.retry_failed(NAMESPACE, since=later["failed_at"], dry_run=True)
    assert [x["task_uuid"] for x in rows] == [second]
    assert later["failed_at"] > r["failed_at"]


async def test_readiness_of_a_step_not_created_is_not_retry_eligible(conn: db.Connection) -> None:
    """90_inspection:114:false_to_true:1 (not_created rows with retry_eligible true): a template
    step that has no row has no attempt to retry."""
    tpl = template(
        "not_created_row",
        [
            step("check"),
            step("route", "check", type="decision"),
            step("branch", "route"),
        ],
    )
    task = await start(conn, tpl)
    r = (await readiness(conn, task))["branch"]
    assert (r["state"], r["step_uuid"], r["attempts"]) == ("not_created", None, 0)
    assert (r["dependencies_satisfied"], r["retry_eligible"], r["ready"]) == (False, False, False)
    await assert_healthy(conn)


async def test_a_heartbeat_with_pid_zero_is_accepted(conn: db.Connection) -> None:
    """75_maintenance:184:int_plus1:0 (`p_pid < 1`): pid 0, within the documented range
    (an integer >= 0), was refused."""
    now = await conn.fetchval("SELECT clock_timestamp()")
    beat = {
        "worker_id": "w-pid",
        "host": "h",
        "namespaces": [NAMESPACE],
        "handlers": ["handlers.only"],
        "started_at": now,
        "in_flight": 0,
        "missing_handlers": {},
    }
    await conn.worker_heartbeat(pid=0, **beat)
    pid = await conn.fetchval("SELECT pid FROM tasker.workers WHERE worker_id = 'w-pid'")
    assert pid == 0
    with pytest.raises(ValidationError, match="pid must be an integer >= 0, got -1"):
        await conn.worker_heartbeat(pid=-1, **beat)


async def test_worker_names_are_checked_for_the_worker_template_the_outcome_names(
    conn: db.Connection,
) -> None:
    """62_dynamic:134:desc_to_asc:0 (the other worker template picked first): with two
    batch_worker steps under one batchable, the taken-name check used the worker the outcome
    did not name, so a worker name already used by a template step was not refused."""
    tpl = template(
        "two_worker_templates",
        [
            step("b", type="batchable"),
            step("wa", "b", type="batch_worker"),
            step("wb", "b", type="batch_worker"),
            step("wb_1"),
            step("agg", "wa", "wb", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    assert set(rows) == {"b", "wb_1"}
    outcome = {
        "type": "create_batches",
        "worker_template_name": "wb",
        "cursor_configs": [{"batch_id": "1", "start_cursor": 0, "end_cursor": 1, "batch_size": 1}],
        "total_items": 1,
    }
    await complete(conn, success(rows["b"], {"batch_processing_outcome": outcome}))
    s = await step_row(conn, task, "b")
    assert (s["state"], s["last_error"]["error_type"]) == ("error", "invalid_batch_outcome")
    assert s["last_error"]["message"] == (
        "step b: batch_processing_outcome.cursor_configs[0]: the worker would be named 'wb_1'"
        " (worker_template_name + '_' + batch_id), the name of step 'wb_1' already in this"
        " template; choose batch_ids that make new names"
    )
    await complete(conn, success(rows["wb_1"]))
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_a_create_batches_without_a_worker_template_name_says_it_is_missing(
    conn: db.Connection,
) -> None:
    """62_dynamic:96:coalesce_drop:0 (no coalesce of the missing name): the step's error said
    `worker_template_name  is not a batch_worker step`, naming nothing."""
    tpl = template(
        "unnamed_worker",
        [
            step("b", type="batchable"),
            step("w", "b", type="batch_worker"),
            step("agg", "w", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    [row] = await claim(conn)
    outcome = {
        "type": "create_batches",
        "cursor_configs": [{"batch_id": "1", "start_cursor": 0, "end_cursor": 1, "batch_size": 1}],
    }
    await complete(conn, success(row, {"batch_processing_outcome": outcome}))
    s = await step_row(conn, task, "b")
    assert (s["state"], s["last_error"]["error_type"]) == ("error", "invalid_batch_outcome")
    assert s["last_error"]["message"] == (
        "step b: batch_processing_outcome.worker_template_name missing is not a batch_worker"
        " step of this batchable step (its workers: w)"
    )
    await conn.cancel_task(task)
    await assert_healthy(conn)


@pytest.mark.parametrize("chosen", [["a"], ["a", "b"]], ids=["one_branch", "both_branches"])
async def test_a_step_joining_two_branches_is_created_only_when_both_are(
    conn: db.Connection, chosen: list[str]
) -> None:
    """62_dynamic:188:del_and:0 (_decision_plan without `parent_names <@ (v_all ||
    v_created)`): a step below two branches of a decision was created when the decision chose
    only one of them, with a parent that would never exist."""
    tpl = template(
        "join_two_branches",
        [
            step("s"),
            step("d", "s", type="decision"),
            step("a", "d"),
            step("b", "d"),
            step("j", "a", "b"),
        ],
    )
    task = await start(conn, tpl)
    outcome = {"decision_point_outcome": {"type": "create_steps", "step_names": chosen}}
    await drive(conn, NAMESPACE, lambda r: outcome if r["step_name"] == "d" else None)
    created = {"s", "d", *chosen} | ({"j"} if len(chosen) == 2 else set())
    names = await conn.fetch("SELECT name FROM tasker.steps WHERE task_uuid = $1", task)
    assert {r["name"] for r in names} == created
    t = await task_row(conn, task)
    assert (t["state"], t["total_steps"]) == ("complete", len(created))
    await assert_healthy(conn)


async def test_a_handler_missing_release_backs_off_by_its_own_releases_only(
    conn: db.Connection,
) -> None:
    """70_leases:182:del_and:0 (the backoff counted every `released` transition of the step):
    a step handed back at a shutdown before waited twice the delay at its first
    handler_missing release."""
    task = await start(conn, single())
    [row] = await claim(conn)
    [back] = await conn.release_steps([_fence(row)], delay_seconds=0, reason="shutdown")
    assert back["released"] is True
    [row] = await claim(conn)
    [back] = await conn.release_steps(
        [_fence(row)], delay_seconds=10, reason="handler_missing", worker_id="w1"
    )
    assert back["released"] is True
    delays = await conn.fetch(
        "SELECT metadata->>'reason' AS reason, (metadata->>'delay_seconds')::float8 AS delay"
        " FROM tasker.step_transitions WHERE task_uuid = $1 AND event = 'released'"
        " ORDER BY transition_id",
        task,
    )
    assert [(r["reason"], r["delay"]) for r in delays] == [
        ("shutdown", 0.0),
        ("handler_missing", 10.0),
    ]
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_repair_resends_a_step_whose_msg_id_names_another_steps_message(
    conn: db.Connection,
) -> None:
    """75_maintenance:103:del_and:0 (repair's re-check under the lock without
    `m.message->>'step_uuid' = s.step_uuid::text`): a step whose msg_id names a message of
    another step (msg_ids start again in a queue dropped and created again) was found lost,
    then left without a message by the re-check."""
    first = await start(conn, single())
    second = await start(conn, single())
    a = await step_row(conn, first, "only")
    b = await step_row(conn, second, "only")
    await conn.execute(f"DELETE FROM tasker.q_{NAMESPACE} WHERE msg_id = $1", a["msg_id"])
    await conn.execute(
        "UPDATE tasker.steps SET msg_id = $1 WHERE step_uuid = $2", b["msg_id"], a["step_uuid"]
    )
    repaired = await conn.repair_messages()
    assert [(r["kind"], r["step_uuid"]) for r in repaired] == [("message_resent", a["step_uuid"])]
    rows = await claim(conn)
    assert {r["step_uuid"] for r in rows} == {a["step_uuid"], b["step_uuid"]}
    await complete(conn, *(success(r) for r in rows))
    await assert_healthy(conn)


async def test_retry_failed_refuses_since_equal_to_before(conn: db.Connection) -> None:
    """80_operators:237:ge_to_gt:0 (`p_since > p_before`): since equal to before, an empty
    range [since, before), was accepted and matched nothing instead of being refused."""
    task = await _task_in_error(conn)
    at = await conn.database_now()
    with pytest.raises(ValidationError, match=r"since \(.+\) must be earlier than before") as err:
        await conn.retry_failed(NAMESPACE, since=at, before=at, dry_run=True)
    assert err.value.error_code == "invalid_argument"
    [row] = await conn.retry_failed(NAMESPACE, before=at, dry_run=True)
    assert row["task_uuid"] == task


async def test_purge_finished_accepts_a_batch_of_one(conn: db.Connection) -> None:
    """85_retention:137:lt_to_le:0 (`p_batch <= 1`): a batch of 1, within the documented
    range 1 to 100000, was refused."""
    [row] = await conn.fetch("SELECT * FROM tasker.purge_finished(1)")
    assert (row["tasks"], row["more"]) == (0, False)
    with pytest.raises(ValidationError, match="batch must be an integer from 1 to 100000, got 0"):
        await conn.fetch("SELECT * FROM tasker.purge_finished(0)")
