"""Decision points: a handler that chooses at run time which downstream steps exist.

A template step of type `decision` runs a `DecisionHandler`. Its success names the steps to
create (direct children of the decision in the template) or says that no branch is taken; the
engine checks the names and creates the steps in the transaction that commits the decision
(`tasker.complete_steps`). An unknown name fails the decision step permanently, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tasker_pg.handler import StepHandler
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import MAX_STEPS, NAME_MAX_LEN

STEP_NAME_RE = re.compile(rf"[A-Za-z_][A-Za-z0-9_.\-]{{0,{NAME_MAX_LEN - 1}}}")
"""A step name, as templates allow them."""

MAX_REASON_CHARS = 4096
"""Longest `reason` the outcome builders accept (it is stored with the step's result)."""


class DecisionHandler(StepHandler):
    """Base class of `decision` steps: return `decision_success` or `decision_no_branches`.

    ```python
    class RoutingDecision(DecisionHandler):
        handler_name = "approval.routing_decision"

        def call(self, context: StepContext) -> StepHandlerResult:
            amount = context.get_dependency_field("validate_request", "amount")
            if amount < 1_000:
                return self.decision_success(["auto_approve"], {"amount": amount})
            if amount < 5_000:
                return self.decision_success(["manager_approval"], {"amount": amount})
            return self.decision_success(
                ["manager_approval", "finance_review"], {"amount": amount}
            )
    ```

    The result is what the engine reads: `{"decision_point_outcome": {"type": "create_steps",
    "step_names": [...]}, "routing_context": {...}}` or `{"decision_point_outcome": {"type":
    "no_branches"}, "reason": ...}`. A success of a decision step without
    `decision_point_outcome` fails the step permanently.
    """

    def decision_success(
        self,
        steps: Sequence[str],
        routing_context: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> StepHandlerResult:
        """Create the steps named `steps` (direct children of this decision in the template).

        `routing_context` (a JSON object) is stored with the decision's result, for the chosen
        steps and for people reading the task. Raises `ValueError` for an empty list, a name
        that is not a step name, or a name given twice.
        """
        return StepHandlerResult.success(
            create_steps_outcome(steps, routing_context), metadata=metadata
        )

    def decision_no_branches(
        self, reason: str, metadata: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        """Take no branch: nothing downstream of this decision is created (a convergence step
        after it still runs once nothing else can be created). `reason` says why, in words."""
        return StepHandlerResult.success(no_branches_outcome(reason), metadata=metadata)


def create_steps_outcome(
    steps: Sequence[str], routing_context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The result of a decision that creates `steps` (what `decision_success` returns)."""
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise ValueError(
            f"steps must be a list of step names, got {type(steps).__name__}"
            + (f" {steps!r}: wrap it in a list" if isinstance(steps, str) else "")
        )
    if not steps:
        raise ValueError(
            "steps is empty: a decision that takes no branch returns "
            'self.decision_no_branches(reason) ({"type": "no_branches"}) instead'
        )
    if len(steps) > MAX_STEPS:
        raise ValueError(
            f"steps names {len(steps)} steps; a template has at most {MAX_STEPS}, so a "
            "decision can create at most that many"
        )
    seen: set[str] = set()
    for name in steps:
        if not isinstance(name, str):
            raise ValueError(f"step names are strings, got {type(name).__name__} {name!r}")
        if not STEP_NAME_RE.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a step name (letters, digits, '_', '-' and '.', starting "
                f"with a letter or '_', at most {NAME_MAX_LEN} characters)"
            )
        if name in seen:
            raise ValueError(f"step {name!r} is named twice")
        seen.add(name)
    if routing_context is not None and not isinstance(routing_context, Mapping):
        raise ValueError(
            f"routing_context must be a JSON object (a dict), got {type(routing_context).__name__}"
        )
    return {
        "decision_point_outcome": {"type": "create_steps", "step_names": list(steps)},
        "routing_context": dict(routing_context) if routing_context is not None else {},
    }


def no_branches_outcome(reason: str) -> dict[str, Any]:
    """The result of a decision that takes no branch (what `decision_no_branches` returns)."""
    return {"decision_point_outcome": {"type": "no_branches"}, "reason": check_reason(reason)}


def check_reason(reason: str) -> str:
    """`reason` if it is a non-empty string of at most `MAX_REASON_CHARS`; else `ValueError`."""
    if not isinstance(reason, str):
        raise ValueError(f"reason must be a string, got {type(reason).__name__}")
    if not reason.strip():
        raise ValueError("reason is empty: say in words why nothing is created")
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"reason is {len(reason)} characters, more than {MAX_REASON_CHARS}")
    return reason
