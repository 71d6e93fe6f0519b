"""The asyncio worker: claims ready steps, runs their handlers, hands the outcomes back to SQL.

PostgreSQL makes every decision (see DESIGN.md); the worker only moves work between the database
and the handlers, and does it with as few round trips as it can:

- Claiming. One claim loop per worker. A namespace is "dirty" when a notification on
  `tasker_<namespace>` arrived, when the polling fallback fires (`poll_interval`, for work that
  becomes visible by time: retries, expired leases), or when the last claim filled every free
  slot. The loop clears the flag *before* it claims, so a notification that arrives while a claim
  is in flight marks the namespace again and triggers a re-check: no wake-up is lost. Each claim
  asks for as many steps as there are free slots (capped at `max_batch`) in one
  `tasker.claim_steps` call.
- Running. Every claimed step gets an asyncio task at once. Async handlers run on the loop, sync
  handlers in a thread pool of `concurrency` threads, so the loop keeps serving while they block.
  `timeout_seconds` is enforced: an async handler is cancelled; for a sync handler the worker
  stops waiting and the thread finishes in the background (its slot stays taken until it does,
  so the pool never over-commits).
- Completing. Outcomes are buffered and flushed by a single flusher with one
  `tasker.complete_steps` call in flight at a time: at once when no handler is running (the
  latency path), else after at most `flush_delay` so that outcomes finishing together share a
  call. Concurrent flushes carrying sibling outcomes of one fan-in would wait on each other's
  commit; one flusher avoids that and batches naturally while a flush is in flight.
- Leases. A heartbeat extends, in one `tasker.extend_leases` call, the leases of every held step
  that would otherwise expire before the next heartbeat. A lease reported lost is logged; the
  handler keeps running (at-least-once) and its outcome will come back stale.
- Connections. One claim session (also used for heartbeats and releases), one flush session and
  one listener session; each reconnects on its own with capped exponential backoff after a
  `ConnectionLostError`. A batch of outcomes that was not acknowledged is sent again: outcomes
  are fenced by (step, attempt, claim_seq), so a second delivery is reported stale and changes
  nothing.
- Stopping. `request_stop()` (the CLI wires SIGTERM/SIGINT to it): stop claiming, let running
  steps finish within `grace_seconds`, flush, hand back claimed-but-unstarted steps with
  `tasker.release_steps` (no attempt spent), close. Steps still running after the grace period
  are abandoned: their leases expire and another worker retries them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tasker_pg import db
from tasker_pg.context import StepContext
from tasker_pg.errors import (
    ConfigurationError,
    ConnectionLostError,
    NotFoundError,
    PermanentError,
    TaskerError,
)
from tasker_pg.handler import StepHandler
from tasker_pg.outcome import (
    Outcome,
    outcome_from_exception,
    outcome_from_result,
    timeout_outcome,
)
from tasker_pg.registry import HandlerRegistry
from tasker_pg.template import TaskTemplate

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Reconnect backoff: first retry after 0.1 s, doubling, never more than 5 s apart.
RECONNECT_INITIAL_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
# How long the shutdown keeps trying to deliver outcomes and releases to an unreachable
# database before it gives up (the leases then expire and the steps are retried elsewhere).
SHUTDOWN_DB_TIMEOUT = 10.0
# The listener session is idle by nature; probe it this often so a dead TCP peer is noticed.
LISTENER_PROBE_INTERVAL = 30.0
# PostgreSQL truncates application_name at 63 bytes.
_APPLICATION_NAME_MAX = 63


@dataclass(frozen=True)
class WorkerStats:
    """Counters since the worker started (a snapshot; `Worker.stats` returns a fresh one).

    `succeeded`, `failed` (permanent, or out of attempts), `retried` (retryable failures that
    will run again) and `checkpointed` count outcomes the engine applied; `stale` counts outcomes
    it refused because the claim was no longer current (lease lost, step cancelled, delivered
    twice); `released` counts claims handed back unstarted at shutdown; `abandoned` counts steps
    still running when the grace period ended; `leases_lost` counts heartbeats that found a lease
    gone; `reclaimed` counts claims of steps whose previous lease had expired; `timeouts` counts
    runs abandoned after `timeout_seconds`; `reconnects` counts sessions re-opened after a lost
    connection; `claim_calls` and `flush_calls` count `claim_steps` and `complete_steps` round
    trips that succeeded (how well work is batched).
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
    reclaimed: int = 0
    timeouts: int = 0
    reconnects: int = 0
    claim_calls: int = 0
    flush_calls: int = 0

    @property
    def outcomes(self) -> int:
        """Outcomes the engine applied (of any kind)."""
        return self.succeeded + self.failed + self.retried + self.checkpointed


class _Claim:
    """One claimed step: its claim row, the fence to send back, and what the worker did with it."""

    __slots__ = (
        "attempt",
        "cfuture",
        "claim_event",
        "claim_seq",
        "handler",
        "lease_deadline",
        "lease_lost",
        "log",
        "max_attempts",
        "namespace",
        "retryable",
        "row",
        "step_name",
        "step_uuid",
        "task",
        "task_uuid",
        "timeout",
    )

    def __init__(self, row: db.Row, namespace: str, lease_deadline: float) -> None:
        self.row = row
        self.namespace = namespace
        self.step_uuid = str(row["step_uuid"])
        self.task_uuid = str(row["task_uuid"])
        self.step_name: str = row["step_name"]
        self.handler: str = row["handler"]
        self.attempt: int = row["attempt"]
        self.claim_seq: int = row["claim_seq"]
        self.max_attempts: int = row["max_attempts"]
        self.retryable: bool = row["retryable"]
        timeout = row["timeout_seconds"]
        self.timeout: float | None = float(timeout) if timeout is not None else None
        self.claim_event: str = row["claim_event"]
        # When this worker believes the lease ends (local monotonic clock, measured from before
        # the claim was sent, so it errs early).
        self.lease_deadline = lease_deadline
        self.lease_lost = False
        self.task: asyncio.Task[None] | None = None
        self.cfuture: concurrent.futures.Future[Any] | None = None
        self.log = {
            "task_uuid": self.task_uuid,
            "step_uuid": self.step_uuid,
            "step_name": self.step_name,
        }

    def fence(self) -> dict[str, Any]:
        """The claim as `extend_leases` / `release_steps` take it."""
        return {"step_uuid": self.step_uuid, "attempt": self.attempt, "claim_seq": self.claim_seq}

    def describe(self) -> str:
        """`step <name> <uuid> of task <uuid> (attempt n)`, for log messages."""
        return (
            f"step {self.step_name} {self.step_uuid} of task {self.task_uuid} "
            f"(attempt {self.attempt}/{self.max_attempts})"
        )


class _StepTimedOut(Exception):
    """Raised inside the worker (never by a handler) when a step exceeds its timeout_seconds."""


class _Session:
    """One logical database session that reconnects itself with capped exponential backoff.

    Calls are serialised by `lock` (one asyncpg connection runs one query at a time). A call that
    loses the connection drops it and raises `ConnectionLostError`; the next call reconnects,
    waiting 0.1 s, 0.2 s, ... up to 5 s between attempts, until the worker is closed.
    """

    def __init__(
        self,
        worker: Worker,
        role: str,
        on_connect: Callable[[db.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self._worker = worker
        self.role = role
        self._on_connect = on_connect
        self.conn: db.Connection | None = None
        self.lock = asyncio.Lock()
        self.ever_connected = False

    async def connect_once(self, *, check_schema: bool = False) -> db.Connection:
        """Open the connection (one attempt), name it, run the on-connect hook."""
        conn = await db.connect(self._worker.dsn, check_schema=check_schema)
        try:
            await conn.execute(
                "SELECT set_config('application_name', $1, false)",
                self._worker.application_name(self.role),
            )
            if self._on_connect is not None:
                await self._on_connect(conn)
        except BaseException:
            conn.terminate()
            raise
        if self.ever_connected:
            self._worker._bump("reconnects")
            logger.info(
                "worker %s: %s session reconnected (backend pid %d)",
                self._worker.worker_id,
                self.role,
                conn.backend_pid,
            )
        else:
            logger.info(
                "worker %s: %s session connected (backend pid %d)",
                self._worker.worker_id,
                self.role,
                conn.backend_pid,
            )
        self.ever_connected = True
        self.conn = conn
        return conn

    async def ensure(self) -> db.Connection:
        """The live connection, reconnecting with backoff; raises once the worker is closed."""
        if self.conn is not None and not self.conn.is_closed():
            return self.conn
        self.drop()
        delay = RECONNECT_INITIAL_DELAY
        while True:
            if self._worker._closed.is_set():
                raise ConnectionLostError(f"worker closed; {self.role} session not reopened")
            try:
                return await self.connect_once()
            except TaskerError as exc:  # connection refused, server starting up, ...
                logger.warning(
                    "worker %s: cannot reconnect the %s session (%s); retrying in %.1fs",
                    self._worker.worker_id,
                    self.role,
                    exc,
                    delay,
                )
            await _wait_event(self._worker._closed, delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def call(self, fn: Callable[[db.Connection], Awaitable[T]]) -> T:
        """Run `fn(conn)` on this session; a lost connection is dropped and re-raised."""
        async with self.lock:
            conn = await self.ensure()
            try:
                return await fn(conn)
            except ConnectionLostError:
                self.drop()
                raise
            # Any other TaskerError: PostgreSQL answered with an error, the session is fine.
            # (tasker_pg.db translates every driver-level failure, asyncpg's protocol-state
            # errors on a terminated backend included, into ConnectionLostError.)

    def drop(self) -> None:
        """Forget the connection (closing it without waiting)."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                conn.terminate()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


class Worker:
    """Runs the steps of one or more namespaces until stopped.

    ```python
    registry = HandlerRegistry()
    registry.register_module("myapp.handlers")
    async with Worker(["ecommerce"], registry, templates=load_templates("templates/")):
        ...  # the worker runs in the background until the block ends
    # or: await Worker(...).run()  (returns after request_stop() / stop())
    ```

    `namespaces` are the queues to work on (a template's `namespace_name`); when empty, the
    namespaces of `templates` are used. `templates` are registered at start (which also creates
    their queues). `dsn` is resolved like everywhere else (`--dsn`, `TASKER_DATABASE_URL`,
    `DATABASE_URL`, the embedded cluster).

    Tuning: `concurrency` steps run at once (also the size of the thread pool for sync handlers);
    `lease_seconds` is how long a claim is held without a heartbeat (a crashed worker's steps are
    retried after it), `heartbeat_interval` (default a third of the lease) how often running
    steps' leases are extended; `grace_seconds` how long a stop waits for running steps;
    `poll_interval` the fallback claim interval when no notification arrives; `flush_delay` the
    longest an outcome waits for others to share its flush while handlers are still running;
    `max_batch` caps the steps per claim and the outcomes per flush; `summary_interval` how often
    a one-line summary is logged at INFO (0 disables it).
    """

    def __init__(
        self,
        namespaces: Iterable[str] | str,
        registry: HandlerRegistry,
        *,
        dsn: str | None = None,
        concurrency: int = 10,
        lease_seconds: float = 30.0,
        grace_seconds: float = 30.0,
        worker_id: str | None = None,
        templates: Iterable[TaskTemplate] = (),
        poll_interval: float = 1.0,
        flush_delay: float = 0.001,
        max_batch: int = 200,
        heartbeat_interval: float | None = None,
        summary_interval: float = 30.0,
    ) -> None:
        self._templates = list(templates)
        names = [namespaces] if isinstance(namespaces, str) else list(namespaces)
        if not names:
            names = [t.namespace_name for t in self._templates]
        self.namespaces: tuple[str, ...] = tuple(dict.fromkeys(names))
        if not self.namespaces:
            raise ConfigurationError(
                "the worker has no namespace to work on: pass namespaces (--namespace NS) "
                "or templates whose namespace_name it should serve"
            )
        if heartbeat_interval is None:
            heartbeat_interval = lease_seconds / 3
        _check_positive("concurrency", concurrency, integer=True)
        _check_positive("max_batch", max_batch, integer=True)
        _check_positive("lease_seconds", lease_seconds)
        _check_positive("poll_interval", poll_interval)
        _check_positive("heartbeat_interval", heartbeat_interval)
        _check_non_negative("grace_seconds", grace_seconds)
        _check_non_negative("flush_delay", flush_delay)
        _check_non_negative("summary_interval", summary_interval)
        if heartbeat_interval >= lease_seconds:
            raise ConfigurationError(
                f"heartbeat_interval ({heartbeat_interval:g}s) must be shorter than "
                f"lease_seconds ({lease_seconds:g}s), or leases expire between heartbeats"
            )
        self.registry = registry
        self.dsn = dsn
        self.concurrency = int(concurrency)
        self.lease_seconds = float(lease_seconds)
        self.grace_seconds = float(grace_seconds)
        self.poll_interval = float(poll_interval)
        self.flush_delay = float(flush_delay)
        self.max_batch = int(max_batch)
        self.heartbeat_interval = float(heartbeat_interval)
        self.summary_interval = float(summary_interval)
        self.worker_id = worker_id or default_worker_id()

        self._counts: dict[str, int] = dict.fromkeys(WorkerStats.__dataclass_fields__, 0)
        self._summary_at = time.monotonic()
        self._summary_outcomes = 0
        self._run_started = False
        self._start_error: BaseException | None = None
        self._claim_task: asyncio.Task[None] | None = None
        self._claim_in_flight = False  # a claim_steps query is running right now
        self._claim_failures = 0  # consecutive claims lost to connection trouble
        # state shared by the loops (all touched from the event loop thread only)
        self._dirty: set[str] = set()
        self._rr = 0  # round-robin position over namespaces
        self._missing_queues: set[str] = set()
        self._running: dict[_Claim, None] = {}  # claims whose handler is running (ordered set)
        self._held: dict[_Claim, None] = {}  # claims not yet acknowledged by complete_steps
        # threads of timed-out (or abandoned) sync handlers that still run: they hold a slot
        self._zombies: set[concurrent.futures.Future[Any]] = set()
        self._outbox: list[tuple[_Claim, Outcome]] = []
        self._flush_in_flight = 0  # outcomes in the complete_steps call running now
        self._flush_broken = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._run_task: asyncio.Task[None] | None = None
        # events
        self._stop_requested = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._closed = asyncio.Event()  # final teardown: reconnect loops give up
        self._ready = asyncio.Event()
        self._claim_wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._flush_progress = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever no handler is running
        self._idle.set()
        # sessions
        self._claim_session = _Session(self, "claim")
        self._flush_session = _Session(self, "flush")
        self._listen_session = _Session(self, "listen", on_connect=self._on_listener_connect)

    def __repr__(self) -> str:
        return (
            f"<Worker {self.worker_id} namespaces={list(self.namespaces)} "
            f"concurrency={self.concurrency} running={len(self._running)}>"
        )

    # --- public API --------------------------------------------------------------------------

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the worker's counters."""
        return WorkerStats(**self._counts)

    @property
    def running_steps(self) -> int:
        """How many handlers are running right now."""
        return len(self._running)

    @property
    def abandoned_threads(self) -> int:
        """Sync handler threads still running that the worker stopped waiting for.

        They are timed-out or abandoned-at-shutdown handlers. A process that wants to exit at
        once after `run()` returns must not wait for them (see the CLI, which exits with
        `os._exit` in that case).
        """
        return sum(1 for f in self._zombies if not f.done())

    async def wait_ready(self) -> None:
        """Return once the worker is connected, has registered its templates and is listening.

        For a worker whose `run()` is running in another task. Raises the start-up error if the
        worker failed to start.
        """
        ready = asyncio.ensure_future(self._ready.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({ready, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()
        if not self._ready.is_set():
            if self._start_error is not None:
                raise self._start_error
            raise RuntimeError(f"worker {self.worker_id} stopped before it was ready")

    def request_stop(self) -> None:
        """Ask the worker to stop gracefully; safe to call from a signal handler, more than once.

        The first call stops claiming and starts the grace period; a second call ends the grace
        period at once (running steps are abandoned to lease expiry).
        """
        if self._stop_requested.is_set():
            if not self._force_stop.is_set():
                logger.warning(
                    "worker %s: second stop request, abandoning %d running step(s) now",
                    self.worker_id,
                    len(self._running),
                )
                self._force_stop.set()
            return
        self._stop_requested.set()
        self._claim_wake.set()

    async def stop(self) -> None:
        """Stop gracefully and wait until `run()` has finished."""
        self.request_stop()
        if self._run_task is not None and self._run_task is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._run_task)

    async def __aenter__(self) -> Worker:
        """Start `run()` in the background and wait until the worker is ready."""
        if self._run_task is not None:
            raise RuntimeError("this worker is already running")
        self._run_task = asyncio.create_task(self.run(), name=f"tasker-worker-{self.worker_id}")
        try:
            await self.wait_ready()
        except BaseException:
            self.request_stop()
            with contextlib.suppress(BaseException):
                await self._run_task
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.request_stop()
        assert self._run_task is not None
        await self._run_task

    async def run(self) -> None:
        """Run until `request_stop()`/`stop()`; then shut down gracefully and return.

        Raises the start-up error when the database cannot be reached or a template is refused,
        and re-raises an unexpected internal error of one of the worker's loops after shutting
        down.
        """
        if self._run_started:
            raise RuntimeError("Worker.run() can only be called once per Worker")
        self._run_started = True
        self._loop = asyncio.get_running_loop()
        loops: list[asyncio.Task[None]] = []
        try:
            try:
                await self._start()
            except BaseException as exc:
                self._start_error = exc
                raise
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix=f"tasker-{self.worker_id}"
            )
            self._claim_task = self._spawn(self._claim_loop(), "claim")
            loops = [
                self._claim_task,
                self._spawn(self._flush_loop(), "flush"),
                self._spawn(self._heartbeat_loop(), "heartbeat"),
                self._spawn(self._listen_loop(), "listen"),
            ]
            if self.summary_interval > 0:
                loops.append(self._spawn(self._summary_loop(), "summary"))
            self._ready.set()
            logger.info(
                "worker %s started: namespaces %s, concurrency %d, lease %gs, grace %gs",
                self.worker_id,
                ", ".join(self.namespaces),
                self.concurrency,
                self.lease_seconds,
                self.grace_seconds,
            )
            await self._stop_requested.wait()
            await self._shutdown()
        finally:
            self._closed.set()
            for task in loops:
                task.cancel()
            for task in [c.task for c in self._running if c.task is not None]:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            for session in (self._claim_session, self._flush_session, self._listen_session):
                await session.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
        if self._error is not None:
            raise self._error

    # --- start and stop ----------------------------------------------------------------------

    async def _start(self) -> None:
        """Connect (checking the schema once), register templates, check queues, listen."""
        conn = await self._claim_session.connect_once(check_schema=True)
        for template in self._templates:
            named_task_id = await conn.register_template(template.to_json())
            logger.info(
                "worker %s: registered template %s/%s %s (id %d)",
                self.worker_id,
                template.namespace_name,
                template.name,
                template.version,
                named_task_id,
            )
        queues = {m.queue_name for m in await conn.metrics_all()}
        for namespace in self.namespaces:
            if namespace not in queues:
                self._missing_queues.add(namespace)
                logger.warning(
                    "worker %s: namespace %r has no queue yet; it appears when a template of "
                    "that namespace is registered (tasker.register_template or --templates)",
                    self.worker_id,
                    namespace,
                )
        await self._flush_session.connect_once()
        await self._listen_session.connect_once()
        self._dirty.update(self.namespaces)

    async def _shutdown(self) -> None:
        """Stop claiming, wait for running steps (grace), flush, release, stop the loops."""
        self._claim_wake.set()
        deadline = time.monotonic() + self.grace_seconds
        logger.info(
            "worker %s stopping: %d step(s) running, grace %gs",
            self.worker_id,
            len(self._running),
            self.grace_seconds,
        )
        # 1. The claim loop ends after a claim in flight (whose rows it releases at once); one
        #    that is only waiting (or reconnecting) is stopped right away.
        assert self._claim_task is not None
        if self._claim_in_flight:
            await _wait_task(self._claim_task, deadline - time.monotonic())
        if not self._claim_task.done():
            self._claim_task.cancel()
            await asyncio.gather(self._claim_task, return_exceptions=True)
        # 2. Running steps get the grace period (a second stop request cuts it short).
        if self._running:
            idle = asyncio.ensure_future(self._idle.wait())
            force = asyncio.ensure_future(self._force_stop.wait())
            try:
                await asyncio.wait(
                    {idle, force},
                    timeout=max(deadline - time.monotonic(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                idle.cancel()
                force.cancel()
        unstarted: list[_Claim] = []
        if self._running:
            for claim in list(self._running):
                if claim.cfuture is not None and claim.cfuture.cancel():
                    unstarted.append(claim)  # a sync handler still queued for a thread
                else:
                    self._held.pop(claim, None)  # no more heartbeats: let the lease expire
                    if claim.cfuture is not None:
                        self._zombies.add(claim.cfuture)
                    self._bump("abandoned")
                    logger.warning(
                        "worker %s: abandoning %s after the grace period; its lease expires "
                        "and another worker retries it",
                        self.worker_id,
                        claim.describe(),
                        extra=claim.log,
                    )
                if claim.task is not None:
                    claim.task.cancel()
            await asyncio.gather(
                *[c.task for c in list(self._running) if c.task is not None],
                return_exceptions=True,
            )
        # 3. Flush what finished, 4. release what never started.
        await self._drain_outbox(SHUTDOWN_DB_TIMEOUT)
        if unstarted:
            await self._release(unstarted, SHUTDOWN_DB_TIMEOUT)
        self._log_summary(final=True)

    async def _drain_outbox(self, timeout: float) -> None:
        """Wait until every buffered outcome has been delivered (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while self._outbox or self._flush_in_flight:
            self._flush_progress.clear()
            if self._outbox:
                self._flush_wake.set()
            if not await _wait_event(self._flush_progress, deadline - time.monotonic()):
                logger.error(
                    "worker %s: could not deliver %d outcome(s) within %gs; their leases expire "
                    "and the steps are retried",
                    self.worker_id,
                    len(self._outbox) + self._flush_in_flight,
                    timeout,
                )
                return

    async def _release(self, claims: Sequence[_Claim], timeout: float) -> None:
        """Hand back claims whose handler never started (no attempt spent)."""
        fences = [c.fence() for c in claims]
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    rows = await self._claim_session.call(lambda conn: conn.release_steps(fences))
            except TimeoutError:
                logger.error(
                    "worker %s: could not release %d unstarted claim(s) in time; they become "
                    "visible when their leases expire",
                    self.worker_id,
                    len(claims),
                )
                return
            except ConnectionLostError as exc:
                if time.monotonic() >= deadline or self._closed.is_set():
                    logger.error("worker %s: releasing claims failed: %s", self.worker_id, exc)
                    return
                failures += 1
                await _wait_event(self._closed, _backoff(failures - 1))
                continue
            except TaskerError as exc:
                logger.error("worker %s: releasing claims failed: %s", self.worker_id, exc)
                return
            break
        released = {str(r["step_uuid"]) for r in rows if r["released"]}
        for claim in claims:
            self._held.pop(claim, None)
            if claim.step_uuid in released:
                self._bump("released")
                logger.info(
                    "worker %s: released unstarted %s",
                    self.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
            else:
                logger.info(
                    "worker %s: could not release %s (no longer held)",
                    self.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )

    # --- claiming ----------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.concurrency - len(self._running) - len(self._zombies)

    async def _claim_loop(self) -> None:
        """Claim while there are free slots and dirty namespaces; else wait for a wake-up."""
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop_requested.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self._dirty.update(self.namespaces)
                next_poll = now + self.poll_interval
            free = self._free_slots()
            if free > 0 and self._dirty and not self._flush_broken:
                namespace = self._next_dirty()
                # Clear before claiming: a notification during the claim marks it again.
                self._dirty.discard(namespace)
                qty = min(free, self.max_batch)
                claims = await self._claim(namespace, qty)
                if self._stop_requested.is_set():
                    if claims:
                        await self._release(claims, SHUTDOWN_DB_TIMEOUT)
                    return
                for claim in claims:
                    self._start_step(claim)
                if len(claims) >= qty:
                    self._dirty.add(namespace)  # it may hold more
                continue
            self._claim_wake.clear()
            await _wait_event(self._claim_wake, next_poll - time.monotonic())

    def _next_dirty(self) -> str:
        """The next dirty namespace in round-robin order (fair when slots are scarce)."""
        count = len(self.namespaces)
        for i in range(count):
            namespace = self.namespaces[(self._rr + i) % count]
            if namespace in self._dirty:
                self._rr = (self._rr + i + 1) % count
                return namespace
        return next(iter(self._dirty))

    async def _claim(self, namespace: str, qty: int) -> list[_Claim]:
        """One `claim_steps` call; connection trouble and errors yield no claims."""
        lease_deadline = time.monotonic() + self.lease_seconds

        async def claim_rows(conn: db.Connection) -> list[db.Row]:
            self._claim_in_flight = True
            try:
                return await conn.claim_steps(namespace, self.worker_id, qty, self.lease_seconds)
            finally:
                self._claim_in_flight = False

        try:
            rows = await self._claim_session.call(claim_rows)
        except ConnectionLostError as exc:
            if not self._closed.is_set():
                logger.warning(
                    "worker %s: lost the claim connection (%s); reconnecting", self.worker_id, exc
                )
                self._dirty.add(namespace)
                # The session reconnects with backoff when connecting fails; this backoff also
                # covers a session that connects but keeps failing.
                self._claim_failures += 1
                await _wait_event(self._stop_requested, _backoff(self._claim_failures - 1))
            return []
        except NotFoundError as exc:
            if namespace not in self._missing_queues:
                self._missing_queues.add(namespace)
                logger.warning(
                    "worker %s: cannot claim from %r: %s", self.worker_id, namespace, exc
                )
            return []
        except TaskerError as exc:
            logger.error(
                "worker %s: claim_steps(%r) failed: %s [%s]",
                self.worker_id,
                namespace,
                exc,
                exc.error_code,
            )
            await _wait_event(self._stop_requested, self.poll_interval)
            return []
        self._counts["claim_calls"] += 1
        self._claim_failures = 0
        if not rows:
            return []
        if namespace in self._missing_queues:
            self._missing_queues.discard(namespace)
        claims = [_Claim(row, namespace, lease_deadline) for row in rows]
        self._bump("claimed", len(claims))
        for claim in claims:
            self._held[claim] = None
            if claim.claim_event == "lease_expired":
                self._bump("reclaimed")
                logger.info(
                    "worker %s: reclaimed %s after its previous lease expired",
                    self.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "worker %s: claimed %s (%s)",
                    self.worker_id,
                    claim.describe(),
                    claim.claim_event,
                    extra=claim.log,
                )
        return claims

    # --- running handlers --------------------------------------------------------------------

    def _start_step(self, claim: _Claim) -> None:
        self._running[claim] = None
        self._idle.clear()
        claim.task = asyncio.create_task(self._execute(claim))

    async def _execute(self, claim: _Claim) -> None:
        """Run one step's handler and queue its outcome; never raises (except cancellation)."""
        started = time.perf_counter()
        outcome: Outcome | None = None
        try:
            try:
                handler = self.registry.resolve(claim.handler)
                context = StepContext.from_claim({**claim.row, "worker_id": self.worker_id})
                if handler.is_async:
                    result = await self._call_async(handler, context, claim.timeout)
                else:
                    result = await self._call_sync(handler, context, claim)
                outcome = outcome_from_result(
                    result,
                    step_uuid=claim.step_uuid,
                    attempt=claim.attempt,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    worker_id=self.worker_id,
                    handler_name=claim.handler,
                )
            except _StepTimedOut:
                self._bump("timeouts")
                outcome = timeout_outcome(
                    step_uuid=claim.step_uuid,
                    attempt=claim.attempt,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    timeout_seconds=claim.timeout or 0.0,
                    worker_id=self.worker_id,
                )
            except Exception as exc:
                outcome = outcome_from_exception(
                    exc,
                    step_uuid=claim.step_uuid,
                    attempt=claim.attempt,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    worker_id=self.worker_id,
                )
        finally:
            self._running.pop(claim, None)
            if not self._running:
                self._idle.set()
            self._claim_wake.set()  # a slot is free
            if outcome is not None:
                self._log_outcome(claim, outcome)
                self._enqueue_outcome(claim, outcome)

    async def _call_async(
        self, handler: StepHandler, context: StepContext, timeout: float | None
    ) -> Any:
        value: Any = handler.call(context)
        if not inspect.isawaitable(value):
            return value
        if timeout is None:
            return await value
        cm = asyncio.timeout(timeout)
        try:
            async with cm:
                return await value
        except TimeoutError:
            if cm.expired():
                raise _StepTimedOut from None
            raise

    async def _call_sync(self, handler: StepHandler, context: StepContext, claim: _Claim) -> Any:
        assert self._executor is not None and self._loop is not None
        cfuture = self._executor.submit(handler.call, context)
        claim.cfuture = cfuture
        afuture = asyncio.wrap_future(cfuture, loop=self._loop)
        if claim.timeout is None:
            return await afuture
        done, _ = await asyncio.wait({afuture}, timeout=claim.timeout)
        if done:
            return afuture.result()
        # Threads cannot be interrupted: stop waiting, and keep the slot taken until the thread
        # really ends so the pool is never asked for more threads than it has.
        self._zombies.add(cfuture)
        loop = self._loop

        def thread_ended(future: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(self._zombie_done, future)

        cfuture.add_done_callback(thread_ended)
        logger.warning(
            "worker %s: %s exceeded its timeout of %gs; its thread keeps running in the "
            "background and holds a slot until it ends",
            self.worker_id,
            claim.describe(),
            claim.timeout,
            extra=claim.log,
        )
        raise _StepTimedOut

    def _zombie_done(self, future: concurrent.futures.Future[Any]) -> None:
        self._zombies.discard(future)
        self._claim_wake.set()

    def _log_outcome(self, claim: _Claim, outcome: Outcome) -> None:
        kind = outcome["kind"]
        if kind == "failure":
            error = outcome["error"]
            retryable = error["retryable"]
            logger.log(
                logging.WARNING if retryable else logging.ERROR,
                "worker %s: %s failed (%s%s, %s): %s",
                self.worker_id,
                claim.describe(),
                error["error_type"],
                f"/{error['error_code']}" if error.get("error_code") else "",
                "retryable" if retryable else "permanent",
                error["message"],
                extra=claim.log,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "worker %s: %s finished: %s in %.1f ms",
                self.worker_id,
                claim.describe(),
                kind,
                outcome["duration_ms"],
                extra=claim.log,
            )

    # --- flushing outcomes -------------------------------------------------------------------

    def _enqueue_outcome(self, claim: _Claim, outcome: Outcome) -> None:
        """Buffer an outcome; flush at once when no handler runs, else within flush_delay."""
        outcome["claim_seq"] = claim.claim_seq
        self._outbox.append((claim, outcome))
        if not self._running or len(self._outbox) >= self.max_batch or self.flush_delay == 0:
            self._flush_wake.set()
        elif self._flush_timer is None and self._loop is not None:
            self._flush_timer = self._loop.call_later(self.flush_delay, self._flush_wake.set)

    async def _flush_loop(self) -> None:
        """The single flusher: one complete_steps call in flight at a time."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if not self._outbox:
                self._flush_progress.set()
                continue
            batch = self._outbox[: self.max_batch]
            del self._outbox[: self.max_batch]
            if self._outbox:
                self._flush_wake.set()
            self._flush_in_flight = len(batch)
            try:
                await self._deliver(batch)
            finally:
                self._flush_in_flight = 0
                self._flush_progress.set()

    async def _deliver(self, batch: list[tuple[_Claim, Outcome]]) -> None:
        """Send one batch until it is acknowledged (re-sending after a lost connection)."""
        outcomes = [outcome for _, outcome in batch]
        failures = 0
        while True:
            try:
                rows = await self._flush_session.call(lambda conn: conn.complete_steps(outcomes))
            except ConnectionLostError as exc:
                failures += 1
                if self._closed.is_set():
                    logger.error(
                        "worker %s: dropping %d undelivered outcome(s) at close",
                        self.worker_id,
                        len(batch),
                    )
                    return
                if not self._flush_broken:
                    logger.warning(
                        "worker %s: lost the flush connection (%s); re-sending %d outcome(s) "
                        "after reconnecting",
                        self.worker_id,
                        exc,
                        len(batch),
                    )
                self._flush_broken = True
                # Re-send at once after the first loss (a reconnect is usually all it takes),
                # then back off.
                await _wait_event(self._closed, _backoff(failures - 1))
                continue
            except TaskerError as exc:  # the engine refused the batch: find the culprit(s)
                await self._deliver_singly(batch, exc)
                return
            self._counts["flush_calls"] += 1
            if self._flush_broken:
                self._flush_broken = False
                self._claim_wake.set()
            self._acknowledge(batch, rows)
            return

    async def _deliver_singly(
        self, batch: list[tuple[_Claim, Outcome]], error: TaskerError
    ) -> None:
        """After a batch error: send outcomes one by one; turn a refused one into a failure."""
        if len(batch) > 1:
            logger.warning(
                "worker %s: complete_steps refused a batch of %d (%s); sending one by one",
                self.worker_id,
                len(batch),
                error,
            )
            for item in batch:
                await self._deliver([item])
            return
        claim, outcome = batch[0]
        if outcome["kind"] != "failure":
            # The engine refused what the handler produced (e.g. an oversized result): store the
            # refusal as a permanent failure naming the problem instead of losing the outcome.
            code = error.error_code or "invalid_result"
            logger.error(
                "worker %s: the engine refused the %s outcome of %s: %s",
                self.worker_id,
                outcome["kind"],
                claim.describe(),
                error,
                extra=claim.log,
            )
            replacement = outcome_from_exception(
                PermanentError(
                    f"the engine refused the step's {outcome['kind']} outcome: {error}",
                    error_code=code,
                ),
                step_uuid=claim.step_uuid,
                attempt=claim.attempt,
                duration_ms=outcome["duration_ms"],
                worker_id=self.worker_id,
            )
            replacement["error"]["error_type"] = "invalid_result"
            replacement["claim_seq"] = claim.claim_seq
            await self._deliver([(claim, replacement)])
            return
        logger.error(
            "worker %s: the engine refused the failure outcome of %s (%s); dropping it, the "
            "lease expires and the step is retried",
            self.worker_id,
            claim.describe(),
            error,
            extra=claim.log,
        )
        self._held.pop(claim, None)

    def _acknowledge(self, batch: list[tuple[_Claim, Outcome]], rows: Sequence[db.Row]) -> None:
        """Count what complete_steps applied, log what it found stale, forget the claims."""
        status: dict[tuple[str, int], tuple[str, str | None]] = {
            (str(r["step_uuid"]), r["attempt"]): (r["status"], r["detail"]) for r in rows
        }
        counts = {"succeeded": 0, "failed": 0, "retried": 0, "checkpointed": 0, "stale": 0}
        for claim, outcome in batch:
            self._held.pop(claim, None)
            state, detail = status.get((claim.step_uuid, claim.attempt), ("applied", None))
            if state == "stale":
                counts["stale"] += 1
                logger.log(
                    logging.WARNING if claim.lease_lost else logging.INFO,
                    "worker %s: outcome (%s) of %s was stale and changed nothing: %s",
                    self.worker_id,
                    outcome["kind"],
                    claim.describe(),
                    detail,
                    extra=claim.log,
                )
                continue
            kind = outcome["kind"]
            if kind == "success":
                counts["succeeded"] += 1
            elif kind == "checkpoint":
                counts["checkpointed"] += 1
            elif detail == "waiting_for_retry" or (
                detail is None
                and outcome["error"]["retryable"]
                and claim.retryable
                and claim.attempt < claim.max_attempts
            ):
                counts["retried"] += 1  # complete_steps' detail is the step's new state
            else:
                counts["failed"] += 1
        for key, value in counts.items():
            self._counts[key] += value

    # --- leases ------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Every heartbeat_interval, extend the leases that would lapse before the next one."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        """One `extend_leases` call for every held claim whose lease ends within two intervals."""
        horizon = time.monotonic() + 2 * self.heartbeat_interval
        due = [c for c in self._held if not c.lease_lost and c.lease_deadline < horizon]
        if not due:
            return
        fences = [c.fence() for c in due]
        sent_at = time.monotonic()
        try:
            rows = await self._claim_session.call(
                lambda conn: conn.extend_leases(fences, self.lease_seconds)
            )
        except ConnectionLostError as exc:
            logger.warning(
                "worker %s: heartbeat for %d step(s) failed (%s)", self.worker_id, len(due), exc
            )
            return
        except TaskerError as exc:
            logger.error("worker %s: extend_leases failed: %s", self.worker_id, exc)
            return
        extended = {str(r["step_uuid"]): bool(r["extended"]) for r in rows}
        for claim in due:
            if extended.get(claim.step_uuid, False):
                claim.lease_deadline = sent_at + self.lease_seconds
            elif claim in self._held:
                claim.lease_lost = True
                self._bump("leases_lost")
                logger.warning(
                    "worker %s: lost the lease of %s; another worker may run it now, and this "
                    "run's outcome will be stale",
                    self.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )

    # --- listening ---------------------------------------------------------------------------

    async def _on_listener_connect(self, conn: db.Connection) -> None:
        for namespace in self.namespaces:
            await conn.listen(f"tasker_{namespace}", self._on_notification)
        # Notifications sent while we were not listening are lost: look at every queue.
        self._dirty.update(self.namespaces)
        self._claim_wake.set()

    def _on_notification(self, channel: str, _payload: str) -> None:
        namespace = channel.removeprefix("tasker_")
        if namespace not in self._dirty:
            self._dirty.add(namespace)
            self._claim_wake.set()

    async def _listen_loop(self) -> None:
        """Keep the listener session alive; reconnecting re-subscribes and re-checks the queues."""
        last_probe = time.monotonic()
        while True:
            try:
                conn = await self._listen_session.ensure()
            except ConnectionLostError:
                return  # closed
            if await _wait_event(self._closed, self.poll_interval):
                return
            if conn.is_closed():
                logger.warning(
                    "worker %s: lost the listener connection; reconnecting", self.worker_id
                )
                self._listen_session.drop()
                continue
            if time.monotonic() - last_probe >= LISTENER_PROBE_INTERVAL:
                last_probe = time.monotonic()
                try:
                    await self._listen_session.call(lambda c: c.execute("SELECT 1", timeout=10))
                except ConnectionLostError:
                    logger.warning(
                        "worker %s: listener connection probe failed; reconnecting", self.worker_id
                    )

    # --- bookkeeping -------------------------------------------------------------------------

    def _bump(self, counter: str, by: int = 1) -> None:
        self._counts[counter] += by

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.summary_interval)
            self._log_summary()

    def _log_summary(self, *, final: bool = False) -> None:
        now = time.monotonic()
        s = self.stats
        elapsed = now - self._summary_at
        rate = (s.outcomes - self._summary_outcomes) / elapsed if elapsed > 0 else 0.0
        self._summary_at = now
        self._summary_outcomes = s.outcomes
        logger.info(
            "worker %s%s: claimed=%d succeeded=%d failed=%d retried=%d stale=%d running=%d "
            "steps/s=%.1f",
            self.worker_id,
            " final" if final else "",
            s.claimed,
            s.succeeded,
            s.failed,
            s.retried,
            s.stale,
            len(self._running),
            rate,
        )

    def application_name(self, role: str) -> str:
        """The `application_name` of this worker's sessions: `tasker-pg worker <id> <role>`."""
        name = f"tasker-pg worker {self.worker_id} {role}"
        return name.encode("utf-8")[:_APPLICATION_NAME_MAX].decode("utf-8", errors="ignore")

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Start one of the worker's loops; an unexpected error in it stops the worker."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("worker %s: the %s loop failed; stopping", self.worker_id, name)
                if self._error is None:
                    self._error = exc
                self.request_stop()

        return asyncio.create_task(guarded(), name=f"tasker-worker-{self.worker_id}-{name}")


def default_worker_id() -> str:
    """`<host>-<pid>-<random>`: unique enough to tell workers apart in logs and audit rows."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _backoff(failures: int) -> float:
    """Seconds to wait after `failures` consecutive failures: 0, then 0.1 s doubling up to 5 s."""
    if failures <= 0:
        return 0.0
    return min(RECONNECT_INITIAL_DELAY * 2.0 ** (failures - 1), RECONNECT_MAX_DELAY)


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds; whether it is set."""
    if event.is_set():
        return True
    if timeout is not None and timeout <= 0:
        return False
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def _wait_task(task: asyncio.Task[None], timeout: float) -> bool:
    """Wait for `task` at most `timeout` seconds without cancelling it; whether it is done."""
    if not task.done():
        await asyncio.wait({task}, timeout=max(timeout, 0))
    return task.done()


def _check_positive(name: str, value: float, *, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if not value > 0:
        raise ConfigurationError(f"{name} must be > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigurationError(f"{name} must be >= 0, got {value!r}")
