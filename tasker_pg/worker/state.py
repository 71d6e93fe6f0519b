"""State the worker's parts share: counters, the claims held and running, and the wake-up events.

Everything here is touched from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

from tasker_pg.rows import ClaimedStep, Fence
from tasker_pg.worker.config import WorkerConfig


@dataclass(frozen=True)
class WorkerStats:
    """Counters since the worker started (a snapshot; `Worker.stats` returns a fresh one).

    `succeeded`, `failed` (permanent, or out of attempts), `retried` (retryable failures that
    will run again) and `checkpointed` count outcomes the engine applied; `stale` counts outcomes
    it refused because the claim was no longer current (lease lost, step cancelled, delivered
    twice); `released` counts claims handed back unstarted at shutdown; `abandoned` counts steps
    still running when the grace period ended; `leases_lost` counts heartbeats that found a lease
    gone; `timeouts` counts runs abandoned after `timeout_seconds`; `reconnects` counts sessions
    re-opened after a lost connection; `claim_calls` and `flush_calls` count `claim_steps` and
    `complete_steps` round trips that succeeded (how well work is batched).
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

    @property
    def outcomes(self) -> int:
        """Outcomes the engine applied (of any kind)."""
        return self.succeeded + self.failed + self.retried + self.checkpointed


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
        "step",
        "task",
    )

    def __init__(self, step: ClaimedStep, namespace: str, lease_deadline: float) -> None:
        self.step = step
        self.namespace = namespace
        self.fence: Fence = step.fence
        # When this worker believes the lease ends (local monotonic clock, measured from before
        # the claim was sent, so it errs early).
        self.lease_deadline = lease_deadline
        self.lease_lost = False
        self.task: asyncio.Task[None] | None = None
        self.cfuture: concurrent.futures.Future[Any] | None = None
        # The exception the handler raised, kept until the outcome is acknowledged so a final
        # failure is logged with its traceback.
        self.error: BaseException | None = None
        # `extra` of every log record about this step.
        self.log = {
            "task_uuid": step.task_uuid,
            "step_uuid": step.step_uuid,
            "step_name": step.step_name,
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
        # threads of timed-out (or abandoned) sync handlers that still run: they hold a slot
        self.zombies: set[concurrent.futures.Future[Any]] = set()
        self.stop_requested = asyncio.Event()
        self.force_stop = asyncio.Event()  # a second stop request: end the grace period now
        self.closed = asyncio.Event()  # final teardown: reconnect loops give up
        self.claim_wake = asyncio.Event()  # a slot freed up or a namespace may hold work
        self.idle = asyncio.Event()  # set whenever no handler is running
        self.idle.set()

    def bump(self, counter: str, by: int = 1) -> None:
        self.counts[counter] += by

    def stats(self) -> WorkerStats:
        return WorkerStats(**self.counts)

    def free_slots(self) -> int:
        return self.config.concurrency - len(self.running) - len(self.zombies)
