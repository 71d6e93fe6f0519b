"""The dashboard's SQL: every statement reads through an index or a small table.

What each one reads:

- the namespaces are those of the registered templates (`tasker.named_tasks`, one row per
  template version: small);
- a namespace's queue numbers read its queue partition `tasker.q_<namespace>`, which holds one
  message per live step only (finished steps have none), each joined to its step by primary
  key;
- tasks not finished (`pending`, `steps_in_process`, `error`) are read through the partial index
  `tasks_live_idx` (`completed_at IS NULL`), finished ones of the last minutes through
  `tasks_finished_idx` (`namespace, completed_at`);
- the task list walks `tasks_created_at_idx` newest first from a cursor and reads at most
  `SCAN_BUDGET` index entries per page (a filter that matches few tasks says how far it looked
  instead of walking the whole index);
- a task's steps, edges and audit trail are read by task uuid (`steps_task_name_idx`,
  `step_transitions_step_idx`, `task_transitions_task_idx`);
- workers: `tasker.v_workers`, one row per worker process.

Left out because only a full scan has them: completed steps per minute (no index on
`steps.completed_at`; the throughput shown is finished tasks, from `tasks_finished_idx`) and
counts of all finished tasks by state.
"""

from __future__ import annotations

from typing import Final

SCAN_BUDGET: Final = 2000
"""Index entries of `tasks_created_at_idx` one task-list page reads at most."""

# Per namespace of a registered template: the queue (ready = visible messages, the oldest
# visible one's time, in flight = leased messages of running steps, delayed = other invisible
# messages: retries waiting for their time and delayed starts), tasks not finished and in
# error, and tasks finished in the last minute and five minutes.
NAMESPACES: Final = """
WITH ns AS (SELECT DISTINCT nt.namespace FROM tasker.named_tasks nt)
SELECT ns.namespace, q.ready, extract(epoch FROM now() - q.oldest_ready_at) AS oldest_ready_age,
       q.in_flight, q.delayed, live.live_tasks, live.error_tasks,
       fin.finished_1m, fin.finished_5m, fin.complete_5m
  FROM ns
 CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE m.vt <= now()) AS ready,
           min(m.vt) FILTER (WHERE m.vt <= now()) AS oldest_ready_at,
           count(*) FILTER (WHERE m.vt > now() AND m.step_state = 'in_progress') AS in_flight,
           count(*) FILTER (WHERE m.vt > now() AND m.step_state IS DISTINCT FROM 'in_progress')
               AS delayed
      FROM (SELECT m.vt,
                   -- for invisible messages only, a subquery per message: one primary-key
                   -- lookup each, never a join the planner could turn into a scan of steps
                   CASE WHEN m.vt > now() THEN
                       (SELECT s.state FROM tasker.steps s
                         WHERE s.step_uuid = (m.message->>'step_uuid')::uuid)
                   END AS step_state
              FROM tasker.queue_messages m
             WHERE m.queue = ns.namespace
            OFFSET 0) m) q  -- (OFFSET 0: not flattened, so each lookup runs once)
 CROSS JOIN LATERAL (
    SELECT count(*) AS live_tasks, count(*) FILTER (WHERE t.state = 'error') AS error_tasks
      FROM tasker.tasks t
     WHERE t.completed_at IS NULL AND t.namespace = ns.namespace) live
 CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE t.completed_at >= now() - interval '1 minute') AS finished_1m,
           count(*) AS finished_5m,
           count(*) FILTER (WHERE t.state = 'complete') AS complete_5m
      FROM tasker.tasks t
     WHERE t.namespace = ns.namespace AND t.completed_at >= now() - interval '5 minutes') fin
 ORDER BY ns.namespace
"""

# The namespaces of the registered templates, for the task list's filter.
NAMESPACE_NAMES: Final = "SELECT DISTINCT nt.namespace FROM tasker.named_tasks nt ORDER BY 1"

# One page of tasks, newest first, keyset-paged on tasks_created_at_idx.
# $1/$2 cursor (created_at, task_uuid of the last row already shown; NULL: from the newest),
# $3 created at or after (NULL: any), $4 namespace, $5 effective state (NULL: any),
# $6 page size, $7 scan budget. The first row always exists: it carries how many index
# entries were read and the last one (where the next page starts when the budget ran out);
# the page's tasks follow in its columns (NULL task_uuid: no match).
TASK_PAGE: Final = """
WITH scanned AS (
    SELECT t.task_uuid, t.created_at
      FROM tasker.tasks t
     WHERE ($1::timestamptz IS NULL
            OR t.created_at < $1 OR (t.created_at = $1 AND t.task_uuid < $2::uuid))
       AND ($3::timestamptz IS NULL OR t.created_at >= $3)
     ORDER BY t.created_at DESC, t.task_uuid DESC
     LIMIT $7
), summary AS (
    SELECT count(*) AS scanned,
           (array_agg(s.created_at ORDER BY s.created_at, s.task_uuid))[1] AS last_created_at,
           (array_agg(s.task_uuid ORDER BY s.created_at, s.task_uuid))[1] AS last_task_uuid
      FROM scanned s
), matched AS (
    SELECT v.task_uuid, v.namespace, v.name, v.version, v.state, v.total_steps,
           v.completed_steps, v.error_steps, v.created_at, v.completed_at
      FROM scanned s
      JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
      -- v_tasks' effective state, as a lateral probe of the task's steps (LIMIT 1): written as
      -- v_tasks' EXISTS, PostgreSQL 18 planned it as a hashed subplan over every step
      LEFT JOIN LATERAL (
          SELECT 1 AS started
            FROM tasker.steps st
           WHERE st.task_uuid = t.task_uuid
             AND (st.attempts > 0 OR st.state <> 'pending' AND st.state <> 'enqueued')
           LIMIT 1
      ) p ON t.state = 'pending'
      CROSS JOIN LATERAL (
          SELECT t.task_uuid, t.namespace, t.name, t.version,
                 CASE WHEN p.started IS NOT NULL THEN 'steps_in_process' ELSE t.state END AS state,
                 t.total_steps, t.completed_steps, t.error_steps, t.created_at, t.completed_at
      ) v
     WHERE ($4::text IS NULL OR v.namespace = $4)
       AND ($5::text IS NULL OR v.state = $5)
     ORDER BY s.created_at DESC, s.task_uuid DESC
     LIMIT $6
)
SELECT summary.scanned, summary.last_created_at, summary.last_task_uuid, m.*
  FROM summary
  LEFT JOIN matched m ON true
 ORDER BY m.created_at DESC NULLS LAST, m.task_uuid DESC
"""

# The template's steps of a task ($1 task), in template order: parents by name, and whether
# the step is created at run time (a decision's branch, a batch worker's template).
TEMPLATE_STEPS: Final = """
SELECT ns.name, ns.parent_names, ns.is_dynamic, ns.step_type
  FROM tasker.tasks t
  JOIN tasker.named_steps ns ON ns.named_task_id = t.named_task_id
 WHERE t.task_uuid = $1::uuid
 ORDER BY ns.step_index
"""

# The edges of a task's steps by name ($1 task): a batch worker's parents are its fan-out
# step, which the template does not list as a parent.
STEP_EDGES: Final = """
SELECT p.name AS parent, c.name AS child
  FROM tasker.steps c
  JOIN tasker.step_edges e ON e.child_uuid = c.step_uuid
  JOIN tasker.steps p ON p.step_uuid = e.parent_uuid
 WHERE c.task_uuid = $1::uuid
"""

# A task's audit trail, newest first ($1 task, $2 most rows): the task's transitions and its
# steps' transitions in one list.
AUDIT: Final = """
(SELECT tr.created_at, tr.transition_id, NULL::text AS step_name, tr.from_state, tr.to_state,
        tr.event, NULL::integer AS attempt, NULL::text AS worker_id, NULL::text AS error_summary
   FROM tasker.task_transitions tr
  WHERE tr.task_uuid = $1::uuid)
UNION ALL
(SELECT tr.created_at, tr.transition_id, s.name, tr.from_state, tr.to_state, tr.event,
        tr.attempt, tr.worker_id, tr.error_summary
   FROM tasker.steps s
   JOIN tasker.step_transitions tr ON tr.step_uuid = s.step_uuid
  WHERE s.task_uuid = $1::uuid)
 ORDER BY created_at DESC, transition_id DESC
 LIMIT $2
"""

# The workers (one row per worker process; stale rows are removed after a week), alive first.
WORKERS: Final = """
SELECT w.worker_id, w.host, w.pid, w.status, w.namespaces, w.handlers, w.started_at,
       w.last_heartbeat_at, extract(epoch FROM w.heartbeat_age) AS heartbeat_age, w.in_flight,
       w.missing_handlers
  FROM tasker.v_workers w
 ORDER BY w.status, w.worker_id
"""

# The task a step belongs to ($1 step), to return to its page after an action.
STEP_TASK: Final = "SELECT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = $1::uuid"
