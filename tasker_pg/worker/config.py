"""The worker's settings, checked once when the worker is built."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tasker_pg.errors import ConfigurationError

# PostgreSQL truncates application_name at 63 bytes.
_APPLICATION_NAME_MAX = 63
# A PostgreSQL setting name (custom ones have a dot: myext.setting).
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_SETTING_VALUE_MAX = 1024

DEFAULT_MAX_RUNTIME = 3600.0
"""Seconds a handler may run per claim when its step has no timeout_seconds (1 hour)."""

DEFAULT_OUTCOME_RETRY_CAP = 600.0
"""Seconds the worker keeps re-sending an outcome the database has not acknowledged."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What one worker serves and how (see `Worker` for what each setting means)."""

    namespaces: tuple[str, ...]
    worker_id: str
    dsn: str | None = None
    concurrency: int = 10
    lease_seconds: float = 30.0
    grace_seconds: float = 30.0
    poll_interval: float = 1.0
    flush_delay: float = 0.001
    max_batch: int = 200
    heartbeat_interval: float = 10.0
    summary_interval: float = 30.0
    repair_interval: float = 60.0
    retention_interval: float = 300.0
    schedule_interval: float = 10.0
    # how often tasker.wake_waits() runs (sleeps, wait timeouts, early events); 0: never
    wake_interval: float = 1.0
    missing_handler_delay: float = 10.0
    max_runtime: float = DEFAULT_MAX_RUNTIME
    outcome_retry_cap: float = DEFAULT_OUTCOME_RETRY_CAP
    # PostgreSQL settings of every session the worker opens, e.g. (("lock_timeout", "5s"),).
    server_settings: tuple[tuple[str, str], ...] = ()
    # /metrics, /healthz, /readyz on this port (None: not served; 0: any free port)
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    # also export tasker.engine_metrics() while this worker holds the exporter lock
    export_engine_metrics: bool = False
    # take the children an outcome makes ready in the same call (complete_and_claim)
    handoff: bool = True

    @classmethod
    def build(
        cls,
        namespaces: Iterable[str],
        *,
        worker_id: str | None,
        dsn: str | None,
        concurrency: int,
        lease_seconds: float,
        grace_seconds: float,
        poll_interval: float,
        flush_delay: float,
        max_batch: int,
        heartbeat_interval: float | None,
        summary_interval: float,
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
        wake_interval: float = 1.0,
    ) -> WorkerConfig:
        """Validate the settings; raises `ConfigurationError` naming the one that is wrong."""
        names = tuple(dict.fromkeys(namespaces))
        if not names:
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
        _check_positive("max_runtime", max_runtime)
        _check_positive("outcome_retry_cap", outcome_retry_cap)
        settings = _check_server_settings(server_settings or {})
        _check_non_negative("grace_seconds", grace_seconds)
        _check_non_negative("flush_delay", flush_delay)
        _check_non_negative("summary_interval", summary_interval)
        _check_non_negative("repair_interval", repair_interval)
        _check_non_negative("retention_interval", retention_interval)
        _check_non_negative("schedule_interval", schedule_interval)
        _check_non_negative("wake_interval", wake_interval)
        _check_non_negative("missing_handler_delay", missing_handler_delay)
        if missing_handler_delay > 3600:
            raise ConfigurationError(
                f"missing_handler_delay must be at most 3600 seconds, got {missing_handler_delay!r}"
            )
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 <= metrics_port <= 65535
        ):
            raise ConfigurationError(
                f"metrics_port must be a port number (0 to 65535), got {metrics_port!r}"
            )
        if export_engine_metrics and metrics_port is None:
            raise ConfigurationError(
                "export_engine_metrics needs metrics_port: the engine gauges are served with "
                "the worker's metrics (--metrics-port)"
            )
        if heartbeat_interval >= lease_seconds:
            raise ConfigurationError(
                f"heartbeat_interval ({heartbeat_interval:g}s) must be shorter than "
                f"lease_seconds ({lease_seconds:g}s), or leases expire between heartbeats"
            )
        return cls(
            namespaces=names,
            worker_id=worker_id or default_worker_id(),
            dsn=dsn,
            concurrency=int(concurrency),
            lease_seconds=float(lease_seconds),
            grace_seconds=float(grace_seconds),
            poll_interval=float(poll_interval),
            flush_delay=float(flush_delay),
            max_batch=int(max_batch),
            heartbeat_interval=float(heartbeat_interval),
            summary_interval=float(summary_interval),
            repair_interval=float(repair_interval),
            retention_interval=float(retention_interval),
            schedule_interval=float(schedule_interval),
            wake_interval=float(wake_interval),
            missing_handler_delay=float(missing_handler_delay),
            max_runtime=float(max_runtime),
            outcome_retry_cap=float(outcome_retry_cap),
            server_settings=settings,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            export_engine_metrics=bool(export_engine_metrics),
            handoff=bool(handoff),
        )

    def application_name(self, role: str) -> str:
        """The `application_name` of this worker's sessions: `tasker-pg worker <id> <role>`."""
        name = f"tasker-pg worker {self.worker_id} {role}"
        return name.encode("utf-8")[:_APPLICATION_NAME_MAX].decode("utf-8", errors="ignore")


def default_worker_id() -> str:
    """`<host>-<pid>-<random>`: unique enough to tell workers apart in logs and audit rows."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _check_positive(name: str, value: float, *, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ConfigurationError(f"{name} must be > 0 and finite, got {value!r}")


def _check_server_settings(settings: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The settings as sorted (name, value) pairs; refuses a name that is not a setting name."""
    pairs: list[tuple[str, str]] = []
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.match(name):
            raise ConfigurationError(
                f"server setting name {name!r} is not a PostgreSQL setting name "
                "(letters, digits and underscores, e.g. lock_timeout)"
            )
        if not isinstance(value, str) or len(value) > _SETTING_VALUE_MAX or "\x00" in value:
            raise ConfigurationError(
                f"server setting {name} must be a string of at most {_SETTING_VALUE_MAX} "
                f"characters, got {value!r:.80}"
            )
        pairs.append((name, value))
    return tuple(sorted(pairs))


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigurationError(f"{name} must be >= 0, got {value!r}")
