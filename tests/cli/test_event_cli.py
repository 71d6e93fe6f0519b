"""Durable waits from the client and the command line: `emit_event` (async and blocking
clients) and `tasker-pg event emit` complete the steps waiting on an event and key; `tasker-pg
step explain` says what a waiting step waits for."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tasker_pg import AsyncTaskerClient, TaskerClient, db
from tasker_pg import cli as tasker_cli
from tasker_pg.errors import ValidationError
from tests.support import cli as cli_support
from tests.support.engine import assert_healthy, start, step, step_row, template

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"TASKER_DATABASE_URL": dsn, "NO_COLOR": "1", "DATABASE_URL": None}
    return cli_support.run_main(tasker_cli.main, args, env=env, cwd=REPO)


def flow() -> dict[str, Any]:
    """approve (waits for `approval` keyed by order_id) -> ship."""
    return template(
        "approvals",
        [
            {"name": "approve", "type": "wait_for_event", "event": "approval", "key": "$.order_id"},
            step("ship", "approve"),
        ],
    )


async def test_event_emit_completes_the_waiting_step_and_explain_says_what_it_waits_for(
    dsn: str, conn: db.Connection
) -> None:
    task = await start(conn, flow(), {"order_id": 42})
    explained = cli(dsn, "step", "explain", str(task), "approve")
    assert explained.returncode == 0, explained.stderr
    assert "state       waiting" in explained.stdout
    assert "waiting for event 'approval' with key '42'" in explained.stdout
    assert "handler     none (a wait step" in explained.stdout

    emitted = cli(
        dsn, "event", "emit", "approval", "42", "--payload", '{"approved": true}', "--json"
    )
    assert emitted.returncode == 0, emitted.stderr
    document = json.loads(emitted.stdout)
    assert document["completed_steps"] == 1
    approve = await step_row(conn, task, "approve")
    assert (approve["state"], approve["results"]) == ("complete", {"approved": True})
    assert approve["metadata"]["event_id"] == document["event_id"]

    again = cli(dsn, "event", "emit", "approval", "42")
    assert again.returncode == 0, again.stderr
    assert again.stdout.endswith(", 0 waiting step(s) completed\n")
    bad = cli(dsn, "event", "emit", "approval", "42", "--payload", "{nope")
    assert bad.returncode == 2
    assert "--payload is not valid JSON" in bad.stderr
    await assert_healthy(conn)


async def test_clients_emit_events(dsn: str, conn: db.Connection) -> None:
    first = await start(conn, flow(), {"order_id": "o-1"})
    second = await start(conn, flow(), {"order_id": "o-2"})
    async with AsyncTaskerClient(dsn) as client:
        emitted = await client.emit_event("approval", "o-1", {"by": "async"})
        assert emitted.completed_steps == 1
        with pytest.raises(ValidationError) as empty:
            await client.emit_event("", "o-1")
        assert empty.value.error_code == "invalid_argument"
        with pytest.raises(ValidationError) as not_json:
            await client.emit_event("approval", "o-1", {"when": {1, 2}})
        assert not_json.value.error_code == "invalid_argument"

    def blocking() -> int:
        with TaskerClient(dsn) as client:
            return client.emit_event("approval", "o-2", {"by": "sync"}).completed_steps

    assert await asyncio.to_thread(blocking) == 1
    assert (await step_row(conn, first, "approve"))["results"] == {"by": "async"}
    assert (await step_row(conn, second, "approve"))["results"] == {"by": "sync"}
    await assert_healthy(conn)
