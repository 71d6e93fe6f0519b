"""The operator CLI, called in-process (`tasker_pg.cli.main`) as scripts use it; one test runs
the installed `tasker-pg` console script as real processes, one command of each group.

Every command's `--json` output parses; exit codes are 0 ok, 1 not found / failed task, 2 usage
(argparse errors and bad JSON); `task show` draws every step of a diamond with its state; steps
are made to fail by driving them with `claim_steps`/`complete_steps` (no worker), then retried,
resolved and explained from the command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tasker_pg import HandlerRegistry, StepContext, StepHandler, StepHandlerResult, Worker, db
from tasker_pg import cli as tasker_cli
from tasker_pg.render import format_time
from tests.support import cli as cli_support
from tests.support.engine import (
    NAMESPACE,
    complete,
    diamond,
    failure,
    start,
    step,
    step_states,
    success,
    template,
    wait_for_claim,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "00000000-0000-4000-8000-000000000000"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"

DIAMOND_YAML = """\
name: yaml_diamond
namespace_name: flows
version: 1.0.0
steps:
  - name: start
    handler: {callable: handlers.start}
  - name: b
    handler: {callable: handlers.b}
    dependencies: [start]
  - name: c
    handler: {callable: handlers.c}
    dependencies: [start]
  - name: end
    handler: {callable: handlers.end}
    dependencies: [b, c]
"""


def _env(dsn: str) -> dict[str, str | None]:
    return {"TASKER_DATABASE_URL": dsn, "NO_COLOR": "1", "DATABASE_URL": None}


def cli(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`tasker-pg ARGS` against the test database, in this process."""
    return cli_support.run_main(tasker_cli.main, args, env=_env(dsn), stdin=stdin, cwd=REPO)


def script(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tasker-pg ARGS` against the test database: the installed console script, a process."""
    env = {k: v for k, v in {**os.environ, **_env(dsn)}.items() if v is not None}
    return subprocess.run(
        [cli_support.console_script(), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok_json(dsn: str, *args: str) -> Any:
    """Run a command with --json, assert exit 0 and return the parsed document."""
    result = cli(dsn, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def failed_task(conn: db.Connection) -> tuple[str, str]:
    """A diamond task whose `start` step failed permanently: (task uuid, step uuid)."""
    task = await start(conn, diamond())
    [row] = await wait_for_claim(conn, NAMESPACE, qty=1)
    await complete(conn, failure(row, "card declined", retryable=False, error_type="Declined"))
    return str(task), str(row["step_uuid"])


# --- --json everywhere -----------------------------------------------------------------------


async def test_json_output_parses_for_every_command(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "diamond.yaml"
    path.write_text(DIAMOND_YAML)
    registered = ok_json(dsn, "template", "register", str(path))
    assert [(r["namespace"], r["name"], r["version"], r["step_count"]) for r in registered] == [
        ("flows", "yaml_diamond", "1.0.0", 4)
    ]
    templates = ok_json(dsn, "template", "list")
    assert [(t["namespace"], t["name"], t["steps"]) for t in templates] == [
        ("flows", "yaml_diamond", 4)
    ]

    created = ok_json(
        dsn,
        "task",
        "create",
        "flows",
        "yaml_diamond",
        "--context",
        '{"order": 7}',
        "--priority",
        "5",
        "--idempotency-key",
        "order-7",
        "--reason",
        "cli test",
    )
    task = created["task_uuid"]
    assert created["status"] == "pending" and created["context"] == {"order": 7}
    assert (created["priority"], created["idempotency_key"], created["reason"]) == (
        5,
        "order-7",
        "cli test",
    )
    again = ok_json(
        dsn,
        "task",
        "create",
        "flows",
        "yaml_diamond",
        "--context",
        "{}",
        "--idempotency-key",
        "order-7",
    )
    assert again["task_uuid"] == task  # the idempotency key returned the first task
    assert (created["created"], again["created"]) == (True, False)
    said = cli(dsn, "task", "create", "flows", "yaml_diamond", "--idempotency-key", "order-7")
    assert said.returncode == 0, said.stderr
    assert "idempotency key 'order-7' was used before" in said.stdout
    assert f"found existing task {task}" in said.stdout, said.stdout

    listed = ok_json(dsn, "task", "list")
    assert [t["task_uuid"] for t in listed["tasks"]] == [task]
    assert listed["pagination"]["total_count"] == 1

    shown = ok_json(dsn, "task", "show", task)
    assert shown["task"]["task_uuid"] == task
    assert [s["name"] for s in shown["steps"]] == ["start", "b", "c", "end"]
    assert shown["steps"][3]["dependencies"] == ["b", "c"]

    queues = ok_json(dsn, "queue", "list")
    assert [q["queue_name"] for q in queues] == ["flows"]

    cancelled = ok_json(dsn, "task", "cancel", task, "--reason", "changed my mind")
    assert cancelled["state"] == "cancelled" and cancelled["cancelled_steps"] == 4

    waited = cli(dsn, "task", "wait", task, "--timeout", "5", "--json")
    assert waited.returncode == 1  # cancelled: not a success
    assert json.loads(waited.stdout)["status"] == "cancelled"

    _, step = await failed_task(conn)
    explained = ok_json(dsn, "step", "explain", step)
    assert explained["step"]["current_state"] == "error"
    retried = ok_json(dsn, "step", "retry", step)
    assert retried["state"] == "enqueued"
    resolved = ok_json(dsn, "step", "resolve", step, "--result", '{"by": "hand"}')
    assert resolved["state"] == "resolved_manually"


# --- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["task", "show", UNKNOWN],
        ["task", "wait", UNKNOWN, "--timeout", "1"],
        ["task", "cancel", UNKNOWN],
        ["step", "explain", UNKNOWN],
        ["step", "retry", UNKNOWN],
        ["step", "resolve", UNKNOWN, "--result", "null"],
        ["task", "create", "flows", "no_such_template", "--context", "{}"],
    ],
    ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else str(a),
)
async def test_unknown_things_exit_1_with_an_error_code(dsn: str, args: list[str]) -> None:
    result = cli(dsn, *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error [")
    assert "not_found]" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["task", "show", "not-a-uuid"], "not a valid UUID"),
        (["task"], "required"),
        (["task", "list", "--limit", "0"], "must be > 0"),
        (["task", "list", "--status", "finished"], "invalid choice"),
        (["task", "wait", UNKNOWN, "--timeout", "-1"], "must be a finite number >= 0"),
        (["step", "resolve", UNKNOWN], "--result"),
        (["task", "create", "flows", "diamond", "--context", "{not json"], "error [invalid_json]"),
        (["task", "create", "flows", "diamond", "--context", "[1, 2]"], "must be a JSON object"),
        (["task", "create", "flows", "diamond", "--context", "@/no/such.json"], "cannot read"),
        (["step", "resolve", UNKNOWN, "--result", "{oops"], "error [invalid_json]"),
        (["task", "retry", "--namespace", "flows"], "--failed-since"),
        (
            ["task", "retry", "--namespace", "flows", "--failed-since", "yesterday"],
            "expected an ISO 8601 time",
        ),
        (
            ["task", "retry", "--namespace", "flows", "--failed-since", "1h", "--limit", "0"],
            "must be > 0",
        ),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str) -> None:
    """Refused before any connection: the database named here does not exist."""
    result = cli(UNREACHABLE, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr


async def test_context_from_a_file_and_from_stdin(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    await conn.register_template(diamond())
    (tmp_path / "ctx.json").write_text('{"from": "file"}')
    from_file = ok_json(
        dsn, "task", "create", NAMESPACE, "diamond", "--context", f"@{tmp_path / 'ctx.json'}"
    )
    assert from_file["context"] == {"from": "file"}
    piped = cli(
        dsn, "task", "create", NAMESPACE, "diamond", "--context", "@-", "--json", stdin='{"a": 1}'
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["context"] == {"a": 1}


# --- task show, list, wait -------------------------------------------------------------------


async def test_task_show_draws_every_step_of_a_diamond_with_its_state(
    dsn: str, conn: db.Connection
) -> None:
    task = await start(conn, diamond())
    [root] = await wait_for_claim(conn, NAMESPACE, qty=1)
    await complete(conn, success(root))  # start complete; b and c enqueued; end pending
    rows = await wait_for_claim(conn, NAMESPACE, qty=1)  # one of b/c in progress
    running = rows[0]["step_name"]
    states = await step_states(conn, task)

    result = cli(dsn, "task", "show", str(task))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert str(task) in out and "flows/diamond 1.0.0" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line[:2] in ("├─", "└─")}
    assert set(lines) == {"start", "b", "c", "end"}, out
    for name, state in states.items():
        assert f" {state} " in lines[name] + " ", (name, state, out)
    assert "1/3" in lines["start"] and "0/3" in lines["end"]
    assert "← b, c" in lines["end"] and "← start" in lines[running]
    assert "waiting for b, c" in out  # why `end` is not running (its readiness reason)
    assert out.index("start") < out.index(" b ") < out.index("end")  # layered by depth
    assert all(len(line) <= 100 for line in out.splitlines())


async def test_task_list_filters_and_pages(dsn: str, conn: db.Connection) -> None:
    tasks = [str(await start(conn, diamond(), {"i": i})) for i in range(3)]
    await start(conn, diamond(namespace="other"))
    await conn.cancel_task(tasks[0])

    page = ok_json(dsn, "task", "list", "--namespace", NAMESPACE, "--limit", "2")
    assert page["pagination"]["total_count"] == 3 and page["pagination"]["has_next"] is True
    assert [t["task_uuid"] for t in page["tasks"]] == [tasks[2], tasks[1]]
    rest = ok_json(dsn, "task", "list", "--namespace", NAMESPACE, "--limit", "2", "--offset", "2")
    assert [t["task_uuid"] for t in rest["tasks"]] == [tasks[0]]
    cancelled = ok_json(dsn, "task", "list", "--status", "cancelled")
    assert [t["task_uuid"] for t in cancelled["tasks"]] == [tasks[0]]

    human = cli(dsn, "task", "list", "--namespace", NAMESPACE, "--limit", "2")
    assert human.returncode == 0
    assert tasks[2] in human.stdout and "1-2 of 3" in human.stdout
    assert "next page: --offset 2" in human.stdout
    assert cli(dsn, "task", "list", "--namespace", "nothing_here").stdout.strip() == "no tasks"


async def test_task_wait_exits_0_when_the_task_completes(dsn: str, conn: db.Connection) -> None:
    task = await start(conn, diamond())
    waiting = asyncio.create_task(
        asyncio.to_thread(cli, dsn, "task", "wait", str(task), "--timeout", "60")
    )
    for _ in range(3):  # start; b and c; end
        rows = await wait_for_claim(conn, NAMESPACE, deadline=10)
        await complete(conn, *(success(r) for r in rows))
    waited = await asyncio.wait_for(waiting, 60)
    assert waited.returncode == 0, waited.stderr
    assert f"task {task}" in waited.stdout and "complete" in waited.stdout


async def test_task_wait_exits_1_for_a_failed_task_and_on_timeout(
    dsn: str, conn: db.Connection
) -> None:
    task, _ = await failed_task(conn)
    failed = cli(dsn, "task", "wait", task, "--timeout", "10")
    assert failed.returncode == 1
    assert "error" in failed.stdout

    pending = str(await start(conn, diamond()))
    timed_out = cli(dsn, "task", "wait", pending, "--timeout", "0.2")
    assert timed_out.returncode == 1
    assert timed_out.stderr.startswith("error [wait_timeout]:")

    created = cli(dsn, "task", "create", NAMESPACE, "diamond", "--wait", "--timeout", "0.2")
    assert created.returncode == 1  # nobody runs it: the wait times out
    assert "error [wait_timeout]" in created.stderr


# --- templates -------------------------------------------------------------------------------


async def test_template_register_and_list(dsn: str, tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "diamond.yaml").write_text(DIAMOND_YAML)
    (folder / "diamond2.yaml").write_text(DIAMOND_YAML.replace("1.0.0", "1.1.0"))

    registered = cli(dsn, "template", "register", str(folder))
    assert registered.returncode == 0, registered.stderr
    assert "registered 2 template(s)" in registered.stdout
    listed = cli(dsn, "template", "list")
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()[2:]]
    assert [r[:4] for r in rows] == [  # newest version first
        ["flows", "yaml_diamond", "1.1.0", "4"],
        ["flows", "yaml_diamond", "1.0.0", "4"],
    ]
    assert ok_json(dsn, "template", "list", "--namespace", "nope") == []

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnamespace_name: Bad-NS\nversion: 1.0.0\nsteps: []\n")
    refused = cli(dsn, "template", "register", str(bad))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error [") and str(bad) in refused.stderr


# --- steps -----------------------------------------------------------------------------------


async def test_step_explain_retry_and_resolve_a_failed_step(dsn: str, conn: db.Connection) -> None:
    task, step = await failed_task(conn)

    explained = cli(dsn, "step", "explain", step)
    assert explained.returncode == 0, explained.stderr
    out = explained.stdout
    assert "start" in out and task in out
    assert "state       error" in out
    assert "attempts    1 of 3" in out
    assert "Declined" in out and "card declined" in out  # the last error
    assert f"tasker-pg step retry {step}" in out  # what to do next
    assert "history (oldest first):" in out and "in_progress  error" in out

    doc = ok_json(dsn, "step", "explain", step)
    assert doc["task"]["task_uuid"] == task and doc["task"]["status"] == "error"
    assert doc["step"]["readiness_reason"].startswith("failed: Declined: card declined")
    assert [h["to_state"] for h in doc["audit_history"]] == [
        "enqueued",
        "in_progress",
        "error",
    ]

    shown = cli(dsn, "task", "show", task)
    assert "failed: Declined: card declined" in shown.stdout  # why, under the step
    assert "task is in error" in shown.stdout  # why b and c do not run

    retried = cli(dsn, "step", "retry", step)
    assert retried.returncode == 0, retried.stderr
    assert "error -> enqueued" in retried.stdout
    assert (await step_states(conn, task))["start"] == "enqueued"
    again = cli(dsn, "step", "retry", step)
    assert again.returncode == 1 and "error [step_not_in_error]" in again.stderr

    [row] = await wait_for_claim(conn, NAMESPACE, qty=1)
    assert row["attempt"] == 1  # fresh attempts
    await complete(conn, failure(row, "declined again", retryable=False))

    resolved = cli(dsn, "step", "resolve", step, "--result", '{"charged": "by hand"}')
    assert resolved.returncode == 0, resolved.stderr
    assert "resolved_manually" in resolved.stdout
    states = await step_states(conn, task)
    assert states["start"] == "resolved_manually"
    assert states["b"] == states["c"] == "enqueued"  # the dependents run now
    assert "resolved_manually" in cli(dsn, "task", "show", task).stdout


async def test_task_retry_redrives_the_tasks_in_error(dsn: str, conn: db.Connection) -> None:
    failed = [await failed_task(conn) for _ in range(3)]
    other = await start(conn, template("other", [step("only")]))
    [row] = await wait_for_claim(conn, NAMESPACE, qty=1)
    await complete(conn, failure(row, "nope", retryable=False))
    base = ("task", "retry", "--namespace", "flows", "--name", "diamond", "--failed-since")

    dry = cli(dsn, *base, "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].split() == ["task_uuid", "task", "failed", "at", "steps", "in", "error"]
    assert [line.split()[0] for line in lines[2:5]] == [t for t, _ in failed]  # oldest first
    assert all(line.split()[-1] == "start" for line in lines[2:5])
    assert lines[5].startswith(
        "dry run: would retry 3 step(s) of 3 task(s) of flows/diamond in error since "
    )
    assert lines[5].endswith("; nothing changed")
    assert {(await step_states(conn, t))["start"] for t, _ in failed} == {"error"}
    shown = ok_json(dsn, *base, "1h", "--dry-run", "--limit", "2")
    assert [t["task_uuid"] for t in shown["tasks"]] == [t for t, _ in failed[:2]]
    assert (shown["tasks_matched"], shown["tasks_retried"], shown["steps_to_retry"]) == (2, 0, 2)
    said = cli(dsn, *base, "1h", "--dry-run", "--limit", "2")
    assert "(the oldest 2: more may match)" in said.stdout

    first = cli(dsn, *base, "2026-01-01T00:00:00Z", "--limit", "1", "--reason", "card fixed")
    assert first.returncode == 0, first.stderr
    local = format_time(datetime.fromisoformat("2026-01-01T00:00:00+00:00"))  # shown local
    assert first.stdout.startswith(
        f"retried 1 step(s) of 1 task(s) of flows/diamond in error since {local} (1 batch(es)"
    )
    assert (await step_states(conn, failed[0][0]))["start"] == "enqueued"
    audit = await conn.fetchval(
        "SELECT metadata FROM tasker.step_transitions WHERE step_uuid = $1"
        " AND event = 'retry_requested'",
        failed[0][1],
    )
    assert audit["reason"] == "card fixed" and audit["operation"] == "retry_failed"
    rest = ok_json(dsn, *base, "1d")
    assert [t["task_uuid"] for t in rest["tasks"]] == [t for t, _ in failed[1:]]
    assert (rest["tasks_retried"], rest["steps_retried"], rest["batches"]) == (2, 2, 1)
    assert {(await step_states(conn, t))["start"] for t, _ in failed} == {"enqueued"}
    assert (await step_states(conn, other))["only"] == "error"  # another template

    none = cli(dsn, *base, "1h")
    assert none.returncode == 0, none.stderr
    assert none.stdout.startswith("no task of flows/diamond entered error since ")
    whole = cli(dsn, "task", "retry", "--namespace", "flows", "--failed-since", "1w")
    assert whole.stdout.startswith("retried 1 step(s) of 1 task(s) of namespace flows")
    unknown = cli(dsn, "task", "retry", "--namespace", "nowhere", "--failed-since", "1h")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error [template_not_found]")


async def test_step_explain_of_a_step_waiting_for_retry(dsn: str, conn: db.Connection) -> None:
    task = await start(conn, diamond())
    [row] = await wait_for_claim(conn, NAMESPACE, qty=1)
    await complete(conn, failure(row, "flaky", retry_after=600))
    doc = ok_json(dsn, "step", "explain", str(row["step_uuid"]))
    assert doc["step"]["current_state"] == "waiting_for_retry"
    assert doc["step"]["readiness_reason"].startswith("retry at ")
    shown = cli(dsn, "task", "show", str(task)).stdout
    assert "waiting_for_retry" in shown and "retry at " in shown


def test_unreachable_database_is_reported_not_traced() -> None:
    result = cli(UNREACHABLE, "task", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("error [database_not_found]")
    assert "Traceback" not in result.stderr


def test_bench_and_demo_are_wired() -> None:
    from tasker_pg.cli import build_parser

    args = build_parser().parse_args(["demo", "--tasks", "5"])
    assert args.tasks == 5
    assert build_parser().parse_args(["bench"]).func.__module__ == "tasker_pg.bench_args"


async def test_operator_walkthrough_on_the_checkout_example(dsn: str) -> None:
    """The commands the README suggests, as written, on the repository's example."""
    registered = cli(dsn, "template", "register", "examples/ecommerce")
    assert registered.returncode == 0, registered.stderr
    assert "ecommerce  checkout_workflow  1.0.0" in registered.stdout
    created = cli(
        dsn,
        "task",
        "create",
        "ecommerce",
        "checkout_workflow",
        "--context",
        '{"cart_items": [{"product_id": 1, "quantity": 2}]}',
    )
    assert created.returncode == 0, created.stderr
    task = created.stdout.split()[2]
    assert f"next: tasker-pg task show {task}" in created.stdout
    shown = cli(dsn, "task", "show", task)
    assert shown.returncode == 0
    assert "validate_cart" in shown.stdout and "ready: waiting for a worker" in shown.stdout
    assert "waiting for validate_cart" in shown.stdout
    listed = cli(dsn, "task", "list", "--namespace", "ecommerce")
    assert task in listed.stdout and "pending" in listed.stdout
    assert "ecommerce" in cli(dsn, "queue", "list").stdout
    assert "checkout_workflow" in cli(dsn, "template", "list").stdout
    cancelled = cli(dsn, "task", "cancel", task, "--reason", "just looking")
    assert cancelled.returncode == 0 and "4 unfinished step(s) cancelled" in cancelled.stdout


# --- a handler that raises -------------------------------------------------------------------


class LoadHandler(StepHandler):
    handler_name = "cli_tests.load"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"record": 7})


class ParseHandler(StepHandler):
    handler_name = "cli_tests.parse"

    def call(self, context: StepContext) -> StepHandlerResult:
        raise ValueError("bad record 7")


RAISE_LINE = next(
    number
    for number, line in enumerate(Path(__file__).read_text().splitlines(), start=1)
    if 'raise ValueError("bad record 7")' in line
)


async def test_a_handler_exception_is_shown_with_its_traceback(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A real worker runs a handler raising ValueError once (max_attempts 1): the CLI shows the
    failed step, its message and where it was raised, and the commands that move it on; the
    worker's log has the final-failure line with the traceback."""
    caplog.set_level(logging.INFO, logger="tasker_pg")
    await conn.register_template(
        template(
            "parsing",
            [
                step("load", handler=LoadHandler.handler_name),
                step("parse", "load", handler=ParseHandler.handler_name),
            ],
            retry={"max_attempts": 1},
        )
    )
    registry = HandlerRegistry()
    registry.register(LoadHandler)
    registry.register(ParseHandler)
    where = f'File "{__file__}", line {RAISE_LINE}, in call'
    async with Worker([NAMESPACE], registry, dsn=dsn, summary_interval=0):
        created = await asyncio.to_thread(
            cli, dsn, "task", "create", NAMESPACE, "parsing", "--wait", "--timeout", "60"
        )
    assert created.returncode == 1, created.stderr
    task = created.stdout.split()[2].rstrip(";")
    parse = str(await conn.step_uuid_by_name(task, "parse"))
    [final] = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and getattr(r, "step_uuid", None) == parse
    ]
    logged = logging.Formatter().format(final)  # the message and the exception it carries
    assert f"step parse {parse} of task {task} failed permanently" in logged, logged
    assert "giving up" in logged and "ValueError: bad record 7" in logged, logged
    assert where in logged, logged  # the handler's traceback follows the line
    for out in (created.stdout, cli(dsn, "task", "wait", task, "--timeout", "10").stdout):
        assert f"failed step parse ({parse})" in out, out
        assert "ValueError: bad record 7" in out
        assert f"raised at {__file__}:{RAISE_LINE} in call" in out
        assert f"tasker-pg step retry {parse}" in out
        assert f"tasker-pg step resolve {parse} --result" in out
    waited = cli(dsn, "task", "wait", task, "--timeout", "10")
    assert waited.returncode == 1

    shown = cli(dsn, "task", "show", task)
    assert shown.returncode == 0, shown.stderr
    assert f"step {parse}" in shown.stdout  # every step's uuid under its line
    assert "ValueError: bad record 7" in shown.stdout
    assert "Traceback (most recent call last):" in shown.stdout and where in shown.stdout
    assert f"tasker-pg step retry {parse}" in shown.stdout
    assert "tasker.retry_step" not in shown.stdout  # the CLI names its own commands
    assert all(len(line) <= 100 for line in shown.stdout.splitlines() if "File" not in line)

    for args in ([parse], [task, "parse"]):
        explained = cli(dsn, "step", "explain", *args)
        assert explained.returncode == 0, explained.stderr
        out = explained.stdout
        assert "last error  ValueError: bad record 7" in out
        assert f"raised at   {__file__}:{RAISE_LINE} in call" in out
        assert "traceback of the last error:" in out and where in out
        assert "attempts    1 of 1 (failed for good: no attempts left)" in out
        assert "(retryable)" not in out and "tasker.retry_step" not in out


async def test_a_task_uuid_where_a_step_uuid_belongs_names_task_show(
    dsn: str, conn: db.Connection
) -> None:
    task, _ = await failed_task(conn)
    for args in (
        ["step", "explain", task],
        ["step", "retry", task],
        ["step", "resolve", task, "--result", "{}"],
    ):
        result = cli(dsn, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"{task} is a task's UUID, not a step's" in result.stderr
        assert f"tasker-pg task show {task}" in result.stderr
    unknown = cli(dsn, "step", "explain", task, "no_such_step")
    assert unknown.returncode == 1
    assert "has no step named 'no_such_step' (its steps: start, b, c, end)" in unknown.stderr
    explained = cli(dsn, "step", "explain", task, "start")
    assert explained.returncode == 0, explained.stderr
    assert "failed for good: the handler reported a permanent error" in explained.stdout


def test_version_flag_prints_the_version() -> None:
    import tasker_pg

    result = cli("postgresql://unused", "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tasker-pg {tasker_pg.__version__}"


# --- the console script ----------------------------------------------------------------------


async def test_the_console_script_runs_every_command_group(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    """The installed `tasker-pg` script, as real processes: one command of each group (the
    worker's is tests/worker/test_worker_cli.py's end-to-end test), and its exit codes."""
    path = tmp_path / "diamond.yaml"
    path.write_text(DIAMOND_YAML)
    registered = script(dsn, "template", "register", str(path))
    assert registered.returncode == 0, registered.stderr
    assert "registered 1 template(s)" in registered.stdout
    created = script(dsn, "task", "create", "flows", "yaml_diamond", "--context", "{}", "--json")
    assert created.returncode == 0, created.stderr
    task = json.loads(created.stdout)["task_uuid"]
    queues = script(dsn, "queue", "list", "--json")
    assert queues.returncode == 0, queues.stderr
    assert [q["queue_name"] for q in json.loads(queues.stdout)] == ["flows"]
    _, step = await failed_task(conn)
    explained = script(dsn, "step", "explain", step)
    assert explained.returncode == 0, explained.stderr
    assert "state       error" in explained.stdout
    roles = script(dsn, "roles", "list", "--json")
    assert roles.returncode == 0, roles.stderr
    assert {r["kind"] for r in json.loads(roles.stdout)["roles"]} >= {"worker", "client"}
    cancelled = script(dsn, "task", "cancel", task)
    assert cancelled.returncode == 0, cancelled.stderr
    maintenance = script(dsn, "maintenance")  # no retention policy: nothing to delete
    assert maintenance.returncode == 0, maintenance.stderr
    assert maintenance.stdout.startswith("deleted 0 task(s)")
    missing = script(dsn, "task", "show", UNKNOWN)  # main()'s exit code is the process's
    assert missing.returncode == 1 and "not_found]" in missing.stderr
