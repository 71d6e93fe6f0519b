"""`tasker-pg health` (a probe's exit code) and `tasker-pg metrics` (a Prometheus exporter).

```
tasker-pg health [--dsn URL] [--json] [--min-workers 1] [--max-ready-age 300] ...
tasker-pg metrics --port 9464 [--dsn URL]
```

`health` runs `AsyncTaskerClient.health_check` with the thresholds given and exits 0 when the
engine is healthy, 1 when not (database unreachable, schema outdated, a check failed).
`metrics` serves `tasker.engine_metrics()` as Prometheus gauges on `/metrics` (read at each
scrape, at most once a second), with `/healthz` (the process runs) and `/readyz` (the last read
succeeded), until SIGTERM or SIGINT; it needs the `metrics` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from tasker_pg import argtypes
from tasker_pg.client import (
    DEFAULT_MAX_EXPIRED_LEASES,
    DEFAULT_MAX_READY_AGE,
    DEFAULT_MIN_WORKERS,
    DEFAULT_WORKER_STALE_AFTER,
    AsyncTaskerClient,
)
from tasker_pg.responses import HealthResponse

EXIT_OK = 0
EXIT_FAILED = 1


def threshold(text: str) -> float | None:
    """A non-negative number, or `off` (reported, not checked)."""
    if text.strip().lower() == "off":
        return None
    return argtypes.non_negative_float(text)


def add_parsers(sub: Any, with_dsn: Any) -> None:
    """Add `health` and `metrics` to the `tasker-pg` subcommands."""
    health = with_dsn(
        sub.add_parser(
            "health",
            help="is the engine healthy? exit 0 when it is, 1 when not (for probes)",
            description="Check that the database is reachable and its schema current, count "
            "the workers seen recently, the oldest ready step, expired leases and tasks in "
            "error, and hold them to the thresholds. Exit code 0 healthy, 1 not.",
        )
    )
    health.add_argument("--json", action="store_true", help="print one JSON document")
    health.add_argument(
        "--min-workers",
        type=argtypes.non_negative_int,
        default=DEFAULT_MIN_WORKERS,
        metavar="N",
        help=f"at least N workers with a recent heartbeat (default {DEFAULT_MIN_WORKERS}: "
        "reported only)",
    )
    health.add_argument(
        "--worker-stale-after",
        type=argtypes.positive_float,
        default=DEFAULT_WORKER_STALE_AFTER,
        metavar="S",
        help="a heartbeat older than S seconds is not recent; workers write one every 5 s "
        f"(default {DEFAULT_WORKER_STALE_AFTER:g})",
    )
    health.add_argument(
        "--max-ready-age",
        type=threshold,
        default=DEFAULT_MAX_READY_AGE,
        metavar="S|off",
        help="the oldest ready step may have waited at most S seconds "
        f"(default {DEFAULT_MAX_READY_AGE:g})",
    )
    health.add_argument(
        "--max-expired-leases",
        type=threshold,
        default=DEFAULT_MAX_EXPIRED_LEASES,
        metavar="N|off",
        help="at most N expired leases no claim has recorded yet "
        f"(default {DEFAULT_MAX_EXPIRED_LEASES})",
    )
    health.add_argument(
        "--max-tasks-in-error",
        type=threshold,
        default=None,
        metavar="N|off",
        help="at most N tasks in error (default off: reported only)",
    )
    health.add_argument(
        "--timeout",
        type=argtypes.positive_float,
        default=10.0,
        metavar="S",
        help="give up on the database after S seconds (default 10)",
    )
    health.set_defaults(func=cmd_health)

    metrics = with_dsn(
        sub.add_parser(
            "metrics",
            help="serve tasker.engine_metrics() as Prometheus gauges until SIGTERM/SIGINT",
            description="A Prometheus exporter of the engine's gauges (queue depths, oldest "
            "ready step, tasks by state, dead tuples, oldest xmin): /metrics, /healthz, "
            "/readyz. Needs the metrics extra: pip install 'tasker-pg[metrics]'.",
        )
    )
    metrics.add_argument(
        "--port", type=argtypes.port, required=True, metavar="PORT", help="port to serve on"
    )
    metrics.add_argument(
        "--host",
        default="0.0.0.0",
        metavar="HOST",
        help="address to listen on (default 0.0.0.0: every interface)",
    )
    metrics.add_argument(
        "--min-interval",
        type=argtypes.non_negative_float,
        default=1.0,
        metavar="S",
        help="scrapes within S seconds of a read reuse it (default 1)",
    )
    metrics.set_defaults(func=cmd_metrics)


# --- health ------------------------------------------------------------------------------------


def cmd_health(args: argparse.Namespace) -> int:
    return asyncio.run(_health(args))


async def _health(args: argparse.Namespace) -> int:
    async with AsyncTaskerClient(args.dsn, connect_timeout=args.timeout) as client:
        health = await client.health_check(
            min_workers=args.min_workers,
            worker_stale_after=args.worker_stale_after,
            max_ready_age=args.max_ready_age,
            max_expired_leases=_int_or_none(args.max_expired_leases),
            max_tasks_in_error=_int_or_none(args.max_tasks_in_error),
        )
    if args.json:
        import json

        print(json.dumps(health.to_dict(), indent=2, default=str))
    else:
        print(render_health(health))
    return EXIT_OK if health.healthy else EXIT_FAILED


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def render_health(health: HealthResponse) -> str:
    """The health check for a person: the status, the database, one line per check."""
    lines = [f"status: {health.status}"]
    if health.database_reachable:
        current = (
            "current"
            if health.schema_version == health.expected_schema_version
            and health.status != "schema_outdated"
            else f"needs {health.expected_schema_version}"
        )
        lines.append(
            f"database: reachable (PostgreSQL {health.server_version}, "
            f"{health.latency_ms:g} ms), schema version {health.schema_version} ({current})"
        )
    else:
        lines.append("database: not reachable")
    for check in health.checks:
        lines.append(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.message}")
    if health.checks:
        lines.append(f"ready steps: {health.ready_steps}")
    for worker in health.workers:
        lines.append(
            f"worker {worker.worker_id}: {worker.status}, heartbeat "
            f"{worker.heartbeat_age_seconds:.1f}s ago, {worker.in_flight} in flight"
        )
    if health.message and not health.checks:
        lines.append(health.message)
    return "\n".join(lines)


# --- metrics -----------------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace) -> int:
    from tasker_pg.metrics import require_prometheus

    require_prometheus()
    return asyncio.run(_serve_metrics(args))


async def _serve_metrics(args: argparse.Namespace) -> int:
    from tasker_pg import metrics

    loop = asyncio.get_running_loop()
    engine = metrics.EngineMetrics(args.dsn, elect=False, min_interval=args.min_interval)
    registry = metrics.new_registry()
    metrics.add_process_collectors(registry)
    registry.register(engine.collector(loop))

    async def healthz() -> tuple[bool, dict[str, Any]]:
        return True, {}

    async def readyz() -> tuple[bool, dict[str, Any]]:
        rows = await engine.read()
        return rows is not None, {"error": engine.last_error} if engine.last_error else {}

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        server = metrics.MetricsServer(
            registry, loop, host=args.host, port=args.port, healthz=healthz, readyz=readyz
        )
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    server.start()
    print(
        f"tasker-pg metrics: serving tasker.engine_metrics() on "
        f"http://{args.host}:{server.port}/metrics (Ctrl-C stops)",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(server.stop)
        await engine.close()
    return EXIT_OK
