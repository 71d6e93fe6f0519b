"""The worker's metrics port: `/metrics` (its own metrics, and the engine's when it exports
them), `/healthz` and `/readyz`.

Built only when the worker has a `metrics_port`; `tasker_pg.metrics` (and so prometheus-client)
is imported then and not before.

- `/healthz`: the worker runs and its three sessions (claim, flush, listen) are connected. It
  fails while a session reconnects (a database outage), so give a liveness probe a failure
  threshold longer than an outage you would ride out.
- `/readyz`: the worker can claim: started and not stopping, not stalled (`Worker.health`),
  outcomes being delivered, and the schema current (checked on the listener session at most
  every `SCHEMA_RECHECK` seconds: a newer tasker-pg may have migrated the database meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tasker_pg import db
from tasker_pg.errors import ConfigurationError, SchemaError, TaskerError
from tasker_pg.worker.session import Session
from tasker_pg.worker.state import Shared

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tasker_pg.metrics import EngineMetrics, MetricsServer

logger = logging.getLogger(__name__)

SCHEMA_RECHECK = 30.0


class Observer:
    """The worker's metrics registry, its HTTP server and its probes."""

    def __init__(
        self,
        shared: Shared,
        sessions: dict[str, Session],
        outcomes_waiting: Callable[[], int],
        delivery_broken: Callable[[], bool],
        ready: asyncio.Event,
    ) -> None:
        from tasker_pg import metrics

        self._metrics = metrics
        self._shared = shared
        self._sessions = sessions
        self._outcomes_waiting = outcomes_waiting
        self._delivery_broken = delivery_broken
        self._ready = ready
        self.registry = metrics.new_registry()
        metrics.add_process_collectors(self.registry)
        shared.instruments = metrics.PrometheusInstruments(self.registry)
        self.registry.register(metrics.GaugeCollector(self._worker_gauges))
        self.engine: EngineMetrics | None = None
        self.server: MetricsServer | None = None
        self._schema_checked_at: float | None = None
        self._schema_error: str | None = None

    async def start(self) -> None:
        """Serve (the port is bound here; an error binding it is raised)."""
        config = self._shared.config
        assert config.metrics_port is not None
        loop = asyncio.get_running_loop()
        if config.export_engine_metrics:
            self.engine = self._metrics.EngineMetrics(
                config.dsn,
                elect=True,
                application_name=config.application_name("metrics"),
                server_settings=dict(config.server_settings),
            )
            self.registry.register(self.engine.collector(loop))
        try:
            self.server = self._metrics.MetricsServer(
                self.registry,
                loop,
                host=config.metrics_host,
                port=config.metrics_port,
                healthz=self.healthz,
                readyz=self.readyz,
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}"
            ) from exc
        self.server.start()
        logger.info(
            "worker %s: serving /metrics, /healthz and /readyz on %s:%d%s",
            self._shared.worker_id,
            config.metrics_host,
            self.server.port,
            " (and the engine metrics when elected)" if self.engine is not None else "",
        )

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None
        if self.engine is not None:
            await self.engine.close()

    @property
    def port(self) -> int | None:
        return self.server.port if self.server is not None else None

    def _connected(self) -> dict[str, bool]:
        return {
            role: s.conn is not None and not s.conn.is_closed()
            for role, s in self._sessions.items()
        }

    async def healthz(self) -> tuple[bool, dict[str, Any]]:
        shared = self._shared
        sessions = self._connected()
        ok = self._ready.is_set() and not shared.closed.is_set() and all(sessions.values())
        return ok, {"worker_id": shared.worker_id, "sessions": sessions}

    async def readyz(self) -> tuple[bool, dict[str, Any]]:
        shared = self._shared
        alive, details = await self.healthz()
        health = shared.health(self._outcomes_waiting())
        reasons: list[str] = []
        if not self._ready.is_set():
            reasons.append("starting")
        if shared.stop_requested.is_set():
            reasons.append("stopping")
        if not alive:
            reasons.append("a session is not connected")
        if health.status != "ok":
            reasons.append(f"{health.status}: {health.overdue} overdue handler(s)")
        if self._delivery_broken():
            reasons.append("outcomes cannot be delivered")
        if alive:
            schema_error = await self._schema_check()
            if schema_error is not None:
                reasons.append(f"schema: {schema_error}")
        details.update(
            {
                "free_slots": health.free_slots,
                "running": health.running,
                "outcomes_waiting": health.outcomes_waiting,
                "reasons": reasons,
            }
        )
        return not reasons, details

    async def _schema_check(self) -> str | None:
        now = time.monotonic()
        if self._schema_checked_at is not None and now - self._schema_checked_at < SCHEMA_RECHECK:
            return self._schema_error
        session = self._sessions["listen"]
        try:
            await session.call(db.check_schema)
        except SchemaError as exc:
            self._schema_error = exc.message
        except TaskerError as exc:
            return f"not checked: {exc}"  # not cached: tried again at the next probe
        else:
            self._schema_error = None
        self._schema_checked_at = now
        return self._schema_error

    def _worker_gauges(self) -> list[Metric]:
        """Read from the HTTP server's thread: lengths and flags only (atomic reads)."""
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        shared = self._shared
        config = shared.config
        running = len(shared.running)
        return [
            InfoMetricFamily(
                "tasker_worker",
                "The worker serving this port",
                value={"worker_id": shared.worker_id, "namespaces": ",".join(config.namespaces)},
            ),
            GaugeMetricFamily(
                "tasker_worker_concurrency", "Steps the worker runs at once", config.concurrency
            ),
            GaugeMetricFamily(
                "tasker_worker_in_flight_steps",
                "Claims held: running, or finished and not acknowledged by the database yet",
                len(shared.held),
            ),
            GaugeMetricFamily("tasker_worker_running_steps", "Handlers running now", running),
            GaugeMetricFamily(
                "tasker_worker_free_slots",
                "Steps the worker could claim now",
                max(config.concurrency - running - len(shared.zombies), 0),
            ),
            GaugeMetricFamily(
                "tasker_worker_outcomes_waiting",
                "Outcomes not acknowledged by the database yet",
                self._outcomes_waiting(),
            ),
            GaugeMetricFamily(
                "tasker_worker_stalled",
                "1 while every slot is held by a handler past its max run time",
                1.0 if shared.stalled else 0.0,
            ),
        ]
