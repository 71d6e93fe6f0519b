"""Handlers for the property test: each step adds 1 to the sum of its parents' values.

A step fails retryably on its first `failures` attempts, a number drawn from the seed in the
task context and the step's name, so every run of a task fails the same way and retries always
end in success. The failure takes one of three shapes (RetryableError, an unhandled exception,
a retryable `failure()` result) and a short pause, drawn from the same seed, reshuffles the
interleavings (so a failing seed replays the same pauses).
"""

from __future__ import annotations

import asyncio
import random
import time

from tasker_pg import StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import RetryableError

MAX_FAILURES = 3


def planned_failures(seed: int, step_name: str) -> int:
    """How many attempts of `step_name` fail in a task seeded with `seed`."""
    return random.Random(f"{seed}:{step_name}").choice([0, 0, 0, 1, 1, 2, MAX_FAILURES])


def pause(context: StepContext) -> float:
    """Seconds to pause before running: up to 5 ms, fixed by the seed, step and attempt."""
    seed = context.get_input("seed")
    return random.Random(f"{seed}:{context.step_name}:{context.attempt}:pause").random() * 0.005


def _run(context: StepContext, handler: StepHandler) -> StepHandlerResult:
    seed = context.get_input("seed")
    rng = random.Random(f"{seed}:{context.step_name}:{context.attempt}")
    if context.attempt <= planned_failures(seed, context.step_name):
        shape = rng.randrange(3)
        if shape == 0:
            raise RetryableError(f"planned failure {context.attempt}", retry_after=0)
        if shape == 1:
            raise ValueError(f"planned crash {context.attempt}")
        return handler.failure(f"planned failure {context.attempt}", retryable=True)
    parents = context.get_config("parents", [])
    value = 1 + sum(context.get_dependency_field(p, "value") for p in parents)
    return handler.success(
        {
            "value": value,
            "attempt": context.attempt,
            "saw": sorted(context.dependency_results),
        }
    )


class PropSyncHandler(StepHandler):
    handler_name = "prop.sync"

    def call(self, context: StepContext) -> StepHandlerResult:
        time.sleep(pause(context))
        return _run(context, self)


class PropAsyncHandler(StepHandler):
    handler_name = "prop.async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(pause(context))
        return _run(context, self)
