"""The benchmark's setup and inspection queries, in one place.

The engine itself is driven through `db.Connection` methods (`create_tasks`, `create_task`,
`register_template`, `check_invariants`); what is here prepares databases and reads back what
the engine wrote (counts, timings from the engine's own timestamps, server settings), so that
no scenario carries SQL of its own. The raw SQL the engine is compared with lives in
`tasker_pg.bench.baseline`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from typing import Any

from tasker_pg import db
from tasker_pg.bench.handlers import NAMESPACE
from tasker_pg.embedded import REPORTED_SETTINGS
from tasker_pg.errors import DatabaseError

_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# The server as the report describes it; `backend_pid` tells whether it runs on this machine.
_SERVER_SETTINGS = """
SELECT current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int AS server_version_num,
       current_setting('fsync') AS fsync,
       current_setting('synchronous_commit') AS synchronous_commit,
       current_setting('shared_buffers') AS shared_buffers,
       current_setting('full_page_writes') AS full_page_writes,
       current_setting('max_connections') AS max_connections,
       inet_server_addr()::text AS server_addr,
       pg_backend_pid() AS backend_pid
"""

# The settings the report lists (tasker_pg.embedded.REPORTED_SETTINGS: durability, memory and
# what the embedded cluster tunes for a queue workload), each as SHOW prints it.
_REPORTED_SETTINGS = """
SELECT s.name, current_setting(s.name, true) AS value
  FROM unnest($1::text[]) WITH ORDINALITY s(name, ord)
 ORDER BY s.ord
"""

# The server backends of the bench's workers (their application_name carries the worker id).
_WORKER_BACKEND_PIDS = """
SELECT pid
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND application_name LIKE 'tasker-pg worker bench-%'
"""

# Fresh tables: give the planner real statistics (inside the creating transaction it sees that
# transaction's rows), as a database in steady state would have.
_ANALYZE_ENGINE_TABLES = (
    "ANALYZE tasker.tasks, tasker.steps, tasker.step_edges, tasker.queue_messages"
)

# The completion poll: tasks done, and tasks that ended any other final way. $1: count only
# tasks created since then (the backlog scenario's drained tasks; NULL: every task).
_TASK_PROGRESS = """
SELECT count(*) FILTER (WHERE state = 'complete') AS complete,
       count(*) FILTER (WHERE state IN ('error', 'cancelled', 'resolved_manually')) AS failed
  FROM tasker.tasks
 WHERE $1::timestamptz IS NULL OR created_at >= $1
"""
_TASK_STEP_COUNT = "SELECT count(*) FROM tasker.steps WHERE task_uuid = $1"
_FIRST_STEP_ERROR = "SELECT last_error::text FROM tasker.steps WHERE last_error IS NOT NULL LIMIT 1"

# What a drain left behind, for the verification that every task and step completed once; of
# the tasks created since $1 (NULL: every task). Messages left: any but those of older tasks.
_DRAIN_TOTALS = """
WITH drained AS MATERIALIZED (
    SELECT task_uuid, state FROM tasker.tasks WHERE $1::timestamptz IS NULL OR created_at >= $1
),
steps AS MATERIALIZED (
    SELECT s.state, s.attempts FROM tasker.steps s
     WHERE s.task_uuid IN (SELECT task_uuid FROM drained)
)
SELECT (SELECT count(*) FROM drained) AS tasks,
       (SELECT count(*) FROM drained WHERE state = 'complete') AS tasks_complete,
       (SELECT count(*) FROM steps) AS steps,
       (SELECT count(*) FROM steps WHERE state = 'complete') AS steps_complete,
       (SELECT coalesce(sum(attempts), 0) FROM steps) AS attempts,
       (SELECT count(*) FROM tasker.step_transitions x
         WHERE x.to_state = 'complete'
           AND x.task_uuid IN (SELECT task_uuid FROM drained)) AS completions,
       (SELECT count(*) FROM tasker.queue_messages m
         WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t
                            WHERE t.task_uuid::text = m.message->>'task_uuid'
                              AND t.created_at < $1)) AS messages_left
"""

# From the first claim to the last task completed (database clock); claim and flush calls that
# did work, counted by their distinct (worker, transaction timestamp) pairs; of the tasks
# created since $1 (NULL: every task).
_DRAIN_TIMING = """
WITH drained AS MATERIALIZED (
    SELECT task_uuid, completed_at FROM tasker.tasks
     WHERE $1::timestamptz IS NULL OR created_at >= $1
),
events AS MATERIALIZED (
    SELECT x.event, x.worker_id, x.created_at FROM tasker.step_transitions x
     WHERE x.event IN ('claimed', 'succeeded') AND x.task_uuid IN (SELECT task_uuid FROM drained)
),
batches AS (
    SELECT event, count(DISTINCT (worker_id, created_at)) AS n, min(created_at) AS first
      FROM events GROUP BY event
)
SELECT extract(epoch FROM (SELECT max(completed_at) FROM drained)
                        - (SELECT first FROM batches WHERE event = 'claimed'))::float8 AS seconds,
       coalesce((SELECT n FROM batches WHERE event = 'claimed'), 0) AS claim_batches,
       coalesce((SELECT n FROM batches WHERE event = 'succeeded'), 0) AS flush_batches
"""

# Task created (create_task began) -> its step claimed (claim_steps began) / handler started.
_LATENCY_SINGLE = """
SELECT (s.results->>'started')::float8 - extract(epoch FROM t.created_at)::float8 AS to_start,
       extract(epoch FROM c.created_at - t.created_at)::float8 AS to_claim
  FROM tasker.tasks t
  JOIN tasker.steps s ON s.task_uuid = t.task_uuid
  JOIN tasker.step_transitions c ON c.step_uuid = s.step_uuid AND c.event = 'claimed'
 WHERE t.name = $1
"""
# Handoff: the child made ready (its `enqueued_at`, written by enqueue_ready at the end of the
# parent's complete_steps, just before that transaction commits) -> child claimed / handler
# started; and, for reference, from the start of the parent's complete_steps call (its
# `succeeded` transition), which adds that call's own execution.
_LATENCY_HANDOFF = """
SELECT (c.results->>'started')::float8 - extract(epoch FROM c.enqueued_at)::float8 AS to_start,
       extract(epoch FROM cc.created_at - c.enqueued_at)::float8 AS to_claim,
       (c.results->>'started')::float8 - extract(epoch FROM ps.created_at)::float8
           AS from_parent_outcome
  FROM tasker.tasks t
  JOIN tasker.steps c ON c.task_uuid = t.task_uuid
  JOIN tasker.step_edges e ON e.child_uuid = c.step_uuid
  JOIN tasker.step_transitions ps ON ps.step_uuid = e.parent_uuid AND ps.event = 'succeeded'
  JOIN tasker.step_transitions cc ON cc.step_uuid = c.step_uuid AND cc.event = 'claimed'
 WHERE t.name = $1
"""
# Task created -> task completed.
_LATENCY_E2E = """
SELECT extract(epoch FROM t.completed_at - t.created_at)::float8 AS seconds
  FROM tasker.tasks t
 WHERE t.name = $1
"""

# Server time per engine function (track_functions = all), most self time first.
_FUNCTION_TIMES = """
SELECT funcname, calls, total_time, self_time
  FROM pg_stat_user_functions
 WHERE schemaname = 'tasker'
 ORDER BY self_time DESC, funcname
"""

# What the create scenario wrote (the bare-insert reference table included).
_CREATED_TOTALS = """
SELECT (SELECT count(*) FROM tasker.tasks) AS tasks,
       (SELECT count(*) FROM tasker.steps) AS steps,
       (SELECT count(*) FROM tasker.step_edges) AS edges,
       (SELECT count(*) FROM tasker.queue_messages) AS messages,
       (SELECT count(*) FROM bench_insert) AS inserted
"""


def _counts(row: db.Row | None) -> dict[str, int]:
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}


def _database_name(name: str) -> str:
    """A bench database name, checked before it is spliced into DDL (quoted)."""
    if not _DATABASE_NAME.match(name):
        raise ValueError(f"not a bench database name: {name!r}")
    return f'"{name}"'


async def drop_database(admin: db.Connection, name: str, *, force: bool) -> None:
    """Drop a bench database if it exists (`force`: disconnect its sessions first, PG 13+)."""
    suffix = " WITH (FORCE)" if force else ""
    await admin.execute(f"DROP DATABASE IF EXISTS {_database_name(name)}{suffix}")


async def create_database(admin: db.Connection, name: str) -> None:
    await admin.execute(f"CREATE DATABASE {_database_name(name)}")


async def track_functions(admin: db.Connection, name: str) -> None:
    """Sessions of the bench database count the time of every function (needs superuser)."""
    await admin.execute(f"ALTER DATABASE {_database_name(name)} SET track_functions = 'all'")


async def function_times(conn: db.Connection) -> list[db.Row]:
    """The engine functions' calls and server time (ms) in this database, most self time first
    (the sessions that ran them have ended: their statistics are flushed)."""
    return await conn.fetch(_FUNCTION_TIMES)


async def checkpoint(conn: db.Connection) -> None:
    """A checkpoint now, so a timed scenario never runs into one (needs superuser or
    pg_checkpoint; skipped without)."""
    with contextlib.suppress(DatabaseError):
        await conn.execute("CHECKPOINT")


async def server_settings(conn: db.Connection) -> db.Row:
    row = await conn.fetchrow(_SERVER_SETTINGS)
    assert row is not None
    return row


async def reported_settings(conn: db.Connection) -> dict[str, str | None]:
    """The server's value of each setting the report lists, in that order (None: unknown to
    this server version)."""
    rows = await conn.fetch(_REPORTED_SETTINGS, list(REPORTED_SETTINGS))
    return {str(r["name"]): r["value"] for r in rows}


async def worker_backend_pids(conn: db.Connection) -> list[int]:
    return [int(r["pid"]) for r in await conn.fetch(_WORKER_BACKEND_PIDS)]


async def analyze_engine_tables(conn: db.Connection) -> None:
    await conn.execute(_ANALYZE_ENGINE_TABLES)


async def task_progress(conn: db.Connection, since: dt.datetime | None = None) -> tuple[int, int]:
    """(complete, failed) task counts (of the tasks created since `since`, when given)."""
    counts = _counts(await conn.fetchrow(_TASK_PROGRESS, since))
    return counts["complete"], counts["failed"]


async def task_step_count(conn: db.Connection, task: Any) -> int:
    """How many steps the task has (created ones: a fan-out adds its workers)."""
    return int(await conn.fetchval(_TASK_STEP_COUNT, task))


async def first_step_error(conn: db.Connection) -> Any:
    return await conn.fetchval(_FIRST_STEP_ERROR)


async def drain_totals(conn: db.Connection, since: dt.datetime | None = None) -> dict[str, int]:
    return _counts(await conn.fetchrow(_DRAIN_TOTALS, since))


async def drain_timing(
    conn: db.Connection, since: dt.datetime | None = None
) -> tuple[float, int, int]:
    """(seconds from first claim to last completion, claim batches, flush batches) of the
    tasks created since `since` (every task when None)."""
    row = await conn.fetchrow(_DRAIN_TIMING, since)
    assert row is not None
    seconds = row["seconds"]
    return (
        float(seconds) if seconds is not None else 0.0,
        int(row["claim_batches"]),
        int(row["flush_batches"]),
    )


async def latency_single(conn: db.Connection, template: str) -> list[db.Row]:
    return await conn.fetch(_LATENCY_SINGLE, template)


async def latency_handoff(conn: db.Connection, template: str) -> list[db.Row]:
    return await conn.fetch(_LATENCY_HANDOFF, template)


async def latency_end_to_end(conn: db.Connection, template: str) -> list[db.Row]:
    return await conn.fetch(_LATENCY_E2E, template)


async def created_totals(conn: db.Connection) -> dict[str, int]:
    return _counts(await conn.fetchrow(_CREATED_TOTALS))


# PostgreSQL 15 and later: flush this backend's pending statistics when it is next idle.
_FLUSH_STATISTICS = "SELECT pg_stat_force_next_flush()"

# A report's read (the xmin scenario's snapshot holder takes its snapshot with it).
_REPORT_READ = "SELECT count(*) FROM tasker.tasks"

# The hot tables of the bench namespace: dead and live tuples (statistics, flushed about once
# a second), table and index sizes.
_HOT_TABLE_STATS = """
SELECT s.relname AS relation, s.n_dead_tup AS dead, s.n_live_tup AS live,
       pg_relation_size(s.relid) / 1024 AS table_kb, pg_indexes_size(s.relid) / 1024 AS index_kb
  FROM pg_stat_user_tables s
 WHERE s.schemaname = 'tasker' AND s.relname IN ('tasks', 'steps', 'step_edges', $1)
 ORDER BY s.relname
"""

# Per window of $2 seconds from $1, the full windows of a $3-second phase: tasks created in it,
# tasks completed in it, and the p50 / p99 lag (ms) from creation to completion of the latter.
_COMPLETION_WINDOWS = """
WITH p AS (SELECT $1::timestamptz AS since, $2::float8 AS width, $3::float8 AS seconds),
t AS MATERIALIZED (
    SELECT created_at, completed_at FROM tasker.tasks, p WHERE created_at >= p.since
),
w AS (
    SELECT k, p.width,
           p.since + make_interval(secs => k * p.width) AS lo,
           p.since + make_interval(secs => (k + 1) * p.width) AS hi
      FROM p, generate_series(0, floor(p.seconds / p.width)::int - 1) k
)
SELECT w.k * w.width AS from_s, (w.k + 1) * w.width AS to_s,
       (SELECT count(*) FROM t WHERE t.created_at >= w.lo AND t.created_at < w.hi) AS arrived,
       (SELECT count(*) FROM t WHERE t.completed_at >= w.lo AND t.completed_at < w.hi) AS completed,
       (SELECT 1000 * percentile_cont(0.5) WITHIN GROUP (
                   ORDER BY extract(epoch FROM t.completed_at - t.created_at))
          FROM t WHERE t.completed_at >= w.lo AND t.completed_at < w.hi) AS lag_p50_ms,
       (SELECT 1000 * percentile_cont(0.99) WITHIN GROUP (
                   ORDER BY extract(epoch FROM t.completed_at - t.created_at))
          FROM t WHERE t.completed_at >= w.lo AND t.completed_at < w.hi) AS lag_p99_ms
  FROM w
 ORDER BY w.k
"""


async def report_read(conn: db.Connection) -> int:
    return int(await conn.fetchval(_REPORT_READ))


async def hot_table_stats(conn: db.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(_HOT_TABLE_STATS, f"q_{NAMESPACE}")
    return [
        {
            "relation": str(r["relation"]),
            **{key: int(r[key]) for key in ("dead", "live", "table_kb", "index_kb")},
        }
        for r in rows
    ]


async def completion_windows(
    conn: db.Connection, since: dt.datetime, window: float, seconds: float
) -> list[dict[str, Any]]:
    rows = await conn.fetch(_COMPLETION_WINDOWS, since, window, seconds)
    out = []
    for r in rows:
        arrived, completed = int(r["arrived"]), int(r["completed"])
        out.append(
            {
                "from_s": float(r["from_s"]),
                "to_s": float(r["to_s"]),
                "arrived": arrived,
                "completed": completed,
                "completed_per_arrived": round(completed / arrived, 4) if arrived else 0.0,
                "lag_p50_ms": _round_or_none(r["lag_p50_ms"]),
                "lag_p99_ms": _round_or_none(r["lag_p99_ms"]),
            }
        )
    return out


def _round_or_none(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


async def flush_statistics(conn: db.Connection) -> None:
    """Have this session's table statistics (inserted rows) flushed as soon as it is idle, so
    the next reading of pg_stat_user_tables counts them."""
    await conn.execute(_FLUSH_STATISTICS)


# The retention scenario's history: the given tasks (one step each, just created) made finished
# two days ago, set-based, as a worker would have left them (step complete with a result and
# its claim and success transitions, task complete with its transition, message gone).
_FINISH_AS_HISTORY = """
WITH t AS (
    UPDATE tasker.tasks t
       SET state = 'complete', completed_steps = t.total_steps,
           completed_at = now() - interval '2 days', updated_at = now() - interval '2 days'
     WHERE t.task_uuid = ANY ($1::uuid[])
    RETURNING t.task_uuid, t.namespace
),
s AS (
    UPDATE tasker.steps s
       SET state = 'complete', attempts = 1, claim_seq = 1, claim_spent_attempt = true,
           results = '{"history": true}', worker_id = 'bench-history', msg_id = NULL,
           started_at = now() - interval '2 days', completed_at = now() - interval '2 days',
           updated_at = now() - interval '2 days'
      FROM t
     WHERE s.task_uuid = t.task_uuid
    RETURNING s.step_uuid, s.task_uuid
),
gone AS (
    DELETE FROM tasker.queue_messages m
     USING (SELECT x.namespace, st.msg_id
              FROM t x JOIN tasker.steps st ON st.task_uuid = x.task_uuid
             WHERE st.msg_id IS NOT NULL) k
     WHERE m.queue = k.namespace AND m.msg_id = k.msg_id
),
step_audit AS (
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt,
                                         worker_id, created_at)
    SELECT s.step_uuid, s.task_uuid, e.from_state, e.to_state, e.event, 1, 'bench-history',
           now() - interval '2 days'
      FROM s CROSS JOIN (VALUES ('enqueued', 'in_progress', 'claimed'),
                                ('in_progress', 'complete', 'succeeded'))
                        AS e(from_state, to_state, event)
)
INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, created_at)
SELECT t.task_uuid, 'pending', 'complete', 'completed', now() - interval '2 days' FROM t
"""

# The retention scenario's policy: finished tasks of the namespace are kept a day.
_KEEP_FINISHED_A_DAY = "SELECT * FROM tasker.set_retention_policy($1, interval '1 day')"


async def finish_as_history(conn: db.Connection, tasks: list[Any]) -> None:
    await conn.execute(_FINISH_AS_HISTORY, tasks)


async def keep_finished_a_day(conn: db.Connection) -> None:
    await conn.execute(_KEEP_FINISHED_A_DAY, NAMESPACE)


async def claimed_lanes(conn: db.Connection, first: int) -> list[str]:
    """The lane of each of the first `first` claims of the database, in audit order."""
    rows = await conn.fetch(
        "SELECT s.lane FROM tasker.step_transitions tr JOIN tasker.steps s USING (step_uuid)"
        " WHERE tr.event = 'claimed' ORDER BY tr.transition_id LIMIT $1",
        first,
    )
    return [r["lane"] for r in rows]
