"""The asyncio worker: claims ready steps, runs their handlers, hands the outcomes back to SQL.

PostgreSQL makes every decision (docs/architecture.md); the worker only moves work between the
database and the handlers, with as few round trips as it can. `Worker` (core.py) is a facade
over one part per job:

- `claiming`: one claim loop, woken by LISTEN/NOTIFY on `tasker_<namespace>` and a polling
  fallback; each claim asks for as many steps as there are free slots in one
  `tasker.claim_steps` call, typed as `tasker_pg.rows.ClaimedStep`.
- `running`: every claimed step gets an asyncio task at once; async handlers run on the loop,
  sync handlers in a thread pool of `concurrency` threads; each claim has a max run time (the
  step's `timeout_seconds`, else `max_runtime`), past which it fails as a `timeout`.
- `delivery`: outcomes (typed values fenced by step, attempt and claim_seq) are buffered and
  flushed by a single flusher, one `tasker.complete_and_claim` call in flight at a time; the
  answer is counted and each step's end is logged (`steplog`), and the children the successes
  made ready come back in the same call, claimed for this worker, and start at once. Only a
  refusal (`db.is_refusal`) changes an outcome; any other error re-sends it with backoff, for up
  to `outcome_retry_cap`.
- `leases`: a heartbeat extends the leases of running steps in one `tasker.extend_leases` call;
  unstarted claims go back with `tasker.release_steps` at shutdown.
- `session`: one claim session (also heartbeats and releases), one flush session and one
  listener session, each reconnecting on its own with capped exponential backoff. A batch of
  outcomes that was not acknowledged is sent again: a second delivery is reported stale.
- Stopping: `request_stop()` (SIGTERM/SIGINT in `run_forever()` and the CLI, see `entry`): stop
  claiming, let running steps finish within `grace_seconds`, flush, hand back claimed-but-
  unstarted steps (no attempt spent), close. Steps still running after the grace period (or at
  a second stop request) are abandoned: their leases expire and another worker retries them.
- `handler_check`: at start, a warning for each template step handler the registry cannot
  resolve.
"""

from __future__ import annotations

from tasker_pg.worker.config import WorkerConfig, default_worker_id
from tasker_pg.worker.core import Worker
from tasker_pg.worker.state import WorkerHealth, WorkerStats

__all__ = ["Worker", "WorkerConfig", "WorkerHealth", "WorkerStats", "default_worker_id"]
