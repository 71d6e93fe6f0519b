"""State the worker's parts share: counters, the claims held and running, and the wake-up events.

Everything here is touched from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tasker_pg.rows import ClaimedStep, Fence
from tasker_pg.worker.config import WorkerConfig
from tasker_pg.worker.instruments import Instruments

if TYPE_CHECKING:
    from tasker_pg.tracing import StepTracer

logger = logging.getLogger(__name__)

# The log fields (`Claim.log`) of the step whose handler runs in this context: set in each
# step's task and carried into its sync handler's thread, so the handler's own log records can
# be shown with the step's ids (`tasker_pg.logformat`).
CURRENT_STEP: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "tasker_current_step", default=None
)


@dataclass(frozen=True)
class WorkerStats:
    """Counters since the worker started (a snapshot; `Worker.stats` returns a fresh one).

    `succeeded`, `failed` (permanent, or out of attempts), `retried` (retryable failures that
    will run again) and `checkpointed` count outcomes the engine applied; `stale` counts
    outcomes it refused because the claim was no longer current (lease lost, step cancelled,
    delivered twice); `released` counts claims handed back unstarted at shutdown; `abandoned`
    counts steps still running when the grace period ended; `leases_lost` counts heartbeats that
    found a lease gone; `timeouts` counts runs abandoned after their max run time
    (`timeout_seconds`, else `max_runtime`); `reconnects` counts sessions re-opened after a lost
    connection; `claim_calls` and `flush_calls` count `claim_steps` and `complete_steps` round
    trips that succeeded (how well work is batched); `delivery_retries` counts `complete_steps`
    tries that failed without a refusal and were sent again; `outcomes_given_up` counts outcomes
    given up to lease expiry after `outcome_retry_cap`; `full_claims` counts the claims that
    read without a claim window (`tasker_pg.worker.window`); `handed_off` counts the claims
    (among `claimed`) that `complete_and_claim` handed to this worker with the outcome that made
    them ready.
    """

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    checkpointed: int = 0
    stale: int = 0
    released: int = 0
    abandoned: int = 0
    leases_lost: int = 0
    timeouts: int = 0
    reconnects: int = 0
    claim_calls: int = 0
    flush_calls: int = 0
    delivery_retries: int = 0
    outcomes_given_up: int = 0
    full_claims: int = 0
    handed_off: int = 0

    @property
    def outcomes(self) -> int:
        """Outcomes the engine applied (of any kind)."""
        return self.succeeded + self.failed + self.retried + self.checkpointed


@dataclass(frozen=True)
class WorkerHealth:
    """What a worker can do right now (a snapshot; `Worker.health` returns a fresh one).

    `status` is "ok", or "stalled" when every slot is held by an overdue handler (one that ran
    past its max run time: a sync handler's thread that cannot be stopped, or an async handler
    that does not end when cancelled), so the worker claims nothing until one ends.
    `overdue` counts those handlers, `free_slots` the steps it could claim now, and
    `outcomes_waiting` the outcomes the database has not acknowledged yet.
    """

    status: Literal["ok", "stalled"]
    concurrency: int
    running: int
    overdue: int
    free_slots: int
    outcomes_waiting: int


class Claim:
    """One claimed step as the worker tracks it: the frozen claim row plus what became of it."""

    __slots__ = (
        "cfuture",
        "error",
        "fence",
        "lease_deadline",
        "lease_lost",
        "log",
        "namespace",
        "overdue",
        "run_deadline",
        "step",
        "task",
        "undelivered_since",
    )

    def __init__(
        self, step: ClaimedStep, namespace: str, lease_deadline: float, worker_id: str = ""
    ) -> None:
        self.step = step
        self.namespace = namespace
        self.fence: Fence = step.fence
        # When this worker believes the lease ends (local monotonic clock, measured from before
        # the claim was sent, so it errs early).
        self.lease_deadline = lease_deadline
        self.lease_lost = False
        # When the handler's run time is up (local monotonic clock; set when it starts), and
        # whether it was: an overdue claim's lease is no longer extended.
        self.run_deadline: float | None = None
        self.overdue = False
        # When the database first failed to acknowledge this claim's outcome (None: it has
        # not yet); the outcome is re-sent until outcome_retry_cap has passed since then.
        self.undelivered_since: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.cfuture: concurrent.futures.Future[Any] | None = None
        # The exception the handler raised, kept until the outcome is acknowledged so a final
        # failure is logged with its traceback.
        self.error: BaseException | None = None
        # `extra` of every log record about this step (`tasker-pg worker --log-format` shows
        # them).
        self.log: dict[str, Any] = {
            "task_uuid": step.task_uuid,
            "step_uuid": step.step_uuid,
            "step_name": step.step_name,
            "attempt": step.attempt,
            "namespace": namespace,
            "worker_id": worker_id,
        }

    def describe(self) -> str:
        """`step <name> <uuid> of task <uuid> (attempt n/max)`, for log messages."""
        step = self.step
        return (
            f"step {step.step_name} {step.step_uuid} of task {step.task_uuid} "
            f"(attempt {step.attempt}/{step.max_attempts})"
        )


class Shared:
    """The settings, counters, claim sets and events every part of one worker uses."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.counts: dict[str, int] = dict.fromkeys(WorkerStats.__dataclass_fields__, 0)
        self.running: dict[Claim, None] = {}  # claims whose handler is running (ordered set)
        self.held: dict[Claim, None] = {}  # claims not yet acknowledged by complete_steps
        # slots kept for claims on their way: the claim in flight, and the children a flush in
        # flight may be handed (complete_and_claim); the claim loop and the flusher both ask
        self.reserved = 0
        # threads of timed-out (or abandoned) sync handlers that still run: they hold a slot
        self.zombies: set[concurrent.futures.Future[Any]] = set()
        self.stop_requested = asyncio.Event()
        self.force_stop = asyncio.Event()  # a second stop request: end the grace period now
        self.closed = asyncio.Event()  # final teardown: reconnect loops give up
        self.claim_wake = asyncio.Event()  # a slot freed up or a namespace may hold work
        self.idle = asyncio.Event()  # set whenever no handler is running
        self.idle.set()
        self.stalled = False  # every slot held by an overdue handler (see check_stalled)
        # metrics hooks (tasker_pg.worker.instruments); a no-op unless metrics are served
        self.instruments = Instruments()
        # one span per step run (tasker_pg.tracing.StepTracer); None unless tracing is on
        self.tracer: StepTracer | None = None

    def bump(self, counter: str, by: int = 1) -> None:
        self.counts[counter] += by

    def stats(self) -> WorkerStats:
        return WorkerStats(**self.counts)

    def free_slots(self) -> int:
        return self.config.concurrency - len(self.running) - len(self.zombies) - self.reserved

    def is_overdue(self, claim: Claim, now: float) -> bool:
        """Whether the claim's handler ran past its max run time (its lease is not extended)."""
        if claim.overdue:
            return True
        deadline = claim.run_deadline
        return deadline is not None and now >= deadline and claim in self.running

    def overdue_slots(self) -> int:
        """Slots held by handlers past their max run time (threads and cancelled tasks)."""
        now = time.monotonic()
        tasks = sum(1 for c in self.running if c.cfuture is None and self.is_overdue(c, now))
        return tasks + sum(1 for f in self.zombies if not f.done())

    def check_stalled(self) -> None:
        """Log once when every slot becomes held by an overdue handler, and once when not."""
        overdue = self.overdue_slots()
        stalled = overdue >= self.config.concurrency
        if stalled == self.stalled:
            return
        self.stalled = stalled
        if stalled:
            logger.warning(
                "worker %s: all %d slot(s) are held by handlers that ran past their max run "
                "time and have not ended; claiming nothing until one ends (their steps were "
                "failed as timeouts and are retried elsewhere)",
                self.worker_id,
                self.config.concurrency,
            )
        else:
            logger.info(
                "worker %s: a slot held by an overdue handler is free again; claiming",
                self.worker_id,
            )

    def health(self, outcomes_waiting: int) -> WorkerHealth:
        overdue = self.overdue_slots()
        return WorkerHealth(
            status="stalled" if overdue >= self.config.concurrency else "ok",
            concurrency=self.config.concurrency,
            running=len(self.running),
            overdue=overdue,
            free_slots=max(self.free_slots(), 0),
            outcomes_waiting=outcomes_waiting,
        )
