"""Running handlers: async ones on the event loop, sync ones in a thread pool, with timeouts.

Every claimed step gets an asyncio task at once. Async handlers run on the loop, sync handlers
in a thread pool of `concurrency` threads, so the loop keeps serving while they block.

Every claim has a max run time: the step's `timeout_seconds`, else the worker's `max_runtime`
(1 hour by default); a checkpoint continuation is a new claim with a new one. Past it the
worker reports a retryable failure with error_code `timeout` (fenced like any outcome) and the
heartbeat stops extending the lease. An async handler is cancelled. A sync handler's thread
cannot be stopped: the worker stops waiting for it, and its slot stays taken until the thread
ends (the pool never over-commits); when every slot is taken that way, the worker says so
(`Shared.check_stalled`, `Worker.health`).

With tracing on (`Shared.tracer`), each run is an OpenTelemetry span, current while the handler
runs and ended once its outcome is queued (`tasker_pg.tracing`); off, the run makes no tracing
call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from tasker_pg.context import StepContext
from tasker_pg.errors import PermanentError
from tasker_pg.handler import StepHandler
from tasker_pg.outcome import Outcome, outcome_from_exception, outcome_from_result, timeout_outcome
from tasker_pg.registry import HandlerRegistry
from tasker_pg.worker.fetching import DependencyFetcher
from tasker_pg.worker.state import CURRENT_STEP, Claim, Shared

logger = logging.getLogger(__name__)


class _StepTimedOut(Exception):
    """Raised inside the worker (never by a handler) when a step exceeds its timeout_seconds."""


class Runner:
    """Runs each claimed step's handler and passes its outcome to `on_outcome`."""

    def __init__(
        self,
        shared: Shared,
        registry: HandlerRegistry,
        on_outcome: Callable[[Claim, Outcome], None],
        on_missing_handler: Callable[[Claim, PermanentError], None] | None = None,
    ) -> None:
        self._shared = shared
        self._registry = registry
        self._on_outcome = on_outcome
        # A step whose handler this worker lacks goes here (handed back), not to on_outcome.
        self._on_missing_handler = on_missing_handler
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Fetches the dependency results a partial claim left out (its pool opens on first use).
        self._fetcher: DependencyFetcher | None = None

    def open(self) -> None:
        """Create the thread pool for sync handlers (call from the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._fetcher = DependencyFetcher(self._shared, self._loop)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._shared.config.concurrency,
            thread_name_prefix=f"tasker-{self._shared.worker_id}",
        )

    @property
    def abandoned_threads(self) -> int:
        """Sync handler threads still running that the worker stopped waiting for."""
        return sum(1 for f in self._shared.zombies if not f.done())

    def start(self, claim: Claim) -> None:
        """Start the step's handler in its own task."""
        self._shared.running[claim] = None
        self._shared.idle.clear()
        claim.task = asyncio.create_task(self._execute(claim))

    async def finish_or_abandon(self, deadline: float) -> list[Claim]:
        """Give running steps until `deadline` (a second stop request cuts it short), then
        abandon what still runs to lease expiry; returns the sync steps that never started."""
        shared = self._shared
        if shared.running:
            idle = asyncio.ensure_future(shared.idle.wait())
            force = asyncio.ensure_future(shared.force_stop.wait())
            try:
                await asyncio.wait(
                    {idle, force},
                    timeout=max(deadline - time.monotonic(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                idle.cancel()
                force.cancel()
        unstarted: list[Claim] = []
        if not shared.running:
            return unstarted
        forced = shared.force_stop.is_set()
        why = "at the second stop request" if forced else "after the grace period"
        for claim in list(shared.running):
            if claim.cfuture is not None and claim.cfuture.cancel():
                unstarted.append(claim)  # a sync handler still queued for a thread
            else:
                shared.held.pop(claim, None)  # no more heartbeats: let the lease expire
                if claim.cfuture is not None:
                    shared.zombies.add(claim.cfuture)
                shared.bump("abandoned")
                shared.instruments.step(claim, "abandoned")
                logger.warning(
                    "worker %s: abandoning %s %s; its lease expires and another worker retries it",
                    shared.worker_id,
                    claim.describe(),
                    why,
                    extra=claim.log,
                )
            if claim.task is not None:
                claim.task.cancel()
        await asyncio.gather(
            *[c.task for c in list(shared.running) if c.task is not None],
            return_exceptions=True,
        )
        return unstarted

    async def close(self) -> None:
        """Cancel whatever still runs and let the pool go (its threads are not waited for)."""
        tasks = [c.task for c in self._shared.running if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._fetcher is not None:
            await self._fetcher.close()

    async def _execute(self, claim: Claim) -> None:
        """Run one step's handler and queue its outcome; never raises (except cancellation)."""
        shared = self._shared
        step = claim.step
        CURRENT_STEP.set(claim.log)  # this step's own task: its records carry its ids
        started = time.perf_counter()
        outcome: Outcome | None = None
        limit: Literal["timeout_seconds", "max_runtime"] = "timeout_seconds"
        max_runtime = step.timeout_seconds
        if max_runtime is None:
            limit, max_runtime = "max_runtime", shared.config.max_runtime
        claim.run_deadline = time.monotonic() + max_runtime
        tracer = shared.tracer
        if tracer is not None:  # the step's span, current while the handler runs
            span, span_token = tracer.start(claim, shared.worker_id)
        try:
            try:
                try:
                    handler = self._registry.resolve(step.handler)
                except PermanentError as exc:
                    if exc.error_code != "handler_not_found" or self._on_missing_handler is None:
                        raise
                    self._on_missing_handler(claim, exc)  # released, not failed
                    return
                context = StepContext.from_claimed(
                    step, worker_id=shared.worker_id, dependency_fetcher=self._fetcher
                )
                if handler.is_async:
                    result = await self._call_async(handler, context, claim, max_runtime)
                else:
                    result = await self._call_sync(handler, context, claim, max_runtime)
                outcome = outcome_from_result(
                    result,
                    fence=claim.fence,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    worker_id=shared.worker_id,
                    handler_name=step.handler,
                )
            except _StepTimedOut:
                shared.bump("timeouts")
                shared.instruments.step(claim, "timed_out")
                outcome = timeout_outcome(
                    fence=claim.fence,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    timeout_seconds=max_runtime,
                    worker_id=shared.worker_id,
                    limit=limit,
                )
            except Exception as exc:
                claim.error = exc
                outcome = outcome_from_exception(
                    exc,
                    fence=claim.fence,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    worker_id=shared.worker_id,
                )
        finally:
            shared.running.pop(claim, None)
            if not shared.running:
                shared.idle.set()
            shared.claim_wake.set()  # a slot is free
            if outcome is not None:
                self._on_outcome(claim, outcome)
            if tracer is not None:
                tracer.finish(span, span_token, claim, outcome)

    async def _call_async(
        self, handler: StepHandler, context: StepContext, claim: Claim, timeout: float
    ) -> Any:
        value: Any = handler.call(context)
        if not inspect.isawaitable(value):
            return value
        cm = asyncio.timeout(timeout)
        try:
            async with cm:
                result = await value
        except TimeoutError:
            if cm.expired():
                claim.overdue = True
                raise _StepTimedOut from None
            raise
        if cm.expired():
            # The handler swallowed the cancellation and returned after its time was up: its
            # lease is no longer extended, so the run counts as timed out all the same.
            claim.overdue = True
            raise _StepTimedOut
        return result

    async def _call_sync(
        self, handler: StepHandler, context: StepContext, claim: Claim, timeout: float
    ) -> Any:
        assert self._executor is not None and self._loop is not None
        # in a copy of this task's context, so the handler's records carry the step's ids
        cfuture = self._executor.submit(contextvars.copy_context().run, handler.call, context)
        claim.cfuture = cfuture
        afuture = asyncio.wrap_future(cfuture, loop=self._loop)
        done, _ = await asyncio.wait({afuture}, timeout=timeout)
        if done:
            return afuture.result()
        claim.overdue = True
        # Threads cannot be interrupted: stop waiting, and keep the slot taken until the thread
        # really ends so the pool is never asked for more threads than it has.
        self._shared.zombies.add(cfuture)
        loop = self._loop

        def thread_ended(future: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(self._zombie_done, future)

        cfuture.add_done_callback(thread_ended)
        logger.warning(
            "worker %s: %s ran past its max run time of %gs; reporting it as a timeout. Its "
            "thread cannot be stopped: it keeps running in the background and holds a slot "
            "until it ends",
            self._shared.worker_id,
            claim.describe(),
            timeout,
            extra=claim.log,
        )
        self._shared.check_stalled()
        raise _StepTimedOut

    def _zombie_done(self, future: concurrent.futures.Future[Any]) -> None:
        self._shared.zombies.discard(future)
        self._shared.check_stalled()
        self._shared.claim_wake.set()
