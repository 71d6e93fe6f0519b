"""Delivering outcomes: buffer them, flush with one `complete_steps` call in flight, acknowledge.

Outcomes are flushed by a single flusher: at once when no handler is running (the latency
path), else after at most `flush_delay` so that outcomes finishing together share a call.
Concurrent flushes carrying sibling outcomes of one fan-in would wait on each other's commit;
one flusher avoids that and batches naturally while a flush is in flight. A batch that was not
acknowledged because the connection broke is sent again: outcomes are fenced by (step, attempt,
claim_seq), so a second delivery is reported stale and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from tasker_pg import db
from tasker_pg.errors import ConnectionLostError, TaskerError
from tasker_pg.outcome import Outcome, refused_outcome
from tasker_pg.worker import steplog
from tasker_pg.worker.session import Session, backoff, wait_event
from tasker_pg.worker.state import Claim, Shared

logger = logging.getLogger(__name__)


class Deliverer:
    """The outbox of finished steps and the flusher that hands them to `complete_steps`."""

    def __init__(self, shared: Shared, session: Session) -> None:
        self._shared = shared
        self._session = session
        self._outbox: list[tuple[Claim, Outcome]] = []
        self._in_flight = 0  # outcomes in the complete_steps call running now
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        # The flush connection is down: the claim loop stops claiming until a flush succeeds.
        self.broken = False

    def enqueue(self, claim: Claim, outcome: Outcome) -> None:
        """Buffer an outcome; flush at once when no handler runs, else within flush_delay."""
        self._outbox.append((claim, outcome))
        config = self._shared.config
        if (
            not self._shared.running
            or len(self._outbox) >= config.max_batch
            or config.flush_delay == 0
        ):
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(config.flush_delay, self._wake.set)

    async def loop(self) -> None:
        """The single flusher: one complete_steps call in flight at a time."""
        max_batch = self._shared.config.max_batch
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._outbox:
                self._progress.set()
                continue
            batch = self._outbox[:max_batch]
            del self._outbox[:max_batch]
            if self._outbox:
                self._wake.set()
            self._in_flight = len(batch)
            try:
                await self._deliver(batch)
            finally:
                self._in_flight = 0
                self._progress.set()

    async def drain(self, timeout: float) -> None:
        """Wait until every buffered outcome has been delivered (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while self._outbox or self._in_flight:
            self._progress.clear()
            if self._outbox:
                self._wake.set()
            if not await wait_event(self._progress, deadline - time.monotonic()):
                logger.error(
                    "worker %s: could not deliver %d outcome(s) within %gs; their leases expire "
                    "and the steps are retried",
                    self._shared.worker_id,
                    len(self._outbox) + self._in_flight,
                    timeout,
                )
                return

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _deliver(self, batch: list[tuple[Claim, Outcome]]) -> None:
        """Send one batch until it is acknowledged (re-sending after a lost connection)."""
        shared = self._shared
        outcomes = [outcome.to_json() for _, outcome in batch]
        failures = 0
        while True:
            try:
                rows = await self._session.call(lambda conn: conn.complete_steps(outcomes))
            except ConnectionLostError as exc:
                failures += 1
                if shared.closed.is_set():
                    logger.error(
                        "worker %s: dropping %d undelivered outcome(s) at close",
                        shared.worker_id,
                        len(batch),
                    )
                    return
                if not self.broken:
                    logger.warning(
                        "worker %s: lost the flush connection (%s); re-sending %d outcome(s) "
                        "after reconnecting",
                        shared.worker_id,
                        exc,
                        len(batch),
                    )
                self.broken = True
                # Re-send at once after the first loss (a reconnect is usually all it takes),
                # then back off.
                await wait_event(shared.closed, backoff(failures - 1))
                continue
            except TaskerError as exc:  # the engine refused the batch: find the culprit(s)
                await self._deliver_singly(batch, exc)
                return
            shared.counts["flush_calls"] += 1
            if self.broken:
                self.broken = False
                shared.claim_wake.set()
            self._acknowledge(batch, rows)
            return

    async def _deliver_singly(self, batch: list[tuple[Claim, Outcome]], error: TaskerError) -> None:
        """After a batch error: send outcomes one by one; turn a refused one into a failure."""
        worker_id = self._shared.worker_id
        if len(batch) > 1:
            logger.warning(
                "worker %s: complete_steps refused a batch of %d (%s); sending one by one",
                worker_id,
                len(batch),
                error,
            )
            for item in batch:
                await self._deliver([item])
            return
        claim, outcome = batch[0]
        if outcome.kind != "failure":
            # The engine refused what the handler produced (e.g. an oversized result): store the
            # refusal as a permanent failure naming the problem instead of losing the outcome.
            logger.error(
                "worker %s: the engine refused the %s outcome of %s: %s",
                worker_id,
                outcome.kind,
                claim.describe(),
                error,
                extra=claim.log,
            )
            await self._deliver([(claim, refused_outcome(outcome, error))])
            return
        logger.error(
            "worker %s: the engine refused the failure outcome of %s (%s); dropping it, the "
            "lease expires and the step is retried",
            worker_id,
            claim.describe(),
            error,
            extra=claim.log,
        )
        self._shared.held.pop(claim, None)

    def _acknowledge(self, batch: list[tuple[Claim, Outcome]], rows: Sequence[db.Row]) -> None:
        """Count and log what complete_steps applied, log what it found stale, forget the claims."""
        shared = self._shared
        worker_id = shared.worker_id
        answers: dict[tuple[str, int], tuple[str, str | None]] = {
            (str(r["step_uuid"]), r["attempt"]): (r["status"], r["detail"]) for r in rows
        }
        counts = shared.counts
        held = shared.held
        for claim, outcome in batch:
            held.pop(claim, None)
            fence = claim.fence
            status, detail = answers.get((fence.step_uuid, fence.attempt), ("applied", None))
            if status == "stale":
                counts["stale"] += 1
                steplog.log_stale(worker_id, claim, outcome, detail)
                continue
            # complete_steps' detail is the step's new state.
            state = detail if detail in steplog.COUNTER_OF_STATE else None
            if state is None:
                state = steplog.expected_state(claim, outcome)
            counts[steplog.COUNTER_OF_STATE[state]] += 1
            steplog.log_step_end(worker_id, claim, outcome, state)
            claim.error = None  # the traceback's frames are no longer needed
