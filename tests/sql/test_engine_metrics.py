"""`tasker.engine_metrics()`: exact counts per namespace, and index reads only.

The 1,000,000-task check asserts what the call reads (no sequential scan of an engine table in
any statement it runs, and a bounded number of the tasks table's pages), not how long it took;
the time of one call is printed for the record.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.template import TaskTemplate
from tests.support import pgserver, plans, seeded
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
from tests.support.worker import poll

Metrics = dict[tuple[str, str | None, str | None], float]


async def engine_metrics(conn: db.Connection) -> Metrics:
    rows = await conn.fetch("SELECT * FROM tasker.engine_metrics()")
    return {(r["metric"], r["namespace"], r["label"]): r["value"] for r in rows}


async def _ready_age(conn: db.Connection) -> float:
    """Seconds since the longest-visible never-claimed message became visible."""
    return float(
        await conn.fetchval(
            f"SELECT extract(epoch FROM clock_timestamp() - min(vt)) FROM tasker.q_{NAMESPACE} "
            "WHERE read_ct = 0 AND vt <= clock_timestamp()"
        )
    )


async def test_engine_metrics_counts_each_kind_of_step_and_task(conn: db.Connection) -> None:
    tpl = single(retry={"max_attempts": 3, "backoff": "none"})
    await conn.register_template(tpl)

    async def create(count: int, **options: Any) -> None:
        await conn.create_tasks(NAMESPACE, "single", [{}] * count, options=options)

    # one task in error, one complete
    await create(1)
    [row] = await claim(conn, qty=1)
    await complete(conn, failure(row, retryable=False))
    await create(1)
    [row] = await claim(conn, qty=1)
    await complete(conn, success(row))
    # one waiting an hour for its retry
    await create(1)
    [row] = await claim(conn, qty=1)
    await complete(conn, failure(row, retry_after=3600))
    # four created, two of them claimed (leased for a minute), two ready
    await create(4)
    assert len(await claim(conn, qty=2, lease=60.0)) == 2
    # two delayed an hour
    await create(2, delay_seconds=3600)
    # one claimed with a lease that expires at once (priority 9: the claim takes it first)
    await create(1, priority=9)
    [expiring] = await claim(conn, qty=1, lease=0.05)
    assert expiring["step_name"] == "only"
    # one ready at priority -1 (every recorded priority is counted, a negative one too)
    await create(1, priority=-1)

    async def lease_over() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT clock_timestamp() > $1::timestamptz", expiring["lease_expires_at"]
            )
        )

    await poll(lease_over, what="the lease to expire")

    before = await _ready_age(conn)
    metrics = await engine_metrics(conn)
    after = await _ready_age(conn)
    ns = NAMESPACE
    oldest = metrics.pop(("oldest_ready_age_seconds", ns, None))
    assert before <= oldest <= after
    assert {k: v for k, v in metrics.items() if k[1] == ns} == {
        ("ready_steps", ns, None): 3,
        ("in_flight_steps", ns, None): 2,
        ("delayed_steps", ns, None): 2,
        ("retry_waiting_steps", ns, None): 1,
        ("expired_leases", ns, None): 1,
        ("waiting_steps", ns, None): 0,
        ("flow_lanes", ns, None): 0,
        # stored states: a claimed step does not move its task out of pending
        ("tasks", ns, "pending"): 8,
        ("tasks", ns, "steps_in_process"): 1,
        ("tasks", ns, "error"): 1,
        ("tasks_finished_5m", ns, "complete"): 1,
        ("tasks_finished_5m", ns, "cancelled"): 0,
        ("tasks_finished_5m", ns, "resolved_manually"): 0,
    }
    # the hot tables' statistics, the queue partition included
    for table in ("tasks", "steps", "step_transitions", f"q_{ns}"):
        assert ("dead_tuples", None, table) in metrics
        assert ("live_tuples", None, table) in metrics
    await assert_healthy(conn)


async def test_engine_metrics_reports_the_oldest_snapshot(conn: db.Connection, dsn: str) -> None:
    await start(conn, single())
    holder = await db.connect(dsn)
    owner = await conn.fetchval(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'tasker'"
    )
    try:
        async with holder.transaction(isolation="repeatable_read"):
            await holder.fetchval("SELECT count(*) FROM tasker.v_tasks")
            held_since = await holder.fetchval("SELECT now()")
            # advance the transaction counter past the held snapshot
            for _ in range(3):
                await conn.execute("SELECT txid_current()")
            metrics = await engine_metrics(conn)
            assert metrics[("oldest_xmin_age_xids", None, "backend")] >= 3
            # the superuser's session's start is hidden from the owner role ...
            assert ("oldest_xmin_age_seconds", None, "backend") not in metrics
            # ... until it may read every session's statistics
            await conn.execute(f"GRANT pg_read_all_stats TO {owner}")
            age_sql = "SELECT extract(epoch FROM clock_timestamp() - $1)::float8"
            before = await conn.fetchval(age_sql, held_since)
            metrics = await engine_metrics(conn)
            after = await conn.fetchval(age_sql, held_since)
            assert before <= metrics[("oldest_xmin_age_seconds", None, "backend")] <= after
        metrics = await engine_metrics(conn)
        assert metrics[("oldest_xmin_age_xids", None, "prepared_xact")] == 0
        assert metrics[("oldest_xmin_age_xids", None, "replication_slot")] == 0
        assert metrics[("oldest_xmin_age_seconds", None, "replication_slot")] == 0
    finally:
        await conn.execute(f"REVOKE pg_read_all_stats FROM {owner}")
        await holder.close()


async def test_engine_metrics_lists_only_engine_namespaces(conn: db.Connection) -> None:
    await conn.create_queue("plain")
    await conn.send("plain", {"x": 1})
    assert await engine_metrics(conn) == {
        k: v for k, v in (await engine_metrics(conn)).items() if k[1] is None
    }
    await start(conn, single(namespace="other"))
    metrics = await engine_metrics(conn)
    assert {k[1] for k in metrics} == {None, "other"}
    assert metrics[("ready_steps", "other", None)] == 1


# --- 1,000,000 tasks ------------------------------------------------------------------------

BIG_NS = "big"
HISTORY = 1_000_000
LIVE = 1_000


async def seed_big(conn: db.Connection) -> None:
    """LIVE ready tasks of one step and HISTORY finished tasks (rows of tasks only, set-based:
    engine_metrics must never read them)."""
    tpl = single(namespace=BIG_NS)
    named_task_id = await conn.register_template(tpl)
    await conn.create_tasks(BIG_NS, "single", [{}] * LIVE)
    await conn.execute(
        """
        INSERT INTO tasker.tasks (task_uuid, named_task_id, namespace, name, version, state,
                                  context, total_steps, created_at, updated_at, completed_at)
        SELECT gen_random_uuid(), $1, $2, 'single', '1.0.0', 'complete', '{}', 0,
               now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'
          FROM generate_series(1, $3)
        """,
        named_task_id,
        BIG_NS,
        HISTORY,
    )
    await conn.execute("VACUUM ANALYZE tasker.tasks")


@pytest.fixture(scope="module")
async def big_template(pg_server: pgserver.TestServer) -> AsyncIterator[str]:
    probe = await db.connect(pg_server.admin_dsn, check_schema=False)
    try:
        await plans.require_auto_explain(probe)
    finally:
        await probe.close()
    name = await seeded.seed_template(pg_server, "metrics1m", seed_big)
    yield name
    await pg_server.drop(name)


async def _tasks_pages_read(conn: db.Connection) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    async with conn.transaction():
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            "SELECT coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0) "
            "FROM pg_statio_user_tables WHERE schemaname = 'tasker' AND relname = 'tasks'"
        )
    return int(value)


@pytest.mark.plans
@pytest.mark.timeout(300)
async def test_engine_metrics_at_a_million_tasks_reads_indexes_only(
    pg_server: pgserver.TestServer, big_template: str
) -> None:
    async with seeded.clone_connection(pg_server, big_template) as conn:
        pages = await conn.fetchval(
            "SELECT relpages FROM pg_class WHERE oid = 'tasker.tasks'::regclass"
        )
        assert pages > 10_000  # a million rows
        await engine_metrics(conn)  # warm the caches and the session's plans
        read_before = await _tasks_pages_read(conn)
        started = time.perf_counter()
        metrics = await engine_metrics(conn)
        took_ms = (time.perf_counter() - started) * 1000
        read = await _tasks_pages_read(conn) - read_before
        print(
            f"\nengine_metrics() at {HISTORY + LIVE} tasks: {took_ms:.1f} ms, {read} pages of tasks"
        )
        assert metrics[("ready_steps", BIG_NS, None)] == LIVE
        assert metrics[("tasks", BIG_NS, "pending")] == LIVE
        assert metrics[("tasks_finished_5m", BIG_NS, "complete")] == 0
        # the live tasks' pages (LIVE rows), not the history's
        assert read < 200, read

        async with plans.collect_plans(conn) as log:
            await engine_metrics(conn)
        scanned = {rel for s in log.statements for rel in s.seq_scanned()}
        engine_tables = {"tasks", "steps", "step_edges", "step_transitions", "task_transitions"}
        assert not scanned & (engine_tables | {f"q_{BIG_NS}"}), [
            s.describe() for s in log.statements
        ]
        used = {i for s in log.statements for i in s.indexes()}
        assert {"tasks_live_idx", "tasks_finished_idx"} <= used, used


async def test_engine_metrics_report_waits_lanes_and_rate_limit_tokens(conn: db.Connection) -> None:
    await conn.execute("SELECT tasker.set_rate_limit('metered', 2, 4)")
    raw = {
        "name": "metered",
        "namespace_name": NAMESPACE,
        "version": "1.0.0",
        "fairness": {"key": "$.customer"},
        "rate_limit": "metered",
        "steps": [
            {"name": "work", "handler": {"callable": "h.work"}},
            {"name": "pause", "type": "sleep", "duration_seconds": 3600, "dependencies": ["work"]},
        ],
    }
    await conn.register_template(TaskTemplate.from_dict(raw).to_json())
    await conn.create_tasks(NAMESPACE, "metered", [{"customer": c} for c in ("a", "b", "c")])
    rows = await claim(conn, qty=10)
    assert len(rows) == 3  # the burst of 4 covers them
    await complete(conn, *(success(r) for r in rows[:2]))
    metrics = await engine_metrics(conn)
    assert metrics[("waiting_steps", NAMESPACE, None)] == 2
    assert metrics[("flow_lanes", NAMESPACE, None)] == 3
    assert 1 <= metrics[("rate_limit_tokens", None, "metered")] < 1.5
    await complete(conn, success(rows[2]))
    await assert_healthy(conn)
