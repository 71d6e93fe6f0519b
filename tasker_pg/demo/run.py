"""`tasker-pg demo`: the run itself, its live progress line and what it prints at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tasker_pg import db, migrations
from tasker_pg.client import AsyncTaskerClient
from tasker_pg.demo.example import (
    APPROVAL_CONTEXT,
    APPROVAL_TEMPLATE_NAME,
    DEMO_NAMESPACE,
    TEMPLATE_NAME,
    demo_contexts,
    demo_registry,
    demo_template,
    find_approval_example,
    find_example,
)
from tasker_pg.embedded import EmbeddedCluster
from tasker_pg.errors import ConfigurationError
from tasker_pg.render import (
    Style,
    format_duration,
    format_table,
    render_dag,
    render_task_header,
)
from tasker_pg.responses import FINAL_TASK_STATES, TaskResponse
from tasker_pg.worker import Worker

DEADLINE_SECONDS = 60.0
"""Give up (exit 1) when the batch has not finished by then; it takes a few seconds."""

# Where the demo's tasks stand ($1 their uuids): tasks per effective state.
TASK_STATES_SQL = """
SELECT v.state, count(*) AS tasks
  FROM tasker.v_tasks v
 WHERE v.task_uuid = ANY ($1::uuid[])
 GROUP BY v.state
"""

# Every step of the demo's tasks ($1 their uuids), for the summary.
STEPS_SQL = """
SELECT s.task_uuid, s.step_uuid, s.name, s.state, s.attempts, s.last_error, s.results
  FROM tasker.steps s
 WHERE s.task_uuid = ANY ($1::uuid[])
"""

logger = logging.getLogger(__name__)


def command_name(
    argv0: str | None = None,
    *,
    executable: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
    cwd: Path | None = None,
) -> str:
    """How to type `tasker-pg` so that the printed commands run this same installation.

    `tasker-pg` when the one found on PATH is the script running now; otherwise the script's
    path: relative to the current directory when it is inside it (`.venv/bin/tasker-pg` after
    `make demo` in a checkout whose venv is not activated), else absolute. Run as
    `python -m tasker_pg.cli`, the script is the `tasker-pg` next to the interpreter, or, when
    there is none, `<python> -m tasker_pg.cli`. (Arguments default to this process's own.)
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    cwd = Path.cwd() if cwd is None else cwd
    found = which("tasker-pg")
    cwd = Path(os.path.abspath(cwd))
    if Path(argv0).name.startswith("tasker-pg"):
        script = Path(os.path.normpath(cwd / argv0))
    else:
        script = Path(os.path.normpath(cwd / executable)).parent / "tasker-pg"
        if not script.is_file():
            return f"{shlex.quote(executable)} -m tasker_pg.cli"
    if found is not None and _same_file(found, script):
        return "tasker-pg"
    try:
        relative = script.relative_to(cwd)
    except ValueError:
        return shlex.quote(str(script))
    text = str(relative)
    return shlex.quote(text if "/" in text else f"./{text}")


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resolve_suggestion(validate_cart_result: Any, step_uuid: str) -> tuple[str, str] | None:
    """`step resolve` arguments for a declined payment: a result the example's
    send_confirmation accepts (`payment_id`, `amount_charged` as a number), charging the cart
    total that validate_cart computed. None when that total is unknown."""
    total = validate_cart_result.get("total") if isinstance(validate_cart_result, dict) else None
    if isinstance(total, bool) or not isinstance(total, int | float):
        return None
    result = {
        "payment_id": "pay_by_hand_" + step_uuid.split("-")[0],
        "amount_charged": round(total, 2),
        "currency": "USD",
        "status": "completed",
    }
    return step_uuid, json.dumps(result)


class Progress:
    """One line of live counts: redrawn in place on a tty, printed now and then otherwise."""

    def __init__(self, out: TextIO, total: int, *, tty: bool, unicode: bool) -> None:
        self.out = out
        self.total = total
        self.tty = tty
        self.unicode = unicode
        self._last_line = ""
        self._last_print = 0.0

    def line(self, counts: Mapping[str, int], worker: Worker, elapsed: float) -> str:
        finished = sum(n for state, n in counts.items() if state in FINAL_TASK_STATES)
        width = 16
        filled = round(width * finished / max(self.total, 1))
        full, empty = ("█", "░") if self.unicode else ("#", "-")
        bar = full * filled + empty * (width - filled)
        st = worker.stats
        return (
            f"[{bar}] {finished:>{len(str(self.total))}}/{self.total} tasks: "
            f"{counts.get('complete', 0)} complete, {counts.get('error', 0)} error | "
            f"steps {st.succeeded} ok, {st.retried} retried, {st.failed} failed | "
            f"{elapsed:.1f} s"
        )

    def show(self, text: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            # never wider than the terminal: a wrapped line cannot be redrawn in place
            columns = shutil.get_terminal_size().columns
            self.out.write("\r" + text[: columns - 1] + "\x1b[K" + ("\n" if final else ""))
            self.out.flush()
        elif final or (text != self._last_line and now - self._last_print >= 1.0):
            self.out.write(text + "\n")
            self.out.flush()
            self._last_print = now
        self._last_line = text


async def _counts(conn: db.Connection, uuids: Sequence[str]) -> dict[str, int]:
    return {r["state"]: int(r["tasks"]) for r in await conn.fetch(TASK_STATES_SQL, list(uuids))}


async def run_demo(
    *, dsn: str | None = None, tasks: int = 20, out: TextIO | None = None, verbose: bool = False
) -> int:
    """The demo; returns the process exit code (0 when every task ended as planned)."""
    out = out if out is not None else sys.stdout
    if tasks < 2:
        raise ConfigurationError("the demo needs at least 2 tasks (one fails, one is retried)")
    style = Style.for_stream(out)
    tty = bool(out.isatty()) if hasattr(out, "isatty") else False
    arrow = "→" if style.unicode else "->"

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(style.bold("tasker-pg demo: the e-commerce checkout workflow"))
    say(
        f"  validate_cart {arrow} process_payment + update_inventory (in parallel) "
        f"{arrow} send_confirmation"
    )
    example = find_example()
    template = demo_template(example)
    approval = find_approval_example()
    approval_template = demo_template(approval)
    registry = demo_registry(example.handlers, approval.handlers)
    cmd = command_name()

    if dsn is None:
        cluster = EmbeddedCluster()
        started = time.monotonic()
        running = cluster.status().running
        dsn = cluster.start()
        how = "running" if running else f"started in {time.monotonic() - started:.1f} s"
        say(f"embedded PostgreSQL {how}: {db.mask_dsn(dsn)}")
        next_dsn = (
            f' --dsn "$({cmd} db url)"'
            if any(os.environ.get(v) for v in ("TASKER_DATABASE_URL", "DATABASE_URL"))
            else ""
        )
        psql_url = f'"$({cmd} db url)"'
    else:
        say(f"database: {db.mask_dsn(dsn)}")
        next_dsn = " --dsn '<your DSN>'"
        psql_url = "'<your DSN>'"

    conn = await db.connect(dsn, check_schema=False)
    try:
        report = await migrations.migrate(conn)
        say(
            f"schema at version {report.current_version}"
            + (f" ({len(report.applied)} migration(s) applied)" if report.applied else "")
        )
        named_task_id = await conn.register_template(template.to_json())
        say(
            f"registered {DEMO_NAMESPACE}/{template.name} {template.version} "
            f"({len(template.steps)} steps, id {named_task_id}) from {example.origin}"
        )
        approval_id = await conn.register_template(approval_template.to_json())
        say(
            f"registered {DEMO_NAMESPACE}/{approval_template.name} {approval_template.version} "
            f"(a decision step, id {approval_id}) from {approval.origin}"
        )
        contexts, declined_at, flaky_at = demo_contexts(tasks, example.handlers.PRODUCTS)

        # Expected failures are the point of the demo, not news: keep the worker's log quiet.
        worker_logger = logging.getLogger("tasker_pg.worker")
        saved_level = worker_logger.level
        if not verbose:
            worker_logger.setLevel(logging.CRITICAL)
        worker = Worker(
            DEMO_NAMESPACE,
            registry,
            dsn=dsn,
            concurrency=8,
            poll_interval=0.1,
            grace_seconds=5.0,
            summary_interval=0,
            worker_id=f"demo-{os.getpid()}",
        )
        try:
            async with worker, AsyncTaskerClient(dsn, initiator="tasker-pg demo") as client:
                say(f"worker {worker.worker_id} running in this process (concurrency 8)")
                say()
                started = time.monotonic()
                uuids = await client.create_tasks(
                    TEMPLATE_NAME,
                    namespace=DEMO_NAMESPACE,
                    contexts=contexts,
                    version=template.version,
                    reason="tasker-pg demo",
                )
                say(
                    f"created {len(uuids)} tasks in one call: {len(uuids) - 2} ordinary carts, "
                    "1 card the gateway declines, 1 gateway timeout"
                )
                finals = await _watch(client, conn, uuids, worker, style, tty, out)
                wall = time.monotonic() - started
                request = await client.create_task(
                    APPROVAL_TEMPLATE_NAME,
                    namespace=DEMO_NAMESPACE,
                    context=APPROVAL_CONTEXT,
                    version=approval_template.version,
                    reason="tasker-pg demo",
                )
                decided = await client.wait_for_task(request.task_uuid, DEADLINE_SECONDS)
        finally:
            worker_logger.setLevel(saved_level)
        steps = await conn.fetch(STEPS_SQL, uuids)
        decision = await conn.fetch(STEPS_SQL, [decided.task_uuid])
        stats = worker.stats
    finally:
        await conn.close()

    by_uuid = {t.task_uuid: t for t in finals}
    declined = by_uuid[uuids[declined_at]]
    flaky = by_uuid[uuids[flaky_at]]
    retried_tasks = {str(s["task_uuid"]) for s in steps if s["attempts"] > 1}
    failed_steps = [s for s in steps if s["state"] == "error"]

    async with AsyncTaskerClient(dsn) as client:
        # read again: a task reads final the moment it fails, while a sibling step may still run
        flaky, declined = (
            await client.get_task(flaky.task_uuid),
            await client.get_task(declined.task_uuid),
        )
        flaky_steps = await client.list_task_steps(flaky.task_uuid)
        declined_steps = await client.list_task_steps(declined.task_uuid)
        decided_steps = await client.list_task_steps(decided.task_uuid)
    say()
    say(style.bold("a task whose payment was retried, then completed:"))
    say(render_task_header(flaky, style))
    say(render_dag(flaky_steps, style))
    say()
    say(style.bold("the task whose payment was declined (failed permanently):"))
    say(render_task_header(declined, style))
    say(render_dag(declined_steps, style))

    say()
    say(
        style.bold(
            f"an approval request of {APPROVAL_CONTEXT['amount']:,}: a decision chose its steps:"
        )
    )
    say(render_task_header(decided, style))
    say(render_dag(decided_steps, style))
    say(decision_line(decision))

    per_state: dict[str, int] = {}
    for t in finals:
        per_state[t.status] = per_state.get(t.status, 0) + 1
    rows = [(f"tasks {state}", str(n)) for state, n in sorted(per_state.items())]
    rows += [
        (
            "tasks retried, then complete",
            str(sum(1 for u in retried_tasks if by_uuid[u].status == "complete")),
        ),
        ("step runs (attempts)", str(sum(int(s["attempts"]) for s in steps))),
        ("steps retried", str(stats.retried)),
        ("steps failed permanently", str(len(failed_steps))),
        ("wall time", f"{format_duration(wall * 1000)} ({len(uuids) / wall:.1f} tasks/s)"),
    ]
    say()
    say(format_table(("summary", ""), rows))
    say()
    for step in failed_steps:
        err = step["last_error"] or {}
        say(
            f"failed:  {step['name']} of task {step['task_uuid']}: "
            f"{err.get('error_code') or err.get('error_type')}"
        )
    for u in sorted(retried_tasks):
        for step in steps:
            if str(step["task_uuid"]) == u and step["attempts"] > 1:
                say(
                    f"retried: {step['name']} of task {u}: "
                    f"{step['state']} after {step['attempts']} attempts"
                )
    first_failed = failed_steps[0]["step_uuid"] if failed_steps else None
    resolve = None
    for step in failed_steps:
        if step["name"] == "process_payment":
            validated = next(
                (
                    s["results"]
                    for s in steps
                    if s["task_uuid"] == step["task_uuid"] and s["name"] == "validate_cart"
                ),
                None,
            )
            resolve = resolve_suggestion(validated, str(step["step_uuid"]))
            break
    say()
    say("try next:")
    say(f"  {cmd} task show {declined.task_uuid}{next_dsn}")
    if first_failed is not None:
        say(f"  {cmd} step explain {first_failed}{next_dsn}")
    if resolve is not None:
        say(f"  {cmd} step resolve {resolve[0]} --result {shlex.quote(resolve[1])}{next_dsn}")
        say(
            f"  {cmd} worker --namespace {DEMO_NAMESPACE} --handlers {example.handlers_module}"
            f"{next_dsn}    (after a resolve: runs send_confirmation)"
        )
    say(f"  {cmd} task list --namespace {DEMO_NAMESPACE}{next_dsn}")
    say(f"  {cmd} dashboard{next_dsn}    (a web UI of these tasks: the dashboard extra)")
    say(f"  psql {psql_url} -c 'select * from tasker.v_tasks order by created_at desc limit 5'")
    if next_dsn == "" or "db url" in next_dsn:
        say(f"  {cmd} db stop        (the embedded PostgreSQL keeps running until then)")

    expected = (
        declined.status == "error"
        and flaky.status == "complete"
        and per_state.get("complete", 0) == len(uuids) - 1
        and decided.status == "complete"
    )
    if not expected:
        say("the batch did not end as the demo expects (see the states above)")
    return 0 if expected else 1


def decision_line(steps: Sequence[Mapping[str, Any]]) -> str:
    """What the decision of an approval task chose, and which branch it left uncreated."""
    by_name = {s["name"]: s for s in steps}
    outcome = (by_name.get("routing_decision", {}).get("results") or {}).get(
        "decision_point_outcome", {}
    )
    chosen = list(outcome.get("step_names", []))
    skipped = [
        n for n in ("auto_approve", "manager_approval", "finance_review") if n not in by_name
    ]
    finalize = by_name.get("finalize", {}).get("results") or {}
    approvers = ", ".join(finalize.get("approvers", []))
    return (
        f"routing_decision chose {', '.join(chosen) or 'nothing'}; "
        f"not created: {', '.join(skipped) or 'none'}; "
        f"finalize: approved={finalize.get('approved')} by {approvers}"
    )


async def _watch(
    client: AsyncTaskerClient,
    conn: db.Connection,
    uuids: Sequence[str],
    worker: Worker,
    style: Style,
    tty: bool,
    out: TextIO,
) -> list[TaskResponse]:
    """Wait for every task (the client's notification-driven wait), redrawing the progress
    line meanwhile; returns the final tasks in the order of `uuids`."""
    progress = Progress(out, len(uuids), tty=tty, unicode=style.unicode)
    started = time.monotonic()
    done = asyncio.ensure_future(
        asyncio.gather(*(client.wait_for_task(u, DEADLINE_SECONDS) for u in uuids))
    )
    try:
        while True:
            finished = done.done()
            counts = await _counts(conn, uuids)
            progress.show(progress.line(counts, worker, time.monotonic() - started), final=finished)
            if finished:
                return list(done.result())
            # (a display refresh, not synchronisation: `done` wakes us when the batch ends)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 0.1 if tty else 0.5)
    finally:
        if not done.done():
            done.cancel()
            with contextlib.suppress(BaseException):
                await done


def main(*, dsn: str | None = None, tasks: int = 20, verbose: bool = False) -> int:
    """Entry point of `tasker-pg demo`."""
    return asyncio.run(run_demo(dsn=dsn, tasks=tasks, verbose=verbose))
