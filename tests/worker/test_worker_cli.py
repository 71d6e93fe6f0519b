"""The worker's command line: options, usage errors (its main() called in-process), and the
documented worker command (the installed console script, a real process stopped by SIGTERM).

`tasker-pg worker --namespace ecommerce --handlers examples.ecommerce.handlers --templates
examples/ecommerce` processes a task created from plain SQL and exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tasker_pg import db, worker_cli
from tests.support import cli as cli_support
from tests.support.worker import assert_invariants, poll, steps_of, wait_final

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m tasker_pg.worker_cli ARGS`, called in this process (its main())."""
    env = {} if dsn is None else {"TASKER_DATABASE_URL": dsn}
    return cli_support.run_main(worker_cli.main, args, env=env, cwd=REPO)


def spawn(log_path: Path, dsn: str, *args: str) -> subprocess.Popen[bytes]:
    """A process of the installed `tasker-pg` console script whose output goes to `log_path`."""
    env = dict(os.environ, TASKER_DATABASE_URL=dsn)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [cli_support.console_script(), *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_add_parser_wires_the_worker_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="tasker-pg")
    sub = parser.add_subparsers(dest="command", required=True)
    worker_cli.add_parser(sub)
    args = parser.parse_args(
        [
            "worker",
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--handlers",
            "pkg.handlers",
            "--templates",
            "templates/",
            "--concurrency",
            "4",
            "--lease-seconds",
            "12.5",
            "--grace",
            "3",
            "--dsn",
            "postgresql://x/y",
            "--worker-id",
            "w9",
            "--poll-interval",
            "0.5",
        ]
    )
    assert args.func is worker_cli.cmd_worker
    assert args.namespace == ["a", "b"]
    assert args.handlers == ["pkg.handlers"]
    assert args.templates == ["templates/"]
    assert (args.concurrency, args.lease_seconds, args.grace) == (4, 12.5, 3.0)
    assert (args.dsn, args.worker_id, args.poll_interval) == ("postgresql://x/y", "w9", 0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0", "--namespace", "x"], "must be > 0"),
        (["--lease-seconds", "abc", "--namespace", "x"], "expected a number of seconds"),
        (["--grace", "nan", "--namespace", "x"], "expected a finite number"),
    ],
)
def test_bad_option_values_are_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        worker_cli.build_parser().parse_args(args)
    assert exit_info.value.code == 2


def test_no_namespace_and_no_templates_is_a_usage_error() -> None:
    result = run_cli("--handlers", "examples.ecommerce.handlers")
    assert result.returncode == 2
    assert "--namespace" in result.stderr


def test_unknown_handler_module_is_named() -> None:
    result = run_cli("--namespace", "x", "--handlers", "no_such_pkg.handlers")
    assert result.returncode == 1
    assert "no_such_pkg.handlers" in result.stderr
    assert "cannot import handler module" in result.stderr


def test_invalid_template_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnamespace_name: Bad-NS\nversion: 1.0.0\nsteps: []\n")
    result = run_cli("--templates", str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr


@pytest.mark.slow
async def test_done_when_command_runs_a_task_created_from_sql(dsn: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    # the documented command, through the installed `tasker-pg` console script
    proc = spawn(
        log_path,
        dsn,
        "worker",
        "--namespace",
        "ecommerce",
        "--handlers",
        "examples.ecommerce.handlers",
        "--templates",
        "examples/ecommerce",
        "--poll-interval",
        "0.2",
    )
    conn = await db.connect(dsn)
    try:

        async def started() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return "started: namespaces ecommerce" in log_path.read_text()

        await poll(started, what="the worker starting")
        task = await conn.fetchval(
            "SELECT tasker.create_task('ecommerce', 'checkout_workflow', "
            """'{"cart_items": [{"product_id": 2, "quantity": 1}]}'::jsonb)"""
        )
        assert (await wait_final(conn, [task]))[task] == "complete"
        steps = await steps_of(conn, task)
        assert steps["send_confirmation"]["results"]["amount_charged"] == round(
            49.99 + round(49.99 * 0.08, 2) + 5.99, 2
        )
        proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return proc.poll() is not None

        await poll(exited, what="the worker exiting")
        output = log_path.read_text()
        assert proc.returncode == 0, output
        assert "registered template ecommerce/checkout_workflow 1.0.0" in output
        assert "received SIGTERM" in output
        assert "final: claimed=4 succeeded=4" in output
        await assert_invariants(conn)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await conn.close()
