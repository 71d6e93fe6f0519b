"""Handlers for the subprocess worker tests (crash, graceful stop, connection loss, checkpoints).

They coordinate with the test through files named in the task context: a handler writes a
marker file when it reaches an interesting point, and a gated handler waits for a gate file.
A handler behaves differently only on the worker whose `--worker-id` the task context names
(`hang_worker`, `pause_worker`), so a second worker finishes what the first could not.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from tasker_pg import StepContext, StepHandler, StepHandlerResult

# Longest a handler waits for a gate file before failing (a test that forgets to open the gate
# must not hang the suite).
GATE_DEADLINE_S = 30.0


def _touch(directory: str, name: str, content: str = "") -> None:
    path = Path(directory) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content)
    tmp.replace(path)


class PrepareHandler(StepHandler):
    handler_name = "crash.prepare"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"n": context.get_input("n")})


class WorkHandler(StepHandler):
    """Doubles n; on the worker named by `hang_worker` it announces itself and then hangs."""

    handler_name = "crash.work"

    def call(self, context: StepContext) -> StepHandlerResult:
        hang_worker = context.get_input("hang_worker")
        if hang_worker is not None and context.worker_id == hang_worker:
            _touch(context.get_input("marker_dir"), f"hang-{context.task_uuid}", str(os.getpid()))
            time.sleep(60)  # the test SIGKILLs the worker long before this ends
        n = context.get_dependency_field("prepare", "n")
        return self.success({"n": n * 2, "attempt": context.attempt})


class KillWorkerHandler(StepHandler):
    """Kills its own worker process (SIGKILL) on the workers named in `crash_workers`: a
    handler that crashes whatever runs it. Elsewhere it succeeds."""

    handler_name = "crash.kill_worker"

    def call(self, context: StepContext) -> StepHandlerResult:
        if context.worker_id in context.get_input_or("crash_workers", []):
            _touch(context.get_input("marker_dir"), f"killed-{context.worker_id}", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.success({"attempt": context.attempt, "worker": context.worker_id})


class FinishHandler(StepHandler):
    handler_name = "crash.finish"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(context.get_input_or("delay", 0))
        return self.success({"n": context.get_dependency_field("work", "n") + 1})


class GatedHandler(StepHandler):
    """Announces that it started, then waits until the gate file named in the context exists."""

    handler_name = "gated.wait"

    def call(self, context: StepContext) -> StepHandlerResult:
        _touch(context.get_input("marker_dir"), f"started-{context.step_uuid}")
        gate = Path(context.get_input("gate"))
        deadline = time.monotonic() + GATE_DEADLINE_S
        while not gate.exists():
            if time.monotonic() > deadline:
                return self.failure(f"gate {gate} never opened", retryable=False)
            time.sleep(0.02)
        return self.success({"gate": str(gate), "attempt": context.attempt})


# --- the guide's batch checkpoint handler --------------------------------------------------------

ITEMS = [{"id": i, "value": i} for i in range(1, 251)]


class BatchProcessHandler(StepHandler):
    """The guide's "Batch Processing with Checkpoints" handler, verbatim."""

    handler_name = "batch_process"

    def call(self, context: StepContext) -> StepHandlerResult:
        # Check for existing checkpoint
        if context.has_checkpoint():
            cursor = context.checkpoint_cursor
            accumulated = context.accumulated_results or {}
        else:
            cursor = 0
            accumulated = {"total": 0, "processed": 0}

        # Process batch
        batch_size = context.get_input_or("batch_size", 100)
        items = self._fetch_items(cursor, batch_size)

        for item in items:
            accumulated["total"] += item["value"]
            accumulated["processed"] += 1

        if len(items) < batch_size:
            # All done
            return self.success(accumulated)
        else:
            # More to process - yield checkpoint
            return StepHandlerResult.checkpoint(
                cursor=cursor + batch_size,
                items_processed=accumulated["processed"],
                accumulated_results=accumulated,
            )

    def _fetch_items(self, cursor: int, batch_size: int) -> list[dict]:
        return ITEMS[cursor : cursor + batch_size]


class InstrumentedBatchHandler(BatchProcessHandler):
    """The guide's handler, recording every call; it pauses on resume on `pause_worker`."""

    handler_name = "batch_process_instrumented"

    def call(self, context: StepContext) -> StepHandlerResult:
        record = {
            "worker": context.worker_id,
            "attempt": context.attempt,
            "cursor": context.checkpoint_cursor,
        }
        with open(context.get_input("call_log"), "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if context.has_checkpoint() and context.worker_id == context.get_input("pause_worker"):
            _touch(context.get_input("marker_dir"), "paused", json.dumps(record))
            time.sleep(60)  # the test SIGKILLs the worker here, after a committed checkpoint
        return super().call(context)
