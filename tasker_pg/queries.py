"""Named SQL statements of the client and the operator CLI, used only by `tasker_pg.db`.

Tasks are read through the DBA view tasker.v_tasks (its `state` is the effective state users
see) joined with tasker.task_execution_context (counts per step state, execution status), so a
task's state and its counts come from one snapshot.
"""

from __future__ import annotations

from typing import Final

_TASK_COLUMNS = """
       v.task_uuid, v.namespace, v.name, v.version, v.state, v.total_steps, v.priority,
       v.initiator, v.source_system, v.reason, v.tags, v.idempotency_key, v.correlation_id,
       v.context, v.created_at, v.updated_at, v.completed_at,
       e.pending_steps, e.enqueued_steps, e.in_progress_steps, e.waiting_for_retry_steps,
       e.complete_steps, e.error_steps, e.cancelled_steps, e.resolved_steps, e.ready_steps,
       e.execution_status, e.completion_percentage, e.waiting_steps"""

# One task with its progress ($1 task).
GET_TASK: Final = f"""
SELECT {_TASK_COLUMNS}
  FROM tasker.v_tasks v
 CROSS JOIN LATERAL tasker.task_execution_context(v.task_uuid) e
 WHERE v.task_uuid = $1::uuid
"""

# The filter shared by the page and the count ($1 namespace, $2 effective state, $3 the raw
# states that can show as $2). The raw-state test comes first so the effective state, which
# looks at the task's steps, is only computed for rows that can match: only a pending task
# can show as steps_in_process, every other state shows as itself. Everything here reads
# views and functions, never tables, so a tasker_client or tasker_reader login can run it.
_TASK_FILTER = """
 WHERE ($1::text IS NULL OR t.namespace = $1)
   AND ($2::text IS NULL
        OR (t.raw_state = ANY ($3::text[]) AND t.state = $2))"""

# One page of tasks, newest first ($4 limit, $5 offset), each row carrying the filter's total
# count (computed once, in the same snapshot as the page). The page is chosen on the view's
# tasker.tasks columns (created_at is indexed; the view's computed columns are not evaluated);
# the view's state and the execution context are read for the page's rows only.
LIST_TASKS: Final = f"""
WITH page AS (
    SELECT t.task_uuid, t.created_at
      FROM tasker.v_tasks t {_TASK_FILTER}
     ORDER BY t.created_at DESC, t.task_uuid DESC
     LIMIT $4 OFFSET $5
)
SELECT {_TASK_COLUMNS},
       (SELECT count(*) FROM tasker.v_tasks t {_TASK_FILTER}) AS total_count
  FROM page
  JOIN tasker.v_tasks v ON v.task_uuid = page.task_uuid
 CROSS JOIN LATERAL tasker.task_execution_context(v.task_uuid) e
 ORDER BY page.created_at DESC, page.task_uuid DESC
"""

# How many tasks the same filter matches (for an empty page, which carries no count).
COUNT_TASKS: Final = f"""
SELECT count(*) FROM tasker.v_tasks t {_TASK_FILTER}
"""

# Every step of a task in template order ($1 task; $2 one step, or NULL for all): the DBA
# view's row, readiness in words (tasker.step_readiness raises task_not_found for an unknown
# task), and the step's parents by name so a caller can draw the DAG. The view is filtered
# on its task column, not only joined to the function's rows: the planner guesses 1000 rows
# for a plpgsql function and would otherwise hash-join against every step of every task.
LIST_STEPS: Final = """
SELECT v.step_uuid, v.task_uuid, v.name, v.handler, v.state, v.attempts, v.max_attempts,
       v.retryable, v.worker_id, v.created_at, v.started_at, v.completed_at,
       v.last_run_duration, v.lease_expires_at, v.results, v.metadata, v.last_error,
       r.ready, r.reason, r.dependencies_satisfied, r.next_attempt_at AS ready_at,
       v.parent_names AS dependencies
  FROM tasker.v_steps v
  JOIN tasker.step_readiness($1::uuid) r ON r.step_uuid = v.step_uuid
 WHERE v.task_uuid = $1::uuid
   AND ($2::uuid IS NULL OR v.step_uuid = $2::uuid)
 ORDER BY v.step_index, v.name  -- (a batch_worker's workers share its step_index)
"""

# The template steps a task has no row for (conditional and batch workflows), with why ($1 task).
STEPS_NOT_CREATED: Final = """
SELECT r.name, r.reason
  FROM tasker.step_readiness($1::uuid) r
 WHERE r.step_uuid IS NULL
"""

# A step's audit trail, oldest first ($1 task, $2 step).
STEP_AUDIT: Final = """
SELECT tr.transition_id, tr.step_uuid, tr.task_uuid, tr.from_state, tr.to_state, tr.event,
       tr.attempt, tr.worker_id, tr.duration_ms, tr.error_summary, tr.created_at, tr.metadata
  FROM tasker.v_step_transitions tr
 WHERE tr.step_uuid = $2::uuid AND tr.task_uuid = $1::uuid
 ORDER BY tr.transition_id
"""

# Whether a task exists ($1 task), to say which of a (task, step) pair is unknown.
TASK_EXISTS: Final = """
SELECT EXISTS (SELECT 1 FROM tasker.v_tasks t WHERE t.task_uuid = $1::uuid)
"""

# The task a step belongs to ($1 step), for commands that are given only a step uuid.
STEP_TASK: Final = "SELECT s.task_uuid FROM tasker.v_steps s WHERE s.step_uuid = $1::uuid"

# The step of a task with a given name ($1 task, $2 step name).
STEP_BY_NAME: Final = """
SELECT s.step_uuid FROM tasker.v_steps s WHERE s.task_uuid = $1::uuid AND s.name = $2
"""

# The step names of a task in template order ($1 task), for "no step X; its steps are ...".
STEP_NAMES: Final = """
SELECT s.name FROM tasker.v_steps s WHERE s.task_uuid = $1::uuid ORDER BY s.step_index
"""

# Registered templates, newest version first within a name ($1 namespace or NULL).
TEMPLATES: Final = """
SELECT nt.namespace, nt.name, nt.version, nt.step_count, nt.description, nt.created_at
  FROM tasker.v_templates nt
 WHERE ($1::text IS NULL OR nt.namespace = $1)
 ORDER BY nt.namespace, nt.name, nt.version_major DESC, nt.version_minor DESC,
          nt.version_patch DESC, tasker._semver_pre_key(nt.version_pre) DESC NULLS FIRST
"""

# The workers the health check reports: every row of tasker.v_workers (one per worker process,
# a handful; stale rows are removed by cleanup_workers after a week), alive ones first.
WORKERS: Final = """
SELECT w.worker_id, w.host, w.pid, w.status, extract(epoch FROM w.heartbeat_age) AS heartbeat_age,
       w.in_flight, w.namespaces, w.missing_handlers
  FROM tasker.v_workers w
 ORDER BY w.status, w.worker_id
"""

# The engine's gauges (sql/functions/93_metrics.sql): index reads only, one row per value.
ENGINE_METRICS: Final = "SELECT metric, namespace, label, value FROM tasker.engine_metrics()"

# One cheap round trip for the health check; its time is the reported latency.
SERVER_VERSION: Final = "SELECT current_setting('server_version')"

# The database server's clock: the cut-off of a bulk retry run, so the tasks it retries that
# fail again while it runs are not picked up again by its later batches.
DATABASE_NOW: Final = "SELECT clock_timestamp()"
