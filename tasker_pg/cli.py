"""The `tasker-pg` command line: embedded database, migrations, operator commands, demo.

Operators create, inspect and repair work here (`task`, `step`, `queue`, `template`), on the
same client Python code uses; every operator command takes `--json` (one JSON document on
stdout, the responses' `to_dict()`), and errors print `error [code]: message` on stderr.
Exit codes scripts can rely on: 0 ok, 1 failure or not found (or a task that did not
complete, for `task wait` / `task create --wait`), 2 usage error (bad arguments, bad JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import tasker_pg
from tasker_pg import (
    argtypes,
    bench_args,
    db,
    flow_cli,
    migrations,
    observe_cli,
    roles,
    schedule_cli,
    top,
    worker_cli,
)
from tasker_pg.client import REDRIVE_BATCH, AsyncTaskerClient
from tasker_pg.embedded import EmbeddedCluster
from tasker_pg.errors import NotFoundError, TaskerError, ValidationError
from tasker_pg.render import (
    STEP_COMMANDS_INTRO,
    Style,
    error_line,
    format_duration,
    format_table,
    format_time,
    render_dag,
    render_failure,
    render_not_created,
    render_task_header,
    step_commands,
    traceback_origin,
    truncate,
    without_sql_hint,
)
from tasker_pg.responses import TASK_STATES, StepAuditResponse, StepResponse, TaskResponse

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --- db ------------------------------------------------------------------------------------------


def cmd_db_start(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    started = time.monotonic()
    was_running = cluster.status().running
    dsn = cluster.start()
    if was_running:
        print(f"already running: {db.mask_dsn(dsn)}")
    else:
        print(f"started in {time.monotonic() - started:.2f}s: {db.mask_dsn(dsn)}")
    print("the URL with its password: tasker-pg db url")
    return EXIT_OK


def cmd_db_stop(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    print("stopped" if cluster.stop() else "not running")
    return EXIT_OK


def cmd_db_status(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    st = cluster.status()
    info = {
        "home": str(cluster.home),
        "data_dir": str(st.data_dir),
        "initialized": st.initialized,
        "running": st.running,
        "pid": st.pid,
        "port": st.port,
        "bin_dir": str(st.bin_dir) if st.bin_dir else None,
        "dsn": db.mask_dsn(cluster.dsn()) if st.port else None,  # `db url` has the password
    }
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:12} {value}")
    return EXIT_OK if st.running else EXIT_FAILED


def cmd_db_url(args: argparse.Namespace) -> int:
    print(EmbeddedCluster().dsn())
    return EXIT_OK


def cmd_db_destroy(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    cluster.destroy()
    print(f"destroyed {cluster.home}")
    return EXIT_OK


# --- migrate -------------------------------------------------------------------------------------


async def _migrate(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn, check_schema=False)
    try:
        report = await migrations.migrate(conn, role_prefix=args.role_prefix)
    finally:
        await conn.close()
    for m in report.applied:
        print(f"applied {m.filename}")
    for f in report.functions:
        print(f"applied functions/{f.name}")
    for target in report.dropped:
        print(f"dropped {target.lower()} (no function file defines it any more)")
    print(
        f"schema at version {report.current_version}" + ("" if report.changed else " (no change)")
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    return _run(_migrate(args))


# --- roles ---------------------------------------------------------------------------------------


async def _roles_list(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn)
    try:
        prefix, infos = await roles.list_roles(conn)
    finally:
        await conn.close()
    if args.json:
        _print_json({"prefix": prefix, "roles": [i.to_dict() for i in infos]})
        return EXIT_OK
    print(f"role prefix: {prefix or '(none)'}")
    rows = [
        (i.kind, i.name, "yes" if i.exists else "MISSING", ", ".join(i.members) or "-")
        for i in infos
    ]
    print(format_table(("kind", "role", "exists", "members"), rows))
    return EXIT_OK


def cmd_roles_list(args: argparse.Namespace) -> int:
    return _run(_roles_list(args))


async def _roles_membership(args: argparse.Namespace, *, grant: bool) -> int:
    conn = await db.connect(args.dsn)
    try:
        name = await roles.set_membership(conn, args.role, args.login, grant=grant)
    finally:
        await conn.close()
    if args.json:
        _print_json({"role": name, "login": args.login, "member": grant})
    else:
        print(f"granted {name} to {args.login}" if grant else f"revoked {name} from {args.login}")
    return EXIT_OK


def cmd_roles_grant(args: argparse.Namespace) -> int:
    return _run(_roles_membership(args, grant=True))


def cmd_roles_revoke(args: argparse.Namespace) -> int:
    return _run(_roles_membership(args, grant=False))


# --- queue ---------------------------------------------------------------------------------------


async def _queue_list(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn)
    try:
        metrics = await conn.metrics_all()
    finally:
        await conn.close()
    if args.json:
        _print_json([m.__dict__ for m in metrics])
        return EXIT_OK
    print(_queue_table(metrics))
    return EXIT_OK


def _queue_table(metrics: Sequence[db.QueueMetrics]) -> str:
    header = ("queue", "length", "visible", "oldest_s", "newest_s", "total_sent")
    rows = [
        (
            m.queue_name,
            str(m.queue_length),
            str(m.queue_visible_length),
            f"{m.oldest_msg_age_sec:.1f}" if m.oldest_msg_age_sec is not None else "-",
            f"{m.newest_msg_age_sec:.1f}" if m.newest_msg_age_sec is not None else "-",
            str(m.total_messages),
        )
        for m in metrics
    ]
    return format_table(header, rows) if rows else "no queues"


def cmd_queue_list(args: argparse.Namespace) -> int:
    return _run(_queue_list(args))


# --- maintenance ---------------------------------------------------------------------------------


async def _maintenance(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn)
    total = db.PurgeCounts()
    batches = 0
    try:
        while True:
            counts = await conn.purge_finished(args.batch)
            total += counts
            batches += 1
            if not counts.more or (args.max_batches and batches >= args.max_batches):
                break
    finally:
        await conn.close()
    if args.json:
        _print_json({**total.to_dict(), "batches": batches})
        return EXIT_OK
    print(
        f"deleted {total.tasks} task(s) with {total.steps} step(s), {total.step_edges} edge(s), "
        f"{total.step_transitions} step and {total.task_transitions} task transition(s); "
        f"{total.archived_messages} archived message(s); idempotency keys: "
        f"{total.idempotency_keys_kept} kept, {total.idempotency_keys_expired} expired "
        f"({batches} batch(es){'; more remain' if total.more else ''})"
    )
    return EXIT_OK


def cmd_maintenance(args: argparse.Namespace) -> int:
    return _run(_maintenance(args))


# --- operator commands (task, step, template) ------------------------------------------------
# Each runs on an AsyncTaskerClient (the client's methods and errors, DSN resolved as
# everywhere); the lookups the client has no method for are methods of db.Connection.

CLI_INITIATOR = "tasker-pg cli"
# `task show` prints at most this many of the last lines of a failed step's traceback.
TASK_SHOW_TRACEBACK_LINES = 12
CLI_SOURCE_SYSTEM = "tasker-pg"

# Errors about what was typed on the command line: exit 2 like argparse's own.
USAGE_ERROR_CODES = frozenset(
    {"usage", "invalid_json", "invalid_context", "invalid_uuid", "invalid_argument"}
)


class UsageError(TaskerError):
    """A command-line argument is malformed (bad JSON, unreadable @file): exit code 2."""

    error_code = "usage"


def _client(args: argparse.Namespace) -> AsyncTaskerClient:
    return AsyncTaskerClient(args.dsn, initiator=CLI_INITIATOR, source_system=CLI_SOURCE_SYSTEM)


def _json_arg(text: str, option: str) -> Any:
    """A JSON value given inline, as `@path` (a file), or as `@-` (standard input)."""
    source = option
    if text.startswith("@"):
        path = text[1:]
        source = f"{option} {text}"
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"{option}: cannot read {path}: {exc.strerror or exc}",
                error_code="invalid_json",
            ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
            "(give a JSON object such as '{\"key\": 1}', or @file.json)",
            error_code="invalid_json",
        ) from None


def _uuid_arg(text: str) -> str:
    """argparse type of uuid arguments: a malformed uuid is a usage error (exit 2)."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid UUID: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _task_line(task: TaskResponse) -> str:
    return (
        f"task {task.task_uuid}  {task.namespace}/{task.name} {task.version}: {task.status} "
        f"({task.execution_status}, {task.completed_steps}/{task.total_steps} steps done)"
    )


async def _print_final(client: AsyncTaskerClient, task: TaskResponse) -> None:
    """The task's line; for a task in error, each failed step with its error and what to do."""
    print(_task_line(task))
    if task.status != "error":
        return
    for step in await client.list_task_steps(task.task_uuid):
        if step.current_state != "error":
            continue
        error = step.last_error or {}
        print(f"failed step {step.name} ({step.step_uuid})")
        print(f"  {error_line(error) if error else 'error'}")
        origin = traceback_origin(error.get("traceback"))
        if origin:
            print(f"  raised at {origin}")
        print(f"  traceback and history: tasker-pg step explain {step.step_uuid}")
        print(f"  {STEP_COMMANDS_INTRO}")
        for command in step_commands(step.step_uuid):
            print(f"    {command}")


def _final_exit(task: TaskResponse) -> int:
    """0 when the task completed, 1 when it ended any other way (error, cancelled...)."""
    return EXIT_OK if task.status == "complete" else EXIT_FAILED


async def _task_create(args: argparse.Namespace) -> int:
    context = _json_arg(args.context, "--context") if args.context is not None else {}
    if not isinstance(context, dict):
        raise UsageError(
            f"--context must be a JSON object, got {type(context).__name__} "
            "(for example '{\"cart_items\": []}')",
            error_code="invalid_context",
        )
    async with _client(args) as client:
        task = await client.create_task(
            args.name,
            namespace=args.namespace,
            context=context,
            version=args.version,
            reason=args.reason,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            traceparent=args.traceparent,
        )
        verb = "created" if task.created is not False else "found existing"
        if task.created is False and not args.json:
            print(
                f"idempotency key {args.idempotency_key!r} was used before: this is the task it "
                "created, nothing new was created"
            )
        if not args.wait:
            if args.json:
                _print_json(task.to_dict())
            else:
                print(f"{verb} {_task_line(task)}")
                print(f"next: tasker-pg task show {task.task_uuid}")
            return EXIT_OK
        if not args.json:
            print(f"{verb} task {task.task_uuid}; waiting for it to finish ...", flush=True)
        task = await client.wait_for_task(task.task_uuid, args.timeout)
        if args.json:
            _print_json(task.to_dict())
        else:
            await _print_final(client, task)
    return _final_exit(task)


async def _task_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        page = await client.list_tasks(
            limit=args.limit, offset=args.offset, namespace=args.namespace, status=args.status
        )
    if args.json:
        _print_json(page.to_dict())
        return EXIT_OK
    p = page.pagination
    if not page.tasks:
        print("no tasks" if p.total_count == 0 else f"no tasks at offset {p.offset}")
        return EXIT_OK
    header = ("task_uuid", "task", "version", "status", "steps", "created")
    rows = [
        (
            t.task_uuid,
            truncate(f"{t.namespace}/{t.name}", 40),
            t.version,
            t.status,
            f"{t.completed_steps}/{t.total_steps}",
            format_time(t.created_at),
        )
        for t in page.tasks
    ]
    print(format_table(header, rows))
    first = p.offset + 1
    summary = f"{first}-{p.offset + len(page.tasks)} of {p.total_count} (newest first)"
    if p.has_next:
        summary += f"; next page: --offset {p.offset + p.per_page}"
    print(summary)
    return EXIT_OK


async def _task_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        task = await client.get_task(args.task_uuid)
        steps = await client.list_task_steps(args.task_uuid)
        not_created = await client.list_steps_not_created(args.task_uuid)
    if args.json:
        _print_json(
            {
                "task": task.to_dict(),
                "steps": [s.to_dict() for s in steps],
                "not_created": [s.to_dict() for s in not_created],
            }
        )
        return EXIT_OK
    style = Style.for_stream(sys.stdout)
    print(render_task_header(task, style))
    print()
    print(render_dag(steps, style, show_uuids=True))
    if not_created:
        print()
        print(render_not_created(not_created, style))
    for step in steps:
        if step.current_state == "error":
            print()
            print(render_failure(step, style, max_traceback_lines=TASK_SHOW_TRACEBACK_LINES))
    return EXIT_OK


async def _task_cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        summary = await client.cancel_task(args.task_uuid, args.reason)
    if args.json:
        _print_json(summary)
    else:
        print(
            f"cancelled task {summary.get('task_uuid', args.task_uuid)} "
            f"(was {summary.get('previous_state', '?')}; "
            f"{summary.get('cancelled_steps', '?')} unfinished step(s) cancelled)"
        )
    return EXIT_OK


async def _task_retry(args: argparse.Namespace) -> int:
    shown = min(args.limit or REDRIVE_BATCH, REDRIVE_BATCH)  # a dry run is one batch
    async with _client(args) as client:
        if args.dry_run:
            out = await client.retry_failed(
                args.namespace, args.name, since=args.failed_since, limit=shown, dry_run=True
            )
        else:
            out = await client.retry_all_failed(
                args.namespace,
                args.name,
                since=args.failed_since,
                max_tasks=args.limit,
                reason=args.reason,
            )
    if args.json:
        _print_json(out.to_dict())
        return EXIT_OK
    what = f"{out.namespace}/{out.name}" if out.name else f"namespace {out.namespace}"
    when = f"since {format_time(out.since)}"
    if not out.tasks:
        print(f"no task of {what} entered error {when} (nothing to retry)")
        return EXIT_OK
    if out.dry_run:
        header = ("task_uuid", "task", "failed at", "steps in error")
        rows = [
            (t.task_uuid, truncate(t.name, 30), format_time(t.failed_at), ", ".join(t.steps))
            for t in out.tasks
        ]
        print(format_table(header, rows))
        more = f" (the oldest {shown}: more may match)" if out.tasks_matched == shown else ""
        print(
            f"dry run: would retry {out.steps_to_retry} step(s) of {out.tasks_matched} task(s) "
            f"of {what} in error {when}{more}; nothing changed"
        )
        return EXIT_OK
    print(
        f"retried {out.steps_retried} step(s) of {out.tasks_retried} task(s) of {what} in "
        f"error {when} ({out.batches} batch(es), oldest first)"
    )
    skipped = out.tasks_matched - out.tasks_retried
    if skipped:
        print(
            f"{skipped} task(s) left the error state meanwhile (another operator) and were skipped"
        )
    print(f"still in error: tasker-pg task list --namespace {out.namespace} --status error")
    return EXIT_OK


async def _task_wait(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        task = await client.wait_for_task(args.task_uuid, args.timeout)
        if args.json:
            _print_json(task.to_dict())
        else:
            await _print_final(client, task)
    return _final_exit(task)


async def _step_retry(args: argparse.Namespace) -> int:
    _, step_uuid = await _locate_step(args)
    async with _client(args) as client:
        summary = await client.retry_step(step_uuid)
    if args.json:
        _print_json(summary)
    else:
        print(
            f"step {step_uuid}: error -> {summary.get('state', 'enqueued')} with fresh "
            f"attempts; task {summary.get('task_uuid')} is {summary.get('task_state')}"
        )
    return EXIT_OK


async def _step_resolve(args: argparse.Namespace) -> int:
    result = _json_arg(args.result, "--result")
    _, step_uuid = await _locate_step(args)
    async with _client(args) as client:
        summary = await client.resolve_step(step_uuid, result)
    if args.json:
        _print_json(summary)
    else:
        print(
            f"step {step_uuid}: {summary.get('previous_state')} -> "
            f"{summary.get('state', 'resolved_manually')}; task {summary.get('task_uuid')} is "
            f"{summary.get('task_state')}"
        )
    return EXIT_OK


async def _event_emit(args: argparse.Namespace) -> int:
    payload = None if args.payload is None else _json_arg(args.payload, "--payload")
    async with _client(args) as client:
        emitted = await client.emit_event(args.name, args.key, payload)
    if args.json:
        _print_json(emitted.to_dict())
    else:
        print(
            f"event {args.name} key {args.key}: event {emitted.event_id}, "
            f"{emitted.completed_steps} waiting step(s) completed"
        )
    return EXIT_OK


async def _locate_step(args: argparse.Namespace) -> tuple[str, str]:
    """(task uuid, step uuid) of the step a `step` command names.

    The step is given as STEP_UUID, or as TASK_UUID STEP_NAME. A task's uuid given alone is
    refused with the command that lists its steps.
    """
    ref: str = args.ref
    conn = await db.connect(args.dsn)
    try:
        if args.step_name is not None:
            step = await conn.step_uuid_by_name(ref, args.step_name)
            if step is not None:
                return ref, str(step)
            if not await conn.task_exists(ref):
                raise NotFoundError(f"task {ref} does not exist", error_code="task_not_found")
            names = await conn.step_names(ref)
            raise NotFoundError(
                f"task {ref} has no step named {args.step_name!r} (its steps: {', '.join(names)})",
                error_code="step_not_found",
            )
        task = await conn.task_of_step(ref)
        if task is not None:
            return str(task), ref
        if await conn.task_exists(ref):
            raise UsageError(
                f"{ref} is a task's UUID, not a step's: name the step after it "
                f"(tasker-pg step {args.step_command} {ref} STEP_NAME ...), or see each step's "
                f"UUID with `tasker-pg task show {ref}`",
                error_code="task_uuid_given",
            )
        raise NotFoundError(f"step {ref} does not exist", error_code="step_not_found")
    finally:
        await conn.close()


async def _step_explain(args: argparse.Namespace) -> int:
    task_uuid, step_uuid = await _locate_step(args)
    async with _client(args) as client:
        task = await client.get_task(task_uuid)
        step = await client.get_step(task_uuid, step_uuid)
        history = await client.get_step_audit_history(task_uuid, step_uuid)
    if args.json:
        _print_json(
            {
                "step": step.to_dict(),
                "task": {
                    "task_uuid": task.task_uuid,
                    "namespace": task.namespace,
                    "name": task.name,
                    "version": task.version,
                    "status": task.status,
                },
                "audit_history": [h.to_dict() for h in history],
            }
        )
        return EXIT_OK
    print(_explain_text(task, step, history, Style.for_stream(sys.stdout)))
    return EXIT_OK


def _explain_text(
    task: TaskResponse,
    step: StepResponse,
    history: Sequence[StepAuditResponse],
    style: Style,
) -> str:
    """Where a step stands and why, its last error and traceback, what to do, its audit trail."""
    fields: list[tuple[str, str]] = [
        ("step", f"{step.name} ({step.step_uuid})"),
        ("task", f"{task.task_uuid}  {task.namespace}/{task.name} {task.version}: {task.status}"),
        ("handler", step.handler or "none (a wait step: it waits for an event or a time)"),
        ("depends on", ", ".join(step.dependencies) or "-"),
        ("state", style.state(step.current_state, step.current_state)),
        ("why", without_sql_hint(step.readiness_reason or "") or "-"),
        ("ready", "yes" if step.ready else "no"),
        ("attempts", f"{step.attempts} of {step.max_attempts} ({_retry_words(step)})"),
        ("last run", format_duration(step.duration_ms)),
    ]
    if step.next_attempt_at is not None:
        fields.append(("next attempt", format_time(step.next_attempt_at)))
    if step.worker_id:
        fields.append(("worker", step.worker_id))
    error = step.last_error or {}
    if error:
        fields.append(("last error", error_line(error)))
        origin = traceback_origin(error.get("traceback"))
        if origin:
            fields.append(("raised at", origin))
    width = max(len(k) for k, _ in fields)
    lines = [f"{k.ljust(width)}  {v}" for k, v in fields]
    tb = error.get("traceback")
    if isinstance(tb, str) and tb.strip():
        lines += ["", "traceback of the last error:"]
        lines += ["  " + line for line in tb.rstrip().splitlines()]
    if step.current_state == "error":
        lines += ["", STEP_COMMANDS_INTRO]
        lines += ["  " + command for command in step_commands(step.step_uuid)]
    lines += ["", "history (oldest first):"]
    rows = [
        (
            format_time(h.created_at),
            h.from_state or "-",
            h.to_state,
            h.event,
            str(h.attempt),
            h.worker_id or "-",
            format_duration(h.duration_ms),
            truncate(h.error_summary or "", 40),
        )
        for h in history
    ]
    header = ("time", "from", "to", "event", "attempt", "worker", "took", "error")
    lines.append(format_table(header, rows))
    return "\n".join(lines)


def _retry_words(step: StepResponse) -> str:
    """Whether the step may run again on its own, and if not, why not."""
    if step.current_state == "error":
        if (step.last_error or {}).get("retryable") is False:
            return "failed for good: the handler reported a permanent error"
        if not step.retryable:
            return "failed for good: its template does not allow retries"
        if step.attempts >= step.max_attempts:
            return "failed for good: no attempts left"
        return "failed for good"
    if step.current_state in ("complete", "resolved_manually", "cancelled"):
        return "finished"
    if not step.retryable:
        return "a failure is final: its template does not allow retries"
    return "a failure is retried while attempts are left"


async def _template_list(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn)
    try:
        rows = await conn.template_rows(args.namespace)
    finally:
        await conn.close()
    templates = [
        {
            "namespace": r["namespace"],
            "name": r["name"],
            "version": r["version"],
            "steps": r["step_count"],
            "description": r["description"],
            "created_at": r["created_at"].isoformat(),
        }
        for r in rows
    ]
    if args.json:
        _print_json(templates)
        return EXIT_OK
    if not templates:
        print("no templates registered (tasker-pg template register PATH)")
        return EXIT_OK
    header = ("namespace", "name", "version", "steps", "created")
    table = [
        (t["namespace"], t["name"], t["version"], str(t["steps"]), format_time(r["created_at"]))
        for t, r in zip(templates, rows, strict=True)
    ]
    print(format_table(header, table))
    return EXIT_OK


async def _template_register(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        registered = await client.register_templates(args.path)
    if args.json:
        _print_json([r.to_dict() for r in registered])
        return EXIT_OK
    if not registered:
        print(f"no templates found in {args.path}")
        return EXIT_OK
    header = ("namespace", "name", "version", "steps", "id")
    rows = [
        (r.namespace, r.name, r.version, str(r.step_count), str(r.named_task_id))
        for r in registered
    ]
    print(format_table(header, rows))
    print(f"registered {len(registered)} template(s) (an unchanged one again is a no-op)")
    return EXIT_OK


def _async_command(fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Handler:
    def run(args: argparse.Namespace) -> int:
        return _run(fn(args))

    return run


cmd_task_create = _async_command(_task_create)
cmd_task_list = _async_command(_task_list)
cmd_task_show = _async_command(_task_show)
cmd_task_cancel = _async_command(_task_cancel)
cmd_task_wait = _async_command(_task_wait)
cmd_task_retry = _async_command(_task_retry)
cmd_step_retry = _async_command(_step_retry)
cmd_step_resolve = _async_command(_step_resolve)
cmd_event_emit = _async_command(_event_emit)
cmd_step_explain = _async_command(_step_explain)
cmd_template_list = _async_command(_template_list)
cmd_template_register = _async_command(_template_register)


# --- demo -----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from tasker_pg import demo

    return demo.main(dsn=args.dsn, tasks=args.tasks, verbose=args.verbose > 0)


# --- dashboard ------------------------------------------------------------------------------------

DASHBOARD_EXTRA_HINT = "install the dashboard extra: pip install 'tasker-pg[dashboard]'"


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from tasker_pg.dashboard.app import serve
    except ImportError as exc:
        print(
            f"tasker-pg dashboard needs {exc.name or 'a library'}, which is not installed: "
            + DASHBOARD_EXTRA_HINT,
            file=sys.stderr,
        )
        return EXIT_FAILED
    return serve(dsn=args.dsn, host=args.host, port=args.port, allow_actions=args.allow_actions)


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasker-pg",
        description="A Postgres-native workflow engine.",
        epilog="Exit codes: 0 ok, 1 failure or not found (a failed task for `task wait`), "
        "2 usage error.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--version", action="version", version=f"tasker-pg {tasker_pg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_dsn(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--dsn",
            help="database URL (default: TASKER_DATABASE_URL, DATABASE_URL, embedded cluster)",
        )
        return p

    def op(
        parent: Any, name: str, func: Handler, help_text: str, **kw: Any
    ) -> argparse.ArgumentParser:
        """A leaf command with the options every operator command has: --dsn and --json."""
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, **kw)
        with_dsn(p)
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(func=func)
        return p

    dbp = sub.add_parser("db", help="the embedded PostgreSQL (data in ./.tasker-pg)")
    dbsub = dbp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("start", help="initialise if needed and start").set_defaults(func=cmd_db_start)
    dbsub.add_parser("stop", help="stop the server").set_defaults(func=cmd_db_stop)
    status = dbsub.add_parser("status", help="show state; exit 1 when not running")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_db_status)
    dbsub.add_parser("url", help="print the connection URL").set_defaults(func=cmd_db_url)
    dbsub.add_parser("destroy", help="stop and delete all data").set_defaults(func=cmd_db_destroy)

    mig = with_dsn(sub.add_parser("migrate", help="apply pending schema migrations"))
    mig.add_argument(
        "--role-prefix",
        metavar="PREFIX",
        help="prefix of the group roles' names (e.g. acme_ -> acme_tasker_worker); chosen on "
        "the first migrate and kept (default: none)",
    )
    mig.set_defaults(func=cmd_migrate)

    # roles
    rp = sub.add_parser("roles", help="the least-privilege roles: list, grant to a login role")
    rsub = rp.add_subparsers(dest="roles_command", required=True, metavar="ACTION")
    op(rsub, "list", cmd_roles_list, "the group roles and their members")
    for action, func, verb in (
        ("grant", cmd_roles_grant, "make LOGIN a member of"),
        ("revoke", cmd_roles_revoke, "remove LOGIN from"),
    ):
        rg = op(rsub, action, func, f"{verb} a group role (as a user with CREATEROLE)")
        rg.add_argument("--role", required=True, choices=roles.GRANTABLE, help="the group role")
        rg.add_argument("login", metavar="LOGIN", help="an existing role, e.g. orders_svc")

    # task
    tp = sub.add_parser("task", help="create, list, show, cancel, retry and wait for tasks")
    tsub = tp.add_subparsers(dest="task_command", required=True, metavar="ACTION")
    create = op(
        tsub,
        "create",
        cmd_task_create,
        "create a task from a registered template",
        description="Create a task; with --wait, exit 0 when it completes and 1 when it ends "
        "in error or is cancelled (or --timeout runs out).",
    )
    create.add_argument("namespace", metavar="NAMESPACE")
    create.add_argument("name", metavar="NAME", help="template name")
    create.add_argument(
        "--context", metavar="JSON|@FILE", help="the task context: a JSON object, @file or @-"
    )
    create.add_argument("--version", help="template version (default: the newest)")
    create.add_argument("--priority", type=int, help="higher runs first (default 0)")
    create.add_argument("--idempotency-key", metavar="KEY", help="a repeated key returns the task")
    create.add_argument("--reason", help="why the task was created (kept on the task)")
    create.add_argument(
        "--traceparent",
        metavar="TP",
        help="W3C trace context (00-<trace id>-<span id>-<flags>): the spans of the task's "
        "steps (workers with --otel) join this trace",
    )
    create.add_argument("--wait", action="store_true", help="wait until the task finishes")
    create.add_argument(
        "--timeout", type=_seconds, metavar="S", help="with --wait: give up after S seconds"
    )

    tlist = op(tsub, "list", cmd_task_list, "tasks, newest first")
    tlist.add_argument("--namespace")
    tlist.add_argument("--status", choices=TASK_STATES)
    tlist.add_argument("--limit", type=argtypes.positive_int, default=20, help="default 20")
    tlist.add_argument("--offset", type=argtypes.non_negative_int, default=0)

    show = op(tsub, "show", cmd_task_show, "a task and its steps drawn as a DAG")
    show.add_argument("task_uuid", type=_uuid_arg, metavar="UUID")

    cancel = op(tsub, "cancel", cmd_task_cancel, "cancel every unfinished step of a task")
    cancel.add_argument("task_uuid", type=_uuid_arg, metavar="UUID")
    cancel.add_argument("--reason")

    wait = op(
        tsub,
        "wait",
        cmd_task_wait,
        "wait until a task finishes; exit 0 complete, 1 error/cancelled/timeout",
    )
    wait.add_argument("task_uuid", type=_uuid_arg, metavar="UUID")
    wait.add_argument("--timeout", type=_seconds, metavar="S", help="default: no limit")

    retry = op(
        tsub,
        "retry",
        cmd_task_retry,
        "retry the failed steps of the tasks in error (dead letters), oldest first",
        description="Retry every step in error of the tasks in error of a namespace (and "
        "template) that entered error since a time, oldest first, in transactions of up to "
        f"{REDRIVE_BATCH} tasks (tasker.retry_failed), until none is left that entered error "
        "before the command started. Each step is retried as `tasker-pg step retry` does it.",
    )
    retry.add_argument("--namespace", required=True)
    retry.add_argument("--name", help="only tasks of this template")
    retry.add_argument(
        "--failed-since",
        required=True,
        type=argtypes.point_in_time,
        metavar="TIME",
        help="tasks that entered error at or after TIME: ISO 8601 (no offset: local time) "
        "or how long ago (30m, 1h, 2d, 1w)",
    )
    retry.add_argument(
        "--limit",
        type=argtypes.positive_int,
        metavar="N",
        help=f"at most N tasks, oldest first (default: all; with --dry-run {REDRIVE_BATCH})",
    )
    retry.add_argument(
        "--dry-run", action="store_true", help="list what would be retried; change nothing"
    )
    retry.add_argument("--reason", help="why (recorded with the steps' retry transitions)")

    # step
    sp = sub.add_parser("step", help="retry, resolve and explain steps")
    ssub = sp.add_subparsers(dest="step_command", required=True, metavar="ACTION")

    def step_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "ref",
            type=_uuid_arg,
            metavar="STEP_UUID|TASK_UUID",
            help="a step's UUID, or its task's",
        )
        p.add_argument(
            "step_name", nargs="?", metavar="STEP_NAME", help="with a task's UUID: the step's name"
        )

    retry = op(ssub, "retry", cmd_step_retry, "run a step in error again with fresh attempts")
    step_arguments(retry)
    resolve = op(
        ssub, "resolve", cmd_step_resolve, "complete a step by hand; its dependents then run"
    )
    step_arguments(resolve)
    resolve.add_argument(
        "--result", required=True, metavar="JSON|@FILE", help="the step's result (JSON)"
    )
    explain = op(
        ssub, "explain", cmd_step_explain, "why a step is where it is, its error and history"
    )
    step_arguments(explain)

    # event
    ep = sub.add_parser("event", help="emit the events wait_for_event steps wait for")
    esub = ep.add_subparsers(dest="event_command", required=True, metavar="ACTION")
    emit = op(
        esub,
        "emit",
        cmd_event_emit,
        "complete the steps waiting on an event and key (kept for steps that wait later)",
    )
    emit.add_argument("name", metavar="NAME", help="the event name, e.g. payment_settled")
    emit.add_argument("key", metavar="KEY", help="the key, e.g. the order id the step waits for")
    emit.add_argument(
        "--payload",
        metavar="JSON|@FILE",
        help="the result of the steps it completes (JSON; default {})",
    )

    # queue
    qp = sub.add_parser("queue", help="queues")
    qsub = qp.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    op(qsub, "list", cmd_queue_list, "metrics of every queue")

    # template
    tmp = sub.add_parser("template", help="task templates")
    tmsub = tmp.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    tml = op(tmsub, "list", cmd_template_list, "registered templates, newest version first")
    tml.add_argument("--namespace")
    reg = op(tmsub, "register", cmd_template_register, "register a template file or directory")
    reg.add_argument("path", metavar="PATH", help="a .yaml file, or a directory of them")

    schedule_cli.add_parser(sub, op)
    flow_cli.add_parser(sub, op)

    maint = op(
        sub,
        "maintenance",
        cmd_maintenance,
        "delete the tasks the namespaces' retention policies no longer keep",
        description="Run tasker.purge_finished() in batches (one transaction each) until "
        "nothing is left to delete, and print what was deleted. Namespaces without a "
        "retention policy (tasker.set_retention_policy) keep every task.",
    )
    maint.add_argument(
        "--batch",
        type=argtypes.positive_int,
        default=1000,
        metavar="N",
        help="tasks per batch, 1..100000 (default 1000)",
    )
    maint.add_argument(
        "--max-batches",
        type=argtypes.non_negative_int,
        default=0,
        metavar="N",
        help="stop after N batches; 0: until nothing is left (default)",
    )

    worker_cli.add_parser(sub)
    observe_cli.add_parsers(sub, with_dsn)
    top.add_parser(sub, with_dsn)

    demo = with_dsn(
        sub.add_parser(
            "demo",
            help="the checkout example end to end on the embedded database",
            description="Start the embedded PostgreSQL (or use --dsn), migrate, register the "
            "checkout example, run a worker in this process and a batch of tasks through it.",
        )
    )
    demo.add_argument(
        "--tasks", type=argtypes.positive_int, default=20, help="how many (default 20)"
    )
    demo.set_defaults(func=cmd_demo)
    bench_args.add_parser(sub)

    dash = with_dsn(
        sub.add_parser(
            "dashboard",
            help="a web UI: namespaces, tasks, a task's DAG, workers (the dashboard extra)",
            description="Serve the web dashboard until Ctrl-C. Read-only unless "
            "--allow-actions. Needs the dashboard extra: pip install 'tasker-pg[dashboard]'.",
        )
    )
    dash.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; the dashboard has "
        "no login, so expose it only behind something that has one)",
    )
    dash.add_argument(
        "--port",
        type=argtypes.non_negative_int,
        default=8765,
        help="TCP port (default 8765; 0 picks a free one, printed at start)",
    )
    dash.add_argument(
        "--allow-actions",
        action="store_true",
        help="show the operator actions (cancel a task, retry or resolve a step); off by default",
    )
    dash.set_defaults(func=cmd_dashboard)
    return parser


def _error_exit(exc: TaskerError) -> int:
    if isinstance(exc, UsageError) or (
        isinstance(exc, ValidationError) and exc.error_code in USAGE_ERROR_CODES
    ):
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args))
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        code = _error_exit(exc)
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
