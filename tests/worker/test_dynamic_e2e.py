"""The handler API of conditional and batch workflows through a real `Worker`.

A batch fan-out (analyzer, 5 workers of 200 rows, a sync and an async aggregator) with a small
`max_claim_dependency_bytes`, so the aggregators' claim rows are partial and their contexts
fetch the rest through `tasker.dependency_results`; an empty input through one no-op worker;
and a decision that creates one or two branches before a deferred convergence.
"""

from __future__ import annotations

from tasker_pg import (
    Batchable,
    DecisionHandler,
    HandlerRegistry,
    StepContext,
    StepHandler,
    StepHandlerResult,
    Worker,
    db,
)
from tasker_pg.template import TaskTemplate
from tests.support.engine import NAMESPACE, step, template
from tests.support.worker import steps_of, wait_final

ROWS = 1000


class Analyze(StepHandler, Batchable):
    handler_name = "s.analyze"

    def call(self, context: StepContext) -> StepHandlerResult:
        total = context.get_input("rows")
        if total == 0:
            return self.no_batches_outcome("empty")
        return self.batch_analyzer_success(
            cursor_configs=self.create_cursor_ranges(total, batch_size=context.get_input("bs")),
            worker_template_name="process_batch",
            total_items=total,
            batch_metadata={"source": "x"},
        )


class Process(StepHandler, Batchable):
    handler_name = "s.process"

    def call(self, context: StepContext) -> StepHandlerResult:
        no_op = self.handle_no_op_worker(context)
        if no_op is not None:
            return no_op
        b = self.get_batch_context(context)
        assert b.batch_metadata["source"] == "x" and b.batch_metadata["batch_size"] == 200, b
        items = list(range(b.start_cursor, b.end_cursor))
        return self.batch_worker_success(
            items_processed=len(items), results={"sum": sum(items), "pad": "x" * 2000}
        )


class Aggregate(StepHandler, Batchable):
    handler_name = "s.aggregate"

    def call(self, context: StepContext) -> StepHandlerResult:
        s = self.aggregate_batch_worker_results(context, "process_batch_")
        return self.success(
            {
                "partial": context.dependency_results_partial,
                "claimed": len(context.dependency_results),
                "workers": s["worker_count"],
                "no_ops": s["no_op_workers"],
                "total": s["total_processed"],
                "sum": sum(r["sum"] for r in s["results"].values()),
            }
        )


class AsyncAggregate(StepHandler, Batchable):
    handler_name = "s.aggregate_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        s = await self.aggregate_batch_worker_results_async(context, "process_batch_")
        return self.success({"workers": s["worker_count"], "total": s["total_processed"]})


class Route(DecisionHandler):
    handler_name = "s.route"

    def call(self, context: StepContext) -> StepHandlerResult:
        amount = context.get_input("amount")
        if amount < 1000:
            return self.decision_success(["auto_approve"], {"amount": amount})
        return self.decision_success(["manager_approval", "finance_review"])


class Plain(StepHandler):
    handler_name = "s.plain"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success(
            {"step": context.step_name, "deps": sorted(context.get_all_dependency_results())}
        )


def registry() -> HandlerRegistry:
    r = HandlerRegistry()
    for c in (Analyze, Process, Aggregate, AsyncAggregate, Route, Plain):
        r.register(c)
    return r


def pipeline() -> TaskTemplate:
    return TaskTemplate.from_dict(
        template(
            "pipe",
            [
                step("analyze", type="batchable", handler="s.analyze"),
                step(
                    "process_batch",
                    "analyze",
                    type="batch_worker",
                    handler="s.process",
                    batch_config={"batch_size": 200},
                ),
                step(
                    "aggregate", "process_batch", type="deferred_convergence", handler="s.aggregate"
                ),
                step(
                    "aggregate_async",
                    "process_batch",
                    type="deferred_convergence",
                    handler="s.aggregate_async",
                ),
            ],
        )
    )


def approval() -> TaskTemplate:
    return TaskTemplate.from_dict(
        template(
            "appr",
            [
                step("validate_request", handler="s.plain"),
                step("routing_decision", "validate_request", type="decision", handler="s.route"),
                step("auto_approve", "routing_decision", handler="s.plain"),
                step("manager_approval", "routing_decision", handler="s.plain"),
                step("finance_review", "routing_decision", handler="s.plain"),
                step(
                    "finalize",
                    "auto_approve",
                    "manager_approval",
                    "finance_review",
                    type="deferred_convergence",
                    handler="s.plain",
                ),
            ],
        )
    )


async def test_fan_out(dsn: str, conn: db.Connection) -> None:
    # a small claim budget: the aggregate's claim is partial and it fetches the rest
    await conn.execute(
        "UPDATE tasker.settings SET value = 10000 WHERE name = 'max_claim_dependency_bytes'"
    )
    tpl = pipeline()
    async with Worker(
        [NAMESPACE], registry(), dsn=dsn, templates=[tpl], poll_interval=0.1, summary_interval=0
    ):
        big = await conn.create_task(NAMESPACE, "pipe", {"rows": ROWS, "bs": 200})
        empty = await conn.create_task(NAMESPACE, "pipe", {"rows": 0, "bs": 200})
        states = await wait_final(conn, [big, empty], timeout=60)
    assert set(states.values()) == {"complete"}, states
    steps = await steps_of(conn, big)
    assert sorted(n for n in steps if n.startswith("process_batch_")) == [
        f"process_batch_00{i}" for i in range(1, 6)
    ]
    agg = steps["aggregate"]["results"]
    assert agg["workers"] == 5 and agg["total"] == ROWS and agg["sum"] == sum(range(ROWS))
    assert agg["partial"] is True and agg["claimed"] < 6
    assert steps["aggregate_async"]["results"] == {"workers": 5, "total": ROWS}
    e = await steps_of(conn, empty)
    assert sorted(e) == ["aggregate", "aggregate_async", "analyze", "process_batch_000"]
    assert e["aggregate"]["results"]["no_ops"] == 1


async def test_decision(dsn: str, conn: db.Connection) -> None:
    tpl = approval()
    async with Worker(
        [NAMESPACE], registry(), dsn=dsn, templates=[tpl], poll_interval=0.1, summary_interval=0
    ):
        small = await conn.create_task(NAMESPACE, "appr", {"amount": 500})
        large = await conn.create_task(NAMESPACE, "appr", {"amount": 5000})
        states = await wait_final(conn, [small, large], timeout=60)
    assert set(states.values()) == {"complete"}, states
    s = await steps_of(conn, small)
    assert sorted(s) == ["auto_approve", "finalize", "routing_decision", "validate_request"]
    big = await steps_of(conn, large)
    assert sorted(big) == [
        "finalize",
        "finance_review",
        "manager_approval",
        "routing_decision",
        "validate_request",
    ]
    assert big["finalize"]["results"]["deps"] == sorted(
        ["finance_review", "manager_approval", "routing_decision", "validate_request"]
    )
