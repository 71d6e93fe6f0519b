"""`tasker-pg demo` (`make demo`): the checkout example end to end, in one process, in seconds.

Starts the embedded PostgreSQL (unless given a DSN), migrates, registers the checkout template
of `examples/ecommerce` under a namespace of its own (`tasker_demo`, so a worker you run on
`ecommerce` never takes the demo's steps, nor the demo yours), runs a `Worker` in this process
with the example's handlers, creates a batch of tasks in one call and shows them finish: most
complete, one is declined by the payment gateway (a permanent failure), one meets a gateway
timeout on its first attempt and completes on the retry. Then it draws two tasks' DAGs (the
renderer of `tasker-pg task show`), prints a summary and the commands to try next.

The handlers are the example's own, imported from the checkout (`examples/` next to this
package, else in the current directory): the demo shows the code a reader finds in the
repository, not a copy of it. The one addition is a wrapper around the payment handler that
simulates the gateway timeout for a task whose context asks for it (`demo_gateway_timeouts`),
with a short `retry_after` so the demo stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from tasker_pg import db, migrations
from tasker_pg.client import AsyncTaskerClient
from tasker_pg.context import StepContext
from tasker_pg.embedded import EmbeddedCluster
from tasker_pg.errors import ConfigurationError, RetryableError
from tasker_pg.handler import StepHandler
from tasker_pg.registry import HandlerRegistry
from tasker_pg.render import (
    Style,
    format_duration,
    format_table,
    render_dag,
    render_task_header,
)
from tasker_pg.responses import FINAL_TASK_STATES, TaskResponse
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import TaskTemplate, load_template
from tasker_pg.worker import Worker

__all__ = ["DEMO_NAMESPACE", "find_example", "main", "run_demo"]

DEMO_NAMESPACE = "tasker_demo"
"""The demo's own namespace (and queue): it never mixes with a user's `ecommerce` work."""
TEMPLATE_NAME = "checkout_workflow"
EXAMPLE_TEMPLATE = Path("examples/ecommerce/checkout_workflow.yaml")
EXAMPLE_HANDLERS = "examples.ecommerce.handlers"

GATEWAY_TIMEOUTS_KEY = "demo_gateway_timeouts"
"""Task context key: how many first attempts of process_payment meet a gateway timeout."""
RETRY_AFTER_SECONDS = 0.3
"""The simulated gateway's retry hint (the example's own is 5 s: too slow for a demo)."""
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
SELECT s.task_uuid, s.step_uuid, s.name, s.state, s.attempts, s.last_error
  FROM tasker.steps s
 WHERE s.task_uuid = ANY ($1::uuid[])
"""

logger = logging.getLogger(__name__)


def find_example() -> tuple[Path, ModuleType]:
    """The checkout template file and the imported handlers module of `examples/ecommerce`.

    Looked for in the checkout this package lives in (an editable install, `make demo`), then
    in the current directory. The directory found is put on `sys.path` so `examples` imports.
    """
    roots = [Path(__file__).resolve().parent.parent, Path.cwd()]
    for root in roots:
        template = root / EXAMPLE_TEMPLATE
        if template.is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            try:
                module = importlib.import_module(EXAMPLE_HANDLERS)
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import the example handlers {EXAMPLE_HANDLERS} from {root}: {exc}"
                ) from exc
            return template, module
    raise ConfigurationError(
        "the demo runs the checkout example of a tasker-pg checkout "
        f"({EXAMPLE_TEMPLATE} and {EXAMPLE_HANDLERS}), and found it neither next to the "
        f"installed package nor in {Path.cwd()}: run it from the repository root "
        "(`make demo`, or `tasker-pg demo` there)"
    )


def demo_template(path: Path) -> TaskTemplate:
    """The example's template, moved to the demo's namespace."""
    body = load_template(path).to_json()
    body["namespace_name"] = DEMO_NAMESPACE
    return TaskTemplate.from_dict(body, source=str(path))


def demo_registry(handlers: ModuleType) -> HandlerRegistry:
    """The example's four handlers, the payment one behind a simulated flaky gateway."""
    payment_cls: type[StepHandler] = handlers.ProcessPaymentHandler

    class FlakyGatewayPaymentHandler(StepHandler):
        """ProcessPaymentHandler, except that the first `demo_gateway_timeouts` attempts of a
        task meet a gateway timeout (a retryable error with a short retry_after)."""

        handler_name = payment_cls.handler_name

        def __init__(self) -> None:
            self._payment = payment_cls()

        def call(self, context: StepContext) -> StepHandlerResult | Awaitable[StepHandlerResult]:
            timeouts = int(context.get_input_or(GATEWAY_TIMEOUTS_KEY, 0) or 0)
            if context.attempt <= timeouts:
                raise RetryableError(
                    "Payment gateway timeout (simulated by the demo)",
                    retry_after=RETRY_AFTER_SECONDS,
                    context={"gateway": "simulated", "attempt": context.attempt},
                    error_code="GATEWAY_TIMEOUT",
                )
            return self._payment.call(context)

    registry = HandlerRegistry(allow_import=False)
    for cls_name in ("ValidateCartHandler", "UpdateInventoryHandler", "SendConfirmationHandler"):
        registry.register(getattr(handlers, cls_name))
    registry.register(FlakyGatewayPaymentHandler)
    return registry


def demo_contexts(count: int, products: Mapping[int, Any]) -> tuple[list[dict[str, Any]], int, int]:
    """`count` checkout contexts; returns them with the index of the one the gateway declines
    and of the one that meets a timeout first."""
    ids = sorted(products)
    contexts: list[dict[str, Any]] = []
    for i in range(count):
        items = [{"product_id": ids[i % len(ids)], "quantity": 1 + i % 2}]
        if i % 4 == 3:
            items.append({"product_id": ids[(i + 1) % len(ids)], "quantity": 1})
        contexts.append({"cart_items": items, "customer_email": f"customer{i + 1}@example.com"})
    declined = min(6, count - 1)
    flaky = min(3, count - 2) if count > 1 else 0
    if count > 1 and flaky == declined:
        flaky = declined - 1
    contexts[declined]["payment_token"] = "tok_declined"
    if count > 1:
        contexts[flaky][GATEWAY_TIMEOUTS_KEY] = 1
    return contexts, declined, flaky


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
    template_path, handlers = find_example()
    template = demo_template(template_path)
    registry = demo_registry(handlers)

    if dsn is None:
        cluster = EmbeddedCluster()
        started = time.monotonic()
        running = cluster.status().running
        dsn = cluster.start()
        how = "running" if running else f"started in {time.monotonic() - started:.1f} s"
        say(f"embedded PostgreSQL {how}: {db.mask_dsn(dsn)}")
        next_dsn = (
            ' --dsn "$(tasker-pg db url)"'
            if any(os.environ.get(v) for v in ("TASKER_DATABASE_URL", "DATABASE_URL"))
            else ""
        )
        psql_url = '"$(tasker-pg db url)"'
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
            f"({len(template.steps)} steps, id {named_task_id}) from {EXAMPLE_TEMPLATE.parent}/"
        )
        contexts, declined_at, flaky_at = demo_contexts(tasks, handlers.PRODUCTS)

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
        finally:
            worker_logger.setLevel(saved_level)
        steps = await conn.fetch(STEPS_SQL, uuids)
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
    say()
    say(style.bold("a task whose payment was retried, then completed:"))
    say(render_task_header(flaky, style))
    say(render_dag(flaky_steps, style))
    say()
    say(style.bold("the task whose payment was declined (failed permanently):"))
    say(render_task_header(declined, style))
    say(render_dag(declined_steps, style))

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
    say()
    say("try next:")
    say(f"  tasker-pg task show {declined.task_uuid}{next_dsn}")
    if first_failed is not None:
        say(f"  tasker-pg step explain {first_failed}{next_dsn}")
    say(f"  tasker-pg task list --namespace {DEMO_NAMESPACE}{next_dsn}")
    say(f"  psql {psql_url} -c 'select * from tasker.v_tasks order by created_at desc limit 5'")
    if next_dsn == "" or "db url" in next_dsn:
        say("  tasker-pg db stop        (the embedded PostgreSQL keeps running until then)")

    expected = (
        declined.status == "error"
        and flaky.status == "complete"
        and per_state.get("complete", 0) == len(uuids) - 1
    )
    if not expected:
        say("the batch did not end as the demo expects (see the states above)")
    return 0 if expected else 1


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
