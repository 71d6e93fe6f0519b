"""Checks the mutation campaign (`make mutate`, tests/mutation) found missing at the SQL level:
each test kills the SQL mutant named in its docstring (re-run one with
`python -m tests.mutation.sql_mutants --only ID`)."""

from __future__ import annotations

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    single,
    start,
    step,
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


async def test_a_copy_of_a_live_steps_message_does_not_pin_another_queue(
    conn: db.Connection,
) -> None:
    """10_queues:392:del_and:0 (`AND s.msg_id = m.msg_id` dropped): any message naming a live
    step counted as that step's, so a queue holding only a copy could not be dropped."""
    task = await start(conn, single())
    [row] = await claim(conn)
    await conn.create_queue("other")
    # msg_ids count per queue: keep the copy's id apart from the step's own message's id
    # (the refusal matches on msg_id alone, so a copy with the same id still pins the queue)
    await conn.send_batch("other", [{"filler": i} for i in range(3)])
    copy = await conn.send("other", {"step_uuid": str(row["step_uuid"]), "task_uuid": str(task)})
    assert copy != row["msg_id"]
    assert await conn.drop_queue("other") is True
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
