"""The handler API of conditional and batch workflows, without a database.

`DecisionHandler` (decision_success, decision_no_branches), the `Batchable` mixin (cursor
splits, analyzer outcomes, the worker's batch context, aggregation) and `build_test_context`
for the three roles, including a claim that left dependency results out.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tasker_pg
from tasker_pg import (
    Batchable,
    BatchWorkerContext,
    DecisionHandler,
    StepContext,
    StepHandler,
    StepHandlerResult,
)
from tasker_pg.batch import DEFAULT_BATCH_CONFIG, MAX_BATCHES, MAX_TOTAL_ITEMS
from tasker_pg.context import BlockingFetchError
from tasker_pg.errors import PermanentError
from tasker_pg.testing import build_test_context

# --- decisions --------------------------------------------------------------------------------


class Route(DecisionHandler):
    handler_name = "test.route"

    def call(self, context: StepContext) -> StepHandlerResult:
        amount = context.get_dependency_field("validate", "amount")
        if amount is None:
            return self.decision_no_branches("no amount")
        if amount < 1000:
            return self.decision_success(["auto_approve"], {"amount": amount})
        return self.decision_success(["manager_approval", "finance_review"], {"amount": amount})


def test_decision_success_exact_result() -> None:
    result = Route().call(build_test_context({}, {"validate": {"amount": 10}}))
    assert isinstance(result, StepHandlerResult) and result.is_success
    assert result.result == {
        "decision_point_outcome": {"type": "create_steps", "step_names": ["auto_approve"]},
        "routing_context": {"amount": 10},
    }
    result = Route().call(build_test_context({}, {"validate": {"amount": 5000}}))
    assert isinstance(result, StepHandlerResult)
    assert result.result["decision_point_outcome"]["step_names"] == [
        "manager_approval",
        "finance_review",
    ]


def test_decision_without_routing_context_and_with_metadata() -> None:
    result = Route().decision_success(("a", "b"), metadata={"why": "test"})
    assert result.result == {
        "decision_point_outcome": {"type": "create_steps", "step_names": ["a", "b"]},
        "routing_context": {},
    }
    assert result.metadata == {"why": "test"}


def test_decision_no_branches_exact_result() -> None:
    result = Route().call(build_test_context({}, {"validate": {}}))
    assert isinstance(result, StepHandlerResult)
    assert result.result == {
        "decision_point_outcome": {"type": "no_branches"},
        "reason": "no amount",
    }


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "decision_no_branches"),
        ("auto_approve", "wrap it in a list"),
        (None, "list of step names"),
        (["a", "a"], "named twice"),
        (["a", ""], "not a step name"),
        (["a", "b c"], "not a step name"),
        (["9lives"], "not a step name"),
        (["x" * 129], "not a step name"),
        ([1], "strings"),
        ([f"s{i}" for i in range(1001)], "at most 1000"),
    ],
)
def test_decision_success_refuses_bad_steps(steps: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Route().decision_success(steps)


def test_an_empty_decision_says_to_take_no_branch_instead() -> None:
    """The engine refuses `create_steps` with no names the same way (see
    tests/sql/test_dynamic_workflows.py): the advice is no_branches."""
    with pytest.raises(ValueError) as refused:
        Route().decision_success([])
    assert str(refused.value) == (
        "steps is empty: a decision that takes no branch returns"
        ' self.decision_no_branches(reason) ({"type": "no_branches"}) instead'
    )


def test_decision_refuses_bad_routing_context_and_reason() -> None:
    with pytest.raises(ValueError, match="routing_context must be a JSON object"):
        Route().decision_success(["a"], ["not", "a", "dict"])  # type: ignore[arg-type]
    assert Route().decision_success(["x" * 128]).is_success  # the longest name
    for reason, message in [("", "empty"), ("  ", "empty"), (3, "string"), ("r" * 4097, "4096")]:
        with pytest.raises(ValueError, match=message):
            Route().decision_no_branches(reason)  # type: ignore[arg-type]


def test_handler_api_is_exported() -> None:
    for name in ("DecisionHandler", "Batchable", "BatchWorkerContext", "CursorConfig"):
        assert name in tasker_pg.__all__
        assert getattr(tasker_pg, name) is not None
    assert issubclass(DecisionHandler, StepHandler)
    assert Route.handler_name == "test.route"


# --- cursor splits ----------------------------------------------------------------------------


def test_create_cursor_configs_exact() -> None:
    assert Batchable.create_cursor_configs(1000, 5) == [
        {
            "batch_id": f"00{i + 1}",
            "start_cursor": i * 200,
            "end_cursor": (i + 1) * 200,
            "batch_size": 200,
        }
        for i in range(5)
    ]
    assert Batchable.create_cursor_configs(10, 4) == [
        {"batch_id": "001", "start_cursor": 0, "end_cursor": 3, "batch_size": 3},
        {"batch_id": "002", "start_cursor": 3, "end_cursor": 6, "batch_size": 3},
        {"batch_id": "003", "start_cursor": 6, "end_cursor": 8, "batch_size": 2},
        {"batch_id": "004", "start_cursor": 8, "end_cursor": 10, "batch_size": 2},
    ]
    # more workers than items: one item each, no empty range
    assert Batchable.create_cursor_configs(2, 5) == [
        {"batch_id": "001", "start_cursor": 0, "end_cursor": 1, "batch_size": 1},
        {"batch_id": "002", "start_cursor": 1, "end_cursor": 2, "batch_size": 1},
    ]
    assert Batchable.create_cursor_configs(0, 5) == []
    assert Batchable.create_cursor_configs(7, 1) == [
        {"batch_id": "001", "start_cursor": 0, "end_cursor": 7, "batch_size": 7}
    ]


def test_create_cursor_configs_huge_values_and_wide_ids() -> None:
    configs = Batchable.create_cursor_configs(MAX_TOTAL_ITEMS, 3)
    assert configs[-1]["end_cursor"] == MAX_TOTAL_ITEMS
    assert sum(c["batch_size"] for c in configs) == MAX_TOTAL_ITEMS
    many = Batchable.create_cursor_configs(MAX_BATCHES, MAX_BATCHES)
    assert len(many) == MAX_BATCHES
    assert many[0]["batch_id"] == "000001" and many[-1]["batch_id"] == "100000"
    thousand = Batchable.create_cursor_configs(5000, 1000)
    assert thousand[0]["batch_id"] == "0001" and thousand[-1]["batch_id"] == "1000"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 3), "total_items must be between 0"),
        ((10, 0), "worker_count must be between 1"),
        ((10, -2), "worker_count must be between 1"),
        ((10, MAX_BATCHES + 1), "worker_count must be between 1 and 100000"),
        ((MAX_TOTAL_ITEMS + 1, 3), "total_items must be between"),
        ((10.0, 3), "total_items must be an integer"),
        ((10, True), "worker_count must be an integer"),
        (("10", 3), "total_items must be an integer"),
    ],
)
def test_create_cursor_configs_refuses(args: tuple[Any, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Batchable.create_cursor_configs(*args)


def test_create_cursor_ranges_exact() -> None:
    assert Batchable.create_cursor_ranges(1000, 200) == Batchable.create_cursor_configs(1000, 5)
    assert Batchable.create_cursor_ranges(450, 200) == [
        {"batch_id": "001", "start_cursor": 0, "end_cursor": 200, "batch_size": 200},
        {"batch_id": "002", "start_cursor": 200, "end_cursor": 400, "batch_size": 200},
        {"batch_id": "003", "start_cursor": 400, "end_cursor": 450, "batch_size": 50},
    ]
    # 10 batches of 100 would exceed max_batches=4: batches of 250 instead
    assert [c["batch_size"] for c in Batchable.create_cursor_ranges(1000, 100, 4)] == [250] * 4
    # 10 items, at most 4 batches: batches of 3
    assert [c["batch_size"] for c in Batchable.create_cursor_ranges(10, 1, max_batches=4)] == [
        3,
        3,
        3,
        1,
    ]
    assert Batchable.create_cursor_ranges(0, 10) == []
    assert Batchable.create_cursor_ranges(5, 1000) == [
        {"batch_id": "001", "start_cursor": 0, "end_cursor": 5, "batch_size": 5}
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 0), "batch_size must be between 1"),
        ((-5, 10), "total_items must be between 0"),
        ((10, 1, 0), "max_batches must be between 1"),
        ((MAX_BATCHES + 1, 1), "more than 100000: use a larger batch_size"),
        ((10, 2.5), "batch_size must be an integer"),
    ],
)
def test_create_cursor_ranges_refuses(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Batchable.create_cursor_ranges(*args)


def _assert_partition(configs: list[Any], total: int) -> None:
    """The configs cover [0, total) exactly once, in order, with sorted unique ids."""
    position = 0
    for config in configs:
        assert config["start_cursor"] == position
        assert config["batch_size"] == config["end_cursor"] - config["start_cursor"] > 0
        position = config["end_cursor"]
    assert position == total
    ids = [c["batch_id"] for c in configs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [int(i) for i in ids] == list(range(1, len(ids) + 1))
    assert all(len(i) >= 3 for i in ids)


@given(
    total=st.integers(0, 10**6) | st.integers(0, MAX_TOTAL_ITEMS),
    workers=st.integers(1, 1500),
)
def test_cursor_configs_partition_evenly(total: int, workers: int) -> None:
    configs = Batchable.create_cursor_configs(total, workers)
    _assert_partition(configs, total)
    assert len(configs) == min(total, workers)
    sizes = [c["batch_size"] for c in configs]
    if sizes:
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the larger ranges first
        assert max(sizes) == -(-total // len(configs))  # the ceiling split


@given(
    total=st.integers(0, 10**6),
    size=st.integers(1, 10**4),
    cap=st.none() | st.integers(1, 1000),
)
def test_cursor_ranges_respect_batch_size(total: int, size: int, cap: int | None) -> None:
    if cap is None and -(-total // size) > MAX_BATCHES:
        with pytest.raises(ValueError, match="more than 100000"):
            Batchable.create_cursor_ranges(total, size, cap)
        return
    configs = Batchable.create_cursor_ranges(total, size, cap)
    _assert_partition(configs, total)
    if not configs:
        return
    sizes = [c["batch_size"] for c in configs]
    effective = sizes[0]
    assert all(s == effective for s in sizes[:-1]) and sizes[-1] <= effective
    if cap is None or -(-total // size) <= cap:
        assert effective == min(size, total)
    else:
        assert len(configs) <= cap and effective == -(-total // cap)


# --- analyzer outcomes ------------------------------------------------------------------------


class Analyzer(StepHandler, Batchable):
    handler_name = "test.analyze"

    def call(self, context: StepContext) -> StepHandlerResult:
        total = context.get_dependency_field("count", "rows")
        if not total:
            return self.no_batches_outcome("the file has no rows")
        return self.batch_analyzer_success(
            cursor_configs=self.create_cursor_ranges(total, batch_size=200),
            worker_template_name="process_batch",
            total_items=total,
            batch_metadata={"path": "products.csv"},
        )


def test_batch_analyzer_success_exact_result() -> None:
    result = Analyzer().call(build_test_context({}, {"count": {"rows": 450}}))
    assert isinstance(result, StepHandlerResult) and result.is_success
    assert result.result == {
        "batch_processing_outcome": {
            "type": "create_batches",
            "worker_template_name": "process_batch",
            "cursor_configs": [
                {"batch_id": "001", "start_cursor": 0, "end_cursor": 200, "batch_size": 200},
                {"batch_id": "002", "start_cursor": 200, "end_cursor": 400, "batch_size": 200},
                {"batch_id": "003", "start_cursor": 400, "end_cursor": 450, "batch_size": 50},
            ],
            "total_items": 450,
            "batch_metadata": {"path": "products.csv"},
        },
        "worker_count": 3,
        "batch_metadata": {"path": "products.csv"},
    }
    bare = Analyzer().batch_analyzer_success(
        cursor_configs=[{"batch_id": "a", "start_cursor": "A", "end_cursor": "M", "batch_size": 0}],
        worker_template_name="w",
        total_items=0,
        metadata={"m": 1},
    )
    assert bare.result["batch_metadata"] == {}
    assert bare.result["batch_processing_outcome"]["batch_metadata"] == {}
    assert bare.metadata == {"m": 1}
    assert bare.result["batch_processing_outcome"]["cursor_configs"][0]["start_cursor"] == "A"


def test_no_batches_outcome_exact_result() -> None:
    result = Analyzer().call(build_test_context({}, {"count": {"rows": 0}}))
    assert isinstance(result, StepHandlerResult)
    assert result.result == {
        "batch_processing_outcome": {"type": "no_batches", "reason": "the file has no rows"}
    }
    with pytest.raises(ValueError, match="empty"):
        Analyzer().no_batches_outcome("")


def _config(batch_id: Any = "001", **over: Any) -> dict[str, Any]:
    config = {"batch_id": batch_id, "start_cursor": 0, "end_cursor": 10, "batch_size": 10}
    config.update(over)
    return config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cursor_configs": []}, "no_batches_outcome"),
        ({"cursor_configs": _config()}, "must be a list"),
        ({"cursor_configs": [_config(), _config()]}, "'001' is given twice"),
        ({"cursor_configs": [_config(batch_id="a b")]}, "batch_id 'a b'"),
        ({"cursor_configs": [_config(batch_id="")]}, "batch_id ''"),
        ({"cursor_configs": [_config(batch_id=1)]}, "batch_id 1"),
        ({"cursor_configs": [_config(batch_id="x" * 65)]}, "1 to 64"),
        ({"cursor_configs": [_config(batch_id="a.b")]}, "1 to 64"),
        (
            {"worker_template_name": "w" * 100, "cursor_configs": [_config(batch_id="x" * 64)]},
            "more than 128",
        ),
        ({"cursor_configs": [{"batch_id": "001"}]}, "lacks start_cursor, end_cursor, batch_size"),
        ({"cursor_configs": [_config(batch_size=-1)]}, r"cursor_configs\[0\].batch_size"),
        ({"cursor_configs": [_config(start_cursor=None)]}, "start_cursor must be a number"),
        ({"cursor_configs": [_config(end_cursor=[1])]}, "end_cursor must be a number"),
        ({"cursor_configs": [_config(start_cursor=5, end_cursor=2)]}, "before start_cursor"),
        ({"cursor_configs": [_config(end_cursor=2**63)]}, "bigint range"),
        ({"cursor_configs": ["001"]}, r"cursor_configs\[0\] is a str"),
        ({"cursor_configs": [_config()] * (MAX_BATCHES + 1)}, "more than 100000"),
        ({"worker_template_name": "bad name"}, "not a step name"),
        ({"total_items": -1}, "total_items must be between"),
        ({"batch_metadata": [1]}, "batch_metadata must be a JSON object"),
    ],
)
def test_batch_analyzer_success_refuses(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "cursor_configs": [_config()],
        "worker_template_name": "process_batch",
        "total_items": 10,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Analyzer().batch_analyzer_success(**args)


# --- workers ----------------------------------------------------------------------------------


class Worker(StepHandler, Batchable):
    handler_name = "test.process_batch"

    def call(self, context: StepContext) -> StepHandlerResult:
        no_op = self.handle_no_op_worker(context)
        if no_op is not None:
            return no_op
        batch = self.get_batch_context(context)
        rows = context.get_input("rows")[batch.start_cursor : batch.end_cursor]
        return self.batch_worker_success(
            items_processed=len(rows), results={"value": sum(rows)}, last_cursor=batch.end_cursor
        )


def test_batch_worker_context_and_success() -> None:
    cursor = Batchable.create_cursor_configs(10, 3)[1]
    context = build_test_context(
        {"rows": list(range(10))}, batch_cursor=cursor, batch_metadata={"cursor_field": "sku"}
    )
    assert context.step_inputs == {
        "cursor": {"batch_id": "002", "start_cursor": 4, "end_cursor": 7, "batch_size": 3},
        "batch_metadata": {**DEFAULT_BATCH_CONFIG, "cursor_field": "sku"},
        "is_no_op": False,
    }
    batch = Batchable.get_batch_context(context)
    assert batch == BatchWorkerContext(
        batch_id="002",
        start_cursor=4,
        end_cursor=7,
        batch_size=3,
        is_no_op=False,
        cursor_field="sku",
        batch_metadata={**DEFAULT_BATCH_CONFIG, "cursor_field": "sku"},
        cursor=cursor,  # type: ignore[arg-type]
    )
    with pytest.raises(AttributeError):
        batch.batch_id = "x"  # type: ignore[misc]
    result = Worker().call(context)
    assert isinstance(result, StepHandlerResult)
    assert result.result == {
        "items_processed": 3,
        "items_failed": 0,
        "items_skipped": 0,
        "results": {"value": 4 + 5 + 6},
        "last_cursor": 7,
    }


def test_no_op_worker() -> None:
    context = build_test_context({"rows": []}, is_no_op=True)
    batch = Batchable.get_batch_context(context)
    assert (batch.batch_id, batch.start_cursor, batch.end_cursor, batch.batch_size) == (
        "000",
        0,
        0,
        0,
    )
    assert batch.is_no_op and batch.cursor_field == "id"
    assert batch.batch_metadata == DEFAULT_BATCH_CONFIG
    result = Worker().call(context)
    assert isinstance(result, StepHandlerResult)
    assert result.result == {
        "items_processed": 0,
        "items_failed": 0,
        "items_skipped": 0,
        "results": [],
        "batch_id": "000",
        "no_op": True,
    }
    busy = build_test_context({}, batch_cursor=Batchable.create_cursor_configs(3, 1)[0])
    assert Worker().handle_no_op_worker(busy) is None


def test_batch_worker_success_counts() -> None:
    result = Worker().batch_worker_success(items_processed=5, items_failed=2, items_skipped=3)
    assert result.result == {
        "items_processed": 5,
        "items_failed": 2,
        "items_skipped": 3,
        "results": [],
    }
    with pytest.raises(ValueError, match="more than items_processed"):
        Worker().batch_worker_success(items_processed=1, items_failed=1, items_skipped=1)
    with pytest.raises(ValueError, match="items_processed must be between 0"):
        Worker().batch_worker_success(items_processed=-1)
    with pytest.raises(ValueError, match="items_processed must be an integer"):
        Worker().batch_worker_success(items_processed=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inputs", "code", "message"),
    [
        (None, "not_a_batch_worker", "no batch cursor"),
        ({"other": 1}, "not_a_batch_worker", "no batch cursor"),
        ({"cursor": "001"}, "not_a_batch_worker", "no batch cursor"),
        ({"cursor": {"batch_size": 1}}, "invalid_batch_inputs", "batch_id None"),
        ({"cursor": {"batch_id": "1", "batch_size": -1}}, "invalid_batch_inputs", "batch_size"),
        (
            {"cursor": {"batch_id": "1", "batch_size": 1}, "is_no_op": "yes"},
            "invalid_batch_inputs",
            "is_no_op",
        ),
        (
            {"cursor": {"batch_id": "1", "batch_size": 1}, "batch_metadata": [1]},
            "invalid_batch_inputs",
            "batch_metadata",
        ),
    ],
)
def test_get_batch_context_refuses_other_steps(
    inputs: dict[str, Any] | None, code: str, message: str
) -> None:
    context = build_test_context({}, step_inputs=inputs, step_name="not_a_worker")
    with pytest.raises(PermanentError, match=message) as info:
        Batchable.get_batch_context(context)
    assert info.value.error_code == code
    assert "not_a_worker" in str(info.value)


def test_build_test_context_batch_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        build_test_context({}, step_inputs={"a": 1}, is_no_op=True)
    with pytest.raises(ValueError, match="needs batch_cursor"):
        build_test_context({}, batch_metadata={"a": 1})
    with pytest.raises(ValueError, match="claim_dependency_limit"):
        build_test_context({}, claim_dependency_limit=-1)


# --- aggregation ------------------------------------------------------------------------------


def _worker_results(count: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        f"process_batch_{i:03d}": {
            "items_processed": i,
            "items_failed": i % 2,
            "items_skipped": 0,
            "results": {"value": i * 10},
        }
        for i in range(1, count + 1)
    }
    results["analyze"] = {"batch_processing_outcome": {"type": "create_batches"}}
    return results


class Aggregate(StepHandler, Batchable):
    handler_name = "test.aggregate"

    def call(self, context: StepContext) -> StepHandlerResult:
        summary = self.aggregate_batch_worker_results(context, "process_batch_")
        value = sum(r["value"] for r in summary["results"].values())
        return self.success({"total": summary["total_processed"], "value": value, **summary})


class AsyncAggregate(StepHandler, Batchable):
    handler_name = "test.aggregate_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        summary = await self.aggregate_batch_worker_results_async(context, "process_batch_")
        return self.success(summary)


def test_aggregate_exact_result() -> None:
    context = build_test_context({}, _worker_results(3))
    result = Aggregate().call(context)
    assert isinstance(result, StepHandlerResult)
    assert result.result == {
        "total": 6,
        "value": 60,
        "worker_count": 3,
        "no_op_workers": 0,
        "total_processed": 6,
        "total_failed": 2,
        "total_skipped": 0,
        "results": {
            "process_batch_001": {"value": 10},
            "process_batch_002": {"value": 20},
            "process_batch_003": {"value": 30},
        },
    }
    assert list(result.result["results"]) == sorted(result.result["results"])


def test_aggregate_no_op_and_nothing() -> None:
    no_op = Worker().call(build_test_context({}, is_no_op=True))
    assert isinstance(no_op, StepHandlerResult)
    summary = Batchable.aggregate_worker_results({"process_batch_000": no_op.result})
    assert summary == {
        "worker_count": 1,
        "no_op_workers": 1,
        "total_processed": 0,
        "total_failed": 0,
        "total_skipped": 0,
        "results": {},
    }
    assert Batchable.aggregate_worker_results({})["worker_count"] == 0
    # a worker result without counts counts 0 items
    assert Batchable.aggregate_worker_results({"w_1": {"results": 5}})["results"] == {"w_1": 5}


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"w_1": [1, 2]}, "the result of 'w_1' is a list, not an object"),
        ({"w_1": None}, "the result of 'w_1' is a NoneType"),
        ({"w_1": {"items_processed": "3"}}, "items_processed of 'w_1' is '3'"),
        ({"w_1": {"items_processed": -3}}, "items_processed of 'w_1' is -3"),
        ({"w_1": {"items_processed": 1, "items_failed": True}}, "items_failed of 'w_1'"),
    ],
)
def test_aggregate_refuses_malformed_worker_results(results: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Batchable.aggregate_worker_results(results)


def test_aggregate_refuses_bad_prefix() -> None:
    context = build_test_context({}, _worker_results(1))
    for prefix in ("", None, "p" * 129):
        with pytest.raises(ValueError, match="prefix"):
            Aggregate().aggregate_batch_worker_results(context, prefix)  # type: ignore[arg-type]


# --- a claim that left results out ------------------------------------------------------------


def test_partial_claim_sync_handler_fetches_the_rest() -> None:
    full = _worker_results(250)
    complete = Aggregate().call(build_test_context({}, full))
    context = build_test_context({}, full, claim_dependency_limit=10)
    assert context.dependency_results_partial
    assert len(context.dependency_results) == 10
    partial = Aggregate().call(context)
    assert isinstance(partial, StepHandlerResult) and isinstance(complete, StepHandlerResult)
    assert partial.result == complete.result
    assert partial.result["worker_count"] == 250
    # single names: those in the claim and those fetched, absent ones None
    assert context.get_dependency_result("analyze") == full["analyze"]
    assert context.get_dependency_result("process_batch_249") == full["process_batch_249"]
    assert context.get_dependency_field("process_batch_200", "results", "value") == 2000
    assert context.get_dependency_result("process_batch_2") is None
    assert context.get_dependency_result("zzz") is None
    assert context.get_all_dependency_results("nothing_") == {}


def test_partial_claim_async_handler_pages_and_sync_api_is_refused_on_the_loop() -> None:
    full = _worker_results(250)
    context = build_test_context({}, full, claim_dependency_limit=0)
    fetcher = context._dependency_fetcher  # the in-memory fetcher counts its pages
    assert fetcher is not None

    async def run() -> Any:
        result = await AsyncAggregate().call(context)
        names = [name async for name, _ in context.iter_dependency_results("process_batch_")]
        assert names == sorted(n for n in full if n.startswith("process_batch_"))
        assert (
            await context.get_dependency_result_async("process_batch_007")
            == full["process_batch_007"]
        )
        assert await context.get_dependency_result_async("process_batch_00") is None
        everything = await context.get_all_dependency_results_async()
        assert everything == full and list(everything) == sorted(full)
        with pytest.raises(RuntimeError, match="iter_dependency_results"):
            context.get_all_dependency_results("process_batch_")
        with pytest.raises(RuntimeError, match="get_dependency_result_async"):
            context.get_dependency_result("process_batch_001")
        # the sync aggregation helper in an async handler says which helper to use instead
        with pytest.raises(BlockingFetchError, match="aggregate_batch_worker_results_async"):
            Aggregate().aggregate_batch_worker_results(context, "process_batch_")
        return result.result

    summary = asyncio.run(run())
    assert summary["worker_count"] == 250 and summary["total_processed"] == sum(range(251))
    assert fetcher.pages >= 3  # pages of 100: 250 workers took three


def test_partial_claim_sync_api_from_a_thread_uses_the_fetchers_loop() -> None:
    """What the worker does: a sync handler's thread runs the fetch on the worker's loop."""
    full = _worker_results(120)

    class LoopFetcher:
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop
            self.threads: set[int] = set()

        @property
        def loop(self) -> asyncio.AbstractEventLoop:
            return self._loop

        async def fetch_page(
            self, step_uuid: str, prefix: str, after: str | None, limit: int
        ) -> list[tuple[str, Any]]:
            self.threads.add(threading.get_ident())
            names = [
                n for n in sorted(full) if n.startswith(prefix) and (after is None or n > after)
            ]
            return [(n, full[n]) for n in names[:limit]]

    async def run() -> tuple[Any, LoopFetcher]:
        fetcher = LoopFetcher(asyncio.get_running_loop())
        context = StepContext(
            task_uuid="t",
            step_uuid="s",
            step_name="aggregate",
            handler_name="test.aggregate",
            task_context={},
            dependency_results={},
            step_config={},
            attempt=1,
            max_attempts=3,
            dependency_results_partial=True,
            dependency_fetcher=fetcher,
        )
        result = await asyncio.get_running_loop().run_in_executor(None, Aggregate().call, context)
        return result, fetcher

    result, fetcher = asyncio.run(run())
    assert result.result["worker_count"] == 120
    assert fetcher.threads == {
        threading.get_ident()
    }  # the loop's thread (this one), not the pool's


def test_partial_claim_without_a_fetcher_is_an_error_not_a_partial_answer() -> None:
    context = StepContext(
        task_uuid="t",
        step_uuid="s",
        step_name="aggregate",
        handler_name="h",
        task_context={},
        dependency_results={"process_batch_001": {}},
        step_config={},
        attempt=1,
        max_attempts=3,
        dependency_results_partial=True,
    )
    with pytest.raises(RuntimeError, match="no fetcher"):
        context.get_all_dependency_results("process_batch_")
    assert context.get_dependency_result("process_batch_001") == {}  # in the claim: fine
    with pytest.raises(RuntimeError, match="no fetcher"):
        context.get_dependency_result("process_batch_002")


def test_full_claim_iterates_from_memory_in_name_order() -> None:
    context = build_test_context({}, {"b": 2, "a": 1, "c_1": 3, "c_0": 4})
    assert not context.dependency_results_partial

    async def names(prefix: str) -> list[tuple[str, Any]]:
        return [item async for item in context.iter_dependency_results(prefix)]

    assert asyncio.run(names("")) == [("a", 1), ("b", 2), ("c_0", 4), ("c_1", 3)]
    assert asyncio.run(names("c_")) == [("c_0", 4), ("c_1", 3)]
    assert list(context.get_all_dependency_results()) == ["a", "b", "c_0", "c_1"]
    # a limit at or above the count keeps everything in the claim: not partial
    assert not build_test_context({}, {"a": 1}, claim_dependency_limit=1).dependency_results_partial
