"""`tasker-pg schedule create|list|pause|resume|delete|trigger|backfill`."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tasker_pg import db
from tests.cli.test_cli import cli, script
from tests.support.engine import NAMESPACE, single

pytestmark = pytest.mark.timeout(120)


async def test_create_list_trigger_pause_resume_delete(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(single())
    made = cli(
        dsn,
        "schedule",
        "create",
        "nightly",
        "--namespace",
        NAMESPACE,
        "--template",
        "single",
        "--cron",
        "30 2 * * *",
        "--time-zone",
        "Europe/Berlin",
        "--context",
        '{"report": "daily"}',
        "--overlap",
        "allow",
        "--catchup-window",
        "600",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    body = json.loads(made.stdout)
    expected_next = await conn.fetchval(
        "SELECT tasker.cron_next('30 2 * * *', 'Europe/Berlin', now())"
    )
    assert {k: body[k] for k in ("name", "cron", "time_zone", "overlap", "enabled")} == {
        "name": "nightly",
        "cron": "30 2 * * *",
        "time_zone": "Europe/Berlin",
        "overlap": "allow",
        "enabled": True,
    }
    assert (body["context"], body["catchup_window_seconds"]) == ({"report": "daily"}, 600.0)
    assert dt.datetime.fromisoformat(body["next_fire_at"]) == expected_next

    fired = cli(dsn, "schedule", "trigger", "nightly", "--json")
    assert fired.returncode == 0, fired.stderr
    task = json.loads(fired.stdout)["task_uuid"]
    assert await conn.fetchval(
        "SELECT context FROM tasker.tasks WHERE task_uuid = $1::uuid", task
    ) == {"report": "daily"}

    listed = cli(dsn, "schedule", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "name",
        "template",
        "cron",
        "zone",
        "overlap",
        "next",
        "fire",
        "last",
        "fire",
        "last",
        "task",
    ]
    assert lines[2].startswith("nightly  flows/single newest  30 2 * * *  Europe/Berlin  allow")
    assert lines[2].endswith(f"{task} pending")

    paused = cli(dsn, "schedule", "pause", "nightly")
    assert paused.returncode == 0, paused.stderr
    assert "paused; next -" in paused.stdout
    assert "nightly (paused)" in cli(dsn, "schedule", "list").stdout
    resumed = cli(dsn, "schedule", "resume", "nightly", "--json")
    assert json.loads(resumed.stdout)["enabled"] is True

    gone = cli(dsn, "schedule", "delete", "nightly")
    assert (gone.returncode, gone.stdout.strip()) == (0, "deleted schedule nightly")
    again = cli(dsn, "schedule", "delete", "nightly")
    assert (again.returncode, again.stdout.strip()) == (1, "no schedule nightly")
    assert cli(dsn, "schedule", "list").stdout.strip().startswith("no schedules")


async def test_backfill_prints_each_slot_once(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(single())
    await conn.create_schedule("q", NAMESPACE, "single", "0 * * * *")
    hour = await conn.fetchval("SELECT date_trunc('hour', now())")
    start = (hour - dt.timedelta(hours=3)).isoformat()
    end = (hour - dt.timedelta(hours=1)).isoformat()
    first = cli(dsn, "schedule", "backfill", "q", "--from", start, "--to", end)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == "3 task(s) created, 0 slot(s) had fired already"
    again = cli(dsn, "schedule", "backfill", "q", "--from", start, "--to", end, "--json")
    assert [f["action"] for f in json.loads(again.stdout)] == ["existing"] * 3
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 3


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (
            (
                "create",
                "s",
                "--namespace",
                NAMESPACE,
                "--template",
                "single",
                "--cron",
                "61 * * * *",
            ),
            1,
            "error [invalid_schedule]: cron minute field: '61' is out of range 0-59",
        ),
        (
            (
                "create",
                "s",
                "--namespace",
                NAMESPACE,
                "--template",
                "single",
                "--cron",
                "@daily",
                "--time-zone",
                "Mars/Base",
            ),
            1,
            "time zone 'Mars/Base' is unknown",
        ),
        (
            (
                "create",
                "s",
                "--namespace",
                NAMESPACE,
                "--template",
                "single",
                "--cron",
                "@daily",
                "--context",
                "[1]",
            ),
            2,
            "error [invalid_context]: --context must be a JSON object",
        ),
        (
            (
                "create",
                "s",
                "--namespace",
                NAMESPACE,
                "--template",
                "single",
                "--cron",
                "@daily",
                "--overlap",
                "never",
            ),
            2,
            "invalid choice: 'never'",
        ),
        (("pause", "ghost"), 1, "error [schedule_not_found]: schedule 'ghost' does not exist"),
        (("trigger", "ghost"), 1, "error [schedule_not_found]"),
        (("backfill", "ghost", "--from", "2h"), 1, "error [schedule_not_found]"),
        (("backfill", "ghost", "--from", "yesterday"), 2, "expected an ISO 8601 time"),
    ],
)
async def test_bad_input_is_refused(
    dsn: str, conn: db.Connection, args: tuple[str, ...], code: int, needle: str
) -> None:
    await conn.register_template(single())
    result = cli(dsn, "schedule", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert await conn.fetchval("SELECT count(*) FROM tasker.schedules") == 0


async def test_console_script(dsn: str, conn: db.Connection) -> None:
    result = script(dsn, "schedule", "list", "--json")
    assert (result.returncode, json.loads(result.stdout)) == (0, [])
