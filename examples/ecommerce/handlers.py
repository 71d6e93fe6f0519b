"""The guide's e-commerce checkout: validate cart, then payment and inventory, then confirmation.

ValidateCartHandler is the guide's example as published; the other three follow its style.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from tasker_pg import StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError, RetryableError

logger = logging.getLogger(__name__)

# Mock product database
PRODUCTS = {
    1: {"id": 1, "name": "Widget A", "price": 29.99, "stock": 100, "active": True},
    2: {"id": 2, "name": "Widget B", "price": 49.99, "stock": 50, "active": True},
    3: {"id": 3, "name": "Widget C", "price": 19.99, "stock": 25, "active": True},
}


class ValidateCartHandler(StepHandler):
    """Validates cart items, checks availability, and calculates totals."""

    handler_name = "ecommerce.step_handlers.ValidateCartHandler"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        # TAS-137: Use get_input() for task context access
        cart_items = context.get_input("cart_items")

        if not cart_items:
            raise PermanentError(
                message="Cart items are required",
                error_code="MISSING_CART_ITEMS",
            )

        logger.info(
            "ValidateCartHandler: Validating cart - task_uuid=%s, items=%d",
            context.task_uuid,
            len(cart_items),
        )

        # Validate each cart item
        self._validate_cart_item_structure(cart_items)
        validated_items = self._validate_cart_items(cart_items)

        # Calculate totals
        subtotal = sum(item["line_total"] for item in validated_items)
        tax = round(subtotal * 0.08, 2)  # 8% tax
        shipping = self._calculate_shipping(validated_items)
        total = subtotal + tax + shipping

        return StepHandlerResult.success(
            {
                "validated_items": validated_items,
                "subtotal": subtotal,
                "tax": tax,
                "shipping": shipping,
                "total": total,
                "item_count": len(validated_items),
                "validated_at": datetime.now(timezone.utc).isoformat(),  # noqa: UP017
            },
            metadata={
                "operation": "validate_cart",
                "execution_hints": {
                    "items_validated": len(validated_items),
                    "total_amount": total,
                },
            },
        )

    def _validate_cart_item_structure(self, cart_items: list[dict]) -> None:
        for index, item in enumerate(cart_items):
            if not item.get("product_id"):
                raise PermanentError(
                    message=f"Product ID required for item {index + 1}",
                    error_code="MISSING_PRODUCT_ID",
                )

            quantity = item.get("quantity")
            if not quantity or quantity <= 0:
                raise PermanentError(
                    message=f"Valid quantity required for item {index + 1}",
                    error_code="INVALID_QUANTITY",
                )

    def _validate_cart_items(self, cart_items: list[dict]) -> list[dict]:
        validated = []

        for item in cart_items:
            product_id = item["product_id"]
            quantity = item["quantity"]
            product = PRODUCTS.get(product_id)

            if not product:
                raise PermanentError(
                    message=f"Product {product_id} not found",
                    error_code="PRODUCT_NOT_FOUND",
                )

            if not product["active"]:
                raise PermanentError(
                    message=f"Product {product['name']} is not available",
                    error_code="PRODUCT_INACTIVE",
                )

            if product["stock"] < quantity:
                # Temporary failure - retry when stock replenished
                raise RetryableError(
                    message=f"Insufficient stock for {product['name']}",
                    retry_after=30,
                    context={
                        "product_id": product_id,
                        "available": product["stock"],
                        "requested": quantity,
                    },
                )

            validated.append({
                "product_id": product["id"],
                "name": product["name"],
                "price": product["price"],
                "quantity": quantity,
                "line_total": round(product["price"] * quantity, 2),
            })  # fmt: skip

        return validated

    def _calculate_shipping(self, items: list[dict]) -> float:
        total_weight = sum(item["quantity"] * 0.5 for item in items)
        if total_weight <= 2:
            return 5.99
        elif total_weight <= 10:
            return 9.99
        else:
            return 14.99


def _stable_id(prefix: str, *parts: str) -> str:
    """An id that is the same every time for the same inputs.

    Steps run at least once: a retried or re-delivered step must produce the same ids (and a
    real payment gateway would get the same idempotency key) instead of charging twice.
    """
    digest = hashlib.sha256("/".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}_{digest[:24]}"


def _upstream_field(context: StepContext, step: str, field: str, kind: Any) -> Any:
    """A field of an upstream step's result that this step cannot do without.

    A result that lacks it (or holds something else), for instance one an operator entered with
    `tasker-pg step resolve`, fails the step permanently with a message naming the step and the
    field: running it again would not make the field appear.
    """
    value = context.get_dependency_field(step, field)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        problem = "has no" if value is None else f"has a {type(value).__name__} as its"
        raise PermanentError(
            message=f"{context.step_name} needs {field!r} from {step}, whose result "
            f"{problem} {field!r}",
            error_code="MISSING_UPSTREAM_FIELD",
            context={"step": step, "field": field, "value": value},
        )
    return value


class ProcessPaymentHandler(StepHandler):
    """Charges the cart total computed by validate_cart (simulated gateway)."""

    handler_name = "ecommerce.step_handlers.ProcessPaymentHandler"
    handler_version = "1.0.0"

    # Test tokens that make the simulated gateway decline or time out.
    DECLINED_TOKEN = "tok_declined"
    TIMEOUT_TOKEN = "tok_gateway_timeout"

    def call(self, context: StepContext) -> StepHandlerResult:
        total = context.get_dependency_field("validate_cart", "total")
        if not isinstance(total, int | float) or total <= 0:
            raise PermanentError(
                message="validate_cart did not produce a positive cart total to charge",
                error_code="MISSING_CART_TOTAL",
                context={"total": total},
            )

        payment_method = context.get_input_or("payment_method", "credit_card")
        payment_token = context.get_input_or("payment_token", "tok_test_visa")

        logger.info(
            "ProcessPaymentHandler: Charging %.2f - task_uuid=%s, method=%s",
            total,
            context.task_uuid,
            payment_method,
        )

        payment_id = self._charge_payment(context.task_uuid, total, payment_token)

        return self.success(
            {
                "payment_id": payment_id,
                "amount_charged": round(total, 2),
                "currency": "USD",
                "payment_method": payment_method,
                "status": "completed",
            },
            metadata={
                "operation": "process_payment",
                "execution_hints": {"amount": round(total, 2), "attempt": context.attempt},
            },
        )

    def _charge_payment(self, task_uuid: str, amount: float, payment_token: str) -> str:
        if payment_token == self.DECLINED_TOKEN:
            raise PermanentError(
                message="Payment declined by the card issuer",
                error_code="PAYMENT_DECLINED",
                context={"amount": amount},
            )
        if payment_token == self.TIMEOUT_TOKEN:
            raise RetryableError(
                message="Payment gateway timeout",
                retry_after=5,
                context={"gateway": "simulated"},
            )
        return _stable_id("pay", task_uuid)


class UpdateInventoryHandler(StepHandler):
    """Reserves stock for every validated cart item (does not change PRODUCTS)."""

    handler_name = "ecommerce.step_handlers.UpdateInventoryHandler"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        validated_items = context.get_dependency_field("validate_cart", "validated_items")
        if not validated_items:
            raise PermanentError(
                message="validate_cart did not produce any validated items to reserve",
                error_code="MISSING_VALIDATED_ITEMS",
            )

        reserved: list[dict[str, Any]] = []
        for item in validated_items:
            product = PRODUCTS.get(item["product_id"])
            if product is None:
                raise PermanentError(
                    message=f"Product {item['product_id']} not found",
                    error_code="PRODUCT_NOT_FOUND",
                )
            if product["stock"] < item["quantity"]:
                # Stock changed since validation: retry once it is replenished.
                raise RetryableError(
                    message=f"Insufficient stock for {product['name']}",
                    retry_after=30,
                    context={
                        "product_id": product["id"],
                        "available": product["stock"],
                        "requested": item["quantity"],
                    },
                )
            reserved.append(
                {
                    "product_id": product["id"],
                    "name": product["name"],
                    "quantity": item["quantity"],
                    "stock_after_reservation": product["stock"] - item["quantity"],
                }
            )

        return self.success(
            {
                "reservation_id": _stable_id("res", context.task_uuid),
                "reserved_items": reserved,
                "total_items_reserved": sum(item["quantity"] for item in reserved),
                "status": "reserved",
            },
            metadata={
                "operation": "update_inventory",
                "execution_hints": {"products_reserved": len(reserved)},
            },
        )


class SendConfirmationHandler(StepHandler):
    """Builds the order confirmation email from the payment and inventory results."""

    handler_name = "ecommerce.step_handlers.SendConfirmationHandler"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        payment = context.get_dependency_result("process_payment")
        inventory = context.get_dependency_result("update_inventory")
        if not payment or not inventory:
            raise PermanentError(
                message="process_payment and update_inventory results are required",
                error_code="MISSING_UPSTREAM_RESULTS",
            )

        payment_id = _upstream_field(context, "process_payment", "payment_id", str)
        amount_charged = _upstream_field(context, "process_payment", "amount_charged", int | float)
        items = inventory.get("reserved_items", [])
        recipient = context.get_input_or("customer_email", "customer@example.com")

        lines = [f"- {item['quantity']} x {item['name']}" for item in items]
        body = "\n".join(
            [
                "Thank you for your order!",
                f"Payment {payment_id}: ${amount_charged:.2f} charged.",
                "Items:",
                *lines,
            ]
        )

        return self.success(
            {
                "email_sent": True,
                "recipient": recipient,
                "message_id": _stable_id("msg", context.task_uuid),
                "subject": f"Order confirmation - payment {payment_id}",
                "body": body,
                "payment_id": payment_id,
                "amount_charged": amount_charged,
                "items": [
                    {
                        "product_id": item["product_id"],
                        "name": item["name"],
                        "quantity": item["quantity"],
                    }
                    for item in items
                ],
            },
            metadata={
                "operation": "send_confirmation",
                "execution_hints": {"items_listed": len(items)},
            },
        )
