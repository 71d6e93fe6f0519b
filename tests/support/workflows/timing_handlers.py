"""Handlers for the worker's timing tests: blocking sync steps, quick async steps, timeouts."""

from __future__ import annotations

import asyncio
import time

from tasker_pg import StepContext, StepHandler, StepHandlerResult


class SleepSyncHandler(StepHandler):
    """Blocks its thread for `seconds` (default 1): what a slow sync client call looks like."""

    handler_name = "timing.sleep_sync"

    def call(self, context: StepContext) -> StepHandlerResult:
        started = time.time()
        time.sleep(context.get_input_or("seconds", 1.0))
        return self.success({"started": started, "finished": time.time()})


class QuickAsyncHandler(StepHandler):
    handler_name = "timing.quick_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0.01)
        return self.success({"finished": time.time()})


class SlowFirstAttemptAsyncHandler(StepHandler):
    """Overruns its timeout on attempt 1 (cancelled by the worker), succeeds on attempt 2."""

    handler_name = "timing.slow_once_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        if context.attempt == 1:
            await asyncio.sleep(30)
        return self.success({"attempt": context.attempt})


class SlowFirstAttemptSyncHandler(StepHandler):
    """Overruns its timeout on attempt 1 (the worker stops waiting), succeeds on attempt 2."""

    handler_name = "timing.slow_once_sync"

    def call(self, context: StepContext) -> StepHandlerResult:
        if context.attempt == 1:
            time.sleep(2)
        return self.success({"attempt": context.attempt})
