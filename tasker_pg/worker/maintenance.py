"""Maintenance: the worker's `tasker.workers` row, message repair, and steps it has no handler for.

One loop per worker, on the listener session (idle by nature):
- every `WORKERS_ROW_INTERVAL` seconds (and at start) it upserts the worker's row with
  `tasker.worker_heartbeat`: host, pid, namespaces, registered handlers, claims in flight and
  the handlers it lacked (name -> first seen);
- every `repair_interval` seconds (0 disables it) it calls `tasker.repair_messages()`, which
  re-sends the message of any live step that lost it and enqueues stranded ready steps (one
  worker at a time: the function takes an advisory lock), logging a WARNING naming what it
  repaired, and `tasker.cleanup_workers()` (rows of workers gone for a week);
- every `retention_interval` seconds (0 disables it) it calls `tasker.purge_finished()`, which
  deletes one batch of the tasks the namespaces' retention policies no longer keep (one worker
  at a time: an advisory lock); while batches come back full it calls again after as long as the
  last batch took (so a backlog takes at most about half of a database core), between its other
  duties, each batch its own short transaction. What it deleted is logged at INFO;
- every `schedule_interval` seconds (0 disables it) it calls `tasker.fire_due_schedules()`,
  which creates the tasks of the schedule slots that are due (one worker at a time: an advisory
  lock taken in the same transaction; each slot fires once whoever calls, by its idempotency
  key), logging at INFO what it created and at WARNING a schedule whose firing failed;
- every `wake_interval` seconds (0 disables it) it calls `tasker.wake_waits()`, which ends the
  sleep steps that are due, applies wait timeouts and matches events emitted before their steps
  waited (one worker at a time: an advisory lock); while a batch comes back full it calls again
  at once. Timeouts are logged at INFO;
- a claimed step whose handler this worker does not have (a rolling deploy: an older worker
  meets a newer template) is not failed: it goes back with `tasker.release_steps` (reason
  `handler_missing`, no attempt spent), its message hidden for `missing_handler_delay`
  seconds, so a worker that has the handler takes it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import socket
import time

from tasker_pg.errors import ConnectionLostError, TaskerError
from tasker_pg.registry import HandlerRegistry
from tasker_pg.worker.session import Session, backoff, wait_event
from tasker_pg.worker.state import Claim, Shared

logger = logging.getLogger(__name__)

# Waits per tasker.wake_waits() call (one transaction each).
WAKE_BATCH = 1000
# How often the worker's tasker.workers row is written.
WORKERS_ROW_INTERVAL = 5.0
# How many repaired steps a WARNING names (the count is always given).
_MAX_LISTED = 20
# Schedule slots per tasker.fire_due_schedules() call.
SCHEDULE_BATCH = 1000
# Tasks per tasker.purge_finished() call (one transaction each).
RETENTION_BATCH = 1000
# While a purge has more to do, the pause before the next batch, in multiples of the time the
# last batch took: a backlog is caught up using about a fifth of one database session's time,
# so the work running meanwhile keeps most of the database.
RETENTION_PAUSE = 4.0


class Maintenance:
    """The workers row, periodic repair, and releases of steps without a handler here."""

    def __init__(self, shared: Shared, session: Session, registry: HandlerRegistry) -> None:
        self._shared = shared
        self._session = session
        self._registry = registry
        self._started_at = datetime.datetime.now(datetime.UTC)
        self._host = socket.gethostname()[:200] or "host"
        self.missing_handlers: dict[str, str] = {}  # handler name -> first seen (ISO)
        self._to_release: list[Claim] = []
        self._wake = asyncio.Event()
        self._failures = 0

    def handler_missing(self, claim: Claim, error: BaseException) -> None:
        """Called by the runner for a claim whose handler this worker does not have."""
        shared = self._shared
        handler = claim.step.handler
        if handler not in self.missing_handlers:
            self.missing_handlers[handler] = datetime.datetime.now(datetime.UTC).isoformat()
        shared.bump("released")
        shared.instruments.step(claim, "released")
        logger.warning(
            "worker %s has no handler %s for %s: handing it back without spending an attempt; "
            "a worker that has the handler can take it after %gs, a delay doubled with each "
            "hand-back of this step, up to 5 min (%s)",
            shared.worker_id,
            handler,
            claim.describe(),
            shared.config.missing_handler_delay,
            error,
            extra=claim.log,
        )
        self._to_release.append(claim)
        self._wake.set()

    async def loop(self) -> None:
        """Write the workers row, repair, and release claims without a handler, until closed."""
        config = self._shared.config
        now = time.monotonic()
        next_row = now
        # Spread the workers' repairs over the interval (only one runs at a time anyway).
        next_repair = now + config.repair_interval * random.uniform(0.5, 1.0)
        next_retention = now + config.retention_interval * random.uniform(0.5, 1.0)
        next_schedule = now + config.schedule_interval * random.uniform(0.0, 0.5)
        next_wake = now + config.wake_interval * random.uniform(0.0, 1.0)
        while True:
            if self._to_release:
                await self.release_missing()
            now = time.monotonic()
            if now >= next_row:
                await self.write_row()
                next_row = now + WORKERS_ROW_INTERVAL
            if config.repair_interval > 0 and now >= next_repair:
                await self.repair()
                next_repair = now + config.repair_interval
            if config.retention_interval > 0 and now >= next_retention:
                more = await self.purge()
                # while batches come back full, the next one after RETENTION_PAUSE times as
                # long as this one took
                took = time.monotonic() - now
                next_retention = (
                    now + took + RETENTION_PAUSE * took if more else now + config.retention_interval
                )
            if config.schedule_interval > 0 and now >= next_schedule:
                full = await self.fire_schedules()
                next_schedule = time.monotonic() if full else now + config.schedule_interval
            if config.wake_interval > 0 and now >= next_wake:
                more = await self.wake()
                next_wake = time.monotonic() if more else now + config.wake_interval
            until = next_row
            if config.wake_interval > 0:
                until = min(until, next_wake)
            if config.repair_interval > 0:
                until = min(until, next_repair)
            if config.retention_interval > 0:
                until = min(until, next_retention)
            if config.schedule_interval > 0:
                until = min(until, next_schedule)
            if self._to_release:  # a failed release: try again after a backoff
                until = min(until, time.monotonic() + backoff(self._failures))
            self._wake.clear()
            await wait_event(self._wake, until - time.monotonic())

    async def drain(self, timeout: float) -> None:
        """At shutdown: hand back the claims still waiting for a handler_missing release."""
        deadline = time.monotonic() + timeout
        while self._to_release and time.monotonic() < deadline:
            await self.release_missing()
            if self._to_release:
                await asyncio.sleep(backoff(self._failures))

    async def write_row(self) -> None:
        """Upsert this worker's tasker.workers row; failures are logged, never fatal."""
        shared = self._shared
        config = shared.config
        try:
            await self._session.call(
                lambda conn: conn.worker_heartbeat(
                    worker_id=shared.worker_id,
                    host=self._host,
                    pid=os.getpid(),
                    namespaces=config.namespaces,
                    handlers=self._registry.names(),
                    started_at=self._started_at,
                    in_flight=len(shared.held),
                    missing_handlers=self.missing_handlers,
                )
            )
        except TaskerError as exc:
            logger.warning(
                "worker %s: writing its tasker.workers row failed: %s", shared.worker_id, exc
            )

    async def repair(self) -> None:
        """One `tasker.repair_messages()` call (and the workers-row cleanup), logged loudly."""
        shared = self._shared
        try:
            rows = await self._session.call(lambda conn: conn.repair_messages())
            await self._session.call(lambda conn: conn.fetchval("SELECT tasker.cleanup_workers()"))
        except TaskerError as exc:
            logger.warning("worker %s: repair_messages failed: %s", shared.worker_id, exc)
            return
        if not rows:
            return
        listed = "; ".join(
            f"{r['kind']}: step {r['step_uuid']} of task {r['task_uuid']} "
            f"({r['namespace']}, {r['step_state']})"
            for r in rows[:_MAX_LISTED]
        )
        more = f"; and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
        logger.warning(
            "worker %s: repaired %d stranded step(s) (a message was missing or a ready step was "
            "never enqueued): %s%s",
            shared.worker_id,
            len(rows),
            listed,
            more,
        )

    async def fire_schedules(self) -> bool:
        """One `tasker.fire_due_schedules()` call, logged; True when it handled a full batch."""
        shared = self._shared
        try:
            rows = await self._session.call(
                lambda conn: conn.fire_due_schedules(SCHEDULE_BATCH, exclusive=True)
            )
        except TaskerError as exc:
            logger.warning("worker %s: fire_due_schedules failed: %s", shared.worker_id, exc)
            return False
        created = [r for r in rows if r["action"] == "created"]
        if created:
            logger.info(
                "worker %s: schedules created %d task(s): %s",
                shared.worker_id,
                len(created),
                "; ".join(
                    f"{r['schedule_name']} slot {r['slot'].isoformat()} -> {r['task_uuid']}"
                    for r in created[:_MAX_LISTED]
                ),
            )
        for r in rows:
            if r["action"] == "error":
                logger.warning(
                    "worker %s: schedule %s could not fire its slot %s (tasker-pg schedule "
                    "list shows the error)",
                    shared.worker_id,
                    r["schedule_name"],
                    r["slot"].isoformat(),
                )
        return len(rows) >= SCHEDULE_BATCH

    async def purge(self) -> bool:
        """One `tasker.purge_finished()` batch, logged; True when another batch is waiting."""
        shared = self._shared
        try:
            counts = await self._session.call(lambda conn: conn.purge_finished(RETENTION_BATCH))
        except TaskerError as exc:
            logger.warning("worker %s: purge_finished failed: %s", shared.worker_id, exc)
            return False
        if counts.tasks or counts.archived_messages or counts.idempotency_keys_expired:
            logger.info(
                "worker %s: retention deleted %d task(s) (%d steps, %d edges, %d step and %d "
                "task transitions), %d archived message(s), %d expired idempotency key(s)",
                shared.worker_id,
                counts.tasks,
                counts.steps,
                counts.step_edges,
                counts.step_transitions,
                counts.task_transitions,
                counts.archived_messages,
                counts.idempotency_keys_expired,
            )
        return counts.more

    async def wake(self) -> bool:
        """One `tasker.wake_waits()` call, timeouts logged; True when a full batch was due."""
        shared = self._shared
        try:
            counts = await self._session.call(lambda conn: conn.wake_waits(WAKE_BATCH))
        except TaskerError as exc:
            logger.warning("worker %s: wake_waits failed: %s", shared.worker_id, exc)
            return False
        if counts.timed_out:
            logger.info(
                "worker %s: %d wait step(s) timed out (failed, or completed with their default)",
                shared.worker_id,
                counts.timed_out,
            )
        return counts.more

    async def release_missing(self) -> None:
        """Release, in one call, the claims whose handler this worker does not have."""
        shared = self._shared
        batch, self._to_release = self._to_release, []
        fences = [c.fence.to_json() for c in batch]
        try:
            rows = await self._session.call(
                lambda conn: conn.release_steps(
                    fences,
                    delay_seconds=shared.config.missing_handler_delay,
                    reason="handler_missing",
                    worker_id=shared.worker_id,
                )
            )
        except ConnectionLostError as exc:
            self._failures += 1
            if shared.closed.is_set():
                logger.error("worker %s: releasing claims failed: %s", shared.worker_id, exc)
                return
            self._to_release = batch + self._to_release  # try again; heartbeats keep the leases
            return
        except TaskerError as exc:
            # Not retried: the leases lapse and another worker takes the steps (an attempt).
            logger.error("worker %s: releasing claims failed: %s", shared.worker_id, exc)
            for claim in batch:
                shared.held.pop(claim, None)
            return
        self._failures = 0
        released = {str(r["step_uuid"]) for r in rows if r["released"]}
        for claim in batch:
            shared.held.pop(claim, None)
            if claim.fence.step_uuid not in released:
                logger.info(
                    "worker %s: could not release %s (no longer held)",
                    shared.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
