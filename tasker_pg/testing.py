"""Helpers for unit-testing step handlers without a database or a worker."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from tasker_pg.context import StepContext


def build_test_context(
    task_context: dict[str, Any],
    dependency_results: dict[str, Any] | None = None,
    step_config: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
    *,
    step_name: str = "test_step",
    attempt: int = 1,
    max_attempts: int = 3,
    step_inputs: dict[str, Any] | None = None,
    task_uuid: str | None = None,
    step_uuid: str | None = None,
) -> StepContext:
    """A `StepContext` as a worker would build it, for calling `handler.call(context)` in tests.

    `dependency_results` maps upstream step names to their results; `checkpoint` takes the
    shape `{"cursor": ..., "items_processed": int, "accumulated_results": ...}`. Task and step
    UUIDs are fresh random ones unless given.

    Every dict is deep-copied, as a worker hands each run freshly decoded data: a handler that
    mutates its input (the guide's checkpoint example does) never changes the test's fixtures
    or a result object the test still holds.
    """
    return StepContext(
        task_uuid=task_uuid if task_uuid is not None else str(uuid.uuid4()),
        step_uuid=step_uuid if step_uuid is not None else str(uuid.uuid4()),
        step_name=step_name,
        handler_name=step_name,
        task_context=copy.deepcopy(task_context),
        dependency_results=copy.deepcopy(dependency_results) if dependency_results else {},
        step_config=copy.deepcopy(step_config) if step_config else {},
        attempt=attempt,
        max_attempts=max_attempts,
        checkpoint=copy.deepcopy(checkpoint),
        step_inputs=copy.deepcopy(step_inputs),
    )
