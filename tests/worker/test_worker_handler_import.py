"""A worker runs only the handlers its operator registered; dotted-path import is opt-in."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tasker_pg import HandlerRegistry, Worker, db, worker_cli
from tasker_pg.errors import PermanentError
from tasker_pg.template import TaskTemplate
from tests.support.worker import (
    registry_of,
    steps_of,
    templates,
    wait_final,
    wait_handler_missing,
)
from tests.support.workflows import timing_handlers

MODULE = "tests.support.unregistered_handler"
DOTTED = f"{MODULE}.UnregisteredHandler"
NAMESPACE = "timing_async"
FAST = {"poll_interval": 0.1, "summary_interval": 0}


@pytest.fixture(autouse=True)
def not_imported() -> Iterator[None]:
    """The test-only handler module is not imported before or after each test."""
    sys.modules.pop(MODULE, None)
    yield
    sys.modules.pop(MODULE, None)


def dotted_template() -> TaskTemplate:
    return TaskTemplate.from_dict(
        {
            "name": "dotted",
            "namespace_name": NAMESPACE,
            "version": "1.0.0",
            "steps": [
                {"name": "by_path", "handler": {"callable": DOTTED}},
                {"name": "os_path", "handler": {"callable": "os.path"}},
            ],
        }
    )


async def run_dotted(
    dsn: str, conn: db.Connection, registry: HandlerRegistry
) -> dict[str, dict[str, Any]]:
    async with Worker(
        [NAMESPACE],
        registry,
        dsn=dsn,
        templates=[dotted_template(), *templates("quick")],
        **FAST,
    ):
        task = await conn.create_task(NAMESPACE, "dotted", {})
        await wait_final(conn, [task])
    return await steps_of(conn, task)


async def test_unregistered_dotted_path_is_not_imported(dsn: str, conn: db.Connection) -> None:
    """Without --allow-import the worker does not have these handlers: it hands the steps back
    (no attempt spent, for a worker that has them) and imports nothing."""
    async with Worker(
        [NAMESPACE],
        registry_of(timing_handlers),
        dsn=dsn,
        templates=[dotted_template(), *templates("quick")],
        **FAST,
    ):
        task = await conn.create_task(NAMESPACE, "dotted", {})
        steps = await steps_of(conn, task)
        released = await wait_handler_missing(conn, [s["step_uuid"] for s in steps.values()])
    by_step = {r["step_uuid"]: r for r in released}
    steps = await steps_of(conn, task)
    for name, callable_name in (("by_path", DOTTED), ("os_path", "os.path")):
        step = steps[name]
        assert step["state"] != "error", step
        assert step["last_error"] is None
        assert callable_name in by_step[step["step_uuid"]]["error_summary"]
    assert MODULE not in sys.modules


async def test_allow_import_runs_a_dotted_path(dsn: str, conn: db.Connection) -> None:
    registry, _ = worker_cli.load_handlers_and_templates(
        [timing_handlers.__name__], [], allow_import=True
    )
    steps = await run_dotted(dsn, conn, registry)
    assert steps["by_path"]["state"] == "complete", steps["by_path"]
    assert steps["by_path"]["results"] == {"imported": True}
    # os.path is importable but is no StepHandler.
    assert steps["os_path"]["last_error"]["error_code"] == "invalid_handler"
    assert MODULE in sys.modules


def test_worker_cli_import_is_opt_in() -> None:
    parser = worker_cli.build_parser()
    assert parser.parse_args(["--namespace", "x"]).allow_import is False
    assert parser.parse_args(["--namespace", "x", "--allow-import"]).allow_import is True
    registry, _ = worker_cli.load_handlers_and_templates([timing_handlers.__name__], [])
    with pytest.raises(PermanentError) as exc_info:
        registry.resolve(DOTTED)
    assert exc_info.value.error_code == "handler_not_found"
    assert MODULE not in sys.modules
