"""`tasker-pg health` (exit code by threshold) and `tasker-pg metrics` (the exporter process)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tasker_pg import TaskerClient, db
from tests.cli.test_cli import UNREACHABLE, cli
from tests.support import cli as cli_support
from tests.support.engine import NAMESPACE, claim, complete, failure, single
from tests.support.metrics import Samples, http_get, sample, scrape
from tests.support.worker import poll

pytestmark = pytest.mark.timeout(120)


async def one_ready_one_in_error(conn: db.Connection) -> None:
    """Two tasks of one step: one failed permanently (its task in error), one ready; and the
    heartbeat row of one worker."""
    await conn.register_template(single())
    await conn.create_tasks(NAMESPACE, "single", [{}, {}])
    [row] = await claim(conn, qty=1)
    await complete(conn, failure(row, retryable=False))
    await conn.execute(
        "SELECT tasker.worker_heartbeat('w-probe', 'host', 1, ARRAY[$1], ARRAY[]::text[], "
        "now(), 0)",
        NAMESPACE,
    )


async def test_health_holds_each_value_to_its_threshold(dsn: str, conn: db.Connection) -> None:
    await one_ready_one_in_error(conn)
    ok = cli(dsn, "health", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert (report["status"], report["healthy"], report["message"]) == ("healthy", True, None)
    assert (
        report["workers_alive"],
        report["ready_steps"],
        report["expired_leases"],
        report["tasks_in_error"],
    ) == (1, 1, 0, 1)
    assert [(c["name"], c["ok"], c["threshold"]) for c in report["checks"]] == [
        ("workers_alive", True, None),
        ("oldest_ready_age_seconds", True, 300),
        ("expired_leases", True, 100),
        ("tasks_in_error", True, None),
    ]
    assert 0 < report["oldest_ready_age_seconds"] <= 300

    failed = cli(dsn, "health", "--max-tasks-in-error", "0", "--min-workers", "2")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stdout.splitlines()
    assert lines[0] == "status: degraded"
    assert lines[1].startswith("database: reachable (PostgreSQL ")
    assert lines[1].endswith("(current)")
    assert lines[2] == "FAIL  workers_alive: 1 worker(s) with a heartbeat within 30s (at least 2)"
    assert lines[3].startswith("ok    oldest_ready_age_seconds: ")
    assert lines[4] == "ok    expired_leases: 0 expired lease(s) (at most 100)"
    assert lines[5] == "FAIL  tasks_in_error: 1 task(s) in error (at most 0)"
    assert lines[6] == "ready steps: 1"
    assert lines[7].startswith("worker w-probe: alive, heartbeat ")

    # the ready step has waited longer than 0 s
    waiting = cli(dsn, "health", "--max-ready-age", "0", "--json")
    assert waiting.returncode == 1
    assert json.loads(waiting.stdout)["message"].startswith(
        "{} seconds the oldest ready step has waited (at most 0)".format(
            json.loads(waiting.stdout)["checks"][1]["value"]
        )
    )
    # the worker's heartbeat is older than a stale limit shorter than its age
    await conn.execute("UPDATE tasker.workers SET last_heartbeat_at = now() - interval '2 minutes'")
    stale = cli(dsn, "health", "--min-workers", "1", "--json")
    assert stale.returncode == 1
    assert json.loads(stale.stdout)["workers_alive"] == 0

    # the blocking client takes the same thresholds
    with TaskerClient(dsn) as client:
        health = await asyncio.to_thread(client.health_check, max_tasks_in_error=1)
    assert (health.status, health.tasks_in_error, health.ready_steps) == ("healthy", 1, 1)
    assert await conn.check_invariants() == []


async def test_health_exits_1_when_the_database_cannot_be_reached() -> None:
    down = cli(UNREACHABLE, "health", "--timeout", "5")
    assert down.returncode == 1
    assert down.stdout.splitlines()[:2] == ["status: unhealthy", "database: not reachable"]


async def test_health_exits_1_on_an_outdated_schema(dsn: str, conn: db.Connection) -> None:
    await conn.execute(
        "DELETE FROM tasker.schema_migrations "
        "WHERE version = (SELECT max(version) FROM tasker.schema_migrations)"
    )
    outdated = cli(dsn, "health", "--json")
    assert outdated.returncode == 1
    report = json.loads(outdated.stdout)
    assert (report["status"], report["checks"]) == ("schema_outdated", [])
    assert "tasker-pg migrate" in report["message"]


def start_exporter(log: Path, dsn: str) -> subprocess.Popen[bytes]:
    """`tasker-pg metrics` on any free port, a process writing to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    argv = [cli_support.console_script(), "metrics", "--port", "0", "--host", "127.0.0.1"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*argv, "--dsn", dsn], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def test_metrics_command_serves_the_engine_gauges(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    await one_ready_one_in_error(conn)
    log = tmp_path / "metrics.log"
    proc = start_exporter(log, dsn)
    try:

        async def port() -> int | None:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
            assert proc.poll() is None, log.read_text()
            return int(found.group(1)) if found else None

        number = await poll(port, what="the exporter's address")

        async def collected() -> Samples | None:
            # a scrape whose read of the engine timed out (a loaded machine) has no gauges
            got = await scrape(number)
            return (
                got
                if ("tasker_namespace_ready_steps", frozenset({("namespace", NAMESPACE)})) in got
                else None
            )

        samples = await poll(collected, what="a scrape with the engine gauges")
        assert sample(samples, "tasker_namespace_ready_steps", namespace=NAMESPACE) == 1
        assert sample(samples, "tasker_namespace_in_flight_steps", namespace=NAMESPACE) == 0
        tasks = "tasker_namespace_tasks"
        assert sample(samples, tasks, namespace=NAMESPACE, state="error") == 1
        assert sample(samples, tasks, namespace=NAMESPACE, state="pending") == 1
        assert sample(samples, "tasker_engine_metrics_exporter") == 1
        assert (await http_get(number, "/readyz"))[0] == 200
        assert (await http_get(number, "/healthz"))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, log.read_text()


async def test_metrics_command_refuses_a_busy_port(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = cli(dsn, "metrics", "--port", str(busy), "--host", "127.0.0.1")
    assert result.returncode == 1
    assert f"error: cannot serve on 127.0.0.1:{busy}" in result.stderr
