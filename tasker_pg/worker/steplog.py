"""What the worker says about each step when the engine has applied its outcome, and its summary.

One line per step, at INFO for a success or checkpoint, WARNING for a failure that will be
retried and ERROR (with the handler's traceback) for a failure that ends the step. The line is
written once `tasker.complete_steps` has answered, so it states what the engine did, not what
the worker expected.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tasker_pg.outcome import Failure, Outcome
from tasker_pg.worker.state import Claim, Shared

logger = logging.getLogger(__name__)
# The lines about single steps have a logger of their own, so a deployment can turn them off
# (`tasker-pg worker --log-steps failures` raises it to WARNING) and keep the summaries.
STEP_LOGGER = "tasker_pg.worker.steps"
step_logger = logging.getLogger(STEP_LOGGER)

# The step states `tasker.complete_steps` reports for an applied outcome, and what they count as.
COUNTER_OF_STATE = {
    "complete": "succeeded",
    "in_progress": "checkpointed",
    "waiting_for_retry": "retried",
    "error": "failed",
}


def expected_state(claim: Claim, outcome: Outcome) -> str:
    """The state the engine moves the step to for `outcome` (its rule, for a missing answer)."""
    if outcome.kind == "success":
        return "complete"
    if outcome.kind == "checkpoint":
        return "in_progress"
    step = claim.step
    if outcome.error.retryable and step.retryable and step.attempt < step.max_attempts:
        return "waiting_for_retry"
    return "error"


def log_step_end(worker_id: str, claim: Claim, outcome: Outcome, state: str) -> None:
    """The one line about a step whose outcome the engine applied, moving it to `state`."""
    step = claim.step
    if state == "complete":
        step_logger.info(
            "worker %s: step %s %s of task %s succeeded in %.1f ms (attempt %d/%d)",
            worker_id,
            step.step_name,
            step.step_uuid,
            step.task_uuid,
            outcome.duration_ms,
            step.attempt,
            step.max_attempts,
            extra=claim.log,
        )
    elif state == "in_progress":
        step_logger.info(
            "worker %s: step %s %s of task %s checkpointed in %.1f ms (attempt %d/%d, "
            "%s item(s) processed so far); it continues from its cursor",
            worker_id,
            step.step_name,
            step.step_uuid,
            step.task_uuid,
            outcome.duration_ms,
            step.attempt,
            step.max_attempts,
            getattr(outcome, "items_processed", "?"),
            extra=claim.log,
        )
    elif state == "waiting_for_retry" and isinstance(outcome, Failure):
        step_logger.warning(
            "worker %s: step %s %s of task %s failed in %.1f ms (will retry, attempt %d/%d, "
            "next in %s): %s",
            worker_id,
            step.step_name,
            step.step_uuid,
            step.task_uuid,
            outcome.duration_ms,
            step.attempt,
            step.max_attempts,
            _next_in(claim, outcome),
            _error_text(outcome),
            extra=claim.log,
        )
    else:
        _log_final_failure(worker_id, claim, outcome)


def _log_final_failure(worker_id: str, claim: Claim, outcome: Outcome) -> None:
    """ERROR: the step is in error now; the handler's traceback follows when there is one."""
    step = claim.step
    if isinstance(outcome, Failure):
        error = outcome.error
        if not error.retryable:
            why = "the error is permanent"
        elif not step.retryable:
            why = "the step is not retryable"
        elif step.attempt >= step.max_attempts:
            why = "no attempts left"
        else:
            why = "the engine put the step in error"
        text = _error_text(outcome)
        if claim.error is None and error.traceback:
            text = f"{text}\n{error.traceback.rstrip()}"
    else:
        # complete_steps stores an oversized result or checkpoint, and a decision or batch
        # outcome it cannot apply, as a permanent failure.
        why = "the engine refused to store it"
        text = (
            f"its {outcome.kind} was stored as a failure (result_too_large: larger than "
            "max_payload_bytes in tasker.settings; or invalid_decision_outcome / "
            "invalid_batch_outcome: a decision or batch outcome it cannot apply); see the "
            "step's last_error"
        )
    exc = claim.error
    step_logger.error(
        "worker %s: step %s %s of task %s failed permanently in %.1f ms (attempt %d/%d, "
        "giving up: %s): %s",
        worker_id,
        step.step_name,
        step.step_uuid,
        step.task_uuid,
        outcome.duration_ms,
        step.attempt,
        step.max_attempts,
        why,
        text,
        exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
        extra=claim.log,
    )


def log_stale(worker_id: str, claim: Claim, outcome: Outcome, detail: str | None) -> None:
    """The engine refused the outcome because the claim is no longer current."""
    logger.log(
        logging.WARNING if claim.lease_lost else logging.INFO,
        "worker %s: outcome (%s) of %s was stale and changed nothing: %s",
        worker_id,
        outcome.kind,
        claim.describe(),
        detail,
        extra=claim.log,
    )


def _error_text(outcome: Failure) -> str:
    """`ErrorType [error_code]: message` (the code only when it says more than the type)."""
    error = outcome.error
    code = error.error_code
    shown = f" [{code}]" if code and code != error.error_type else ""
    return f"{error.error_type}{shown}: {error.message}"


def _next_in(claim: Claim, outcome: Failure) -> str:
    """When the retry becomes visible: `retry_after`, else the step's backoff (a range with
    jitter), by the same rule as the engine."""
    if outcome.error.retry_after is not None:
        return f"{outcome.error.retry_after:.1f}s"
    shortest, longest = claim.step.retry_delay_seconds()
    if longest - shortest < 0.05:
        return f"{longest:.1f}s"
    return f"{shortest:.1f}-{longest:.1f}s"


class Summary:
    """A one-line summary every `summary_interval` seconds, and a final one at shutdown."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._at = time.monotonic()
        self._outcomes = 0

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self._shared.config.summary_interval)
            self.log()

    def log(self, *, final: bool = False) -> None:
        now = time.monotonic()
        s = self._shared.stats()
        elapsed = now - self._at
        rate = (s.outcomes - self._outcomes) / elapsed if elapsed > 0 else 0.0
        self._at = now
        self._outcomes = s.outcomes
        logger.info(
            "worker %s%s: claimed=%d succeeded=%d failed=%d retried=%d stale=%d running=%d "
            "steps/s=%.1f",
            self._shared.worker_id,
            " final" if final else "",
            s.claimed,
            s.succeeded,
            s.failed,
            s.retried,
            s.stale,
            len(self._shared.running),
            rate,
        )
