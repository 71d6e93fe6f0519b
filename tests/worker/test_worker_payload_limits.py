"""A handler's huge exception message ends as a stored failure with a truncated message, never as
an outcome the engine refuses (issue 10, item 4: the error object has a size limit in
tasker.settings, max_error_bytes, and the worker keeps what it sends under it)."""

from __future__ import annotations

import pytest

from tasker_pg import HandlerRegistry, StepContext, StepHandler, StepHandlerResult, Worker, db
from tasker_pg.template import TaskTemplate
from tests.support.worker import steps_of, wait_final

pytestmark = pytest.mark.timeout(60)


class HugeErrorHandler(StepHandler):
    """Raises an exception whose message is 5 MB of control characters (six bytes each as JSON
    text), so even the capped message and traceback are over the engine's error limit."""

    handler_name = "limits.huge_error"

    def call(self, context: StepContext) -> StepHandlerResult:
        raise RuntimeError("\x01" * 5_000_000)


async def test_a_5mb_exception_message_is_stored_truncated(dsn: str, conn: db.Connection) -> None:
    registry = HandlerRegistry()
    registry.register(HugeErrorHandler)
    tpl = TaskTemplate.from_dict(
        {
            "name": "huge_error",
            "namespace_name": "limits",
            "version": "1.0.0",
            "steps": [
                {
                    "name": "boom",
                    "handler": {"callable": HugeErrorHandler.handler_name},
                    "retry": {"max_attempts": 1},
                }
            ],
        }
    )
    async with Worker(
        ["limits"], registry, dsn=dsn, templates=[tpl], poll_interval=0.1, summary_interval=0
    ):
        task = await conn.create_task("limits", "huge_error", {})
        assert (await wait_final(conn, [task]))[task] == "error"

    step = (await steps_of(conn, task))["boom"]
    assert step["attempts"] == 1
    error = step["last_error"]
    assert error["error_type"] == "RuntimeError"  # the handler's failure, not lease_expired
    assert "truncated" in error["message"]
    assert error["message"].startswith("\x01")
    limit = await conn.fetchval("SELECT value FROM tasker.settings WHERE name = 'max_error_bytes'")
    stored = await conn.fetchval(
        "SELECT octet_length((last_error - 'attempt' - 'worker_id' - 'at')::text) "
        "FROM tasker.steps WHERE step_uuid = $1",
        step["step_uuid"],
    )
    assert stored <= limit
