"""A handler module that only the registry-import tests name, by dotted path.

Nothing imports it, so whether it is in `sys.modules` after a test shows whether a worker
imported it because a template named it.
"""

from __future__ import annotations

from tasker_pg import StepContext, StepHandler, StepHandlerResult


class UnregisteredHandler(StepHandler):
    handler_name = "unregistered_handler"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"imported": True})
