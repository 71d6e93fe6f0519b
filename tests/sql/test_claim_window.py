"""Claim windows: `claim_steps(..., visible_since)` reads only the messages that became visible
since then, so the dead index entries a held snapshot keeps in front of them are not walked
again by every claim (the "queue death spiral"). Priorities are probed from
tasker.queue_priorities, not discovered from the index. Checked by what the claim index returns
(pg_stat_user_indexes) and by the plan, not by time."""

from __future__ import annotations

import datetime

import pytest

from tasker_pg import db
from tests.sql.conftest import Opener
from tests.sql.test_claim_cost import _index_reads, claim_reads
from tests.support import plans
from tests.support.engine import NAMESPACE, assert_healthy, claim, complete, single, start, success

pytestmark = pytest.mark.timeout(120)

CHURN = 300


async def _now(conn: db.Connection) -> datetime.datetime:
    value = await conn.fetchval("SELECT clock_timestamp()")
    assert isinstance(value, datetime.datetime)
    return value


async def _create(conn: db.Connection, count: int, **options: object) -> list[str]:
    tasks = await conn.create_tasks(NAMESPACE, "single", [{}] * count, options=options)
    return [str(t) for t in tasks]


async def test_a_windowed_claim_does_not_walk_what_a_held_snapshot_keeps(
    conn: db.Connection, sessions: Opener
) -> None:
    """While a snapshot is held, CHURN steps run to completion; each leaves a dead entry in the
    visible range of the claim index that nothing may remove. A claim without a window reads
    every one of them; a claim whose window starts after them reads only what it hands out
    (plus the one entry that ends the range)."""
    await start(conn, single())
    [holder] = await sessions(1)
    async with holder.transaction(isolation="repeatable_read"):
        await holder.fetchval("SELECT count(*) FROM tasker.tasks")
        await _create(conn, CHURN)
        rows = await claim(conn, qty=CHURN + 1)
        await complete(conn, *(success(r) for r in rows))
        since = await _now(conn)
        await _create(conn, 5)
        handed, full_reads = await claim_reads(conn, 50)
        assert handed == 5 and full_reads >= CHURN, full_reads
        windowed = await conn.fetch(
            "SELECT count(*) FROM tasker._lock_visible($1, 50, clock_timestamp(), $2)",
            NAMESPACE,
            since,
        )
        assert windowed[0][0] == 5
        before = await _index_reads(conn)
        async with conn.transaction():
            rows = await claim(conn, qty=50, since=since)
            assert len(rows) == 5
            reads = await _index_reads(conn) - before
            await complete(conn, *(success(r) for r in rows))
        assert reads <= 6, reads
    await assert_healthy(conn)


async def test_a_window_leaves_out_what_was_visible_before_it(conn: db.Connection) -> None:
    """The window is the caller's promise that it took everything visible before `since`: a
    message visible earlier is left to a claim without a window, which hands it out."""
    await start(conn, single())
    older = await _create(conn, 2)
    since = await _now(conn)
    newer = await _create(conn, 3)
    rows = await claim(conn, qty=10, since=since)
    assert sorted(str(r["task_uuid"]) for r in rows) == sorted(newer)
    rest = await claim(conn, qty=10)
    assert {str(r["task_uuid"]) for r in rest} >= set(older)
    await complete(conn, *(success(r) for r in rows + rest))
    assert await claim(conn, qty=10, since=since) == []
    await assert_healthy(conn)


async def test_priorities_are_recorded_and_a_window_hands_out_in_priority_order(
    conn: db.Connection,
) -> None:
    """Every priority other than 0 a task is created with is recorded for its queue (create_task,
    create_tasks with one options object or one per task); a windowed claim probes each, highest
    first, and 0."""
    await start(conn, single())
    since = await _now(conn)
    low = await _create(conn, 2, priority=-3)
    mid = await _create(conn, 2)
    high = await conn.create_tasks(
        NAMESPACE, "single", [{}, {}], options=[{"priority": 9}, {"priority": 7}]
    )
    one = await conn.create_task(NAMESPACE, "single", {}, options={"priority": 8})
    recorded = await conn.fetch(
        "SELECT priority FROM tasker.queue_priorities WHERE queue = $1 ORDER BY 1", NAMESPACE
    )
    assert [r[0] for r in recorded] == [-3, 7, 8, 9]
    rows = [r for _ in range(8) for r in await claim(conn, qty=1, since=since)]
    assert [str(r["task_uuid"]) for r in rows] == [
        str(high[0]),
        str(one),
        str(high[1]),
        *mid,
        *low,
    ]
    await complete(conn, *(success(r) for r in rows))
    await assert_healthy(conn)


async def test_a_queue_with_many_priorities_falls_back_to_discovering_them(
    conn: db.Connection,
) -> None:
    """Past 64 priorities in all, a windowed claim finds the priorities present from the index
    (as a claim without a window does) instead of probing each recorded one."""
    await start(conn, single())
    since = await _now(conn)
    options = [{"priority": p} for p in range(1, 71)]
    tasks = await conn.create_tasks(NAMESPACE, "single", [{}] * 70, options=options)
    rows = [r for _ in range(5) for r in await claim(conn, qty=1, since=since)]
    assert [str(r["task_uuid"]) for r in rows] == [str(t) for t in reversed(tasks[-5:])]
    rest = await claim(conn, qty=100, since=since)
    await complete(conn, *(success(r) for r in rows + rest))
    assert len(rows) + len(rest) == 70
    await assert_healthy(conn)


async def test_raw_queues_record_their_priorities_and_drop_them(conn: db.Connection) -> None:
    await conn.execute("SELECT tasker.create_queue('prio_raw')")
    await conn.execute("SELECT tasker.send('prio_raw', '{}'::jsonb, 0, 4)")
    await conn.execute("SELECT tasker.send_batch('prio_raw', ARRAY['{}'::jsonb], 0, -2)")
    await conn.execute("SELECT tasker.send('prio_raw', '{}'::jsonb)")
    recorded = await conn.fetch(
        "SELECT priority FROM tasker.queue_priorities WHERE queue = 'prio_raw' ORDER BY 1"
    )
    assert [r[0] for r in recorded] == [-2, 4]
    read = await conn.fetch("SELECT priority FROM tasker.read('prio_raw', 30, 10)")
    assert [r[0] for r in read] == [4, 0, -2]
    assert await conn.fetchval("SELECT tasker.drop_queue('prio_raw')") is True
    assert (
        await conn.fetchval("SELECT count(*) FROM tasker.queue_priorities WHERE queue = 'prio_raw'")
        == 0
    )


async def test_an_unrecorded_priority_is_an_invariant_violation(conn: db.Connection) -> None:
    await start(conn, single(), priority=5)
    await conn.execute("DELETE FROM tasker.queue_priorities WHERE queue = $1", NAMESPACE)
    broken = await conn.fetch("SELECT * FROM tasker.check_invariants()")
    assert [r["invariant"] for r in broken] == ["priority_is_recorded"]
    assert "priority 5" in broken[0]["detail"]
    await conn.execute(
        "INSERT INTO tasker.queue_priorities (queue, priority) VALUES ($1, 5)", NAMESPACE
    )
    rows = await claim(conn, qty=1)
    await complete(conn, success(rows[0]))
    await assert_healthy(conn)


@pytest.mark.plans
async def test_the_windowed_range_scan_bounds_both_ends(conn: db.Connection) -> None:
    """The windowed claim reads the claim index with both ends of the window in its index
    condition: the dead entries before it are never visited."""
    await start(conn, single())
    since = await _now(conn)
    await _create(conn, 3)
    claim_idx = await plans.partition_index(
        conn, "tasker.queue_messages_claim_idx", f"tasker.q_{NAMESPACE}"
    )
    async with plans.collect_plans(conn) as log:
        rows = await claim(conn, qty=10, since=since)
    assert len(rows) == 3  # not start()'s task: it became visible before the window
    runs = log.executions("m.vt >= p_since AND m.vt <= p_now")
    assert len(runs) == 1  # priority 0 only
    [scan] = [n for n in runs[0].nodes() if n.get("Index Name") == claim_idx]
    assert "vt >=" in scan["Index Cond"] and "vt <=" in scan["Index Cond"], scan
    assert "vt" not in scan.get("Filter", ""), scan
    rows += await claim(conn, qty=10)
    await complete(conn, *(success(r) for r in rows))
    await assert_healthy(conn)
