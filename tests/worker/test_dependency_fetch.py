"""Lazy dependency results against a real PostgreSQL: the worker's `DependencyFetcher` paging
through `tasker.dependency_results`, a `StepContext` whose claim left results out (sync API
from a handler thread, async API on the loop, the sync API refused on the loop), a fetch that
survives a killed connection, and handlers reading results through a running `Worker`.

The claim rows here come from `tasker.claim_steps` on a static fan-in template; the partial
claim is that row with part of its results taken out, as the engine's claim leaves out batch
workers' results past `max_claim_dependency_bytes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasker_pg import (
    Batchable,
    HandlerRegistry,
    StepContext,
    StepHandler,
    StepHandlerResult,
    Worker,
    db,
)
from tasker_pg.errors import NotFoundError
from tasker_pg.outcome import Outcome, Success
from tasker_pg.rows import ClaimedStep
from tasker_pg.template import TaskTemplate
from tasker_pg.worker.config import WorkerConfig
from tasker_pg.worker.fetching import DependencyFetcher
from tasker_pg.worker.running import Runner
from tasker_pg.worker.state import Claim, Shared
from tests.support.engine import NAMESPACE, claim, complete, start, step, success, template
from tests.support.worker import poll, steps_of, wait_final

PARTS = [f"part_{i:03d}" for i in range(250)]


def _part_result(name: str) -> dict[str, Any]:
    index = int(name.rsplit("_", 1)[1])
    return {"items_processed": index, "items_failed": 0, "items_skipped": 0, "results": index}


def _fan_in_body() -> dict[str, Any]:
    return template(
        "fetch_fan_in",
        [step("analyze")] + [step(p, "analyze") for p in PARTS] + [step("aggregate", *PARTS)],
    )


async def _claimed_join(conn: db.Connection) -> ClaimedStep:
    """Run the fan-in's steps through the engine up to its join; returns the join's claim."""
    await start(conn, _fan_in_body())
    rows = await claim(conn)
    assert [r["step_name"] for r in rows] == ["analyze"]
    await complete(conn, success(rows[0], {"total": 250}))
    rows = await claim(conn, qty=1000)
    assert sorted(r["step_name"] for r in rows) == PARTS
    await complete(conn, *[success(r, _part_result(r["step_name"])) for r in rows])
    rows = await claim(conn)
    assert [r["step_name"] for r in rows] == ["aggregate"]
    return ClaimedStep.from_row(rows[0])


@pytest.fixture
async def fetcher(dsn: str) -> AsyncIterator[DependencyFetcher]:
    config = WorkerConfig(namespaces=(NAMESPACE,), worker_id="fetch-test", dsn=dsn, concurrency=2)
    fetcher = DependencyFetcher(Shared(config), asyncio.get_running_loop())
    try:
        yield fetcher
    finally:
        await fetcher.close()


def _partial(step: ClaimedStep, keep: int) -> ClaimedStep:
    """The claim with only the analyzer's and the first `keep` parts' results in it."""
    assert step.dependency_results is not None
    kept = {n: v for n, v in step.dependency_results.items() if n == "analyze" or n < PARTS[keep]}
    return dataclasses.replace(step, dependency_results=kept, dependency_results_partial=True)


class Aggregate(StepHandler, Batchable):
    handler_name = "fetch_test.aggregate"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success(self.aggregate_batch_worker_results(context, "part_"))


async def test_partial_claim_pages_through_the_real_function(
    conn: db.Connection, fetcher: DependencyFetcher
) -> None:
    full = await _claimed_join(conn)
    assert full.dependency_results is not None and len(full.dependency_results) == 251
    context = StepContext.from_claimed(_partial(full, 20), dependency_fetcher=fetcher)
    assert context.dependency_results_partial and len(context.dependency_results) == 21

    names = [name async for name, _ in context.iter_dependency_results("part_")]
    assert names == PARTS
    assert fetcher.pages == 3  # pages of 100
    everything = await context.get_all_dependency_results_async()
    assert everything == full.dependency_results and list(everything) == sorted(everything)
    assert await context.get_dependency_result_async("part_200") == _part_result("part_200")
    assert await context.get_dependency_result_async("part_20") is None  # a prefix, no step
    assert await context.get_dependency_result_async("aggregate") is None  # not an ancestor

    # a sync handler runs in a thread: its blocking calls fetch on this (the worker's) loop
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, Aggregate().call, context)
    assert isinstance(result, StepHandlerResult)
    assert result.result["worker_count"] == 250
    assert result.result["total_processed"] == sum(range(250))
    field = await loop.run_in_executor(
        None, context.get_dependency_field, "part_249", "items_processed"
    )
    assert field == 249

    # on the loop's own thread the blocking API would wait for itself: refused, pointing on
    with pytest.raises(RuntimeError, match="iter_dependency_results"):
        context.get_all_dependency_results("part_")
    with pytest.raises(RuntimeError, match="get_dependency_result_async"):
        context.get_dependency_result("part_100")
    assert context.get_dependency_result("part_001") == _part_result("part_001")  # in the claim

    await complete(
        conn,
        success(
            {
                "step_uuid": full.step_uuid,
                "attempt": full.attempt,
                "claim_seq": full.claim_seq,
                "step_name": "aggregate",
            }
        ),
    )


async def test_fetch_survives_a_killed_connection(
    conn: db.Connection, fetcher: DependencyFetcher
) -> None:
    full = await _claimed_join(conn)
    context = StepContext.from_claimed(_partial(full, 0), dependency_fetcher=fetcher)
    assert await context.get_dependency_result_async("part_000") == _part_result("part_000")
    # the pool's connection dies between two fetches
    killed = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        "tasker-pg worker fetch-test fetch",
    )
    assert killed == 1
    assert await context.get_dependency_result_async("part_100") == _part_result("part_100")
    await complete(
        conn,
        success(
            {
                "step_uuid": full.step_uuid,
                "attempt": full.attempt,
                "claim_seq": full.claim_seq,
                "step_name": "aggregate",
            }
        ),
    )


async def test_a_refusal_is_raised_at_once(fetcher: DependencyFetcher) -> None:
    with pytest.raises(NotFoundError):
        await fetcher.fetch_page("00000000-0000-0000-0000-000000000000", "", None, 10)
    assert fetcher.pages == 0


# --- through a running worker ----------------------------------------------------------------


class Part(StepHandler):
    handler_name = "fetch_test.part"

    async def call(self, context: StepContext) -> StepHandlerResult:
        return self.success(_part_result(context.step_name))


class AsyncAggregate(StepHandler, Batchable):
    handler_name = "fetch_test.aggregate_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        summary = await self.aggregate_batch_worker_results_async(context, "part_")
        names = [name async for name, _ in context.iter_dependency_results()]
        return self.success({"summary": summary, "names": names})


def _worker_template(count: int) -> TaskTemplate:
    parts = [f"part_{i:03d}" for i in range(count)]
    body = template(
        "fetch_worker",
        [step(p, handler=Part.handler_name) for p in parts]
        + [step("sync_sum", *parts, handler=Aggregate.handler_name)]
        + [step("async_sum", *parts, handler=AsyncAggregate.handler_name)],
    )
    return TaskTemplate.from_dict(body)


async def test_handlers_read_dependency_results_in_a_worker(dsn: str, conn: db.Connection) -> None:
    registry = HandlerRegistry()
    for cls in (Part, Aggregate, AsyncAggregate):
        registry.register(cls)
    tpl = _worker_template(30)
    worker = Worker(
        [NAMESPACE], registry, dsn=dsn, templates=[tpl], poll_interval=0.1, summary_interval=0
    )
    async with worker:
        task = await conn.create_task(NAMESPACE, tpl.name, {})
        assert (await wait_final(conn, [task]))[task] == "complete"
    steps = await steps_of(conn, task)
    summary = steps["sync_sum"]["results"]
    assert summary["worker_count"] == 30 and summary["total_processed"] == sum(range(30))
    assert steps["async_sum"]["results"]["summary"] == summary
    assert steps["async_sum"]["results"]["names"] == [f"part_{i:03d}" for i in range(30)]


async def test_the_runner_hands_handlers_its_fetcher(dsn: str, conn: db.Connection) -> None:
    """A partial claim run by the worker's Runner: the sync handler, in the thread pool, gets
    every result (fetched on the loop through the runner's own pool)."""
    full = await _claimed_join(conn)
    config = WorkerConfig(namespaces=(NAMESPACE,), worker_id="runner-test", dsn=dsn)
    registry = HandlerRegistry()
    registry.register(Aggregate)
    outcomes: list[Outcome] = []
    runner = Runner(Shared(config), registry, lambda _claim, outcome: outcomes.append(outcome))
    runner.open()
    try:
        job = Claim(
            dataclasses.replace(_partial(full, 5), handler=Aggregate.handler_name),
            NAMESPACE,
            lease_deadline=time.monotonic() + 30,
        )
        runner.start(job)
        assert job.task is not None
        await job.task
    finally:
        await runner.close()
    [outcome] = outcomes
    assert isinstance(outcome, Success), outcome
    assert outcome.result["worker_count"] == 250
    assert outcome.result["total_processed"] == sum(range(250))

    async def pool_closed() -> bool:  # the backend exits shortly after the client leaves
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            "tasker-pg worker runner-test fetch",
        )
        return bool(count == 0)

    await poll(pool_closed, what="the runner's fetch pool closed")
    await conn.complete_steps([outcome.to_json()])
