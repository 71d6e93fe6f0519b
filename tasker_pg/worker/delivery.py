"""Delivering outcomes: buffer, flush one `complete_and_claim` call at a time, acknowledge.

Outcomes are flushed by a single flusher: at once when no handler is running (the latency
path), else after at most `flush_delay` so that outcomes finishing together share a call.
Concurrent flushes carrying sibling outcomes of one fan-in would wait on each other's commit;
one flusher avoids that and batches naturally while a flush is in flight.

The hand-off: a flush whose successes have dependent steps asks `complete_and_claim` to claim
the children they make ready for this worker, and starts them at once: a hop of a workflow costs
one round trip. It is for a worker that a success leaves idle (no other handler running): the
slot its handler just freed (up to the step's `dependents`) is kept from the moment the outcome
is buffered until its batch's delivery ends, so the claim loop, woken by that same free slot,
does not take it first for a claim that would find nothing. A busy worker hands nothing off: its
claim loop takes the children in batches on the claim session while the flush session commits,
the two in parallel, which drains a backlog faster than one session doing both. A re-sent batch
whose first delivery committed gets its hand-off released by the engine (the answer that carried
it was lost).

Only a deterministic refusal (`db.is_refusal`: bad input, value too large, unknown step or wrong
state) changes what is sent: the batch is split to find the culprit, a refused success or
checkpoint becomes a permanent failure naming why, a refused failure a minimal one. Every other
error (a lost connection, a lock or statement timeout, a cancelled query, a serialization
failure or deadlock, too many connections, an error nobody recognises) leaves the outcomes as
they are: the batch is sent again with capped, jittered exponential backoff while the heartbeat
keeps extending the leases, and outcomes are fenced by (step, attempt, claim_seq), so a delivery
that did commit before its answer was lost is reported stale and changes nothing. After
`outcome_retry_cap` seconds without an acknowledgement the worker gives an outcome up: it stops
extending its lease and the engine retries the step when the lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from tasker_pg import db
from tasker_pg.errors import ConnectionLostError, TaskerError
from tasker_pg.outcome import Outcome, refused_outcome
from tasker_pg.rows import ClaimedStep
from tasker_pg.worker import steplog
from tasker_pg.worker.session import Session, retry_delay, wait_event
from tasker_pg.worker.state import Claim, Shared

logger = logging.getLogger(__name__)

# An outcome not acknowledged after this many tries is logged at WARNING (then every
# WARN_EVERY tries), naming the step, the task and the error.
WARN_AFTER_TRIES = 3
WARN_EVERY = 10
# At most this many steps are named one by one in a warning about a batch.
NAMED_IN_WARNING = 5
# The most children one complete_and_claim call may hand off (the SQL function's limit).
MAX_HANDOFF = 1000

# Takes the steps a flush was handed and the local deadline of their lease.
HandoffSink = Callable[[list[ClaimedStep], float], Awaitable[None]]


class Deliverer:
    """The outbox of finished steps and the flusher that hands them to `complete_and_claim`."""

    def __init__(
        self, shared: Shared, session: Session, on_handoff: HandoffSink | None = None
    ) -> None:
        self._shared = shared
        self._session = session
        self._on_handoff = on_handoff
        self._outbox: list[tuple[Claim, Outcome]] = []
        # slots kept (Shared.reserved) for the children a buffered success may be handed: kept
        # when the outcome is buffered, so the claim loop does not take the slot its handler
        # just freed, and given back when its batch's delivery ends
        self._kept: dict[Claim, int] = {}
        self._batch_kept = 0  # the slots kept for the batch in flight
        self._in_flight = 0  # outcomes in the complete_and_claim call running now
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        # The flush connection is down: the claim loop stops claiming until a flush succeeds.
        self.broken = False

    @property
    def waiting(self) -> int:
        """Outcomes not acknowledged yet (buffered, or in the complete_steps call now)."""
        return len(self._outbox) + self._in_flight

    def enqueue(self, claim: Claim, outcome: Outcome) -> None:
        """Buffer an outcome; flush at once when no handler runs, else within flush_delay."""
        self._outbox.append((claim, outcome))
        config = self._shared.config
        if (
            self._on_handoff is not None
            and config.handoff
            and outcome.kind == "success"
            and not self._shared.running
        ):
            keep = min(claim.step.dependents, max(self._shared.free_slots(), 0))
            if keep > 0:
                self._shared.reserved += keep
                self._kept[claim] = keep
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
            kept = self._batch_kept = sum(self._kept.pop(c, 0) for c, _ in batch)
            try:
                await self._deliver(batch)
            finally:
                if kept:
                    self._shared.reserved -= kept
                    self._shared.claim_wake.set()  # what was not handed off is free again
                self._batch_kept = 0
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
        """Send one batch until the database acknowledges or refuses it.

        A refusal goes to `_deliver_singly`. Any other error keeps the outcomes (and, through
        the heartbeat, their leases) and sends them again with backoff, until each outcome's
        `outcome_retry_cap` has passed or the worker closes.
        """
        shared = self._shared
        tries = 0
        while batch:
            try:
                rows, handed = await self._send(batch)
            except Exception as exc:
                if isinstance(exc, TaskerError) and db.is_refusal(exc):
                    # The engine refused something in the batch: find the culprit(s).
                    await self._deliver_singly(batch, exc)
                    return
                tries += 1
                if shared.closed.is_set():
                    logger.error(
                        "worker %s: dropping %d undelivered outcome(s) at close (%s); their "
                        "leases expire and the steps are retried",
                        shared.worker_id,
                        len(batch),
                        _describe_error(exc),
                    )
                    return
                lost = isinstance(exc, ConnectionLostError)
                if lost and not self.broken:
                    logger.warning(
                        "worker %s: lost the flush connection (%s); re-sending %d outcome(s) "
                        "after reconnecting",
                        shared.worker_id,
                        exc,
                        len(batch),
                    )
                    self.broken = True
                batch = self._keep_or_give_up(batch, exc, tries)
                if batch:
                    await wait_event(shared.closed, retry_delay(tries, at_once_first=lost))
                continue
            shared.counts["flush_calls"] += 1
            if self.broken:
                self.broken = False
                shared.claim_wake.set()
            self._acknowledge(batch, rows)
            if handed:
                assert self._on_handoff is not None
                await self._on_handoff(*handed)
            return

    async def _send(
        self, batch: list[tuple[Claim, Outcome]]
    ) -> tuple[list[db.Row], tuple[list[ClaimedStep], float] | None]:
        """One `complete_and_claim` call for the batch: its answers, and the steps handed off
        with their local lease deadline (None when none were)."""
        shared = self._shared
        config = shared.config
        outcomes = [outcome.to_json() for _, outcome in batch]
        handoff = self._handoff_slots(batch)  # within the slots kept for the batch
        lease_deadline = time.monotonic() + config.lease_seconds
        started = time.perf_counter()
        rows, steps = await self._session.call(
            lambda conn: conn.complete_and_claim(
                outcomes, config.worker_id, handoff, config.lease_seconds
            )
        )
        shared.instruments.flush_seconds(time.perf_counter() - started)
        return rows, ((steps, lease_deadline) if steps else None)

    def _handoff_slots(self, batch: list[tuple[Claim, Outcome]]) -> int:
        """How many children to ask for: what the batch's successes can make ready, capped by
        the slots kept for them; 0 when none were kept (hand-off off, or the worker was busy:
        its claim loop takes the children in batches, on its own session, in parallel with
        the flushes) or when the worker is stopping."""
        shared = self._shared
        if self._batch_kept == 0 or shared.stop_requested.is_set():
            return 0
        bound = sum(c.step.dependents for c, o in batch if o.kind == "success")
        return min(bound, self._batch_kept, shared.config.max_batch, MAX_HANDOFF)

    def _keep_or_give_up(
        self, batch: list[tuple[Claim, Outcome]], error: BaseException, tries: int
    ) -> list[tuple[Claim, Outcome]]:
        """After a failed try that was not a refusal: the outcomes to send again.

        An outcome waiting longer than `outcome_retry_cap` is given up: its claim is forgotten,
        so the heartbeat stops extending its lease, and the engine retries the step once the
        lease expires. Loud at WARNING after a few tries, at ERROR when giving up.
        """
        shared = self._shared
        cap = shared.config.outcome_retry_cap
        now = time.monotonic()
        why = _describe_error(error)
        shared.bump("delivery_retries")
        kept: list[tuple[Claim, Outcome]] = []
        for claim, outcome in batch:
            if claim.undelivered_since is None:
                claim.undelivered_since = now
            if now - claim.undelivered_since >= cap:
                shared.held.pop(claim, None)
                shared.bump("outcomes_given_up")
                logger.error(
                    "worker %s: the database has not acknowledged the %s outcome of %s for "
                    "%gs (outcome_retry_cap; last error: %s); giving it up: its lease is no "
                    "longer extended and the engine retries the step when it expires",
                    shared.worker_id,
                    outcome.kind,
                    claim.describe(),
                    cap,
                    why,
                    extra=claim.log,
                )
                continue
            kept.append((claim, outcome))
        if kept and (
            tries == WARN_AFTER_TRIES
            or (tries > WARN_AFTER_TRIES and (tries - WARN_AFTER_TRIES) % WARN_EVERY == 0)
        ):
            for claim, outcome in kept[:NAMED_IN_WARNING]:
                logger.warning(
                    "worker %s: the database has not acknowledged the %s outcome of %s after "
                    "%d tries (%s); keeping it and its lease and sending it again with backoff "
                    "(for at most %gs)",
                    shared.worker_id,
                    outcome.kind,
                    claim.describe(),
                    tries,
                    why,
                    cap,
                    extra=claim.log,
                )
            if len(kept) > NAMED_IN_WARNING:
                logger.warning(
                    "worker %s: ... and %d more outcome(s) of the same batch wait too",
                    shared.worker_id,
                    len(kept) - NAMED_IN_WARNING,
                )
        elif kept and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "worker %s: complete_steps for %d outcome(s) failed (%s); try %d, sending again",
                shared.worker_id,
                len(kept),
                why,
                tries,
            )
        return kept

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
        # The engine refused what the handler produced (e.g. an oversized result, a value it
        # cannot store): send a failure naming the problem instead of losing the outcome.
        replacement = refused_outcome(outcome, error)
        if replacement is not None:
            logger.error(
                "worker %s: the engine refused the %s outcome of %s (%s); sending a failure "
                "that says so instead",
                worker_id,
                outcome.kind,
                claim.describe(),
                _describe_error(error),
                extra=claim.log,
            )
            await self._deliver([(claim, replacement)])
            return
        logger.error(
            "worker %s: the engine refused even the minimal failure outcome of %s (%s); "
            "dropping it, the lease expires and the step is retried",
            worker_id,
            claim.describe(),
            _describe_error(error),
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
        instruments = shared.instruments
        for claim, outcome in batch:
            held.pop(claim, None)
            instruments.handler_seconds(claim, outcome.duration_ms / 1000.0)
            fence = claim.fence
            status, detail = answers.get((fence.step_uuid, fence.attempt), ("applied", None))
            if status == "stale":
                counts["stale"] += 1
                instruments.step(claim, "stale")
                steplog.log_stale(worker_id, claim, outcome, detail)
                continue
            # complete_steps' detail is the step's new state.
            state = detail if detail in steplog.COUNTER_OF_STATE else None
            if state is None:
                state = steplog.expected_state(claim, outcome)
            counter = steplog.COUNTER_OF_STATE[state]
            counts[counter] += 1
            instruments.step(claim, counter)
            steplog.log_step_end(worker_id, claim, outcome, state)
            claim.error = None  # the traceback's frames are no longer needed


def _describe_error(exc: BaseException) -> str:
    """`message [error_code, SQLSTATE x]` for a log line."""
    if isinstance(exc, TaskerError):
        state = f", SQLSTATE {exc.sqlstate}" if exc.sqlstate else ""
        return f"{exc} [{exc.error_code}{state}]"
    return f"{type(exc).__name__}: {exc}"
