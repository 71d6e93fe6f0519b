"""What a newcomer running a worker sees: `run_forever()` under real signals, and the console.

- `Worker(...).run_forever()` in a script (tests/support/run_forever_app.py): SIGINT or SIGTERM
  lets the running step finish, the call returns, the process exits 0 with no traceback; a
  second SIGINT abandons the running step at once and says so truthfully;
- the `tasker-pg worker` command shows the handlers' own log records next to the worker's,
  one line per finished step, each record about a step ending with its task, step and attempt,
  and `-q` keeps only warnings;
- `--log-format json` writes one JSON object per line with the step's fields, and
  `--metrics-port` serves the worker's metrics while it runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasker_pg import db
from tests.support.metrics import http_get, sample, scrape
from tests.support.worker import assert_invariants, poll, steps_of, wait_final

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


class Process:
    """A subprocess whose stdout and stderr go to one log file."""

    def __init__(self, log_path: Path, dsn: str, *argv: str) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env["TASKER_DATABASE_URL"] = dsn
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, *, timeout: float = 20.0) -> None:
        async def probe() -> bool:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"exited before logging {text!r}:\n{self.log()}")
            return False

        await poll(probe, timeout=timeout, interval=0.05, what=f"log line {text!r}")

    async def wait_exit(self, *, timeout: float = 20.0) -> int:
        async def probe() -> bool:
            return self.proc.poll() is not None

        try:
            await poll(probe, timeout=timeout, interval=0.05, what="the process exiting")
        except AssertionError:
            raise AssertionError(f"did not exit:\n{self.log()}") from None
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


async def start_gated_task(conn: db.Connection, tmp_path: Path) -> tuple[uuid.UUID, Path]:
    """A `console` task whose step runs until `gate` exists; returns once the step started."""
    gate = tmp_path / "gate"
    task = await conn.create_task(
        "console", "console", {"gate": str(gate), "marker_dir": str(tmp_path)}
    )

    async def started() -> bool:
        return has_marker(tmp_path)

    await poll(started, what="the gated step running")
    return task, gate


def has_marker(directory: Path) -> bool:
    return any(directory.glob("started-*"))


def assert_clean_exit(output: str) -> None:
    assert "Traceback" not in output, output
    assert "KeyboardInterrupt" not in output, output
    assert "CancelledError" not in output, output
    assert "run_forever returned" in output, output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_run_forever_stops_gracefully_on_a_signal(
    dsn: str,
    conn: db.Connection,
    processes: list[Process],
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    app = Process(tmp_path / "app.log", dsn, "-m", "tests.support.run_forever_app", "30")
    processes.append(app)
    await app.wait_log("worker app started")
    task, gate = await start_gated_task(conn, tmp_path)

    app.proc.send_signal(sig)
    await app.wait_log("worker app stopping: 1 step(s) running")
    assert app.proc.poll() is None  # waiting for the running step
    gate.write_text("open")
    assert await app.wait_exit() == 0

    output = app.log()
    assert_clean_exit(output)
    assert f"received {sig.name}" in output
    # logging was configured by run_forever: INFO lines, the handler's own included
    assert (
        f"INFO tests.support.workflows.console_handlers: gated handler says hello from task {task}"
        in output
    )
    step = (await steps_of(conn, task))["wait"]
    assert (step["state"], step["attempts"]) == ("complete", 1)
    assert f"step wait {step['step_uuid']} of task {task} succeeded in" in output, output
    assert "final: claimed=1 succeeded=1" in output
    await assert_invariants(conn)


async def test_second_sigint_abandons_the_running_step_at_once(
    dsn: str, conn: db.Connection, processes: list[Process], tmp_path: Path
) -> None:
    app = Process(tmp_path / "app.log", dsn, "-m", "tests.support.run_forever_app", "60")
    processes.append(app)
    await app.wait_log("worker app started")
    task, _gate = await start_gated_task(conn, tmp_path)

    app.proc.send_signal(signal.SIGINT)
    await app.wait_log("worker app stopping: 1 step(s) running, grace 60s")
    sent = time.monotonic()
    app.proc.send_signal(signal.SIGINT)
    assert await app.wait_exit() == 0
    assert time.monotonic() - sent < 15, "the second SIGINT did not cut the 60 s grace short"

    output = app.log()
    assert_clean_exit(output)
    assert "second stop request (SIGINT): abandoning 1 running step(s) now" in output
    step = (await steps_of(conn, task))["wait"]
    assert f"abandoning step wait {step['step_uuid']} of task {task}" in output
    assert "at the second stop request" in output
    assert "after the grace period" not in output
    # abandoned, not failed: the step stays claimed until its lease expires
    assert (step["state"], step["attempts"]) == ("in_progress", 1)


async def test_cli_shows_handler_logs_and_one_line_per_step(
    dsn: str, conn: db.Connection, processes: list[Process], tmp_path: Path
) -> None:
    common = (
        "-m",
        "tasker_pg.cli",
        "worker",
        "--handlers",
        "tests.support.workflows.console_handlers",
        "--templates",
        "tests/support/workflows/console.yaml",
        "--summary-interval",
        "0",
        "--poll-interval",
        "0.2",
    )
    loud = Process(tmp_path / "loud.log", dsn, *common, "--worker-id", "loud")
    processes.append(loud)
    await loud.wait_log("worker loud started")
    task, gate = await start_gated_task(conn, tmp_path)
    gate.write_text("open")
    assert (await wait_final(conn, [task]))[task] == "complete"
    step = (await steps_of(conn, task))["wait"]
    await loud.wait_log(f"step wait {step['step_uuid']} of task {task} succeeded in")
    loud.proc.send_signal(signal.SIGTERM)
    assert await loud.wait_exit() == 0
    output = loud.log()
    # the handler's module logger comes through the same handler and format as the worker's
    assert (
        f"INFO tests.support.workflows.console_handlers: gated handler says hello from task {task}"
        in output
    ), output
    assert "INFO tasker_pg.worker.steps: worker loud: step wait" in output
    # records about the step end with its ids: the worker's and the handler's own alike
    ids = f" [task={task} step={step['step_uuid']} attempt=1]"
    lines = output.splitlines()
    [hello] = [line for line in lines if "gated handler says hello" in line]
    [done] = [line for line in lines if f"step wait {step['step_uuid']} of task" in line]
    assert hello.endswith(ids), hello
    assert done.endswith(ids), done
    [started] = [line for line in lines if "worker loud started" in line]
    assert "[task=" not in started

    quiet = Process(tmp_path / "quiet.log", dsn, *common, "--worker-id", "quiet", "-q")
    processes.append(quiet)
    second = tmp_path / "second"
    second.mkdir()
    task2, gate2 = await start_gated_task(conn, second)
    gate2.write_text("open")
    assert (await wait_final(conn, [task2]))[task2] == "complete"
    quiet.proc.send_signal(signal.SIGTERM)
    assert await quiet.wait_exit() == 0
    output = quiet.log()
    assert " INFO " not in output, output
    assert "gated handler says hello" not in output

    # --log-steps failures: INFO stays on (handlers, start and stop), the per-step lines go
    lean = Process(
        tmp_path / "lean.log", dsn, *common, "--worker-id", "lean", "--log-steps", "failures"
    )
    processes.append(lean)
    await lean.wait_log("worker lean started")
    third = tmp_path / "third"
    third.mkdir()
    task3, gate3 = await start_gated_task(conn, third)
    gate3.write_text("open")
    assert (await wait_final(conn, [task3]))[task3] == "complete"
    lean.proc.send_signal(signal.SIGTERM)
    assert await lean.wait_exit() == 0
    output = lean.log()
    assert f"gated handler says hello from task {task3}" in output, output
    assert "tasker_pg.worker.steps" not in output, output
    assert "worker lean final: claimed=1 succeeded=1" in output, output


async def test_cli_json_logs_carry_the_step_fields_and_metrics_are_served(
    dsn: str, conn: db.Connection, processes: list[Process], tmp_path: Path
) -> None:
    worker = Process(
        tmp_path / "json.log",
        dsn,
        "-m",
        "tasker_pg.cli",
        "worker",
        "--handlers",
        "tests.support.workflows.console_handlers",
        "--templates",
        "tests/support/workflows/console.yaml",
        "--summary-interval",
        "0",
        "--poll-interval",
        "0.2",
        "--worker-id",
        "jsonw",
        "--log-format",
        "json",
        "--metrics-port",
        "0",
        "--metrics-host",
        "127.0.0.1",
    )
    processes.append(worker)
    await worker.wait_log("worker jsonw started")
    [port] = re.findall(
        r"serving /metrics, /healthz and /readyz on 127\.0\.0\.1:(\d+)", worker.log()
    )
    task, gate = await start_gated_task(conn, tmp_path)
    gate.write_text("open")
    assert (await wait_final(conn, [task]))[task] == "complete"
    step = (await steps_of(conn, task))["wait"]
    await worker.wait_log(f"step wait {step['step_uuid']} of task {task} succeeded in")

    samples = await scrape(int(port))
    steps_total = "tasker_steps_total"
    assert sample(samples, steps_total, namespace="console", step="wait", outcome="claimed") == 1
    assert sample(samples, steps_total, namespace="console", step="wait", outcome="succeeded") == 1
    assert (await http_get(int(port), "/readyz"))[0] == 200

    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0
    records = [json.loads(line) for line in worker.log().splitlines()]  # every line is JSON
    assert {r["worker_id"] for r in records} == {"jsonw"}
    assert all(set(r) >= {"timestamp", "level", "logger", "message"} for r in records)
    about_step = {
        "task_uuid": str(task),
        "step_uuid": str(step["step_uuid"]),
        "step_name": "wait",
        "attempt": 1,
        "namespace": "console",
        "worker_id": "jsonw",
    }
    [hello] = [r for r in records if r["logger"] == "tests.support.workflows.console_handlers"]
    assert hello["message"] == f"gated handler says hello from task {task}"
    assert {k: hello[k] for k in about_step} == about_step
    assert hello["level"] == "INFO"
    [done] = [r for r in records if r["logger"] == "tasker_pg.worker.steps"]
    assert {k: done[k] for k in about_step} == about_step
    assert done["message"].startswith(f"worker jsonw: step wait {step['step_uuid']} of task")
    [started] = [r for r in records if r["message"].startswith("worker jsonw started")]
    assert "step_uuid" not in started
    await assert_invariants(conn)
