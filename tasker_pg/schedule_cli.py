"""`tasker-pg schedule create|list|pause|resume|delete|trigger|backfill`: cron schedules.

Each command is one call of the client (`AsyncTaskerClient`), hence of one SQL function of
sql/functions/87_schedules.sql; `--json` prints the responses' `to_dict()`. Exit codes as the
rest of the command line: 0 ok, 1 failure or not found, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from tasker_pg import argtypes
from tasker_pg.client import AsyncTaskerClient
from tasker_pg.errors import ValidationError
from tasker_pg.render import format_table, format_time, truncate
from tasker_pg.responses import ScheduleFire, ScheduleResponse

Handler = Callable[[argparse.Namespace], int]
Op = Callable[..., argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILED = 1


def _client(args: argparse.Namespace) -> AsyncTaskerClient:
    return AsyncTaskerClient(args.dsn, initiator="tasker-pg cli", source_system="tasker-pg")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _context(text: str | None) -> dict[str, Any]:
    """`--context`: a JSON object inline, `@file` or `@-` (standard input)."""
    if text is None:
        return {}
    source = "--context"
    if text.startswith("@"):
        source = f"--context {text}"
        path = text[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValidationError(
                f"--context: cannot read {path}: {exc.strerror or exc}", error_code="invalid_json"
            ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            error_code="invalid_json",
        ) from None
    if not isinstance(value, dict):
        raise ValidationError(f"{source} must be a JSON object", error_code="invalid_context")
    return value


def _show(schedule: ScheduleResponse) -> None:
    state = "enabled" if schedule.enabled else "paused"
    version = schedule.template_version or "newest"
    print(
        f"schedule {schedule.name}: {schedule.cron} ({schedule.time_zone}) -> "
        f"{schedule.namespace}/{schedule.template_name} {version}, overlap {schedule.overlap}, "
        f"catch-up {schedule.catchup_window_seconds:g}s, {state}; "
        f"next {format_time(schedule.next_fire_at)}"
    )


def _print_fires(fires: list[ScheduleFire], args: argparse.Namespace) -> None:
    if args.json:
        _print_json([f.to_dict() for f in fires])
        return
    if not fires:
        print("no slot in that range")
        return
    header = ("slot", "task", "action")
    rows = [(format_time(f.slot), f.task_uuid or "-", f.action) for f in fires]
    print(format_table(header, rows))
    created = sum(f.action == "created" for f in fires)
    print(f"{created} task(s) created, {len(fires) - created} slot(s) had fired already")


async def _create(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        schedule = await client.create_schedule(
            args.name,
            namespace=args.namespace,
            template=args.template,
            cron=args.cron,
            time_zone=args.time_zone,
            context=_context(args.context),
            overlap=args.overlap,
            catchup_window=timedelta(seconds=args.catchup_window),
            version=args.template_version,
            enabled=not args.paused,
        )
    if args.json:
        _print_json(schedule.to_dict())
    else:
        _show(schedule)
    return EXIT_OK


async def _list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        schedules = await client.list_schedules()
    if args.json:
        _print_json([s.to_dict() for s in schedules])
        return EXIT_OK
    if not schedules:
        print("no schedules (tasker-pg schedule create, or schedules: in a template)")
        return EXIT_OK
    header = ("name", "template", "cron", "zone", "overlap", "next fire", "last fire", "last task")
    rows = [
        (
            s.name + ("" if s.enabled else " (paused)"),
            f"{s.namespace}/{s.template_name} {s.template_version or 'newest'}",
            s.cron,
            s.time_zone,
            s.overlap,
            format_time(s.next_fire_at),
            format_time(s.last_fired_at),
            "-"
            if s.last_task_uuid is None
            else f"{s.last_task_uuid} {s.last_task_state or 'purged'}",
        )
        for s in schedules
    ]
    print(format_table(header, rows))
    for s in schedules:
        if s.last_error:
            print(f"{s.name}: last firing failed: {truncate(s.last_error, 300)}")
    return EXIT_OK


async def _change(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.schedule_command == "pause":
            schedule = await client.pause_schedule(args.name)
        else:
            schedule = await client.resume_schedule(args.name)
    if args.json:
        _print_json(schedule.to_dict())
    else:
        _show(schedule)
    return EXIT_OK


async def _delete(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        deleted = await client.delete_schedule(args.name)
    if args.json:
        _print_json({"name": args.name, "deleted": deleted})
    else:
        print(f"deleted schedule {args.name}" if deleted else f"no schedule {args.name}")
    return EXIT_OK if deleted else EXIT_FAILED


async def _trigger(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        task = await client.trigger_schedule(args.name)
    if args.json:
        _print_json({"name": args.name, "task_uuid": task})
    else:
        print(f"schedule {args.name} created task {task}")
    return EXIT_OK


async def _backfill(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        fires = await client.backfill_schedule(args.name, args.start, args.end, limit=args.limit)
    _print_fires(fires, args)
    return EXIT_OK


def _sync(coro_fn: Callable[[argparse.Namespace], Any]) -> Handler:
    def run(args: argparse.Namespace) -> int:
        return int(asyncio.run(coro_fn(args)))

    return run


def add_parser(sub: Any, op: Op) -> None:
    """The `schedule` command and its actions; `op` adds a leaf with --dsn and --json."""
    sp = sub.add_parser("schedule", help="cron schedules that create tasks")
    ssub = sp.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")

    create = op(
        ssub,
        "create",
        _sync(_create),
        "create a schedule",
        description="Every slot of CRON in the time zone creates a task of the template. "
        "Five fields (minute hour day-of-month month day-of-week) or an alias such as @hourly.",
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--namespace", required=True)
    create.add_argument("--template", required=True, metavar="NAME", help="the template's name")
    create.add_argument("--cron", required=True, metavar="EXPR", help="e.g. '0 9 * * MON-FRI'")
    create.add_argument("--time-zone", default="UTC", metavar="ZONE", help="default UTC")
    create.add_argument("--context", metavar="JSON|@FILE", help="the tasks' context (JSON)")
    create.add_argument(
        "--overlap",
        choices=("skip", "allow", "cancel_previous"),
        default="skip",
        help="while the last task is pending or running: skip the slot (default), allow "
        "another task, or cancel the last one",
    )
    create.add_argument(
        "--catchup-window",
        type=argtypes.positive_float,
        default=3600.0,
        metavar="S",
        help="after downtime, missed slots at most this many seconds old still fire "
        "(60 to 31622400; default 3600)",
    )
    create.add_argument(
        "--template-version", metavar="VERSION", help="default: the newest at each firing"
    )
    create.add_argument("--paused", action="store_true", help="create it paused")

    op(ssub, "list", _sync(_list), "every schedule: next and last fire, last task's state")
    for action, text in (
        ("pause", "stop a schedule firing"),
        ("resume", "fire a paused schedule again, from the next slot after now"),
        ("delete", "delete a schedule (its tasks stay)"),
        ("trigger", "create a task of a schedule now"),
    ):
        handler = {"pause": _change, "resume": _change, "delete": _delete, "trigger": _trigger}
        op(ssub, action, _sync(handler[action]), text).add_argument("name", metavar="NAME")
    backfill = op(
        ssub,
        "backfill",
        _sync(_backfill),
        "create the tasks of every slot in a past range",
        description="Slots that already fired keep their task, so a backfill can be repeated.",
    )
    backfill.add_argument("name", metavar="NAME")
    backfill.add_argument(
        "--from",
        dest="start",
        required=True,
        type=argtypes.point_in_time,
        metavar="TIME",
        help="ISO 8601 (2026-12-07T09:00:00Z) or how long ago (2h, 3d)",
    )
    backfill.add_argument(
        "--to",
        dest="end",
        type=argtypes.point_in_time,
        default=None,
        metavar="TIME",
        help="default: now",
    )
    backfill.add_argument(
        "--limit",
        type=argtypes.positive_int,
        default=1000,
        metavar="N",
        help="at most this many slots, 1..10000 (default 1000)",
    )
