"""A claim reads only what it can hand out: messages that are not visible yet (leased, delayed,
waiting for a retry) are never read, whatever their number, and parked ones are not in the
queue at all. Checked by what the claim index returns (pg_stat_user_indexes) and by the
plan of the range scan, not by time."""

from __future__ import annotations

import asyncio

import pytest

from tasker_pg import db
from tests.sql.conftest import Opener
from tests.support import plans
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    failure,
    single,
    start,
    success,
)

pytestmark = pytest.mark.timeout(120)

INVISIBLE_EACH = 200


async def _index_reads(conn: db.Connection) -> int:
    """Index entries the namespace partition's claim index has returned so far. The session's
    pending statistics are flushed first (pg_stat_force_next_flush: at the end of that
    statement), then read from a fresh snapshot."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    async with conn.transaction():
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            """
            SELECT coalesce(sum(s.idx_tup_read), 0)
              FROM pg_stat_user_indexes s
              JOIN pg_inherits i ON i.inhrelid = s.indexrelid
             WHERE i.inhparent = 'tasker.queue_messages_claim_idx'::regclass
               AND s.relname = $1
            """,
            f"q_{NAMESPACE}",
        )
    return int(value)


async def claim_reads(conn: db.Connection, qty: int) -> tuple[int, int]:
    """(rows handed out, claim-index entries read) of one claim, rolled back."""
    before = await _index_reads(conn)
    tx = conn.raw.transaction()
    await tx.start()
    try:
        rows = await claim(conn, qty=qty, lease=60.0)
    finally:
        await tx.rollback()
    return len(rows), await _index_reads(conn) - before


async def _create(conn: db.Connection, count: int, **options: object) -> list[str]:
    tasks = await conn.create_tasks(NAMESPACE, "single", [{}] * count, options=options)
    return [str(t) for t in tasks]


async def invisible_backlog(conn: db.Connection) -> None:
    """INVISIBLE_EACH leased steps, delayed steps (up to a year) and steps waiting for a
    retry, at priorities 0 and 7, all created before anything visible."""
    await start(conn, single(retry={"max_attempts": 3, "backoff": "none"}))
    await _create(conn, INVISIBLE_EACH, priority=7)
    await _create(conn, INVISIBLE_EACH)
    leased = await claim(conn, qty=2 * INVISIBLE_EACH + 1, lease=3600.0)
    # the task start() created plus the 2 x INVISIBLE_EACH
    assert len(leased) == 2 * INVISIBLE_EACH + 1
    # half of them fail and wait an hour for their retry; the other half keep their lease
    await complete(conn, *(failure(r, retry_after=3600) for r in leased[::2]))
    await _create(conn, INVISIBLE_EACH, delay_seconds=31_000_000)
    await _create(conn, INVISIBLE_EACH, priority=7, delay_seconds=60)
    # The claims and failures above left dead index entries (an update of vt is not HOT):
    # vacuum's business, and what the first scan over them marks dead; not what this measures.
    await conn.execute(f"VACUUM ANALYZE tasker.q_{NAMESPACE}")
    invisible = await conn.fetchval(
        "SELECT count(*) FROM tasker.queue_messages WHERE queue = $1 AND vt > now()", NAMESPACE
    )
    assert invisible == 4 * INVISIBLE_EACH + 1


async def test_an_empty_claim_reads_no_invisible_message(conn: db.Connection) -> None:
    """An empty claim reads one entry per priority present (the probe that finds it: two
    here) and none of the 801 invisible messages."""
    await invisible_backlog(conn)
    assert await claim_reads(conn, 50) == (0, 2)
    await assert_healthy(conn)


async def test_a_claim_reads_only_the_messages_it_hands_out(conn: db.Connection) -> None:
    """Visible messages behind 801 invisible ones, at two priorities: the claim reads each
    entry it hands out, plus one per priority it reaches, and nothing else; higher priority
    first."""
    await invisible_backlog(conn)
    high = await _create(conn, 30, priority=7)
    low = await _create(conn, 40)
    assert await claim_reads(conn, 50) == (50, 52)
    rows = await claim(conn, qty=50)
    tasks = [str(r["task_uuid"]) for r in rows]
    assert tasks == high + low[:20]
    await assert_healthy(conn)


async def test_a_step_whose_backoff_ends_is_handed_out_in_order_of_visibility(
    conn: db.Connection,
) -> None:
    """Within a priority, a claim hands out the longest visible first: a retry that became
    visible before a newer task's message comes before it."""
    await start(conn, single(retry={"max_attempts": 3, "backoff": "none"}))
    [first] = await claim(conn)
    await complete(conn, failure(first, retry_after=0))
    [later] = await _create(conn, 1)
    rows = await claim(conn, qty=2)
    assert [str(r["task_uuid"]) for r in rows] == [str(first["task_uuid"]), later]
    assert [r["attempt"] for r in rows] == [2, 1]
    await assert_healthy(conn)


@pytest.mark.plans
async def test_the_claim_range_scan_bounds_the_visibility_time(conn: db.Connection) -> None:
    """The plan the claim really runs reads the claim index with the visibility time in its
    index condition (a range), not as a filter on the rows it reads."""
    await invisible_backlog(conn)
    await _create(conn, 5)
    claim_idx = await plans.partition_index(
        conn, "tasker.queue_messages_claim_idx", f"tasker.q_{NAMESPACE}"
    )
    async with plans.collect_plans(conn) as log:
        rows = await claim(conn, qty=50)
    assert len(rows) == 5
    runs = log.executions("m.priority = v_prio AND m.vt <= p_now")
    assert len(runs) == 2  # one range per priority present
    for run in runs:
        [scan] = [n for n in run.nodes() if n.get("Index Name") == claim_idx]
        assert "vt <=" in scan["Index Cond"], scan
        # the queue's own partition: at most a check of its queue column, never of vt
        assert "vt" not in scan.get("Filter", ""), scan
    await assert_healthy(conn)


@pytest.mark.plans
async def test_acknowledgements_probe_the_whole_message_key_on_tiny_statistics(
    conn: db.Connection,
) -> None:
    """A queue whose workers keep up has a handful of live rows, so its statistics say "tiny"
    while its indexes may hold many dead entries. complete_steps and extend_leases must then
    still find each message by its whole key (queue and msg_id) on the primary key: a probe by
    the queue alone, or through the claim index, reads the whole queue per message (with the
    namespace and msg_id from two relations, the plans probed by the queue alone)."""
    await start(conn, single())
    await _create(conn, 4)
    await conn.execute(f"ANALYZE tasker.q_{NAMESPACE}, tasker.steps, tasker.tasks")
    rows = await claim(conn, qty=5)
    assert len(rows) == 5
    pkey = await plans.partition_index(conn, "tasker.queue_messages_pkey", f"tasker.q_{NAMESPACE}")
    claim_idx = await plans.partition_index(
        conn, "tasker.queue_messages_claim_idx", f"tasker.q_{NAMESPACE}"
    )
    fences = [
        {"step_uuid": str(r["step_uuid"]), "attempt": r["attempt"], "claim_seq": r["claim_seq"]}
        for r in rows
    ]
    async with plans.collect_plans(conn) as log:
        await conn.release_steps(fences[:1], worker_id="w1")
        await conn.extend_leases(fences[1:], 60.0)
        await complete(conn, *(success(r) for r in rows[1:]))
    probes = [
        (stmt, node)
        for stmt in log.statements
        for node in stmt.nodes()
        if node.get("Index Name") in {pkey, claim_idx}
    ]
    # the locks and updates of release_steps and extend_leases, complete_steps' lock and delete
    assert len(probes) >= 6, [s.describe() for s in log.statements]
    for stmt, node in probes:
        assert node["Index Name"] == pkey, stmt.describe()
        assert "msg_id" in node.get("Index Cond", ""), (node.get("Index Cond"), stmt.describe())
    await assert_healthy(conn)


async def test_claims_racing_task_commits_run_every_step(
    conn: db.Connection, sessions: Opener
) -> None:
    """The claim takes its messages with statements of their own (each with a fresh snapshot).
    A message whose task commits between the claim's start and its pick must be run, not taken
    for a message that names no step. Claims race one-task commits for a few seconds; every
    task must complete through claims alone: no message archived as dead, no step left
    without its message (check_invariants), no repair. Before the fix this left dozens of
    steps stranded within seconds (their message archived by the claim that picked it)."""
    await start(conn, single())
    creator, claimer = await sessions(2)
    stop = asyncio.Event()
    created: list[str] = []

    async def create() -> None:
        while not stop.is_set():
            [task] = await creator.create_tasks(NAMESPACE, "single", [{}])
            created.append(str(task))

    async def run() -> int:
        done = 0
        while True:
            finished = creating.done()  # before the claim: nothing is created after it then
            rows = await claim(claimer, qty=20)
            if rows:
                await complete(claimer, *(success(r) for r in rows))
                done += len(rows)
            elif finished:
                return done

    creating = asyncio.create_task(create())
    running = asyncio.create_task(run())
    await asyncio.sleep(RACE_SECONDS)
    stop.set()
    await creating
    done = await running
    archived = await conn.fetchval(
        "SELECT count(*) FROM tasker.queue_archive WHERE queue = $1", NAMESPACE
    )
    assert (archived, done) == (0, len(created) + 1)
    assert len(created) > 100  # it raced
    await assert_healthy(conn)


RACE_SECONDS = 3.0


@pytest.mark.plans
async def test_message_updates_stay_bounded_by_msg_id_after_a_churn(
    conn: db.Connection, sessions: Opener
) -> None:
    """Statistics taken after a churn (a queue with no live message but many pages, as a queue
    whose workers keep up looks) must not make the lease update of claim_steps, the delete of
    complete_steps, extend_leases or release_steps walk the queue: each probes the primary key
    by msg_id (before, a generic plan took `queue = $1` alone and joined the claimed steps per
    message, every dead entry of the queue per call while a snapshot was held)."""
    await start(conn, single(retry={"max_attempts": 3, "backoff": "none"}))
    for _ in range(3):
        await _create(conn, 1000)
        rows = await claim(conn, qty=1001)
        await complete(conn, *(success(r) for r in rows))
    await conn.execute(f"ANALYZE tasker.q_{NAMESPACE}, tasker.steps, tasker.tasks")
    [fresh] = await sessions(1)  # plans made on these statistics
    await _create(fresh, 6)
    pkey = await plans.partition_index(fresh, "tasker.queue_messages_pkey", f"tasker.q_{NAMESPACE}")
    async with plans.collect_plans(fresh) as log:
        rows = await claim(fresh, qty=10)
        fences = [
            {"step_uuid": str(r["step_uuid"]), "attempt": r["attempt"], "claim_seq": r["claim_seq"]}
            for r in rows
        ]
        await fresh.extend_leases(fences[:2], 60.0)
        await fresh.release_steps(fences[2:3], worker_id="w1")
        await complete(fresh, *(success(r) for r in rows[3:5]), failure(rows[5], retry_after=0))
    writes = [
        (stmt, node)
        for stmt in log.statements
        for node in stmt.nodes()
        if node.get("Index Name") == pkey
    ]
    assert len(writes) >= 6, [s.describe() for s in log.statements]
    for stmt, node in writes:
        assert "msg_id" in node.get("Index Cond", ""), (node.get("Index Cond"), stmt.describe())
    await complete(fresh, *(success(r) for r in await claim(fresh, qty=10)))
    await assert_healthy(conn)
