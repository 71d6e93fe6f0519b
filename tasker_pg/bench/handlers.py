"""The handlers and templates of `tasker-pg bench` (its worker processes load this module).

Two handlers: `bench.noop` (the throughput scenarios: returns at once, stores a null result) and
`bench.stamp` (the latency scenarios: records `time.time()` the moment the handler starts, so
the benchmark can compare it with timestamps the database wrote); and the three roles of the
fan-out scenario: `bench.fanout_analyze` (a batchable step returning one cursor range per
worker), `bench.fanout_work` (a batch worker: one item, no-op) and `bench.fanout_gather` (the
deferred convergence: reads every worker's result, fails unless they add up). The no-op, stamp
and worker handlers sleep `sleep_ms` first when the template's `handler.initialization` says
so (`tasker-pg bench --handler-ms 10`), with an async sleep, so a slow handler does not block
the worker's event loop.

The templates are built in code (`templates(handler_ms)`) and registered by the benchmark
itself on each fresh database; the workers are started with `--namespace bench` only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tasker_pg.batch import Batchable
from tasker_pg.context import StepContext
from tasker_pg.errors import PermanentError
from tasker_pg.handler import StepHandler
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import TaskTemplate

NAMESPACE = "bench"
VERSION = "1.0.0"

NOOP = "bench.noop"
STAMP = "bench.stamp"
FANOUT_ANALYZE = "bench.fanout_analyze"
FANOUT_WORK = "bench.fanout_work"
FANOUT_GATHER = "bench.fanout_gather"

FLAT = "flat"  # one step
DIAMOND = "diamond"  # a -> (b, c) -> d
LINEAR = "linear"  # a -> b -> c -> d
LATENCY_SINGLE = "latency_single"  # one stamping step
LATENCY_LINEAR = "latency_linear"  # four stamping steps in a row
FLAT_10MS = "flat_10ms"  # one step whose handler takes 10 ms (the scale scenario)
BACKLOG = "backlog"  # one step; its tasks are kept not visible while flat tasks drain
LIMITS_FAIR = "limits_fair"  # one step, fairness lanes by $.customer
LIMITS_CONCURRENCY = "limits_concurrency"  # ... and a concurrency limit per $.customer
LIMITS_RATED = "limits_rated"  # ... and a rate limit (RATE_LIMIT)
RATE_LIMIT = "bench"
FANOUT = "fanout"  # analyze (batchable) -> work_0001..N (batch workers) -> gather (convergence)
FANOUT_WORKERS = 1_000
FANOUT_WORKER_TEMPLATE = "work"


class NoopHandler(StepHandler):
    """Does nothing (after the configured sleep) and succeeds with a null result."""

    handler_name = NOOP

    async def call(self, context: StepContext) -> StepHandlerResult:
        sleep_ms = context.get_config("sleep_ms", 0)
        if sleep_ms:
            await asyncio.sleep(sleep_ms / 1000)
        return StepHandlerResult.success(None)


class StampHandler(StepHandler):
    """Succeeds with `{"started": <time.time() when the handler began>}`."""

    handler_name = STAMP

    async def call(self, context: StepContext) -> StepHandlerResult:
        started = time.time()
        sleep_ms = context.get_config("sleep_ms", 0)
        if sleep_ms:
            await asyncio.sleep(sleep_ms / 1000)
        return StepHandlerResult.success({"started": started})


class FanoutAnalyzeHandler(StepHandler, Batchable):
    """Fans out into `workers` (its initialization) one-item batches."""

    handler_name = FANOUT_ANALYZE

    async def call(self, context: StepContext) -> StepHandlerResult:
        return analyzer_result(int(context.get_config("workers", FANOUT_WORKERS)))


def analyzer_result(workers: int) -> StepHandlerResult:
    """The analyzer's outcome for `workers` one-item batches (also sent by the scenario's own
    timed fan-out)."""
    return FanoutAnalyzeHandler().batch_analyzer_success(
        cursor_configs=Batchable.create_cursor_configs(workers, workers),
        worker_template_name=FANOUT_WORKER_TEMPLATE,
        total_items=workers,
    )


class FanoutWorkHandler(StepHandler, Batchable):
    """A batch worker: processes its one item (after the configured sleep)."""

    handler_name = FANOUT_WORK

    async def call(self, context: StepContext) -> StepHandlerResult:
        sleep_ms = context.get_config("sleep_ms", 0)
        if sleep_ms:
            await asyncio.sleep(sleep_ms / 1000)
        batch = self.get_batch_context(context)
        return self.batch_worker_success(items_processed=batch.end_cursor - batch.start_cursor)


class FanoutGatherHandler(StepHandler, Batchable):
    """The aggregator: reads every worker's result (a page at a time when the claim could not
    carry them all) and fails unless they add up to the analyzer's count."""

    handler_name = FANOUT_GATHER

    async def call(self, context: StepContext) -> StepHandlerResult:
        summary = await self.aggregate_batch_worker_results_async(
            context, f"{FANOUT_WORKER_TEMPLATE}_"
        )
        expected = int(context.get_config("workers", FANOUT_WORKERS))
        if (summary["worker_count"], summary["total_processed"]) != (expected, expected):
            raise PermanentError(
                f"gather read {summary['worker_count']} workers and {summary['total_processed']} "
                f"items, expected {expected} of each"
            )
        return StepHandlerResult.success({"total_processed": summary["total_processed"]})


def _step(name: str, handler: str, handler_ms: float, parents: list[str]) -> dict[str, Any]:
    init: dict[str, Any] = {"sleep_ms": handler_ms} if handler_ms else {}
    return {
        "name": name,
        "handler": {"callable": handler, "initialization": init},
        "dependencies": parents,
    }


def _template(name: str, steps: list[dict[str, Any]]) -> TaskTemplate:
    return TaskTemplate.from_dict(
        {
            "name": name,
            "namespace_name": NAMESPACE,
            "version": VERSION,
            "description": f"tasker-pg bench: {name}",
            "steps": steps,
        },
        source=f"{__name__} ({name})",
    )


def _limited(name: str, handler_ms: float, concurrency: int, rated: bool) -> TaskTemplate:
    """One no-op step with flow control by `$.customer`: fairness only (`concurrency` 0), or a
    concurrency limit, and the bench's rate limit when `rated`."""
    flow: dict[str, Any] = {"fairness": {"key": "$.customer"}}
    if concurrency:
        flow = {"concurrency": {"key": "$.customer", "limit": concurrency}}
    if rated:
        flow["rate_limit"] = RATE_LIMIT
    return TaskTemplate.from_dict(
        {
            "name": name,
            "namespace_name": NAMESPACE,
            "version": VERSION,
            "description": f"tasker-pg bench: {name}",
            "steps": [_step("a", NOOP, handler_ms, [])],
            **flow,
        },
        source=f"{__name__} ({name})",
    )


def fanout_template(handler_ms: float = 0, workers: int = FANOUT_WORKERS) -> TaskTemplate:
    """analyze (batchable) -> `workers` batch workers -> gather (deferred convergence)."""
    sized = {"workers": workers}
    worker = _step(FANOUT_WORKER_TEMPLATE, FANOUT_WORK, handler_ms, ["analyze"])
    worker["type"] = "batch_worker"
    worker["batch_config"] = {"batch_size": 1}
    return _template(
        FANOUT,
        [
            {
                "name": "analyze",
                "type": "batchable",
                "handler": {"callable": FANOUT_ANALYZE, "initialization": sized},
            },
            worker,
            {
                "name": "gather",
                "type": "deferred_convergence",
                "handler": {"callable": FANOUT_GATHER, "initialization": sized},
                "dependencies": [FANOUT_WORKER_TEMPLATE],
            },
        ],
    )


def templates(
    handler_ms: float = 0, fanout_workers: int = FANOUT_WORKERS, limits_concurrency: int = 100
) -> dict[str, TaskTemplate]:
    """Every benchmark template by name; each handler sleeps `handler_ms` first when > 0. The
    rated template names the rate limit RATE_LIMIT, which must exist before it is registered."""
    linear_names = ["a", "b", "c", "d"]
    return {
        FLAT: _template(FLAT, [_step("a", NOOP, handler_ms, [])]),
        BACKLOG: _template(BACKLOG, [_step("a", NOOP, handler_ms, [])]),
        FLAT_10MS: _template(FLAT_10MS, [_step("a", NOOP, handler_ms or 10.0, [])]),
        DIAMOND: _template(
            DIAMOND,
            [
                _step("a", NOOP, handler_ms, []),
                _step("b", NOOP, handler_ms, ["a"]),
                _step("c", NOOP, handler_ms, ["a"]),
                _step("d", NOOP, handler_ms, ["b", "c"]),
            ],
        ),
        LINEAR: _template(
            LINEAR,
            [_step(n, NOOP, handler_ms, linear_names[:i][-1:]) for i, n in enumerate(linear_names)],
        ),
        FANOUT: fanout_template(handler_ms, fanout_workers),
        LIMITS_FAIR: _limited(LIMITS_FAIR, handler_ms, 0, False),
        LIMITS_CONCURRENCY: _limited(LIMITS_CONCURRENCY, handler_ms, limits_concurrency, False),
        LIMITS_RATED: _limited(LIMITS_RATED, handler_ms, limits_concurrency, True),
        LATENCY_SINGLE: _template(LATENCY_SINGLE, [_step("a", STAMP, handler_ms, [])]),
        LATENCY_LINEAR: _template(
            LATENCY_LINEAR,
            [
                _step(n, STAMP, handler_ms, linear_names[:i][-1:])
                for i, n in enumerate(linear_names)
            ],
        ),
    }
