"""Batch fan-out: an analyzer splits the work into cursor ranges, one worker step per range,
and a convergence step aggregates the workers' results.

Three roles, one mixin (`Batchable`, used next to `StepHandler`):

- the **analyzer** (a `batchable` step) counts the items and returns `batch_analyzer_success`
  with one cursor config per worker (`create_cursor_configs` or `create_cursor_ranges`), or
  `no_batches_outcome`; the engine creates the workers `{worker_template_name}_{batch_id}` in
  the transaction that commits the analyzer;
- each **worker** (made from a `batch_worker` template step) reads its range with
  `get_batch_context` and returns `batch_worker_success`; a no-op worker (the one `no_batches`
  creates) is answered by `handle_no_op_worker`;
- the **aggregator** (a `deferred_convergence` step) reads every worker's result with
  `aggregate_batch_worker_results` (or `context.get_all_dependency_results(prefix)`).

A worker's inputs, as the engine writes them: `{"cursor": {"batch_id", "start_cursor",
"end_cursor", "batch_size"}, "batch_metadata": {...the template's batch_config merged with the
analyzer's batch_metadata...}, "is_no_op": bool}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from tasker_pg.context import BlockingFetchError, StepContext
from tasker_pg.decision import STEP_NAME_RE, check_reason
from tasker_pg.errors import PermanentError
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import NAME_MAX_LEN

MAX_BATCHES = 100_000
"""Most cursor configs the helpers build or accept (the ceiling of the engine's
`max_batch_workers` setting, whose default is 1,000)."""
MAX_TOTAL_ITEMS = 2**63 - 1
"""Largest item count and cursor position the helpers accept (a PostgreSQL bigint)."""
BATCH_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
"""A batch id: the part of a worker's step name after `{worker_template_name}_` (the engine's
rule: 1 to 64 letters, digits, '_' and '-')."""
DEFAULT_CURSOR_FIELD = "id"
"""The `cursor_field` of a batch_worker template step that does not set one."""
DEFAULT_BATCH_CONFIG: dict[str, Any] = {
    "batch_size": 1000,
    "parallelism": 10,
    "cursor_field": DEFAULT_CURSOR_FIELD,
    "failure_strategy": "continue_on_failure",
}
"""A batch_worker template step's `batch_config` with every default (what its workers get in
`batch_metadata` when neither the template nor the analyzer sets anything)."""


class CursorConfig(TypedDict):
    """One worker's range: items `start_cursor` (inclusive) to `end_cursor` (exclusive).

    ```python
    Batchable.create_cursor_configs(1000, 3)[0]
    # {"batch_id": "001", "start_cursor": 0, "end_cursor": 334, "batch_size": 334}
    ```

    The helpers make integer ranges; a config written by hand may use strings (keys, dates)
    as cursors, and may carry extra keys, which reach the worker in `BatchWorkerContext.cursor`.
    """

    batch_id: str
    start_cursor: Any
    end_cursor: Any
    batch_size: int


@dataclass(frozen=True, slots=True)
class BatchWorkerContext:
    """What a batch worker is to do, read from its step inputs by `Batchable.get_batch_context`.

    `start_cursor` is inclusive and `end_cursor` exclusive (with the helpers' integer ranges,
    `rows[ctx.start_cursor:ctx.end_cursor]`). `batch_metadata` holds the template's
    `batch_config` (`batch_size`, `parallelism`, `cursor_field`, `failure_strategy`) merged
    with the analyzer's `batch_metadata`. A no-op worker (`is_no_op`) has nothing to do:
    return `handle_no_op_worker(context)`.

    ```python
    batch = self.get_batch_context(context)   # in a Batchable handler's call()
    rows = load_rows()[batch.start_cursor : batch.end_cursor]
    key = batch.cursor_field                  # "id" unless the template's batch_config says
    ```
    """

    batch_id: str
    start_cursor: Any
    end_cursor: Any
    batch_size: int
    is_no_op: bool
    cursor_field: str = DEFAULT_CURSOR_FIELD
    batch_metadata: dict[str, Any] = field(default_factory=dict)
    cursor: dict[str, Any] = field(default_factory=dict)
    """The whole cursor config as the analyzer sent it (extra keys included)."""


class Batchable:
    """Mixin for the three roles of a batch fan-out (analyzer, worker, aggregator).

    ```python
    class AnalyzeCsv(StepHandler, Batchable):
        handler_name = "csv.analyze"

        def call(self, context: StepContext) -> StepHandlerResult:
            total = count_rows(context.get_input("path"))
            if total == 0:
                return self.no_batches_outcome("the file has no rows")
            return self.batch_analyzer_success(
                cursor_configs=self.create_cursor_ranges(total, batch_size=200),
                worker_template_name="process_batch",
                total_items=total,
            )

    class ProcessBatch(StepHandler, Batchable):
        handler_name = "csv.process_batch"

        def call(self, context: StepContext) -> StepHandlerResult:
            no_op = self.handle_no_op_worker(context)
            if no_op is not None:
                return no_op
            batch = self.get_batch_context(context)
            rows = read_rows(context.get_input("path"))[batch.start_cursor : batch.end_cursor]
            return self.batch_worker_success(
                items_processed=len(rows), results={"value": sum(r.value for r in rows)}
            )

    class Aggregate(StepHandler, Batchable):
        handler_name = "csv.aggregate"

        def call(self, context: StepContext) -> StepHandlerResult:
            summary = self.aggregate_batch_worker_results(context, "process_batch_")
            value = sum(r["value"] for r in summary["results"].values() if r)
            return self.success({"total_processed": summary["total_processed"], "value": value})
    ```
    """

    # --- analyzer ------------------------------------------------------------------------------

    @staticmethod
    def create_cursor_configs(total_items: int, worker_count: int) -> list[CursorConfig]:
        """Split items `[0, total_items)` into `worker_count` ranges (the ceiling split).

        Sizes differ by at most one, the larger ranges first (1000 items, 3 workers: 334, 333,
        333). Never makes an empty range: with more workers than items each item gets its own
        worker, and 0 items give no configs (return `no_batches_outcome` then). Batch ids are
        `"001"`, `"002"`, ..., zero-padded to at least three digits, so they sort like their
        numbers.
        """
        total = _count(total_items, "total_items", 0, MAX_TOTAL_ITEMS)
        workers = _count(worker_count, "worker_count", 1, MAX_BATCHES)
        if total == 0:
            return []
        workers = min(workers, total)
        base, extra = divmod(total, workers)
        sizes = [base + 1] * extra + [base] * (workers - extra)
        return _configs(sizes)

    @staticmethod
    def create_cursor_ranges(
        total_items: int, batch_size: int, max_batches: int | None = None
    ) -> list[CursorConfig]:
        """Split items `[0, total_items)` into ranges of `batch_size` (the last one shorter).

        With `max_batches`, a split that would need more ranges uses larger ones instead
        (`ceil(total_items / max_batches)` each), so there are at most `max_batches`. Raises
        `ValueError` beyond `MAX_BATCHES` ranges. Batch ids as in `create_cursor_configs`.
        """
        total = _count(total_items, "total_items", 0, MAX_TOTAL_ITEMS)
        size = _count(batch_size, "batch_size", 1, MAX_TOTAL_ITEMS)
        cap = None if max_batches is None else _count(max_batches, "max_batches", 1, MAX_BATCHES)
        if total == 0:
            return []
        count = -(-total // size)
        if cap is not None and count > cap:
            size = -(-total // cap)
            count = -(-total // size)
        if count > MAX_BATCHES:
            raise ValueError(
                f"{total} items in batches of {size} make {count} batches, more than "
                f"{MAX_BATCHES}: use a larger batch_size or pass max_batches"
            )
        sizes = [size] * (count - 1) + [total - size * (count - 1)]
        return _configs(sizes)

    def batch_analyzer_success(
        self,
        *,
        cursor_configs: Sequence[Mapping[str, Any]],
        worker_template_name: str,
        total_items: int,
        batch_metadata: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> StepHandlerResult:
        """Fan out: one worker per cursor config, named `{worker_template_name}_{batch_id}`.

        The result the engine reads: `{"batch_processing_outcome": {"type": "create_batches",
        "worker_template_name", "cursor_configs", "total_items", "batch_metadata"},
        "worker_count", "batch_metadata"}`; the outcome's `batch_metadata` (a JSON object) is
        merged over the template's `batch_config` into every worker's inputs (the copy beside
        the outcome is for readers of the analyzer's result). Raises `ValueError` for no
        configs (use `no_batches_outcome`), more than `MAX_BATCHES`, a malformed config or a
        batch id given twice. (The engine enforces its own limit, `max_batch_workers`, default
        1,000: beyond it the analyzer step fails permanently with a message that says so.)
        """
        return StepHandlerResult.success(
            create_batches_outcome(
                cursor_configs=cursor_configs,
                worker_template_name=worker_template_name,
                total_items=total_items,
                batch_metadata=batch_metadata,
            ),
            metadata=metadata,
        )

    def no_batches_outcome(
        self, reason: str, metadata: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        """No fan-out: the engine creates one no-op worker `{worker_template}_000`, so the
        aggregator still runs and the task completes. `reason` says why, in words."""
        return StepHandlerResult.success(
            {"batch_processing_outcome": {"type": "no_batches", "reason": check_reason(reason)}},
            metadata=metadata,
        )

    # --- worker --------------------------------------------------------------------------------

    @staticmethod
    def get_batch_context(context: StepContext) -> BatchWorkerContext:
        """This worker's range and settings, from the inputs the engine gave the step.

        Raises `PermanentError` (`error_code` `not_a_batch_worker`) when the step has no batch
        cursor: the handler runs a step that is not a batch worker, which no retry can fix.
        """
        inputs = context.step_inputs
        cursor = inputs.get("cursor") if isinstance(inputs, Mapping) else None
        if not isinstance(cursor, Mapping):
            raise PermanentError(
                f"step {context.step_name!r} has no batch cursor in its inputs: "
                "get_batch_context is for the workers a batchable step creates "
                "(template steps of type batch_worker)",
                error_code="not_a_batch_worker",
            )
        assert inputs is not None
        batch_id = cursor.get("batch_id")
        batch_size = cursor.get("batch_size")
        is_no_op = inputs.get("is_no_op", False)
        metadata = inputs.get("batch_metadata") or {}
        problem = None
        if not isinstance(batch_id, str) or not batch_id:
            problem = f"batch_id {batch_id!r} is not a non-empty string"
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            problem = f"batch_size {batch_size!r} is not an integer >= 0"
        elif not isinstance(is_no_op, bool):
            problem = f"is_no_op {is_no_op!r} is not a boolean"
        elif not isinstance(metadata, Mapping):
            problem = f"batch_metadata is a {type(metadata).__name__}, not an object"
        if problem is not None:
            raise PermanentError(
                f"step {context.step_name!r}: malformed batch inputs: {problem}",
                error_code="invalid_batch_inputs",
            )
        assert isinstance(batch_id, str) and isinstance(batch_size, int)
        cursor_field = metadata.get("cursor_field", DEFAULT_CURSOR_FIELD)
        return BatchWorkerContext(
            batch_id=batch_id,
            start_cursor=cursor.get("start_cursor"),
            end_cursor=cursor.get("end_cursor"),
            batch_size=batch_size,
            is_no_op=bool(is_no_op),
            cursor_field=cursor_field if isinstance(cursor_field, str) else DEFAULT_CURSOR_FIELD,
            batch_metadata=dict(metadata),
            cursor=dict(cursor),
        )

    def handle_no_op_worker(self, context: StepContext) -> StepHandlerResult | None:
        """The success of a no-op worker, or None for a worker with work to do.

        The result is `batch_worker_success`'s with nothing processed, plus `"no_op": true`:
        `{"items_processed": 0, "items_failed": 0, "items_skipped": 0, "results": [],
        "batch_id": "000", "no_op": true}`.
        """
        batch = self.get_batch_context(context)
        if not batch.is_no_op:
            return None
        result = worker_result(items_processed=0, results=[])
        result["batch_id"] = batch.batch_id
        result["no_op"] = True
        return StepHandlerResult.success(result)

    def batch_worker_success(
        self,
        *,
        items_processed: int,
        results: Any = None,
        items_failed: int = 0,
        items_skipped: int = 0,
        last_cursor: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> StepHandlerResult:
        """A worker's success: `{"items_processed", "items_failed", "items_skipped", "results"}`
        (plus `last_cursor` when given). `items_processed` counts every item the worker
        handled, failed and skipped ones included; `results` is any JSON value (None: `[]`)."""
        return StepHandlerResult.success(
            worker_result(
                items_processed=items_processed,
                results=results,
                items_failed=items_failed,
                items_skipped=items_skipped,
                last_cursor=last_cursor,
            ),
            metadata=metadata,
        )

    # --- aggregator ----------------------------------------------------------------------------

    @staticmethod
    def aggregate_worker_results(worker_results: Mapping[str, Any]) -> dict[str, Any]:
        """Sum the workers' results (`{worker step name: its result}`) into one summary.

        Returns `{"worker_count", "no_op_workers", "total_processed", "total_failed",
        "total_skipped", "results"}`, where `results` maps each worker that did work to its
        result's `results` value, in name order. Counts a worker without `items_processed`
        as 0; raises `ValueError` naming the worker for a result that is not an object or a
        count that is not an integer >= 0.
        """
        summary = _Summary()
        for name in sorted(worker_results):
            summary.add(name, worker_results[name])
        return summary.to_dict()

    def aggregate_batch_worker_results(self, context: StepContext, prefix: str) -> dict[str, Any]:
        """`aggregate_worker_results` of every finished ancestor whose name starts with
        `prefix` (`"process_batch_"` for workers of template step `process_batch`).

        For a sync handler; it fetches what a large fan-out's claim left out. An async handler
        uses `await self.aggregate_batch_worker_results_async(context, prefix)`.
        """
        try:
            results = context.get_all_dependency_results(_check_prefix(prefix))
        except BlockingFetchError as exc:
            raise BlockingFetchError(
                f"{exc} (here: `await self.aggregate_batch_worker_results_async(context, "
                f"{prefix!r})`)"
            ) from exc
        return self.aggregate_worker_results(results)

    async def aggregate_batch_worker_results_async(
        self, context: StepContext, prefix: str
    ) -> dict[str, Any]:
        """`aggregate_batch_worker_results` for async handlers: reads the workers' results a
        page at a time (`context.iter_dependency_results`)."""
        summary = _Summary()
        async for name, result in context.iter_dependency_results(_check_prefix(prefix)):
            summary.add(name, result)
        return summary.to_dict()


def create_batches_outcome(
    *,
    cursor_configs: Sequence[Mapping[str, Any]],
    worker_template_name: str,
    total_items: int,
    batch_metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result of an analyzer that fans out (what `batch_analyzer_success` returns)."""
    if not isinstance(worker_template_name, str) or not STEP_NAME_RE.fullmatch(
        worker_template_name
    ):
        raise ValueError(
            f"worker_template_name {worker_template_name!r} is not a step name: name the "
            "template step of type batch_worker"
        )
    total = _count(total_items, "total_items", 0, MAX_TOTAL_ITEMS)
    if isinstance(cursor_configs, str | bytes | Mapping) or not isinstance(
        cursor_configs, Sequence
    ):
        raise ValueError(
            f"cursor_configs must be a list of cursor configs, got {type(cursor_configs).__name__}"
        )
    if not cursor_configs:
        raise ValueError(
            "cursor_configs is empty: an analyzer with nothing to split returns "
            "self.no_batches_outcome(reason)"
        )
    if len(cursor_configs) > MAX_BATCHES:
        raise ValueError(f"{len(cursor_configs)} cursor configs, more than {MAX_BATCHES}")
    if batch_metadata is not None and not isinstance(batch_metadata, Mapping):
        raise ValueError(
            f"batch_metadata must be a JSON object (a dict), got {type(batch_metadata).__name__}"
        )
    configs = []
    seen: set[str] = set()
    for index, config in enumerate(cursor_configs):
        configs.append(_check_config(config, index, worker_template_name, seen))
    metadata = dict(batch_metadata) if batch_metadata is not None else {}
    return {
        "batch_processing_outcome": {
            "type": "create_batches",
            "worker_template_name": worker_template_name,
            "cursor_configs": configs,
            "total_items": total,
            "batch_metadata": metadata,
        },
        "worker_count": len(configs),
        # also beside the outcome, where Tasker's analyzers put it, for handlers reading it back
        "batch_metadata": metadata,
    }


def worker_result(
    *,
    items_processed: int,
    results: Any = None,
    items_failed: int = 0,
    items_skipped: int = 0,
    last_cursor: Any = None,
) -> dict[str, Any]:
    """A batch worker's result (what `batch_worker_success` returns)."""
    processed = _count(items_processed, "items_processed", 0, MAX_TOTAL_ITEMS)
    failed = _count(items_failed, "items_failed", 0, MAX_TOTAL_ITEMS)
    skipped = _count(items_skipped, "items_skipped", 0, MAX_TOTAL_ITEMS)
    if failed + skipped > processed:
        raise ValueError(
            f"items_failed ({failed}) + items_skipped ({skipped}) is more than items_processed "
            f"({processed}): items_processed counts every item the worker handled"
        )
    result: dict[str, Any] = {
        "items_processed": processed,
        "items_failed": failed,
        "items_skipped": skipped,
        "results": [] if results is None else results,
    }
    if last_cursor is not None:
        result["last_cursor"] = last_cursor
    return result


class _Summary:
    """The running sums of `aggregate_worker_results` (also fed a page at a time)."""

    def __init__(self) -> None:
        self.workers = 0
        self.no_ops = 0
        self.processed = 0
        self.failed = 0
        self.skipped = 0
        self.results: dict[str, Any] = {}

    def add(self, name: str, result: Any) -> None:
        if not isinstance(result, Mapping):
            raise ValueError(
                f"the result of {name!r} is a {type(result).__name__}, not an object: batch "
                "workers return self.batch_worker_success(...)"
            )
        self.workers += 1
        if result.get("no_op") is True:
            self.no_ops += 1
            return
        self.processed += _worker_count(result, "items_processed", name)
        self.failed += _worker_count(result, "items_failed", name)
        self.skipped += _worker_count(result, "items_skipped", name)
        self.results[name] = result.get("results")

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_count": self.workers,
            "no_op_workers": self.no_ops,
            "total_processed": self.processed,
            "total_failed": self.failed,
            "total_skipped": self.skipped,
            "results": self.results,
        }


def _worker_count(result: Mapping[str, Any], key: str, name: str) -> int:
    value = result.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} of {name!r} is {value!r}, not an integer >= 0")
    return value


def _configs(sizes: list[int]) -> list[CursorConfig]:
    width = max(3, len(str(len(sizes))))
    configs: list[CursorConfig] = []
    start = 0
    for number, size in enumerate(sizes, start=1):
        configs.append(
            {
                "batch_id": str(number).zfill(width),
                "start_cursor": start,
                "end_cursor": start + size,
                "batch_size": size,
            }
        )
        start += size
    return configs


def _count(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {value}")
    return value


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(
            f"prefix must be a non-empty string such as 'process_batch_', got {prefix!r}"
        )
    if len(prefix) > NAME_MAX_LEN:
        raise ValueError(f"prefix is {len(prefix)} characters; step names have {NAME_MAX_LEN}")
    return prefix


def _check_config(
    config: Mapping[str, Any], index: int, template_name: str, seen: set[str]
) -> dict[str, Any]:
    where = f"cursor_configs[{index}]"
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} is a {type(config).__name__}, not an object")
    missing = [
        k for k in ("batch_id", "start_cursor", "end_cursor", "batch_size") if k not in config
    ]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    batch_id = config["batch_id"]
    if not isinstance(batch_id, str) or not BATCH_ID_RE.fullmatch(batch_id):
        raise ValueError(
            f"{where}: batch_id {batch_id!r} must be 1 to 64 letters, digits, '_' and '-'"
        )
    worker = f"{template_name}_{batch_id}"
    if len(worker) > NAME_MAX_LEN:
        raise ValueError(
            f"{where}: worker name {worker[:40]}... is {len(worker)} characters, more than "
            f"{NAME_MAX_LEN}"
        )
    if batch_id in seen:
        raise ValueError(f"{where}: batch_id {batch_id!r} is given twice")
    seen.add(batch_id)
    _count(config["batch_size"], f"{where}.batch_size", 0, MAX_TOTAL_ITEMS)
    for key in ("start_cursor", "end_cursor"):
        value = config[key]
        if value is None or isinstance(value, bool | Mapping | list):
            raise ValueError(f"{where}.{key} must be a number or a string, got {value!r}")
        if isinstance(value, int) and not -MAX_TOTAL_ITEMS - 1 <= value <= MAX_TOTAL_ITEMS:
            raise ValueError(f"{where}.{key} {value} is outside the bigint range")
    start, end = config["start_cursor"], config["end_cursor"]
    if isinstance(start, int) and isinstance(end, int) and end < start:
        raise ValueError(f"{where}: end_cursor {end} is before start_cursor {start}")
    return dict(config)
