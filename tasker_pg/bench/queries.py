"""The benchmark's setup and inspection queries, in one place.

The engine itself is driven through `db.Connection` methods (`create_tasks`, `create_task`,
`register_template`, `check_invariants`); what is here prepares databases and reads back what
the engine wrote (counts, timings from the engine's own timestamps, server settings), so that
no scenario carries SQL of its own. The raw SQL the engine is compared with lives in
`tasker_pg.bench.baseline`.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from tasker_pg import db
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

# The completion poll: tasks done, and tasks that ended any other final way.
_TASK_PROGRESS = """
SELECT count(*) FILTER (WHERE state = 'complete') AS complete,
       count(*) FILTER (WHERE state IN ('error', 'cancelled', 'resolved_manually')) AS failed
  FROM tasker.tasks
"""
_TASK_STEP_COUNT = "SELECT count(*) FROM tasker.steps WHERE task_uuid = $1"
_FIRST_STEP_ERROR = "SELECT last_error::text FROM tasker.steps WHERE last_error IS NOT NULL LIMIT 1"

# What a drain left behind, for the verification that every task and step completed once.
_DRAIN_TOTALS = """
SELECT (SELECT count(*) FROM tasker.tasks) AS tasks,
       (SELECT count(*) FROM tasker.tasks WHERE state = 'complete') AS tasks_complete,
       (SELECT count(*) FROM tasker.steps) AS steps,
       (SELECT count(*) FROM tasker.steps WHERE state = 'complete') AS steps_complete,
       (SELECT coalesce(sum(attempts), 0) FROM tasker.steps) AS attempts,
       (SELECT count(*) FROM tasker.step_transitions WHERE to_state = 'complete') AS completions,
       (SELECT count(*) FROM tasker.queue_messages) AS messages_left
"""

# From the first claim to the last task completed (database clock); claim and flush calls that
# did work, counted by their distinct (worker, transaction timestamp) pairs.
_DRAIN_TIMING = """
SELECT extract(epoch FROM (SELECT max(completed_at) FROM tasker.tasks)
                        - (SELECT min(created_at) FROM tasker.step_transitions
                            WHERE event = 'claimed'))::float8 AS seconds,
       (SELECT count(DISTINCT (worker_id, created_at)) FROM tasker.step_transitions
         WHERE event = 'claimed') AS claim_batches,
       (SELECT count(DISTINCT (worker_id, created_at)) FROM tasker.step_transitions
         WHERE event = 'succeeded') AS flush_batches
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


async def checkpoint(conn: db.Connection) -> None:
    """A checkpoint now, so a timed scenario never runs into one (needs superuser or
    pg_checkpoint; skipped without)."""
    with contextlib.suppress(DatabaseError):
        await conn.execute("CHECKPOINT")


async def server_settings(conn: db.Connection) -> db.Row:
    row = await conn.fetchrow(_SERVER_SETTINGS)
    assert row is not None
    return row


async def worker_backend_pids(conn: db.Connection) -> list[int]:
    return [int(r["pid"]) for r in await conn.fetch(_WORKER_BACKEND_PIDS)]


async def analyze_engine_tables(conn: db.Connection) -> None:
    await conn.execute(_ANALYZE_ENGINE_TABLES)


async def task_progress(conn: db.Connection) -> tuple[int, int]:
    """(complete, failed) task counts."""
    counts = _counts(await conn.fetchrow(_TASK_PROGRESS))
    return counts["complete"], counts["failed"]


async def task_step_count(conn: db.Connection, task: Any) -> int:
    """How many steps the task has (created ones: a fan-out adds its workers)."""
    return int(await conn.fetchval(_TASK_STEP_COUNT, task))


async def first_step_error(conn: db.Connection) -> Any:
    return await conn.fetchval(_FIRST_STEP_ERROR)


async def drain_totals(conn: db.Connection) -> dict[str, int]:
    return _counts(await conn.fetchrow(_DRAIN_TOTALS))


async def drain_timing(conn: db.Connection) -> tuple[float, int, int]:
    """(seconds from first claim to last completion, claim batches, flush batches)."""
    row = await conn.fetchrow(_DRAIN_TIMING)
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
