"""An order that waits for a human approval, holding no worker while it waits.

`reserve_stock -> wait_for_approval (wait_for_event) -> cool_off (sleep) -> ship_or_release`.
`wait_for_approval` completes when `tasker.emit_event('order_approved', <order_id>, payload)` is
called (from psql, a trigger, the client or `tasker-pg event emit`); the payload is its result.
Without an approval within three days it completes with its default, a rejection.
"""

from __future__ import annotations

from tasker_pg import StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError


class ReserveStockHandler(StepHandler):
    """Reserves the order's items (here: checks there are some and counts them)."""

    handler_name = "approval_wait.ReserveStockHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        items = context.get_input_or("items", None)
        if not isinstance(items, list) or not items:
            raise PermanentError("an order needs a non-empty list of items", error_code="no_items")
        return self.success({"reserved": len(items)})


class ShipOrReleaseHandler(StepHandler):
    """Ships an approved order; releases the reservation of a rejected one."""

    handler_name = "approval_wait.ShipOrReleaseHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        decision = context.get_dependency_result("wait_for_approval") or {}
        reserved = context.get_dependency_field("reserve_stock", "reserved")
        if decision.get("approved") is True:
            return self.success({"shipped": reserved, "approved_by": decision.get("by")})
        return self.success({"released": reserved, "rejected_by": decision.get("by")})
