"""The handlers and templates of `tasker-pg bench` (its worker processes load this module).

Two handlers: `bench.noop` (the throughput scenarios: returns at once, stores a null result) and
`bench.stamp` (the latency scenarios: records `time.time()` the moment the handler starts, so
the benchmark can compare it with timestamps the database wrote). Both sleep `sleep_ms` first
when the template's `handler.initialization` says so (`tasker-pg bench --handler-ms 10`), with
an async sleep, so a slow handler does not block the worker's event loop.

The templates are built in code (`templates(handler_ms)`) and registered by the benchmark
itself on each fresh database; the workers are started with `--namespace bench` only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tasker_pg.context import StepContext
from tasker_pg.handler import StepHandler
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import TaskTemplate

NAMESPACE = "bench"
VERSION = "1.0.0"

NOOP = "bench.noop"
STAMP = "bench.stamp"

FLAT = "flat"  # one step
DIAMOND = "diamond"  # a -> (b, c) -> d
LINEAR = "linear"  # a -> b -> c -> d
LATENCY_SINGLE = "latency_single"  # one stamping step
LATENCY_LINEAR = "latency_linear"  # four stamping steps in a row


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


def templates(handler_ms: float = 0) -> dict[str, TaskTemplate]:
    """Every benchmark template by name; each handler sleeps `handler_ms` first when > 0."""
    linear_names = ["a", "b", "c", "d"]
    return {
        FLAT: _template(FLAT, [_step("a", NOOP, handler_ms, [])]),
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
        LATENCY_SINGLE: _template(LATENCY_SINGLE, [_step("a", STAMP, handler_ms, [])]),
        LATENCY_LINEAR: _template(
            LATENCY_LINEAR,
            [
                _step(n, STAMP, handler_ms, linear_names[:i][-1:])
                for i, n in enumerate(linear_names)
            ],
        ),
    }
