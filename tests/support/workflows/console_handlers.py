"""Handlers for the tests of what the worker tells its operator: logs, signals, warnings.

`console.gated` logs through its own module logger, announces that it started with a marker
file and waits (cancellably) for a gate file, both named in the task context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from tasker_pg import StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError

logger = logging.getLogger(__name__)

# Longest the gated handler waits for its gate (a test that forgets it must not hang the suite).
GATE_DEADLINE_S = 30.0


class GatedHandler(StepHandler):
    handler_name = "console.gated"

    async def call(self, context: StepContext) -> StepHandlerResult:
        logger.info("gated handler says hello from task %s", context.task_uuid)
        _touch(Path(context.get_input("marker_dir")) / f"started-{context.step_uuid}")
        gate = Path(context.get_input("gate"))
        deadline = time.monotonic() + GATE_DEADLINE_S
        while not _exists(gate):
            if time.monotonic() > deadline:
                return self.failure(f"gate {gate} never opened", retryable=False)
            await asyncio.sleep(0.02)
        return self.success({"gate": "opened"})


def _touch(path: Path) -> None:
    path.write_text("started")


def _exists(path: Path) -> bool:
    return path.exists()


class OkHandler(StepHandler):
    handler_name = "console.ok"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"ok": True})


class BoomHandler(StepHandler):
    handler_name = "console.boom"

    def call(self, context: StepContext) -> StepHandlerResult:
        raise ValueError(f"boom on attempt {context.attempt}")


class RefuseHandler(StepHandler):
    handler_name = "console.refuse"

    def call(self, context: StepContext) -> StepHandlerResult:
        raise PermanentError("the order is malformed", error_code="BAD_ORDER")
