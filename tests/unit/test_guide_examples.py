"""The Python guide's examples, run unchanged apart from the import name (no database).

The three ValidateCartHandler tests are the guide's own; the other handlers are copied from the
guide's "Writing a Step Handler" and "Common Patterns" sections and run through
`build_test_context`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from examples.ecommerce.handlers import (
    PRODUCTS,
    ProcessPaymentHandler,
    SendConfirmationHandler,
    UpdateInventoryHandler,
    ValidateCartHandler,
)
from tasker_pg import HandlerRegistry, StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError, RetryableError
from tasker_pg.outcome import Fence, outcome_from_exception, outcome_from_result
from tasker_pg.testing import build_test_context

# The claim every outcome in these tests answers.
FENCE = Fence("0b7e3c52-4a57-4c39-a0c4-8f2d0c1e9b11", 1, 1)

# --- the guide's "Testing" section, verbatim apart from imports -------------------------------


class TestValidateCartHandler:
    def test_validates_cart_successfully(self):
        handler = ValidateCartHandler()
        context = build_test_context({"cart_items": [{"product_id": 1, "quantity": 2}]})

        result = handler.call(context)

        assert result.is_success
        assert result.result["total"] == 59.98 + 4.80 + 5.99

    def test_rejects_empty_cart(self):
        handler = ValidateCartHandler()
        context = build_test_context({"cart_items": []})

        with pytest.raises(PermanentError) as exc_info:
            handler.call(context)

        assert exc_info.value.error_code == "MISSING_CART_ITEMS"

    def test_handles_out_of_stock(self):
        handler = ValidateCartHandler()
        context = build_test_context(
            {
                "cart_items": [
                    {"product_id": 1, "quantity": 1000}  # More than stock
                ]
            }
        )

        with pytest.raises(RetryableError):
            handler.call(context)


# --- more of ValidateCartHandler ------------------------------------------------------------


def test_validate_cart_result_details_and_metadata() -> None:
    context = build_test_context(
        {"cart_items": [{"product_id": 2, "quantity": 3}, {"product_id": 3, "quantity": 10}]}
    )
    result = ValidateCartHandler().call(context)

    assert result.is_success
    assert result.result["item_count"] == 2
    assert result.result["subtotal"] == pytest.approx(149.97 + 199.9)
    assert result.result["tax"] == round((149.97 + 199.9) * 0.08, 2)
    assert result.result["shipping"] == 9.99  # 13 items x 0.5 = 6.5, in the (2, 10] band
    assert [i["line_total"] for i in result.result["validated_items"]] == [149.97, 199.9]
    assert result.metadata["operation"] == "validate_cart"
    assert result.metadata["execution_hints"]["items_validated"] == 2


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ({"quantity": 1}, "MISSING_PRODUCT_ID"),
        ({"product_id": 1, "quantity": 0}, "INVALID_QUANTITY"),
        ({"product_id": 99, "quantity": 1}, "PRODUCT_NOT_FOUND"),
    ],
)
def test_validate_cart_permanent_errors(item: dict[str, Any], code: str) -> None:
    context = build_test_context({"cart_items": [item]})
    with pytest.raises(PermanentError) as exc_info:
        ValidateCartHandler().call(context)
    assert exc_info.value.error_code == code


def test_out_of_stock_outcome_is_retryable_with_retry_after_and_context() -> None:
    context = build_test_context({"cart_items": [{"product_id": 3, "quantity": 26}]})
    with pytest.raises(RetryableError) as exc_info:
        ValidateCartHandler().call(context)

    outcome = outcome_from_exception(
        exc_info.value, fence=Fence(context.step_uuid, 1, 1), duration_ms=1.0
    ).to_json()
    assert outcome["kind"] == "failure"
    assert outcome["error"]["retryable"] is True
    assert outcome["error"]["retry_after"] == 30.0
    assert outcome["error"]["context"] == {"product_id": 3, "available": 25, "requested": 26}


def test_raising_stock_makes_the_out_of_stock_cart_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The guide's PRODUCTS is a module-level dict; replenishing stock means mutating it.
    monkeypatch.setitem(PRODUCTS, 1, {**PRODUCTS[1], "stock": 2000})
    context = build_test_context({"cart_items": [{"product_id": 1, "quantity": 1000}]})
    result = ValidateCartHandler().call(context)
    assert result.is_success
    assert result.result["validated_items"][0]["quantity"] == 1000


# --- the rest of the checkout workflow ------------------------------------------------------


def _run_checkout(task_context: dict[str, Any]) -> dict[str, StepHandlerResult]:
    """Run the four checkout handlers in dependency order, feeding results downstream."""
    task_uuid = "5b0c4f7e-8a43-4d4f-9d0e-2f6c1d3b9a10"
    results: dict[str, Any] = {}
    returned: dict[str, StepHandlerResult] = {}
    for name, handler in [
        ("validate_cart", ValidateCartHandler()),
        ("process_payment", ProcessPaymentHandler()),
        ("update_inventory", UpdateInventoryHandler()),
        ("send_confirmation", SendConfirmationHandler()),
    ]:
        context = build_test_context(
            task_context, dict(results), step_name=name, task_uuid=task_uuid
        )
        result = handler.call(context)
        assert isinstance(result, StepHandlerResult)
        assert result.is_success, result
        returned[name] = result
        results[name] = result.result
    return returned


def test_checkout_handlers_chain_through_dependency_results() -> None:
    out = _run_checkout(
        {"cart_items": [{"product_id": 1, "quantity": 2}], "customer_email": "ada@example.com"}
    )
    total = out["validate_cart"].result["total"]
    payment = out["process_payment"].result
    inventory = out["update_inventory"].result
    email = out["send_confirmation"].result

    assert payment["amount_charged"] == round(total, 2) == 70.77
    assert payment["status"] == "completed"
    assert payment["payment_id"].startswith("pay_")
    assert inventory["reserved_items"] == [
        {"product_id": 1, "name": "Widget A", "quantity": 2, "stock_after_reservation": 98}
    ]
    assert inventory["total_items_reserved"] == 2
    assert email["recipient"] == "ada@example.com"
    assert email["payment_id"] == payment["payment_id"]
    assert email["amount_charged"] == 70.77
    assert email["items"] == [{"product_id": 1, "name": "Widget A", "quantity": 2}]
    assert payment["payment_id"] in email["body"]
    assert "$70.77" in email["body"]
    assert "2 x Widget A" in email["body"]
    # Every result is storable.
    for result in out.values():
        outcome = outcome_from_result(result, fence=FENCE, duration_ms=0.0).to_json()
        assert outcome["kind"] == "success"


def test_payment_id_is_deterministic_per_task() -> None:
    deps = {"validate_cart": {"total": 12.5}}
    handler = ProcessPaymentHandler()
    a1 = handler.call(build_test_context({}, deps, task_uuid="task-a", attempt=1))
    a2 = handler.call(build_test_context({}, deps, task_uuid="task-a", attempt=2))
    b = handler.call(build_test_context({}, deps, task_uuid="task-b"))
    assert a1.result["payment_id"] == a2.result["payment_id"]
    assert a1.result["payment_id"] != b.result["payment_id"]


def test_payment_simulated_decline_and_timeout() -> None:
    deps = {"validate_cart": {"total": 12.5}}
    handler = ProcessPaymentHandler()
    with pytest.raises(PermanentError) as declined:
        handler.call(build_test_context({"payment_token": "tok_declined"}, deps))
    assert declined.value.error_code == "PAYMENT_DECLINED"
    with pytest.raises(RetryableError) as timeout:
        handler.call(build_test_context({"payment_token": "tok_gateway_timeout"}, deps))
    assert timeout.value.retry_after == 5
    with pytest.raises(PermanentError) as missing:
        handler.call(build_test_context({}, {}))
    assert missing.value.error_code == "MISSING_CART_TOTAL"


def test_inventory_retries_when_stock_fell_after_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deps = {"validate_cart": {"validated_items": [{"product_id": 2, "quantity": 5}]}}
    monkeypatch.setitem(PRODUCTS, 2, {**PRODUCTS[2], "stock": 4})
    with pytest.raises(RetryableError) as exc_info:
        UpdateInventoryHandler().call(build_test_context({}, deps))
    assert exc_info.value.context == {"product_id": 2, "available": 4, "requested": 5}


def test_checkout_handlers_register_under_the_template_callables() -> None:
    registry = HandlerRegistry()
    registry.register(ValidateCartHandler)
    registry.register(ProcessPaymentHandler)
    import examples.ecommerce.handlers as module

    registry.register_module(module)
    assert registry.names() == [
        "ecommerce.step_handlers.ProcessPaymentHandler",
        "ecommerce.step_handlers.SendConfirmationHandler",
        "ecommerce.step_handlers.UpdateInventoryHandler",
        "ecommerce.step_handlers.ValidateCartHandler",
    ]
    handler = registry.resolve("ecommerce.step_handlers.ValidateCartHandler")
    assert isinstance(handler, ValidateCartHandler)


# --- "Writing a Step Handler" ----------------------------------------------------------------


class MyHandler(StepHandler):
    handler_name = "my_handler"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        return StepHandlerResult.success({"processed": True})


class LinearStep1Handler(StepHandler):
    handler_name = "linear_step_1"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        # Access task context using get_input()
        even_number = context.get_input("even_number")

        if not even_number or even_number % 2 != 0:
            return self.failure(
                "Task context must contain an even number",
                error_type="validation_error",
                retryable=False,
            )

        # Perform business logic
        result = even_number * even_number

        # Return success result
        return self.success(
            {"result": result}, metadata={"operation": "square", "step_type": "initial"}
        )


class MyAsyncHandler(StepHandler):
    handler_name = "my_async_handler"

    async def call(self, context: StepContext) -> StepHandlerResult:
        # Use async operations like aiohttp, asyncpg, etc.
        await asyncio.sleep(0.1)
        return self.success({"processed": True})


def test_my_handler() -> None:
    result = MyHandler().call(build_test_context({}))
    assert result.is_success
    assert result.result == {"processed": True}
    assert result.metadata == {}
    assert MyHandler.handler_version == "1.0.0"
    assert MyHandler.is_async is False


def test_linear_step_1_squares_an_even_number() -> None:
    result = LinearStep1Handler().call(build_test_context({"even_number": 6}))
    assert result.is_success
    assert result.result == {"result": 36}
    assert result.metadata == {"operation": "square", "step_type": "initial"}


@pytest.mark.parametrize("task_context", [{"even_number": 7}, {}, {"even_number": 0}])
def test_linear_step_1_rejects_odd_or_missing_numbers(task_context: dict[str, Any]) -> None:
    result = LinearStep1Handler().call(build_test_context(task_context))
    assert result.is_failure
    assert result.error_message == "Task context must contain an even number"
    assert result.error_type == "validation_error"
    assert result.retryable is False
    outcome = outcome_from_result(result, fence=FENCE, duration_ms=0.5).to_json()
    assert outcome["error"]["retryable"] is False
    assert outcome["error"]["error_type"] == "validation_error"


def test_my_async_handler_runs_with_asyncio() -> None:
    handler = MyAsyncHandler()
    assert handler.is_async is True
    result = asyncio.run(handler.call(build_test_context({})))
    assert result.is_success
    assert result.result == {"processed": True}


# --- "Accessing Task Context" / "Accessing Dependency Results" / "Common Patterns" -----------


def test_context_access_patterns_from_the_guide() -> None:
    context = build_test_context(
        {"customer_id": 42, "cart_items": [{"product_id": 1, "quantity": 2}]},
        {
            "previous_step_name": {"ok": True},
            "validate_order": {"order_total": 99.5},
            "step_name": {"nested": {"field": "deep"}},
        },
    )
    # Get value from task context
    customer_id = context.get_input("customer_id")
    # Access nested values
    cart_items = context.get_input("cart_items")
    # Get with default value
    batch_size = context.get_input_or("batch_size", 100)
    # Get result from a specific upstream step
    previous_result = context.get_dependency_result("previous_step_name")
    # Extract nested values
    order_total = context.get_dependency_field("validate_order", "order_total")
    value = context.get_dependency_field("step_name", "nested", "field")

    assert customer_id == 42
    assert cart_items == [{"product_id": 1, "quantity": 2}]
    assert batch_size == 100
    assert previous_result == {"ok": True}
    assert order_total == 99.5
    assert value == "deep"


def test_metadata_for_observability_pattern() -> None:
    processed_data = [1, 2, 3]
    result = StepHandlerResult.success(
        {"data": processed_data},
        metadata={
            "operation": "my_operation",
            "input_refs": {"field": 'context.get_input("field")'},
            "execution_hints": {"items_processed": 100, "duration_ms": 250},
        },
    )
    outcome = outcome_from_result(result, fence=FENCE, duration_ms=2.0).to_json()
    assert outcome["result"] == {"data": [1, 2, 3]}
    assert outcome["metadata"]["execution_hints"] == {"items_processed": 100, "duration_ms": 250}


class GuideProcessPaymentHandler(StepHandler):
    """The guide's "Handler with Dependencies" example, with a stub `_charge_payment`."""

    handler_name = "process_payment"

    def call(self, context: StepContext) -> StepHandlerResult:
        # Get results from upstream steps
        cart_result = context.get_dependency_result("validate_cart")
        total = cart_result["total"]

        # Get payment info from task context
        payment_method = context.get_input("payment_method")
        payment_token = context.get_input("payment_token")

        # Process payment
        payment_id = self._charge_payment(total, payment_method, payment_token)

        return self.success(
            {"payment_id": payment_id, "amount_charged": total, "status": "completed"}
        )

    def _charge_payment(self, total: float, method: str, token: str) -> str:
        return f"{method}:{token}:{total}"


def test_handler_with_dependencies_pattern() -> None:
    context = build_test_context(
        {"payment_method": "card", "payment_token": "tok_1"},
        {"validate_cart": {"total": 70.77}},
    )
    result = GuideProcessPaymentHandler().call(context)
    assert result.result == {
        "payment_id": "card:tok_1:70.77",
        "amount_charged": 70.77,
        "status": "completed",
    }


class BatchProcessHandler(StepHandler):
    """The guide's "Batch Processing with Checkpoints" example over an in-memory item list."""

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

    def _fetch_items(self, cursor: int, batch_size: int) -> list[dict[str, int]]:
        # 250 items with values 1..250.
        return [{"value": v + 1} for v in range(cursor, min(cursor + batch_size, 250))]


def test_batch_process_checkpoints_until_done() -> None:
    handler = BatchProcessHandler()
    checkpoint: dict[str, Any] | None = None
    seen: list[StepHandlerResult] = []
    for _ in range(10):
        context = build_test_context({"batch_size": 100}, checkpoint=checkpoint)
        result = handler.call(context)
        seen.append(result)
        outcome = outcome_from_result(result, fence=FENCE, duration_ms=1.0).to_json()
        if result.is_success:
            assert outcome["kind"] == "success"
            break
        assert outcome["kind"] == "checkpoint"
        # What the engine stores and hands back on the next claim.
        checkpoint = outcome["checkpoint"]
    assert [r.kind for r in seen] == ["checkpoint", "checkpoint", "success"]
    assert [r.cursor for r in seen[:2]] == [100, 200]
    assert [r.items_processed for r in seen[:2]] == [100, 200]
    assert seen[0].accumulated_results == {"total": sum(range(1, 101)), "processed": 100}
    assert seen[-1].result == {"total": sum(range(1, 251)), "processed": 250}


def test_batch_process_resumes_from_a_given_checkpoint() -> None:
    checkpoint = {
        "cursor": 200,
        "items_processed": 200,
        "accumulated_results": {"total": sum(range(1, 201)), "processed": 200},
    }
    context = build_test_context({"batch_size": 100}, checkpoint=checkpoint)
    assert context.checkpoint_items_processed == 200
    result = BatchProcessHandler().call(context)
    assert result.is_success
    assert result.result == {"total": sum(range(1, 251)), "processed": 250}
