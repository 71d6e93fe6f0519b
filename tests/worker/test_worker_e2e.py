"""Workflows end to end through an in-process `Worker` against a real PostgreSQL.

The guide's checkout (happy path, empty cart, out of stock then restocked), the linear and
diamond math workflows, async and sync handlers running concurrently, timeouts, lease
heartbeats, an unknown handler, batching, and a stop that waits for running steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples.ecommerce import handlers as ecommerce
from tasker_pg import HandlerRegistry, StepContext, StepHandlerResult, Worker, db
from tasker_pg.errors import DatabaseNotFoundError, RetryableError
from tasker_pg.template import TaskTemplate, load_templates
from tests.support.worker import (
    assert_each_completed_once,
    poll,
    registry_of,
    steps_of,
    templates,
    wait_final,
    wait_handler_missing,
)
from tests.support.workflows import math_handlers, timing_handlers

CHECKOUT = Path(__file__).resolve().parents[2] / "examples" / "ecommerce" / "checkout_workflow.yaml"

FAST = {"poll_interval": 0.1, "summary_interval": 0}


# --- the guide's checkout ----------------------------------------------------------------------


class QuickRetryValidateCartHandler(ecommerce.ValidateCartHandler):
    """The guide's ValidateCartHandler with a test-sized retry_after (the guide's is 30 s)."""

    handler_name = ecommerce.ValidateCartHandler.handler_name
    RETRY_AFTER = 1.0

    def call(self, context: StepContext) -> StepHandlerResult:
        try:
            return super().call(context)
        except RetryableError as exc:
            raise RetryableError(
                exc.message, retry_after=self.RETRY_AFTER, context=exc.context
            ) from exc


def checkout_registry(validate: type[ecommerce.ValidateCartHandler]) -> HandlerRegistry:
    registry = HandlerRegistry()
    for cls in (
        validate,
        ecommerce.ProcessPaymentHandler,
        ecommerce.UpdateInventoryHandler,
        ecommerce.SendConfirmationHandler,
    ):
        registry.register(cls)
    return registry


def checkout_worker(dsn: str, registry: HandlerRegistry | None = None) -> Worker:
    return Worker(
        ["ecommerce"],
        registry or registry_of(ecommerce),
        dsn=dsn,
        templates=load_templates(CHECKOUT),
        **FAST,
    )


async def test_checkout_two_widgets(dsn: str, conn: db.Connection) -> None:
    async with checkout_worker(dsn):
        task = await conn.create_task(
            "ecommerce",
            "checkout_workflow",
            {
                "cart_items": [{"product_id": 1, "quantity": 2}],
                "customer_email": "ada@example.com",
            },
        )
        assert (await wait_final(conn, [task]))[task] == "complete"

    steps = await steps_of(conn, task)
    cart = steps["validate_cart"]["results"]
    assert cart["total"] == 59.98 + 4.80 + 5.99
    assert cart["item_count"] == 1
    assert steps["validate_cart"]["metadata"]["operation"] == "validate_cart"
    payment = steps["process_payment"]["results"]
    inventory = steps["update_inventory"]["results"]
    assert payment["amount_charged"] == round(cart["total"], 2)
    confirmation = steps["send_confirmation"]["results"]
    # The confirmation saw both upstream results.
    assert confirmation["payment_id"] == payment["payment_id"]
    assert confirmation["amount_charged"] == payment["amount_charged"]
    assert (
        confirmation["items"]
        == [{"product_id": 1, "name": "Widget A", "quantity": 2}]
        == [
            {k: item[k] for k in ("product_id", "name", "quantity")}
            for item in inventory["reserved_items"]
        ]
    )
    assert confirmation["recipient"] == "ada@example.com"
    assert {s["attempts"] for s in steps.values()} == {1}
    await assert_each_completed_once(conn, [task])


async def test_checkout_empty_cart_is_a_permanent_error(dsn: str, conn: db.Connection) -> None:
    async with checkout_worker(dsn):
        task = await conn.create_task("ecommerce", "checkout_workflow", {"cart_items": []})
        assert (await wait_final(conn, [task]))[task] == "error"

    steps = await steps_of(conn, task)
    validate = steps["validate_cart"]
    assert validate["state"] == "error"
    assert validate["attempts"] == 1  # permanent: never retried
    assert validate["last_error"]["error_code"] == "MISSING_CART_ITEMS"
    assert validate["last_error"]["error_type"] == "PermanentError"
    assert validate["last_error"]["retryable"] is False
    assert {steps[n]["state"] for n in steps if n != "validate_cart"} == {"pending"}


async def test_checkout_out_of_stock_retries_after_retry_after_then_completes(
    dsn: str, conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = checkout_registry(QuickRetryValidateCartHandler)
    async with checkout_worker(dsn, registry):
        task = await conn.create_task(
            "ecommerce", "checkout_workflow", {"cart_items": [{"product_id": 1, "quantity": 150}]}
        )

        async def failed_once() -> Any:
            step = (await steps_of(conn, task))["validate_cart"]
            return step if step["state"] == "waiting_for_retry" else None

        step = await poll(failed_once, what="validate_cart waiting for its retry")
        assert step["last_error"]["error_type"] == "RetryableError"
        assert step["last_error"]["retry_after"] == QuickRetryValidateCartHandler.RETRY_AFTER
        assert step["last_error"]["context"] == {
            "product_id": 1,
            "available": 100,
            "requested": 150,
        }
        monkeypatch.setitem(ecommerce.PRODUCTS[1], "stock", 1000)  # restocked
        assert (await wait_final(conn, [task]))[task] == "complete"

    steps = await steps_of(conn, task)
    assert steps["validate_cart"]["attempts"] == 2
    assert steps["validate_cart"]["results"]["validated_items"][0]["quantity"] == 150
    transitions = await conn.fetch(
        "SELECT event, created_at FROM tasker.step_transitions WHERE step_uuid = $1 "
        "ORDER BY transition_id",
        steps["validate_cart"]["step_uuid"],
    )
    events = [t["event"] for t in transitions]
    assert events[-3:] == ["retry_scheduled", "claimed", "succeeded"]
    waited = (transitions[-2]["created_at"] - transitions[-3]["created_at"]).total_seconds()
    assert waited >= QuickRetryValidateCartHandler.RETRY_AFTER - 0.05
    await assert_each_completed_once(conn, [task])


# --- linear and diamond ------------------------------------------------------------------------


async def test_linear_and_diamond_workflows(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("linear", "diamond"),
        concurrency=4,
        **FAST,
    ) as worker:
        linear = await conn.create_task("math", "linear_workflow", {"even_number": 6})
        diamond = await conn.create_task("math", "diamond_workflow", {"even_number": 6})
        more = [
            await conn.create_task("math", name, {"even_number": n})
            for n in (2, 4, 8)
            for name in ("linear_workflow", "diamond_workflow")
        ]
        states = await wait_final(conn, [linear, diamond, *more])
        assert set(states.values()) == {"complete"}

    line = await steps_of(conn, linear)
    assert [line[f"linear_step_{i}"]["results"]["result"] for i in (1, 2, 3, 4)] == [
        36,
        46,
        138,
        69.0,
    ]
    assert line["linear_step_4"]["results"]["ancestors_seen"] == [
        "linear_step_1",
        "linear_step_2",
        "linear_step_3",
    ]
    assert line["linear_step_1"]["metadata"] == {"operation": "square", "step_type": "initial"}
    dia = await steps_of(conn, diamond)
    assert dia["diamond_branch_b"]["results"]["result"] == 61
    assert dia["diamond_branch_c"]["results"]["result"] == 72
    assert dia["diamond_end"]["results"]["result"] == 66.5
    for n, task in zip((2, 4, 8), more[::2], strict=True):
        expected = ((n * n + 10) * 3) / 2
        assert (await steps_of(conn, task))["linear_step_4"]["results"]["result"] == expected
    for n, task in zip((2, 4, 8), more[1::2], strict=True):
        expected = ((n * n + 25) + n * n * 2) / 2
        assert (await steps_of(conn, task))["diamond_end"]["results"]["result"] == expected
    await assert_each_completed_once(conn, [linear, diamond, *more])
    assert worker.stats.succeeded == 8 * 4
    assert worker.stats.failed == worker.stats.stale == 0


async def test_linear_rejects_odd_number(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["math"], registry_of(math_handlers), dsn=dsn, templates=templates("linear"), **FAST
    ):
        task = await conn.create_task("math", "linear_workflow", {"even_number": 7})
        assert (await wait_final(conn, [task]))[task] == "error"
    step = (await steps_of(conn, task))["linear_step_1"]
    assert step["last_error"]["error_type"] == "validation_error"
    assert step["attempts"] == 1


# --- concurrency, timeouts, leases -------------------------------------------------------------


async def test_sync_handlers_run_in_parallel_and_the_loop_keeps_serving(
    dsn: str, conn: db.Connection
) -> None:
    registry = registry_of(timing_handlers)
    sync_worker = Worker(
        ["timing"], registry, dsn=dsn, templates=templates("sleepy"), concurrency=8, **FAST
    )
    async_worker = Worker(["timing_async"], registry, dsn=dsn, templates=templates("quick"), **FAST)
    async with sync_worker, async_worker:
        async with conn.transaction():
            sleepers = [
                await conn.create_task("timing", "sleepy", {"seconds": 3.0}) for _ in range(8)
            ]

        async def all_running() -> bool:
            count = await conn.fetchval(
                "SELECT count(*) FROM tasker.steps WHERE task_uuid = ANY($1::uuid[]) "
                "AND state = 'in_progress'",
                sleepers,
            )
            return bool(count == 8)

        await poll(all_running, timeout=5, what="8 sleepers running")
        # While the 8 threads block, the loop serves: an async step completes, and the loop
        # answers a tick quickly.
        quick = await conn.create_task("timing_async", "quick", {})
        assert (await wait_final(conn, [quick], timeout=5))[quick] == "complete"
        states = await wait_final(conn, sleepers, timeout=20)

    assert set(states.values()) == {"complete"}
    # In parallel, not one after the other: every sleeper started before any of them finished
    # (their own clock readings, so a stalled machine cannot fake or break it).
    windows = []
    for task in sleepers:
        result = (await steps_of(conn, task))["sleep"]["results"]
        windows.append((result["started"], result["finished"]))
    latest_start = max(start for start, _ in windows)
    earliest_finish = min(finish for _, finish in windows)
    assert latest_start < earliest_finish, "the sleepers did not overlap"
    quick_finished = (await steps_of(conn, quick))["quick"]["results"]["finished"]
    assert quick_finished < earliest_finish, "the async step waited for the sync handlers"
    await assert_each_completed_once(conn, [*sleepers, quick])


async def test_timeouts_fail_as_timeout_and_are_retried(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["timing"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("timeouts"),
        concurrency=4,
        **FAST,
    ) as worker:
        task = await conn.create_task("timing", "timeouts", {})
        assert (await wait_final(conn, [task], timeout=15))[task] == "complete"
        assert worker.stats.timeouts == 2
        assert worker.stats.retried == 2

    steps = await steps_of(conn, task)
    for name in ("slow_async", "slow_sync"):
        assert steps[name]["attempts"] == 2
        assert steps[name]["results"] == {"attempt": 2}
        failures = await conn.fetch(
            "SELECT event, error_summary, attempt FROM tasker.step_transitions "
            "WHERE step_uuid = $1 AND event = 'retry_scheduled'",
            steps[name]["step_uuid"],
        )
        assert len(failures) == 1
        assert failures[0]["attempt"] == 1
        assert failures[0]["error_summary"].startswith("timeout: ")
    await assert_each_completed_once(conn, [task])


async def test_heartbeat_keeps_a_long_step_leased(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["timing"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("sleepy"),
        # heartbeats every 1 s: a stall of up to 2 s still keeps the lease
        lease_seconds=3.0,
        **FAST,
    ) as worker:
        task = await conn.create_task("timing", "sleepy", {"seconds": 6.5})  # over two leases
        assert (await wait_final(conn, [task], timeout=15))[task] == "complete"
        assert worker.stats.leases_lost == 0
        assert worker.stats.stale == 0

    step = (await steps_of(conn, task))["sleep"]
    assert step["attempts"] == 1
    events = await conn.fetch(
        "SELECT event FROM tasker.step_transitions WHERE step_uuid = $1 ORDER BY transition_id",
        step["step_uuid"],
    )
    assert [e["event"] for e in events][-2:] == ["claimed", "succeeded"]


async def test_cancelled_while_running_loses_lease_and_outcome_is_stale(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tasker_pg.worker")
    async with Worker(
        ["timing"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("sleepy"),
        lease_seconds=0.6,
        **FAST,
    ) as worker:
        # the heartbeat (every 0.2 s) has 3 s to notice before the handler ends
        task = await conn.create_task("timing", "sleepy", {"seconds": 3.0})

        async def running() -> bool:
            return bool(worker.running_steps)

        await poll(running, what="the step running")
        await conn.fetchval("SELECT tasker.cancel_task($1, 'test')", task)

        async def stale() -> bool:
            return worker.stats.stale == 1

        await poll(stale, timeout=10, what="the stale outcome")
        assert worker.stats.leases_lost == 1  # the heartbeat noticed before the handler ended
        assert worker.stats.succeeded == 0

    step = (await steps_of(conn, task))["sleep"]
    assert step["state"] == "cancelled"
    assert step["results"] is None
    lost = [r for r in caplog.records if "lost the lease" in r.getMessage()]
    assert len(lost) == 1
    assert getattr(lost[0], "step_uuid", None) == str(step["step_uuid"])
    assert getattr(lost[0], "task_uuid", None) == str(task)
    assert str(task) in lost[0].getMessage()


async def test_unknown_handler_is_handed_back_not_failed_nor_a_crash(
    dsn: str, conn: db.Connection
) -> None:
    broken = TaskTemplate.from_dict(
        {
            "name": "broken",
            "namespace_name": "timing_async",
            "version": "1.0.0",
            "steps": [{"name": "nope", "handler": {"callable": "no_such.module.Handler"}}],
        }
    )
    async with Worker(
        ["timing_async"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=[broken, *templates("quick")],
        **FAST,
    ) as worker:
        bad = await conn.create_task("timing_async", "broken", {})
        nope = (await steps_of(conn, bad))["nope"]
        [released] = await wait_handler_missing(conn, [nope["step_uuid"]])
        good = await conn.create_task("timing_async", "quick", {})
        assert (await wait_final(conn, [good]))[good] == "complete"

    assert released["worker_id"] == worker.worker_id
    assert "no_such.module.Handler" in released["error_summary"]
    step = (await steps_of(conn, bad))["nope"]
    assert step["state"] in ("enqueued", "in_progress") and step["attempts"] == 0, step
    assert step["last_error"] is None


async def test_outcomes_are_batched(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["timing_async"],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=templates("quick"),
        concurrency=40,
        **FAST,
    ) as worker:
        async with conn.transaction():
            tasks = [await conn.create_task("timing_async", "quick", {}) for _ in range(40)]
        states = await wait_final(conn, tasks)
        assert set(states.values()) == {"complete"}
    stats = worker.stats  # after the stop: the last acknowledgement has been counted
    assert stats.succeeded == 40
    # 40 steps that finish together share claims and completions.
    assert stats.claim_calls < 40
    assert stats.flush_calls < 20, stats
    await assert_each_completed_once(conn, tasks)


async def test_stop_waits_for_running_steps(dsn: str, conn: db.Connection) -> None:
    worker = Worker(
        ["timing"], registry_of(timing_handlers), dsn=dsn, templates=templates("sleepy"), **FAST
    )
    async with worker:
        task = await conn.create_task("timing", "sleepy", {"seconds": 0.5})

        async def running() -> bool:
            return bool(worker.running_steps)

        await poll(running, what="the step running")
        await worker.stop()
        # stop() returned only after the running step finished and its outcome was flushed.
        step = (await steps_of(conn, task))["sleep"]
        assert step["state"] == "complete"
    assert worker.stats.succeeded == 1


async def test_worker_refuses_a_missing_database_clearly() -> None:
    worker = Worker(["x"], HandlerRegistry(), dsn="postgresql://nobody@127.0.0.1:1/none", **FAST)
    with pytest.raises(DatabaseNotFoundError) as err:
        async with worker:
            pass
    assert "could not connect" in str(err.value)
