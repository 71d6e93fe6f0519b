"""The linear and diamond math workflows: sync handlers for the line, async ones for the diamond.

linear (even_number n):  square -> +10 -> x3 -> /2          6 -> 36 -> 46 -> 138 -> 69.0
diamond (even_number n): square -> (+25 | x2) -> average    6 -> 36 -> (61 | 72) -> 66.5
"""

from __future__ import annotations

import asyncio

from tasker_pg import StepContext, StepHandler, StepHandlerResult


class LinearStep1Handler(StepHandler):
    """The guide's minimal handler: square the even input."""

    handler_name = "linear_step_1"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        even_number = context.get_input("even_number")

        if not even_number or even_number % 2 != 0:
            return self.failure(
                "Task context must contain an even number",
                error_type="validation_error",
                retryable=False,
            )

        result = even_number * even_number

        return self.success(
            {"result": result},
            metadata={"operation": "square", "step_type": "initial"},
        )


class LinearStep2Handler(StepHandler):
    handler_name = "linear_step_2"

    def call(self, context: StepContext) -> StepHandlerResult:
        value = context.get_dependency_field("linear_step_1", "result")
        return self.success({"result": value + 10}, metadata={"operation": "add"})


class LinearStep3Handler(StepHandler):
    handler_name = "linear_step_3"

    def call(self, context: StepContext) -> StepHandlerResult:
        value = context.get_dependency_field("linear_step_2", "result")
        return self.success({"result": value * 3}, metadata={"operation": "multiply"})


class LinearStep4Handler(StepHandler):
    handler_name = "linear_step_4"

    def call(self, context: StepContext) -> StepHandlerResult:
        value = context.get_dependency_field("linear_step_3", "result")
        # Every ancestor's result is visible, not only the direct parent's.
        seen = sorted(context.dependency_results)
        return self.success(
            {"result": value / 2, "ancestors_seen": seen}, metadata={"operation": "divide"}
        )


class DiamondStartHandler(StepHandler):
    handler_name = "diamond_start"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0)
        n = context.get_input("even_number")
        return self.success({"result": n * n})


class DiamondBranchBHandler(StepHandler):
    handler_name = "diamond_branch_b"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0.01)
        return self.success(
            {"result": context.get_dependency_field("diamond_start", "result") + 25}
        )


class DiamondBranchCHandler(StepHandler):
    handler_name = "diamond_branch_c"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0.01)
        return self.success({"result": context.get_dependency_field("diamond_start", "result") * 2})


class DiamondEndHandler(StepHandler):
    handler_name = "diamond_end"

    async def call(self, context: StepContext) -> StepHandlerResult:
        b = context.get_dependency_field("diamond_branch_b", "result")
        c = context.get_dependency_field("diamond_branch_c", "result")
        return self.success({"result": (b + c) / 2})
