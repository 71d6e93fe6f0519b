"""Handlers of the chaos test's diamond (chaos.yaml): start n*n; left +25; right x2; join average.

Every run gets a fresh run id and is appended to the run log named in the task context (one
JSON line per event, written with a single O_APPEND write so that the worker processes never
interleave lines): "start" when the handler begins, "end" when it returns its success. A run's
result carries its run id and the run ids of the parent results it consumed, so the test can
tell which run's outcome was committed and that each child saw its parents' committed results.
Handlers may run more than once under faults (a killed worker, a lost lease); the test checks
that each step's success was committed exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from abc import abstractmethod
from typing import Any

from tasker_pg import StepContext, StepHandler, StepHandlerResult


def _record(context: StepContext, event: str, run_id: str) -> None:
    line = json.dumps(
        {
            "event": event,
            "run_id": run_id,
            "task": context.task_uuid,
            "step": context.step_name,
            "worker": context.worker_id,
            "attempt": context.attempt,
        }
    )
    fd = os.open(context.get_input("run_log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class _ChaosHandler(StepHandler):
    """Records the run, takes a little while (so faults find work in flight), then computes."""

    parents: tuple[str, ...] = ()

    @abstractmethod
    def compute(self, context: StepContext) -> float:
        """The step's value."""

    async def call(self, context: StepContext) -> StepHandlerResult:
        run_id = uuid.uuid4().hex
        _record(context, "start", run_id)
        low, high = context.get_input_or("sleep", [0.05, 0.3])
        await asyncio.sleep(random.uniform(low, high))
        result: dict[str, Any] = {
            "value": self.compute(context),
            "run_id": run_id,
            "parents": {p: context.get_dependency_field(p, "run_id") for p in self.parents},
        }
        _record(context, "end", run_id)
        return self.success(result)


class StartHandler(_ChaosHandler):
    handler_name = "chaos.start"

    def compute(self, context: StepContext) -> float:
        n = context.get_input("n")
        return float(n * n)


class LeftHandler(_ChaosHandler):
    handler_name = "chaos.left"
    parents = ("start",)

    def compute(self, context: StepContext) -> float:
        return float(context.get_dependency_field("start", "value") + 25)


class RightHandler(_ChaosHandler):
    handler_name = "chaos.right"
    parents = ("start",)

    def compute(self, context: StepContext) -> float:
        return float(context.get_dependency_field("start", "value") * 2)


class JoinHandler(_ChaosHandler):
    handler_name = "chaos.join"
    parents = ("left", "right")

    def compute(self, context: StepContext) -> float:
        left = context.get_dependency_field("left", "value")
        right = context.get_dependency_field("right", "value")
        return float((left + right) / 2)


def expected_values(n: int) -> dict[str, float]:
    """What each step of the diamond must have committed for input n."""
    start = float(n * n)
    left, right = start + 25, start * 2
    return {"start": start, "left": left, "right": right, "join": (left + right) / 2}
