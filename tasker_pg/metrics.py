"""Prometheus metrics: the worker's own, the engine's gauges, and the small HTTP server for both.

Needs the optional extra `metrics` (`pip install 'tasker-pg[metrics]'`, the `prometheus-client`
library); nothing else in tasker-pg imports it, and `require_prometheus()` names the extra when it
is missing.

- `PrometheusInstruments` fills the worker's hooks (`tasker_pg.worker.instruments`) with
  `tasker_steps_total{namespace,step,outcome}`, `tasker_step_duration_seconds{namespace,step}`,
  `tasker_claim_duration_seconds{namespace}`, `tasker_flush_duration_seconds`,
  `tasker_lease_extensions_total` and `tasker_reconnects_total{session}`; `step` is the template
  step name (batch workers share their template's), so the label's values are bounded by the
  templates.
- `EngineMetrics` reads `tasker.engine_metrics()` on a connection of its own and exports it as
  gauges (`tasker_namespace_ready_steps{namespace}`, ...). With `elect=True` (workers) only the
  session holding an advisory lock on a fixed key reads it; the others export
  `tasker_engine_metrics_exporter 0` and no engine gauges, and try for the lock again at each
  scrape. A scrape within `min_interval` of the previous read reuses it.
- `MetricsServer` serves `/metrics`, `/healthz` and `/readyz` from one thread-per-request WSGI
  server (the standard library's) in a background thread. The probes are coroutines run on the
  owner's event loop, so they see the worker's state from the thread that owns it.

Every collector is registered in a `CollectorRegistry` of its own (per worker), never in
prometheus-client's global one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tasker_pg import db
from tasker_pg.errors import ConfigurationError, TaskerError
from tasker_pg.worker.instruments import Instruments

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from tasker_pg.worker.state import Claim

logger = logging.getLogger(__name__)

EXTRA_HINT = "install the metrics extra: pip install 'tasker-pg[metrics]'"

# Handler run times: from a few milliseconds to the default max run time (1 hour).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# Database round trips.
ROUND_TRIP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# The advisory lock (per database) whose holder exports the engine gauges among workers.
EXPORTER_LOCK_SQL = (
    "SELECT pg_try_advisory_lock(hashtextextended('tasker.engine_metrics_exporter', 0))"
)
# Seconds a probe or a scrape waits for the event loop (and the database) to answer.
PROBE_TIMEOUT = 5.0

# tasker.engine_metrics() rows -> (Prometheus name, help, label name of `label` or None).
ENGINE_GAUGES: dict[str, tuple[str, str, str | None]] = {
    "ready_steps": (
        "tasker_namespace_ready_steps",
        "Steps ready to run now (visible messages of enqueued, retry-due and continued steps)",
        None,
    ),
    "in_flight_steps": (
        "tasker_namespace_in_flight_steps",
        "Steps claimed by a worker whose lease has not expired",
        None,
    ),
    "delayed_steps": (
        "tasker_namespace_delayed_steps",
        "Enqueued steps not visible yet (delay_seconds, handed back with a delay)",
        None,
    ),
    "retry_waiting_steps": (
        "tasker_namespace_retry_waiting_steps",
        "Steps waiting for their retry time",
        None,
    ),
    "expired_leases": (
        "tasker_namespace_expired_leases",
        "Claimed steps whose lease expired (the next claim records a failed attempt)",
        None,
    ),
    "oldest_ready_age_seconds": (
        "tasker_namespace_oldest_ready_age_seconds",
        "How long the longest-waiting ready step has been ready (0 when none is)",
        None,
    ),
    "waiting_steps": (
        "tasker_namespace_waiting_steps",
        "wait_for_event and sleep steps waiting (no worker held)",
        None,
    ),
    "flow_lanes": (
        "tasker_namespace_flow_lanes",
        "Fairness lanes (key values with queued or running steps) claims take turns between",
        None,
    ),
    "rate_limit_tokens": (
        "tasker_rate_limit_tokens",
        "Tokens a rate limit holds now (steps it can start at once)",
        "rate_limit",
    ),
    "tasks": ("tasker_namespace_tasks", "Live tasks by stored state", "state"),
    "tasks_finished_5m": (
        "tasker_namespace_tasks_finished_5m",
        "Tasks finished in the last 5 minutes, by final state",
        "state",
    ),
    "dead_tuples": (
        "tasker_table_dead_tuples",
        "Dead row versions of a hot table (statistics collector estimate)",
        "table",
    ),
    "live_tuples": (
        "tasker_table_live_tuples",
        "Live rows of a hot table (statistics collector estimate)",
        "table",
    ),
    "oldest_xmin_age_xids": (
        "tasker_oldest_xmin_age_xids",
        "Transactions since the oldest snapshot vacuum must respect, by holder",
        "holder",
    ),
    "oldest_xmin_age_seconds": (
        "tasker_oldest_xmin_age_seconds",
        "Age of the oldest snapshot vacuum must respect, by holder (where known)",
        "holder",
    ),
}


def require_prometheus() -> None:
    """Raise `ConfigurationError` naming the extra when prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"serving metrics needs the prometheus-client library; {EXTRA_HINT}"
        ) from None


def new_registry() -> CollectorRegistry:
    """A registry of its own (prometheus-client's global one is never used)."""
    require_prometheus()
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


def add_process_collectors(registry: CollectorRegistry) -> None:
    """prometheus-client's process (CPU, memory, open files), platform and garbage collector
    metrics, as its global registry has them."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


# --- the worker's own metrics ----------------------------------------------------------------


class PrometheusInstruments(Instruments):
    """The worker's hooks as Prometheus metrics in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self._steps_total = Counter(
            "tasker_steps_total",
            "Steps by outcome: claimed; the engine's answer (succeeded, failed, retried, "
            "checkpointed, stale); released; the events timed_out, lease_lost, abandoned",
            ["namespace", "step", "outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            "tasker_step_duration_seconds",
            "Handler run time per claim, by template step",
            ["namespace", "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self._claim = Histogram(
            "tasker_claim_duration_seconds",
            "Round trip of one tasker.claim_steps call that succeeded",
            ["namespace"],
            buckets=ROUND_TRIP_BUCKETS,
            registry=registry,
        )
        self._flush = Histogram(
            "tasker_flush_duration_seconds",
            "Round trip of one tasker.complete_and_claim call that succeeded",
            buckets=ROUND_TRIP_BUCKETS,
            registry=registry,
        )
        self._extensions = Counter(
            "tasker_lease_extensions_total",
            "Leases extended by heartbeats",
            registry=registry,
        )
        self._reconnects = Counter(
            "tasker_reconnects_total",
            "Sessions connected again after a lost connection",
            ["session"],
            registry=registry,
        )
        # label children by key: one dictionary lookup per hook on the hot path
        self._step_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._claim_children: dict[str, Any] = {}

    def step(self, claim: Claim, outcome: str) -> None:
        key = (claim.namespace, claim.step.template_step, outcome)
        child = self._step_children.get(key)
        if child is None:
            child = self._step_children[key] = self._steps_total.labels(*key)
        child.inc()

    def handler_seconds(self, claim: Claim, seconds: float) -> None:
        key = (claim.namespace, claim.step.template_step)
        child = self._duration_children.get(key)
        if child is None:
            child = self._duration_children[key] = self._duration.labels(*key)
        child.observe(seconds)

    def claim_seconds(self, namespace: str, seconds: float) -> None:
        child = self._claim_children.get(namespace)
        if child is None:
            child = self._claim_children[namespace] = self._claim.labels(namespace)
        child.observe(seconds)

    def flush_seconds(self, seconds: float) -> None:
        self._flush.observe(seconds)

    def lease_extensions(self, count: int) -> None:
        if count:
            self._extensions.inc(count)

    def reconnect(self, session: str) -> None:
        self._reconnects.labels(session).inc()


class GaugeCollector:
    """A collector of gauges whose values a function computes at scrape time."""

    def __init__(self, gauges: Callable[[], Iterable[Metric]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()

    def describe(self) -> list[Metric]:
        return []  # unchecked: the gauges depend on the database


# --- the engine's gauges ---------------------------------------------------------------------


@dataclass
class _Snapshot:
    rows: list[db.Row]
    read_at: float  # time.monotonic()


class EngineMetrics:
    """`tasker.engine_metrics()` as Prometheus gauges, read on a connection of its own.

    Runs on the owner's event loop (`collect_async`); `collector(loop)` gives a collector for a
    registry that calls it from the HTTP server's thread. `elect`: export only while holding
    the exporter lock (one worker per database does); `min_interval`: seconds a read is reused.
    """

    def __init__(
        self,
        dsn: str | None,
        *,
        elect: bool,
        min_interval: float = 1.0,
        application_name: str = "tasker-pg metrics",
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self._dsn = dsn
        self._elect = elect
        self._min_interval = min_interval
        self._settings = {"application_name": application_name, **(server_settings or {})}
        self._conn: db.Connection | None = None
        self._lock = asyncio.Lock()
        self._snapshot: _Snapshot | None = None
        self.leader = not elect
        self.last_error: str | None = None

    async def read(self) -> list[db.Row] | None:
        """The engine's rows (None when another session exports them or the read failed)."""
        async with self._lock:
            now = time.monotonic()
            snap = self._snapshot
            if snap is not None and now - snap.read_at < self._min_interval:
                return snap.rows if self.leader else None
            try:
                conn = await self._connection()
                if not self.leader:
                    self.leader = bool(await conn.fetchval(EXPORTER_LOCK_SQL))
                    if self.leader:
                        logger.info("this process now exports the engine metrics")
                rows = await conn.engine_metrics() if self.leader else []
            except TaskerError as exc:
                self._drop()
                self.last_error = str(exc)
                logger.warning("reading tasker.engine_metrics() failed: %s", exc)
                return None
            self.last_error = None
            self._snapshot = _Snapshot(rows, time.monotonic())
            return rows if self.leader else None

    async def gauges(self) -> list[Metric]:
        """The engine gauges of one scrape, and whether this process exports them."""
        from prometheus_client.core import GaugeMetricFamily

        rows = await self.read()
        families: dict[str, GaugeMetricFamily] = {}
        for row in rows or ():
            spec = ENGINE_GAUGES.get(row["metric"])
            if spec is None:
                continue
            name, doc, label_name = spec
            labels = ["namespace"] if row["namespace"] is not None else []
            if label_name is not None:
                labels.append(label_name)
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, doc, labels=labels)
            values = [row["namespace"]] if row["namespace"] is not None else []
            if label_name is not None:
                values.append(row["label"] or "")
            family.add_metric(values, float(row["value"]))
        exporter = GaugeMetricFamily(
            "tasker_engine_metrics_exporter",
            "1 when this process exports the engine gauges (one per database among workers)",
            value=1.0 if rows is not None and self.leader else 0.0,
        )
        up = GaugeMetricFamily(
            "tasker_engine_metrics_up",
            "1 when the last read of tasker.engine_metrics() succeeded",
            value=0.0 if self.last_error else 1.0,
        )
        return [*families.values(), exporter, up]

    def collector(self, loop: asyncio.AbstractEventLoop) -> GaugeCollector:
        """A collector for a registry scraped from another thread than `loop`'s."""

        def gauges() -> list[Metric]:
            future = asyncio.run_coroutine_threadsafe(self.gauges(), loop)
            try:
                return future.result(PROBE_TIMEOUT)
            except Exception as exc:
                future.cancel()
                logger.warning("engine metrics not collected: %s", exc)
                return []

        return GaugeCollector(gauges)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self.leader = not self._elect
        if conn is not None:
            await conn.close()

    async def _connection(self) -> db.Connection:
        if self._conn is None or self._conn.is_closed():
            self._drop()
            self._conn = await db.connect(
                self._dsn, check_schema=True, timeout=PROBE_TIMEOUT, server_settings=self._settings
            )
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        # a lost session released the exporter lock
        self.leader = not self._elect
        if conn is not None and not conn.is_closed():
            conn.terminate()


# --- the HTTP server -------------------------------------------------------------------------

Probe = Callable[[], Coroutine[Any, Any, tuple[bool, dict[str, Any]]]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics server: " + format, *args)


class MetricsServer:
    """`/metrics` of `registry`, and `/healthz` and `/readyz` answered by two probes.

    A probe is a coroutine run on `loop` (at most PROBE_TIMEOUT seconds) returning (ok, details);
    the answer is 200 or 503 with the details as JSON. `port` 0 picks a free port (`port` then
    says which).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str = "0.0.0.0",
        port: int,
        healthz: Probe | None = None,
        readyz: Probe | None = None,
    ) -> None:
        from prometheus_client import make_wsgi_app

        self._metrics_app = make_wsgi_app(registry)
        self._loop = loop
        self._probes = {"/healthz": healthz, "/readyz": readyz}
        self._httpd = make_server(host, port, self._app, _Server, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"tasker-metrics-{self.port}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (waits for the serving thread)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in self._probes and self._probes[path] is not None:
            ok, details = self._probe(path)
            body = json.dumps({"status": "ok" if ok else "fail", **details}).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"not found: try /metrics, /healthz or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [body]

    def _probe(self, path: str) -> tuple[bool, dict[str, Any]]:
        probe = self._probes[path]
        assert probe is not None
        try:
            future = asyncio.run_coroutine_threadsafe(probe(), self._loop)
        except RuntimeError as exc:  # the loop is closed
            return False, {"error": f"event loop not running: {exc}"}
        try:
            return future.result(PROBE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            return False, {"error": f"no answer within {PROBE_TIMEOUT:g}s (event loop blocked?)"}
        except Exception as exc:
            return False, {"error": f"{type(exc).__name__}: {exc}"}
