"""Conditional approval: a decision step chooses at run time which approvals a request needs.

`validate_request -> routing_decision (decision)`; the decision creates `auto_approve`
(amount < 1,000), `manager_approval` (1,000 <= amount < 5,000) or `manager_approval` and
`finance_review` (amount >= 5,000); `finalize` (a deferred convergence) runs once every branch
that was created has completed, and reports which approvals were given.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from tasker_pg import DecisionHandler, StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError

AUTO_APPROVE_LIMIT = Decimal(1000)
"""Below this amount a request is approved automatically."""
FINANCE_REVIEW_FROM = Decimal(5000)
"""From this amount on, finance reviews the request as well as the manager."""
APPROVALS = ("auto_approve", "manager_approval", "finance_review")


def route(amount: Decimal) -> list[str]:
    """The approvals an amount needs (the routing rule, kept apart so it can be read alone)."""
    if amount < AUTO_APPROVE_LIMIT:
        return ["auto_approve"]
    if amount < FINANCE_REVIEW_FROM:
        return ["manager_approval"]
    return ["manager_approval", "finance_review"]


class ValidateRequestHandler(StepHandler):
    """Checks the request: a positive amount (a number or a decimal string) and a requester."""

    handler_name = "approval.ValidateRequestHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        raw = context.get_input_or("amount", None)
        try:
            amount = Decimal(str(raw))
        except InvalidOperation:
            raise PermanentError(
                f"amount {raw!r} is not a number", error_code="bad_amount"
            ) from None
        if not amount.is_finite() or amount <= 0:
            raise PermanentError(f"amount must be > 0, got {raw!r}", error_code="bad_amount")
        requester = context.get_input_or("requester", None)
        if not isinstance(requester, str) or not requester:
            raise PermanentError("requester is required", error_code="missing_requester")
        return self.success({"amount": str(amount), "requester": requester})


class RoutingDecisionHandler(DecisionHandler):
    """Chooses the approval branches from the validated amount."""

    handler_name = "approval.RoutingDecisionHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        amount = Decimal(context.get_dependency_field("validate_request", "amount"))
        steps = route(amount)
        return self.decision_success(steps, routing_context={"amount": str(amount)})


class _Approval(StepHandler):
    approver = ""

    def call(self, context: StepContext) -> StepHandlerResult:
        request = context.get_dependency_result("validate_request")
        return self.success(
            {"approved": True, "approver": self.approver, "amount": request["amount"]}
        )


class AutoApproveHandler(_Approval):
    handler_name = "approval.AutoApproveHandler"
    approver = "policy"


class ManagerApprovalHandler(_Approval):
    handler_name = "approval.ManagerApprovalHandler"
    approver = "manager"


class FinanceReviewHandler(_Approval):
    handler_name = "approval.FinanceReviewHandler"
    approver = "finance"


class FinalizeHandler(StepHandler):
    """Approved when every approval that was created approved; lists them in route order."""

    handler_name = "approval.FinalizeHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        results: dict[str, Any] = context.dependency_results
        given = [name for name in APPROVALS if name in results]
        if not given:
            raise PermanentError("no approval ran before finalize", error_code="no_approvals")
        return self.success(
            {
                "approved": all(results[name]["approved"] for name in given),
                "approvals": given,
                "approvers": [results[name]["approver"] for name in given],
                "amount": context.get_dependency_field("validate_request", "amount"),
                "requester": context.get_dependency_field("validate_request", "requester"),
            }
        )
