"""Helpers for unit-testing step handlers without a database or a worker."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Mapping
from typing import Any

from tasker_pg.batch import DEFAULT_BATCH_CONFIG
from tasker_pg.context import StepContext

NO_OP_CURSOR: dict[str, Any] = {
    "batch_id": "000",
    "start_cursor": 0,
    "end_cursor": 0,
    "batch_size": 0,
}
"""The cursor of the one no-op worker a `no_batches` outcome creates."""


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
    batch_cursor: Mapping[str, Any] | None = None,
    batch_metadata: Mapping[str, Any] | None = None,
    is_no_op: bool = False,
    claim_dependency_limit: int | None = None,
) -> StepContext:
    """A `StepContext` as a worker would build it, for calling `handler.call(context)` in tests.

    `dependency_results` maps upstream step names to their results; `checkpoint` takes the
    shape `{"cursor": ..., "items_processed": int, "accumulated_results": ...}`. Task and step
    UUIDs are fresh random ones unless given.

    The three roles of conditional and batch workflows:

    - a decision or an analyzer reads its parents' results from `dependency_results`;
    - a batch worker: `batch_cursor` (a cursor config such as `create_cursor_configs` makes),
      `batch_metadata` (merged over the template's `batch_config` defaults) and `is_no_op`
      become its step inputs exactly as the engine writes them (`is_no_op=True` alone gives
      the no-op worker `000`); not together with `step_inputs`;
    - an aggregator gets every worker's result in `dependency_results`. With
      `claim_dependency_limit=n` the context behaves like a claim that carried only the first
      n of them (in name order): `dependency_results_partial` is true and the accessors fetch
      the rest (from memory here, from the database in a worker), so a test shows that the
      handler does not depend on the claim holding everything.

    Every dict is deep-copied, as a worker hands each run freshly decoded data: a handler that
    mutates its input (the guide's checkpoint example does) never changes the test's fixtures
    or a result object the test still holds.
    """
    if batch_cursor is not None or batch_metadata is not None or is_no_op:
        if step_inputs is not None:
            raise ValueError("pass either step_inputs or the batch worker's inputs, not both")
        if batch_cursor is None and not is_no_op:
            raise ValueError("a batch worker needs batch_cursor (or is_no_op=True)")
        step_inputs = {
            "cursor": dict(batch_cursor if batch_cursor is not None else NO_OP_CURSOR),
            "batch_metadata": {**DEFAULT_BATCH_CONFIG, **(batch_metadata or {})},
            "is_no_op": is_no_op,
        }
    results = copy.deepcopy(dependency_results) if dependency_results else {}
    fetcher: _MemoryFetcher | None = None
    claimed = results
    if claim_dependency_limit is not None:
        if isinstance(claim_dependency_limit, bool) or claim_dependency_limit < 0:
            raise ValueError(f"claim_dependency_limit must be >= 0, got {claim_dependency_limit}")
        fetcher = _MemoryFetcher(results)
        claimed = {name: results[name] for name in sorted(results)[:claim_dependency_limit]}
    return StepContext(
        task_uuid=task_uuid if task_uuid is not None else str(uuid.uuid4()),
        step_uuid=step_uuid if step_uuid is not None else str(uuid.uuid4()),
        step_name=step_name,
        handler_name=step_name,
        task_context=copy.deepcopy(task_context),
        dependency_results=claimed,
        step_config=copy.deepcopy(step_config) if step_config else {},
        attempt=attempt,
        max_attempts=max_attempts,
        checkpoint=copy.deepcopy(checkpoint),
        step_inputs=copy.deepcopy(step_inputs),
        dependency_results_partial=fetcher is not None and len(claimed) < len(results),
        dependency_fetcher=fetcher,
    )


class _MemoryFetcher:
    """Serves `build_test_context`'s dependency results the way `tasker.dependency_results`
    pages through them (name order, prefix, after, limit), each page freshly copied."""

    def __init__(self, results: dict[str, Any]) -> None:
        self._results = results
        self.pages = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return None

    async def fetch_page(
        self, step_uuid: str, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be between 1 and 1000, got {limit}")
        self.pages += 1
        names = [
            n
            for n in sorted(self._results)
            if n.startswith(prefix) and (after is None or n > after)
        ][:limit]
        return [(n, copy.deepcopy(self._results[n])) for n in names]
