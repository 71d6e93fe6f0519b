"""`tasker-pg worker`: run step handlers for one or more namespaces until SIGTERM/SIGINT.

```
tasker-pg worker --namespace ecommerce --handlers examples.ecommerce.handlers \\
    --templates examples/ecommerce
```

Each `--handlers` module is imported (the current directory is importable) and every
`StepHandler` subclass defined in it is registered under its `handler_name`; those are the only
handlers the worker runs unless `--allow-import` lets a template's `handler.callable` name any
importable `module.ClassName`. Each `--templates`
path (a YAML file or a directory of them) is validated and registered at start; without
`--namespace`, the worker serves the templates' namespaces. SIGTERM or SIGINT stops gracefully
(running steps get `--grace` seconds, unstarted claims are handed back) and the command exits 0;
a second signal abandons the running steps at once.

`add_parser(subparsers)` adds the subcommand to the main `tasker-pg` parser; this module also
runs on its own: `python -m tasker_pg.worker_cli --namespace ... --handlers ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tasker_pg import argtypes, logformat
from tasker_pg.errors import TaskerError
from tasker_pg.registry import HandlerRegistry
from tasker_pg.template import TaskTemplate, load_templates
from tasker_pg.worker import Worker, entry, steplog
from tasker_pg.worker.config import (
    DEFAULT_MAX_RUNTIME,
    DEFAULT_OUTCOME_RETRY_CAP,
    default_worker_id,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_LOG_LEVELS = ("debug", "info", "warning", "error")

# Named explicitly: under `python -m` this module's __name__ is "__main__".
logger = logging.getLogger("tasker_pg.worker_cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options (shared by `tasker-pg worker` and `python -m tasker_pg.worker_cli`)."""
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="namespace (queue) to work on; repeat for several "
        "(default: the namespaces of --templates)",
    )
    parser.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE",
        help="module whose StepHandler subclasses are registered, e.g. myapp.handlers; repeatable",
    )
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="also run handler.callable names that are not registered by importing them as "
        "dotted module.ClassName paths: anyone who can register a template can then make this "
        "worker import any installed module (default: only --handlers classes run)",
    )
    parser.add_argument(
        "--templates",
        action="append",
        default=[],
        metavar="PATH",
        help="template YAML file or directory to register at start; repeatable",
    )
    parser.add_argument(
        "--concurrency",
        type=argtypes.positive_int,
        default=10,
        metavar="N",
        help="steps run at once, also the thread pool size for sync handlers (default 10)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=argtypes.positive_float,
        default=30.0,
        metavar="S",
        help="lease per claim; a crashed worker's steps are retried after it (default 30)",
    )
    parser.add_argument(
        "--grace",
        type=argtypes.non_negative_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, how long running steps may take to finish (default 30)",
    )
    parser.add_argument(
        "--poll-interval",
        type=argtypes.positive_float,
        default=1.0,
        metavar="S",
        help="claim this often even without notifications (default 1)",
    )
    parser.add_argument(
        "--max-runtime",
        type=argtypes.positive_float,
        default=DEFAULT_MAX_RUNTIME,
        metavar="SECONDS",
        help="longest a handler may run per claim when its step has no timeout_seconds; past "
        "it the step fails retryably with error_code timeout (default 3600)",
    )
    parser.add_argument(
        "--outcome-retry-cap",
        type=argtypes.positive_float,
        default=DEFAULT_OUTCOME_RETRY_CAP,
        metavar="SECONDS",
        help="how long an outcome the database has not acknowledged (lock or statement "
        "timeout, lost connection) is sent again with its lease kept; past it the lease "
        "expires and the engine retries the step (default 600)",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        type=_pg_setting,
        metavar="NAME=VALUE",
        help="PostgreSQL setting of every session the worker opens, e.g. lock_timeout=5s; "
        "repeatable",
    )
    parser.add_argument(
        "--summary-interval",
        type=argtypes.non_negative_float,
        default=30.0,
        metavar="S",
        help="log a one-line summary this often; 0 disables it (default 30)",
    )
    parser.add_argument(
        "--repair-interval",
        type=argtypes.non_negative_float,
        default=60.0,
        metavar="S",
        help="call tasker.repair_messages() this often (re-sends lost step messages, one worker "
        "at a time); 0 disables it (default 60)",
    )
    parser.add_argument(
        "--retention-interval",
        type=argtypes.non_negative_float,
        default=300.0,
        metavar="S",
        help="call tasker.purge_finished() this often (deletes the tasks the namespaces' "
        "retention policies no longer keep, one worker at a time); 0 disables it (default 300)",
    )
    parser.add_argument(
        "--schedule-interval",
        type=argtypes.non_negative_float,
        default=10.0,
        metavar="S",
        help="call tasker.fire_due_schedules() this often (creates the tasks of due schedule "
        "slots, one worker at a time); 0 disables it (default 10; keep it below the schedules' "
        "catch-up windows)",
    )
    parser.add_argument(
        "--wake-interval",
        type=argtypes.non_negative_float,
        default=1.0,
        metavar="S",
        help="call tasker.wake_waits() this often (ends due sleep steps, applies wait timeouts, "
        "matches events emitted before their steps waited; one worker at a time); 0 disables it "
        "(default 1)",
    )
    parser.add_argument(
        "--missing-handler-delay",
        type=argtypes.non_negative_float,
        default=10.0,
        metavar="S",
        help="a step whose handler this worker lacks is handed back without spending an attempt "
        "and hidden this long, for a worker that has the handler (default 10)",
    )
    parser.add_argument("--worker-id", metavar="ID", help="default: <host>-<pid>-<random>")
    parser.add_argument(
        "--metrics-port",
        type=argtypes.port,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics, /healthz and /readyz on this port (0: any free port, "
        "logged); needs the metrics extra: pip install 'tasker-pg[metrics]'",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics port listens on (default 0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--export-engine-metrics",
        action="store_true",
        help="also export the gauges of tasker.engine_metrics() (queue depths, oldest ready "
        "step, tasks by state, dead tuples, oldest xmin); among workers one per database does, "
        "elected by an advisory lock",
    )
    parser.add_argument(
        "--no-handoff",
        dest="handoff",
        action="store_false",
        help="do not take the steps an outcome makes ready in the call that delivers it "
        "(tasker.complete_and_claim); they are claimed like any other",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="one OpenTelemetry span per step run, sent to the TracerProvider the handler "
        "modules (or opentelemetry-instrument) configured; without one, to an OTLP exporter "
        "when one is installed, else to stderr; needs the otel extra: "
        "pip install 'tasker-pg[otel]'",
    )
    parser.add_argument(
        "--dsn",
        help="database URL (default: TASKER_DATABASE_URL, DATABASE_URL, embedded cluster)",
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default=None,
        help="log level of the worker and of the handlers' own loggers (default info)",
    )
    loudness.add_argument(
        "-v",
        "--verbose",
        dest="worker_verbose",
        action="store_true",
        help="log at DEBUG (every claim, every wake-up)",
    )
    loudness.add_argument(
        "-q",
        "--quiet",
        dest="worker_quiet",
        action="store_true",
        help="log only warnings and errors (no line per step)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text: one line per record, with [task=... step=... attempt=...] where a record "
        "is about a step (default); json: one JSON object per line",
    )
    parser.add_argument(
        "--log-steps",
        choices=("all", "failures"),
        default="all",
        help="all: one line per step (default); failures: only retried and failed steps, "
        "which saves the cost of a log record per step at high throughput",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `worker` subcommand to the `tasker-pg` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run step handlers until SIGTERM/SIGINT",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    parser.set_defaults(func=cmd_worker)
    return parser


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the worker described by parsed arguments; the exit code (0 after a graceful stop)."""
    formatter = _configure_logging(args)
    # chosen here, so every record of the process can carry it (one worker per process)
    worker_id = args.worker_id or default_worker_id()
    if isinstance(formatter, logformat.JsonFormatter):
        formatter.defaults["worker_id"] = worker_id
    if not args.namespace and not args.templates:
        print(
            "error: name the namespaces to work on with --namespace NS (or give --templates, "
            "whose namespaces are then used)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        registry, templates = load_handlers_and_templates(
            args.handlers, args.templates, allow_import=args.allow_import
        )
        worker = Worker(
            args.namespace,
            registry,
            dsn=args.dsn,
            concurrency=args.concurrency,
            lease_seconds=args.lease_seconds,
            grace_seconds=args.grace,
            worker_id=worker_id,
            templates=templates,
            poll_interval=args.poll_interval,
            summary_interval=args.summary_interval,
            repair_interval=args.repair_interval,
            retention_interval=args.retention_interval,
            schedule_interval=args.schedule_interval,
            wake_interval=args.wake_interval,
            missing_handler_delay=args.missing_handler_delay,
            max_runtime=args.max_runtime,
            outcome_retry_cap=args.outcome_retry_cap,
            server_settings=dict(args.pg_setting),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            export_engine_metrics=args.export_engine_metrics,
            handoff=args.handoff,
            tracing=args.otel,
            tracer_provider=_cli_tracer_provider() if args.otel else None,
        )
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        asyncio.run(entry.run_with_signals(worker))
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if args.otel:
            _flush_traces()
    if worker.abandoned_threads:
        # Threads of sync handlers that never finished would keep the interpreter alive at exit
        # (it joins thread-pool threads); their steps are left to lease expiry, so leave now.
        logger.warning(
            "worker %s: exiting with %d sync handler thread(s) still running",
            worker.worker_id,
            worker.abandoned_threads,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _cli_tracer_provider() -> Any:
    """None when the handler modules (or opentelemetry-instrument) set a global TracerProvider;
    else an SDK provider (resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES) exporting
    in batches over OTLP when an OTLP exporter package is installed, else to stderr."""
    from tasker_pg.tracing import require_otel

    require_otel()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    exporter: Any
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    except ImportError:
        exporter = ConsoleSpanExporter(out=sys.stderr)
    named = "OTEL_SERVICE_NAME" in os.environ  # else tasker-pg-worker
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": "tasker-pg-worker"})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _flush_traces() -> None:
    """Export the spans still buffered (the SDK provider's batch processor) before exiting."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush()


def _pg_setting(text: str) -> tuple[str, str]:
    """`NAME=VALUE` as a (name, value) pair (the worker checks the name)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. lock_timeout=5s, got {text!r}")
    return name.strip(), value


def load_handlers_and_templates(
    handler_modules: Sequence[str],
    template_paths: Sequence[str],
    *,
    allow_import: bool = False,
) -> tuple[HandlerRegistry, list[TaskTemplate]]:
    """Import and register the handler modules; load and validate the template files.

    With `allow_import`, the registry also imports unregistered dotted `handler.callable` paths.

    The current working directory is put on `sys.path` first, so `--handlers myapp.handlers`
    finds `./myapp/handlers.py` as `python -m` would.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    registry = HandlerRegistry(allow_import=allow_import)
    for module in handler_modules:
        found = registry.register_module(module)
        if not found:
            logger.warning("handler module %s defines no StepHandler subclass", module)
        else:
            logger.info(
                "registered %d handler(s) from %s: %s",
                len(found),
                module,
                ", ".join(cls.handler_name for cls in found),
            )
    templates: list[TaskTemplate] = []
    for path in template_paths:
        templates.extend(load_templates(path))
    return registry, templates


def _configure_logging(
    args: argparse.Namespace,
) -> logformat.TextFormatter | logformat.JsonFormatter:
    """Send the worker's records and the handlers' own to stderr at INFO unless told otherwise.

    The root logger is configured (a worker is an application): a handler's
    `logging.getLogger(__name__).info(...)` comes out with the worker's lines, in one format.
    `--log-level` wins, then `-q`/`-v` (or `tasker-pg -vv worker`), then INFO.
    """
    if args.log_level is not None:
        level = logging.getLevelName(args.log_level.upper())
    elif getattr(args, "worker_quiet", False):
        level = logging.WARNING
    elif getattr(args, "worker_verbose", False) or getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO
    formatter = entry.configure_console_logging(level, getattr(args, "log_format", "text"))
    # A level set on the package logger earlier (e.g. by a previous run in this process) would
    # override the root's.
    logging.getLogger("tasker_pg").setLevel(logging.NOTSET)
    steps = logging.getLogger(steplog.STEP_LOGGER)
    steps.setLevel(logging.WARNING if getattr(args, "log_steps", "all") == "failures" else 0)
    return formatter


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of `python -m tasker_pg.worker_cli`."""
    parser = argparse.ArgumentParser(
        prog="python -m tasker_pg.worker_cli",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tasker_pg.worker_cli`."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_worker(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
