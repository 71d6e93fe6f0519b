"""Handlers of the dashboard tests' `shop` workflow: prepare -> charge -> notify.

`charge` raises a PermanentError whose message is hostile HTML when the context asks for it,
so the failed step's error must be shown escaped.
"""

from __future__ import annotations

from tasker_pg import StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError

HOSTILE = '<script>window.__pwned = 1</script> card & "declined" <b>now</b>'


class Prepare(StepHandler):
    handler_name = "dash_prepare"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"prepared": True})


class Charge(StepHandler):
    handler_name = "dash_charge"

    def call(self, context: StepContext) -> StepHandlerResult:
        if context.get_input("fail"):
            raise PermanentError(HOSTILE, error_code="CARD_DECLINED")
        return self.success({"charged": True})


class Notify(StepHandler):
    handler_name = "dash_notify"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"sent": True})
