"""`Worker`: the public face of the worker, composed of its parts (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING

from tasker_pg.registry import HandlerRegistry
from tasker_pg.rows import ClaimedStep
from tasker_pg.template import TaskTemplate
from tasker_pg.worker import entry, handler_check
from tasker_pg.worker.claiming import SHUTDOWN_DB_TIMEOUT, Claimer
from tasker_pg.worker.config import DEFAULT_MAX_RUNTIME, DEFAULT_OUTCOME_RETRY_CAP, WorkerConfig
from tasker_pg.worker.delivery import Deliverer
from tasker_pg.worker.leases import Leases
from tasker_pg.worker.maintenance import Maintenance
from tasker_pg.worker.running import Runner
from tasker_pg.worker.session import Session
from tasker_pg.worker.state import Claim, Shared, WorkerHealth, WorkerStats
from tasker_pg.worker.steplog import Summary

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from tasker_pg.worker.observing import Observer

logger = logging.getLogger(__name__)


class Worker:
    """Runs the steps of one or more namespaces until stopped.

    In a script, `Worker(["ecommerce"], registry).run_forever()` blocks until Ctrl-C or SIGTERM
    and then stops gracefully. In async code:

    ```python
    async with Worker(["ecommerce"], registry, templates=load_templates("templates/")):
        ...  # the worker runs in the background until the block ends
    # or: await Worker(...).run()  (returns after request_stop() / stop())
    ```

    `namespaces` are the queues to work on (a template's `namespace_name`); when empty, the
    namespaces of `templates` are used. `templates` are registered at start (which also creates
    their queues). `dsn` is resolved like everywhere else (`--dsn`, `TASKER_DATABASE_URL`,
    `DATABASE_URL`, the embedded cluster).

    Tuning (kept in `config`): `concurrency` steps run at once (also the size of the thread pool
    for sync handlers); `lease_seconds` is how long a claim is held without a heartbeat (a
    crashed worker's steps are retried after it), `heartbeat_interval` (default a third of the
    lease) how often running steps' leases are extended; `grace_seconds` how long a stop waits
    for running steps; `poll_interval` the fallback claim interval when no notification
    arrives; `flush_delay` the longest an outcome waits for others to share its flush while
    handlers are still running; `max_batch` caps the steps per claim and the outcomes per flush;
    `handoff` (default on) lets a flush take the children its successes make ready in the same
    call (`tasker.complete_and_claim`) when a success leaves the worker idle, so a hop costs one
    round trip;
    `summary_interval` how often a one-line summary is logged at INFO (0 disables it);
    `repair_interval` how often the worker calls `tasker.repair_messages()` (one worker at a
    time; 0 disables it); `retention_interval` how often it calls `tasker.purge_finished()`
    (deletes the tasks the namespaces' retention policies no longer keep, one batch per call,
    again after a pause four times as long as the batch while batches come back full, one
    worker at a time; 0 disables it); `schedule_interval` how often it calls
    `tasker.fire_due_schedules()` (creates the tasks of due schedule slots, one worker at a
    time; 0 disables it); `wake_interval` how often it calls `tasker.wake_waits()`
    (ends due sleeps, applies wait timeouts, matches events that came before their waits; one
    worker at a time; 0 disables it; default 1 s);
    `missing_handler_delay` how long a step whose handler this worker
    lacks stays hidden after the worker hands it back (no attempt spent).

    Bounds: `max_runtime` is how long a handler may run per claim when its step has no
    `timeout_seconds` (default 1 hour); past it the step fails retryably with error_code
    `timeout`. `outcome_retry_cap` is how long an outcome the database has not acknowledged
    (lock or statement timeouts, lost connections) is sent again, its lease kept (default 10
    minutes); past it the worker lets the lease expire and the engine retries the step.
    `server_settings` are PostgreSQL settings of every session the worker opens (e.g.
    `{"lock_timeout": "5s"}`).

    Observing: with `metrics_port` (0: any free port; `metrics_port` then says which) the worker
    serves `/metrics` (Prometheus), `/healthz` and `/readyz` on `metrics_host` (default all
    interfaces); it needs the `metrics` extra (prometheus-client). `export_engine_metrics` adds
    the gauges of `tasker.engine_metrics()`, exported by one worker per database at a time.

    Tracing: with `tracing=True` every step run is an OpenTelemetry span (`tasker_pg.tracing`),
    sent to the global TracerProvider the application configured
    (`opentelemetry.trace.set_tracer_provider`), or to `tracer_provider` when given (which turns
    tracing on by itself); it needs the `otel` extra. Without either, no span is made.
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
        repair_interval: float = 60.0,
        missing_handler_delay: float = 10.0,
        max_runtime: float = DEFAULT_MAX_RUNTIME,
        outcome_retry_cap: float = DEFAULT_OUTCOME_RETRY_CAP,
        server_settings: Mapping[str, str] | None = None,
        retention_interval: float = 300.0,
        schedule_interval: float = 10.0,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        export_engine_metrics: bool = False,
        handoff: bool = True,
        tracing: bool = False,
        wake_interval: float = 1.0,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._templates = list(templates)
        names = [namespaces] if isinstance(namespaces, str) else list(namespaces)
        self.config = WorkerConfig.build(
            names or [t.namespace_name for t in self._templates],
            worker_id=worker_id,
            dsn=dsn,
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            grace_seconds=grace_seconds,
            poll_interval=poll_interval,
            flush_delay=flush_delay,
            max_batch=max_batch,
            heartbeat_interval=heartbeat_interval,
            summary_interval=summary_interval,
            repair_interval=repair_interval,
            missing_handler_delay=missing_handler_delay,
            max_runtime=max_runtime,
            outcome_retry_cap=outcome_retry_cap,
            server_settings=server_settings,
            retention_interval=retention_interval,
            schedule_interval=schedule_interval,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            export_engine_metrics=export_engine_metrics,
            handoff=handoff,
            wake_interval=wake_interval,
        )
        if metrics_port is not None:
            from tasker_pg.metrics import require_prometheus

            require_prometheus()
        self.registry = registry
        self.dsn = dsn
        self.namespaces = self.config.namespaces
        self.worker_id = self.config.worker_id
        shared = self._shared = Shared(self.config)
        if tracing or tracer_provider is not None:
            from tasker_pg.tracing import StepTracer

            shared.tracer = StepTracer(tracer_provider)
        self._claim_session = Session(shared, "claim")
        self._flush_session = Session(shared, "flush")
        self._deliverer = Deliverer(shared, self._flush_session, self._take_handoff)
        self._leases = Leases(shared, self._claim_session)
        self._claimer = Claimer(
            shared,
            self._claim_session,
            self._leases,
            self._start_step,
            paused=lambda: self._deliverer.broken,
        )
        # on the listener session, which is idle by nature
        self._maintenance = Maintenance(shared, self._claimer.listen_session, registry)
        self._runner = Runner(
            shared,
            registry,
            self._deliverer.enqueue,
            on_missing_handler=self._maintenance.handler_missing,
        )
        self._summary = Summary(shared)
        self._ready = asyncio.Event()
        self._observer: Observer | None = None
        if self.config.metrics_port is not None:
            from tasker_pg.worker.observing import Observer

            self._observer = Observer(
                shared,
                {
                    "claim": self._claim_session,
                    "flush": self._flush_session,
                    "listen": self._claimer.listen_session,
                },
                outcomes_waiting=lambda: self._deliverer.waiting,
                delivery_broken=lambda: self._deliverer.broken,
                ready=self._ready,
            )
        self._run_started = False
        self._start_error: BaseException | None = None
        self._error: BaseException | None = None
        self._run_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Worker {self.worker_id} namespaces={list(self.namespaces)} "
            f"concurrency={self.config.concurrency} running={self.running_steps}>"
        )

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the worker's counters."""
        return self._shared.stats()

    @property
    def health(self) -> WorkerHealth:
        """What the worker can do right now: "stalled" when every slot is held by a handler
        that ran past its max run time, with the counts behind it (see `WorkerHealth`)."""
        return self._shared.health(self._deliverer.waiting)

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics, /healthz and /readyz while the worker runs (None when
        metrics are off or not served yet)."""
        return self._observer.port if self._observer is not None else None

    @property
    def metrics_registry(self) -> CollectorRegistry | None:
        """The worker's own Prometheus registry (None when metrics are off)."""
        return self._observer.registry if self._observer is not None else None

    @property
    def running_steps(self) -> int:
        """How many handlers are running right now."""
        return len(self._shared.running)

    @property
    def abandoned_threads(self) -> int:
        """Sync handler threads still running that the worker stopped waiting for.

        They are timed-out or abandoned-at-shutdown handlers. A process that wants to exit at
        once after `run()` returns must not wait for them (see the CLI, which exits with
        `os._exit` in that case).
        """
        return self._runner.abandoned_threads

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (the worker may still be finishing running steps)."""
        return self._shared.stop_requested.is_set()

    async def wait_ready(self) -> None:
        """Return once the worker is connected, has registered its templates and is listening.

        For a worker whose `run()` is running in another task. Raises the start-up error if the
        worker failed to start.
        """
        ready = asyncio.ensure_future(self._ready.wait())
        closed = asyncio.ensure_future(self._shared.closed.wait())
        try:
            await asyncio.wait({ready, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()
        if not self._ready.is_set():
            if self._start_error is not None:
                raise self._start_error
            raise RuntimeError(f"worker {self.worker_id} stopped before it was ready")

    def request_stop(self, *, reason: str | None = None) -> None:
        """Ask the worker to stop gracefully; safe to call from a signal handler, more than once.

        The first call stops claiming and starts the grace period; a second call ends the grace
        period at once (running steps are abandoned to lease expiry).
        """
        shared = self._shared
        if shared.stop_requested.is_set():
            if not shared.force_stop.is_set():
                logger.warning(
                    "worker %s: second stop request%s: abandoning %d running step(s) now",
                    self.worker_id,
                    f" ({reason})" if reason else "",
                    len(shared.running),
                )
                shared.force_stop.set()
            return
        shared.stop_requested.set()
        shared.claim_wake.set()

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

    def run_forever(self) -> None:
        """Run until Ctrl-C (SIGINT) or SIGTERM, then stop gracefully and return: for scripts.

        Starts its own event loop, and sends log records at INFO to stderr when logging is not
        configured yet. On the first signal the worker stops claiming, lets running steps finish
        within `grace_seconds`, delivers their outcomes and hands back unstarted claims; a
        second signal abandons running steps at once (their leases expire and another worker
        retries them). Raises the start-up error when the database cannot be reached.
        """
        entry.run_forever(self)

    async def run(self) -> None:
        """Run until `request_stop()`/`stop()`; then shut down gracefully and return.

        A coroutine: `await worker.run()` from async code. A script that just wants to run a
        worker calls `worker.run_forever()` instead. Raises the start-up error when the database
        cannot be reached or a template is refused, and re-raises an unexpected internal error
        of one of the worker's loops after shutting down.
        """
        if self._run_started:
            raise RuntimeError("Worker.run() can only be called once per Worker")
        self._run_started = True
        shared, config = self._shared, self.config
        loops: list[asyncio.Task[None]] = []
        try:
            try:
                if self._observer is not None:
                    await self._observer.start()
                await self._start()
            except BaseException as exc:
                self._start_error = exc
                raise
            self._runner.open()
            self._claimer.task = self._spawn(self._claimer.loop(), "claim")
            loops = [
                self._claimer.task,
                self._spawn(self._deliverer.loop(), "flush"),
                self._spawn(self._leases.heartbeat_loop(), "heartbeat"),
                self._spawn(self._claimer.listen_loop(), "listen"),
                self._spawn(self._maintenance.loop(), "maintenance"),
            ]
            if config.summary_interval > 0:
                loops.append(self._spawn(self._summary.loop(), "summary"))
            self._ready.set()
            logger.info(
                "worker %s started: namespaces %s, concurrency %d, lease %gs, grace %gs",
                self.worker_id,
                ", ".join(self.namespaces),
                config.concurrency,
                config.lease_seconds,
                config.grace_seconds,
            )
            await shared.stop_requested.wait()
            await self._shutdown()
        finally:
            shared.closed.set()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            self._deliverer.close()
            await self._runner.close()
            if self._observer is not None:
                await self._observer.stop()
            for session in (self._claim_session, self._flush_session, self._claimer.listen_session):
                await session.close()
        if self._error is not None:
            raise self._error

    async def _start(self) -> None:
        """Connect (checking the schema once), register templates, check queues and handlers."""
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
                self._claimer.missing_queues.add(namespace)
                logger.warning(
                    "worker %s: namespace %r has no queue yet; it appears when a template of "
                    "that namespace is registered (tasker.register_template or --templates)",
                    self.worker_id,
                    namespace,
                )
        uses = handler_check.uses_of_templates(self._templates)
        uses += handler_check.uses_of_rows(await conn.latest_templates(self.namespaces))
        handler_check.warn_unknown_handlers(self.worker_id, self.registry, uses)
        await self._flush_session.connect_once()
        await self._claimer.listen_session.connect_once()
        self._claimer.dirty.update(self.namespaces)

    async def _shutdown(self) -> None:
        """Stop claiming, wait for running steps (grace), flush, release what never started."""
        self._shared.claim_wake.set()
        deadline = time.monotonic() + self.config.grace_seconds
        logger.info(
            "worker %s stopping: %d step(s) running, grace %gs",
            self.worker_id,
            self.running_steps,
            self.config.grace_seconds,
        )
        await self._claimer.stop(deadline)
        unstarted = await self._runner.finish_or_abandon(deadline)
        await self._deliverer.drain(SHUTDOWN_DB_TIMEOUT)
        await self._maintenance.drain(SHUTDOWN_DB_TIMEOUT)
        if unstarted:
            await self._leases.release(unstarted, SHUTDOWN_DB_TIMEOUT)
        self._summary.log(final=True)

    def _start_step(self, claim: Claim) -> None:
        self._runner.start(claim)

    async def _take_handoff(self, steps: list[ClaimedStep], lease_deadline: float) -> None:
        """Start the steps a flush was handed (released at once when the worker is stopping)."""
        shared = self._shared
        claims = self._claimer.adopt(steps, lease_deadline)
        shared.bump("handed_off", len(claims))
        if shared.stop_requested.is_set():
            await self._leases.release(claims, SHUTDOWN_DB_TIMEOUT)
            return
        for claim in claims:
            self._start_step(claim)

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
