"""What the worker logs about steps and templates, through an in-process `Worker`.

- one line per finished step, stating what the engine did: succeeded (INFO), failed and will
  retry (WARNING, with when), failed for good (ERROR, why it gives up, the handler's
  traceback), each record carrying the task and step ids;
- at start, one warning per template step handler the registry cannot resolve, for the worker's
  templates and the newest registered version of each template of its namespaces.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tasker_pg import HandlerRegistry, Worker, db
from tasker_pg.template import TaskTemplate
from tests.support.worker import registry_of, steps_of, wait_final
from tests.support.workflows import console_handlers

FAST: dict[str, Any] = {"poll_interval": 0.1, "summary_interval": 0}


def one_step(name: str, handler: str, version: str = "1.0.0", **retry: Any) -> TaskTemplate:
    """A template `name` of the `console` namespace with one step `name` running `handler`."""
    step: dict[str, Any] = {"name": name, "handler": {"callable": handler}}
    if retry:
        step["retry"] = retry
    return TaskTemplate.from_dict(
        {"name": name, "namespace_name": "console", "version": version, "steps": [step]}
    )


def records_about(caplog: pytest.LogCaptureFixture, step_uuid: Any) -> list[logging.LogRecord]:
    """The worker's records whose `extra` names the step."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("tasker_pg.worker") and getattr(r, "step_uuid", None) == str(step_uuid)
    ]


async def test_each_step_ends_with_one_line_that_says_what_happened(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasker_pg")
    templates = [
        one_step("ok", "console.ok"),
        one_step("boom", "console.boom", max_attempts=2, backoff="fixed", backoff_base_ms=100),
        one_step("refuse", "console.refuse"),
        one_step("once", "console.boom", retryable=False),
    ]
    async with Worker(
        ["console"], registry_of(console_handlers), dsn=dsn, templates=templates, **FAST
    ) as worker:
        tasks = {t.name: await conn.create_task("console", t.name, {}) for t in templates}
        states = await wait_final(conn, tasks.values())
    assert [states[tasks[n]] for n in ("ok", "boom", "refuse", "once")] == [
        "complete",
        "error",
        "error",
        "error",
    ]
    stats = worker.stats
    assert (stats.succeeded, stats.retried, stats.failed) == (1, 1, 3)

    def lines(name: str) -> list[tuple[int, str]]:
        step = steps[name][name]
        return [(r.levelno, r.getMessage()) for r in records_about(caplog, step["step_uuid"])]

    steps = {name: await steps_of(conn, task) for name, task in tasks.items()}
    head = {
        name: f"step {name} {steps[name][name]['step_uuid']} of task {task}"
        for name, task in tasks.items()
    }
    ms = r"\d+\.\d ms"

    [(level, message)] = lines("ok")
    assert level == logging.INFO
    assert re.fullmatch(rf"worker \S+: {head['ok']} succeeded in {ms} \(attempt 1/3\)", message)

    [(retry_level, retry), (final_level, final)] = lines("boom")
    assert retry_level == logging.WARNING
    assert re.fullmatch(
        rf"worker \S+: {head['boom']} failed in {ms} \(will retry, attempt 1/2, next in 0\.1s\): "
        r"ValueError: boom on attempt 1",
        retry,
    ), retry
    assert final_level == logging.ERROR
    assert re.fullmatch(
        rf"worker \S+: {head['boom']} failed permanently in {ms} \(attempt 2/2, giving up: no "
        r"attempts left\): ValueError: boom on attempt 2",
        final,
    ), final

    [(level, message)] = lines("refuse")
    assert level == logging.ERROR
    assert message.endswith(
        "(attempt 1/3, giving up: the error is permanent): PermanentError [BAD_ORDER]: the "
        "order is malformed"
    )
    [(level, message)] = lines("once")
    assert level == logging.ERROR
    assert "(attempt 1/3, giving up: the step is not retryable): ValueError" in message

    # A final failure comes with the handler's traceback (file and line); a retry does not.
    formatter = logging.Formatter()
    raised = {"boom": "ValueError", "refuse": "PermanentError", "once": "ValueError"}
    for name in ("boom", "refuse", "once"):
        [record] = [
            r
            for r in records_about(caplog, steps[name][name]["step_uuid"])
            if r.levelno == logging.ERROR
        ]
        assert record.exc_info is not None
        exc_type = record.exc_info[0]
        assert exc_type is not None and exc_type.__name__ == raised[name]
        trace = formatter.formatException(record.exc_info)
        assert re.search(r'console_handlers\.py", line \d+, in call', trace), trace
        assert getattr(record, "task_uuid", None) == str(tasks[name])
    [warning] = [
        r
        for r in records_about(caplog, steps["boom"]["boom"]["step_uuid"])
        if r.levelno == logging.WARNING
    ]
    assert warning.exc_info is None
    # A failure that ends the step is never called retryable.
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and re.search(r"(?<!not )retryable", r.getMessage())
    ]


async def test_start_warns_once_per_handler_the_registry_cannot_resolve(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tasker_pg")
    # Registered earlier (by another deployment): two steps naming a handler gone since.
    legacy = TaskTemplate.from_dict(
        {
            "name": "legacy",
            "namespace_name": "console",
            "version": "1.0.0",
            "steps": [
                {"name": "a", "handler": {"callable": "console.gone"}},
                {"name": "b", "handler": {"callable": "console.gone"}, "dependencies": ["a"]},
            ],
        }
    )
    await conn.register_template(legacy.to_json())
    # Only the newest version of a registered template counts.
    for version, handler in (("1.0.0", "console.old_name"), ("1.1.0", "console.ok")):
        await conn.register_template(one_step("evolving", handler, version).to_json())
    typo = "tests.support.workflows.console_handlrs.OkHandler"
    mine = TaskTemplate.from_dict(
        {
            "name": "orders",
            "namespace_name": "console",
            "version": "2.0.0",
            "steps": [
                {"name": "typo_module", "handler": {"callable": typo}},
                # not registered by name, but importable by its dotted path and the registry
                # allows importing: fine
                {
                    "name": "by_path",
                    "handler": {"callable": "tests.support.workflows.console_handlers.OkHandler"},
                },
                {"name": "by_name", "handler": {"callable": "console.ok"}},
                {"name": "near_miss", "handler": {"callable": "console.okk"}},
            ],
        }
    )
    registry = HandlerRegistry(allow_import=True)
    registry.register_module(console_handlers)
    async with Worker(["console"], registry, dsn=dsn, templates=[mine], **FAST):
        pass

    warnings = {
        match.group(1): r.getMessage()
        for r in caplog.records
        if (match := re.search(r"names handler (\S+), ", r.getMessage()))
    }
    assert set(warnings) == {"console.gone", typo, "console.okk"}, warnings
    assert sum("names handler console.gone," in r.getMessage() for r in caplog.records) == 1
    assert (
        "template console/legacy 1.0.0 step a (and 1 more step(s)) names handler console.gone, "
        "which this worker does not know: steps using it will fail"
    ) in warnings["console.gone"]
    assert f"template console/orders 2.0.0 step typo_module names handler {typo}" in warnings[typo]
    assert "did you mean console.ok?" in warnings["console.okk"]
    assert "registered handlers: console.boom, console.gated, console.ok" in warnings["console.okk"]


async def test_run_forever_refuses_a_running_loop_and_run_points_to_it() -> None:
    worker = Worker(["x"], HandlerRegistry(), dsn="postgresql://nobody@127.0.0.1:1/none", **FAST)
    with pytest.raises(RuntimeError, match=r"await worker\.run\(\)"):
        worker.run_forever()
    assert "run_forever()" in (Worker.run.__doc__ or "")
