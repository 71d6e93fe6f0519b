"""The web dashboard: a Starlette app rendering HTML on the server, htmx polling for live parts.

Pages: namespaces (queue depth, in flight, errors, throughput, oldest ready age), tasks
(filters and keyset paging), one task (its DAG as SVG, steps, audit trail) and workers. Every
page's live part is a fragment route the page polls every 2 s (`hx-trigger="every 2s"`); only
that part of the DOM is replaced, the page itself is never reloaded.

Read-only unless built with `allow_actions`: then the task page shows forms for cancel, retry
and resolve, which POST to routes calling the same SQL functions as the CLI
(`tasker.cancel_task`, `tasker.retry_step`, `tasker.resolve_step`). Those routes answer 403
when actions are off, and otherwise require the per-process token the forms carry and, when
the browser sends an Origin header, the same origin as the request's Host.

Everything rendered goes through Jinja2 with autoescaping: task contexts, step names and error
texts may hold any text.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasker_pg import db
from tasker_pg.dashboard import dag, queries
from tasker_pg.errors import TaskerError
from tasker_pg.render import error_line, format_duration, without_sql_hint
from tasker_pg.responses import TASK_STATES, StepNotCreated, StepResponse, TaskResponse

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PAGE_SIZE = 50
AUDIT_ROWS = 300
POLL = "every 2s"
MAX_FORM_BYTES = 1_048_576
# The task list's time filter: label -> how far back.
WINDOWS: dict[str, timedelta | None] = {
    "any": None,
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("tasker_pg.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(float(seconds) * 1000)


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_env.filters["age"] = _age
_env.filters["time"] = _time
_env.filters["duration"] = format_duration
_env.filters["error_line"] = error_line
_env.filters["tojson_pretty"] = lambda value: json.dumps(value, indent=2, default=str)


class _Failure(Exception):
    """An HTTP error page: status and text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _uuid(text: str, what: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise _Failure(404, f"not a valid {what} uuid: {text}") from None


def create_app(
    pool: db.Pool | None = None,
    *,
    dsn: str | None = None,
    allow_actions: bool = False,
    page_size: int = PAGE_SIZE,
    scan_budget: int = queries.SCAN_BUDGET,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard on `pool`, or on a pool of its own opened on `dsn` when it starts (the
    order of `tasker_pg.dsn.resolve_dsn`) and closed when it stops. `page_size` tasks per page
    of the task list, read from at most `scan_budget` index entries. `allowed_hosts`: the
    Host headers it answers (others get 400); None answers any."""
    token = secrets.token_urlsafe(32)
    state: dict[str, Any] = {"pool": pool, "database": "?"}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        own = state["pool"] is None
        if own:
            state["pool"] = await db.create_pool(dsn, min_size=1, max_size=4)
        try:
            async with state["pool"].acquire() as conn:
                state["database"] = await conn.fetchval("SELECT current_database()")
            yield
        finally:
            if own:
                await state["pool"].close()

    def render(name: str, request: Request, status: int = 200, **values: Any) -> HTMLResponse:
        html = _env.get_template(name).render(
            allow_actions=allow_actions,
            csrf_token=token,
            database=state["database"],
            poll=POLL,
            path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def page(
        fn: Callable[[Request, db.Connection], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                async with state["pool"].acquire() as conn:
                    return await fn(request, conn)
            except _Failure as exc:
                return render("error.html", request, exc.status, message=exc.message)
            except TaskerError as exc:
                status = 404 if exc.error_code.endswith("not_found") else 409
                return render("error.html", request, status, message=f"[{exc.error_code}] {exc}")

        return endpoint

    # --- namespaces ----------------------------------------------------------------------------

    async def namespaces_values(conn: db.Connection) -> dict[str, Any]:
        rows = [dict(r) for r in await conn.fetch(queries.NAMESPACES)]
        return {"namespaces": rows}

    async def namespaces_page(request: Request, conn: db.Connection) -> Response:
        return render("namespaces.html", request, **await namespaces_values(conn))

    async def namespaces_fragment(request: Request, conn: db.Connection) -> Response:
        return render("_namespaces.html", request, **await namespaces_values(conn))

    # --- tasks ---------------------------------------------------------------------------------

    async def tasks_values(request: Request, conn: db.Connection) -> dict[str, Any]:
        q = request.query_params
        namespace = q.get("namespace") or None
        status = q.get("state") or None
        if status is not None and status not in TASK_STATES:
            raise _Failure(400, f"unknown state {status!r}; one of {', '.join(TASK_STATES)}")
        window = q.get("window") or "any"
        if window not in WINDOWS:
            raise _Failure(400, f"unknown time window {window!r}; one of {', '.join(WINDOWS)}")
        since = None
        span = WINDOWS[window]
        if span is not None:
            since = await conn.fetchval("SELECT now()") - span
        before_at: datetime | None = None
        before_id: str | None = None
        if q.get("before"):
            try:
                before_at = datetime.fromisoformat(q["before"])
            except ValueError:
                raise _Failure(400, f"bad cursor time {q['before']!r}") from None
            before_id = _uuid(q.get("before_id", ""), "cursor task")
        rows = await conn.fetch(
            queries.TASK_PAGE,
            before_at,
            before_id,
            since,
            namespace,
            status,
            page_size,
            scan_budget,
        )
        first = rows[0]
        tasks = [dict(r) for r in rows if r["task_uuid"] is not None]
        scanned = int(first["scanned"])
        filters = {"namespace": namespace or "", "state": status or "", "window": window}
        next_cursor: tuple[datetime, Any] | None = None
        budget_ran_out = False
        if len(tasks) == page_size:
            next_cursor = (tasks[-1]["created_at"], tasks[-1]["task_uuid"])
        elif scanned == scan_budget:
            next_cursor = (first["last_created_at"], first["last_task_uuid"])
            budget_ran_out = True
        next_url = None
        if next_cursor is not None:
            next_url = "/tasks?" + urlencode(
                {**filters, "before": next_cursor[0].isoformat(), "before_id": str(next_cursor[1])}
            )
        names = [r["namespace"] for r in await conn.fetch(queries.NAMESPACE_NAMES)]
        return {
            "tasks": tasks,
            "filters": filters,
            "query": urlencode({**filters, **{k: q[k] for k in ("before", "before_id") if k in q}}),
            "paged": before_at is not None,
            "first_url": "/tasks?" + urlencode(filters),
            "next_url": next_url,
            "budget_ran_out": budget_ran_out,
            "scan_budget": scan_budget,
            "states": TASK_STATES,
            "windows": list(WINDOWS),
            "namespace_names": names,
        }

    async def tasks_page(request: Request, conn: db.Connection) -> Response:
        return render("tasks.html", request, **await tasks_values(request, conn))

    async def tasks_fragment(request: Request, conn: db.Connection) -> Response:
        return render("_tasks.html", request, **await tasks_values(request, conn))

    # --- one task ------------------------------------------------------------------------------

    async def task_values(request: Request, conn: db.Connection) -> dict[str, Any]:
        task_uuid = _uuid(request.path_params["task"], "task")
        row = await conn.task_row(task_uuid)
        if row is None:
            raise _Failure(404, f"task {task_uuid} does not exist")
        task = TaskResponse.from_row(row)
        steps = [StepResponse.from_row(r) for r in await conn.step_rows(task_uuid)]
        not_created = [
            StepNotCreated(name=r["name"], reason=r["reason"])
            for r in await conn.steps_not_created_rows(task_uuid)
        ]
        template = {
            r["name"]: dag.TemplateStep(r["name"], list(r["parent_names"]), bool(r["is_dynamic"]))
            for r in await conn.fetch(queries.TEMPLATE_STEPS, task_uuid)
        }
        parents: dict[str, list[str]] = {}
        for r in await conn.fetch(queries.STEP_EDGES, task_uuid):
            parents.setdefault(r["child"], []).append(r["parent"])
        for step in steps:
            parents.setdefault(step.name, [])
        audit = [dict(r) for r in await conn.fetch(queries.AUDIT, task_uuid, AUDIT_ROWS)]
        return {
            "task": task,
            "steps": steps,
            "not_created": not_created,
            "layout": dag.layout(steps, not_created, template, parents),
            "audit": audit,
            "audit_rows": AUDIT_ROWS,
            "why": {
                s.step_uuid: ""
                if s.current_state in ("complete", "resolved_manually", "cancelled")
                else without_sql_hint(s.readiness_reason or "")
                for s in steps
            },
            "open_task": task.status not in ("complete", "cancelled", "resolved_manually"),
        }

    async def task_page(request: Request, conn: db.Connection) -> Response:
        return render("task.html", request, **await task_values(request, conn))

    async def task_fragment(request: Request, conn: db.Connection) -> Response:
        return render("_task.html", request, **await task_values(request, conn))

    # --- workers -------------------------------------------------------------------------------

    async def workers_values(conn: db.Connection) -> dict[str, Any]:
        return {"workers": [dict(r) for r in await conn.fetch(queries.WORKERS)]}

    async def workers_page(request: Request, conn: db.Connection) -> Response:
        return render("workers.html", request, **await workers_values(conn))

    async def workers_fragment(request: Request, conn: db.Connection) -> Response:
        return render("_workers.html", request, **await workers_values(conn))

    # --- actions -------------------------------------------------------------------------------

    async def checked_form(request: Request) -> Mapping[str, str]:
        """The posted form, after the checks that make a cross-site request fail."""
        if not allow_actions:
            raise _Failure(403, "actions are off: start the dashboard with --allow-actions")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise _Failure(403, "cross-origin request refused")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise _Failure(413, f"form larger than {MAX_FORM_BYTES} bytes")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if not hmac.compare_digest(form.get("csrf", ""), token):
            raise _Failure(403, "missing or wrong form token: reload the page")
        return form

    def action(
        fn: Callable[[Request, db.Connection, Mapping[str, str]], Awaitable[str]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                form = await checked_form(request)
                async with state["pool"].acquire() as conn:
                    task_uuid = await fn(request, conn, form)
            except _Failure as exc:
                return render("error.html", request, exc.status, message=exc.message)
            except TaskerError as exc:
                status = 404 if exc.error_code.endswith("not_found") else 409
                return render("error.html", request, status, message=f"[{exc.error_code}] {exc}")
            return RedirectResponse(f"/tasks/{task_uuid}", status_code=303)

        return endpoint

    async def cancel_task(request: Request, conn: db.Connection, form: Mapping[str, str]) -> str:
        task_uuid = _uuid(request.path_params["task"], "task")
        await conn.cancel_task(task_uuid, form.get("reason") or "cancelled from the dashboard")
        log.info("dashboard: cancelled task %s", task_uuid)
        return task_uuid

    async def step_task(conn: db.Connection, step_uuid: str) -> str:
        task_uuid = await conn.fetchval(queries.STEP_TASK, step_uuid)
        if task_uuid is None:
            raise _Failure(404, f"step {step_uuid} does not exist")
        return str(task_uuid)

    async def retry_step(request: Request, conn: db.Connection, form: Mapping[str, str]) -> str:
        step_uuid = _uuid(request.path_params["step"], "step")
        task_uuid = await step_task(conn, step_uuid)
        await conn.retry_step(step_uuid)
        log.info("dashboard: retried step %s", step_uuid)
        return task_uuid

    async def resolve_step(request: Request, conn: db.Connection, form: Mapping[str, str]) -> str:
        step_uuid = _uuid(request.path_params["step"], "step")
        try:
            result = json.loads(form.get("result") or "null")
        except json.JSONDecodeError as exc:
            raise _Failure(400, f"the result is not valid JSON: {exc.msg}") from None
        task_uuid = await step_task(conn, step_uuid)
        await conn.resolve_step(step_uuid, result)
        log.info("dashboard: resolved step %s", step_uuid)
        return task_uuid

    async def home(_request: Request) -> Response:
        return RedirectResponse("/namespaces", status_code=307)

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok")

    static = StaticFiles(packages=[("tasker_pg.dashboard", "static")])
    routes = [
        Route("/", home),
        Route("/namespaces", page(namespaces_page)),
        Route("/fragments/namespaces", page(namespaces_fragment)),
        Route("/tasks", page(tasks_page)),
        Route("/fragments/tasks", page(tasks_fragment)),
        Route("/tasks/{task}", page(task_page)),
        Route("/fragments/tasks/{task}", page(task_fragment)),
        Route("/workers", page(workers_page)),
        Route("/fragments/workers", page(workers_fragment)),
        Route("/actions/tasks/{task}/cancel", action(cancel_task), methods=["POST"]),
        Route("/actions/steps/{step}/retry", action(retry_step), methods=["POST"]),
        Route("/actions/steps/{step}/resolve", action(resolve_step), methods=["POST"]),
        Route("/ping", health),
        Mount("/static", app=static, name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


# No framing (the action buttons cannot be clickjacked), scripts and styles from the dashboard
# itself only (htmx adds one inline style for its indicators), forms post to it only.
_HEADERS = {
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class _SecurityHeaders:
    """Adds `_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
"""The Host headers a dashboard bound to a loopback address answers (so a web page whose DNS
name was rebound to 127.0.0.1 cannot read it)."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    *,
    dsn: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_actions: bool = False,
) -> int:
    """Serve the dashboard until Ctrl-C / SIGTERM (exit code 0), after checking the database
    is there and migrated. Port 0 picks a free port; the line printed once it listens gives
    the address."""
    import asyncio

    import uvicorn

    from tasker_pg.dsn import resolve_dsn

    resolved = resolve_dsn(dsn)

    async def check() -> str:
        pool = await db.create_pool(resolved.dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                name: str = await conn.fetchval("SELECT current_database()")
                return name
        finally:
            await pool.close()

    database = asyncio.run(check())
    app = create_app(
        dsn=resolved.dsn,
        allow_actions=allow_actions,
        allowed_hosts=LOOPBACK_NAMES if _is_loopback(host) else None,
    )
    mode = "operator actions on" if allow_actions else "read-only"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
                print(
                    f"dashboard started on http://{shown}:{bound[1]}/ (database {database} "
                    f"from {resolved.source}; {mode}); Ctrl-C stops it",
                    flush=True,
                )

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again with the handlers it
    # found: SIGTERM's then does nothing, so a requested stop exits 0 like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn shut down cleanly, then raised the captured signal again
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        return int(exc.code or 1)
    return 0 if server.started else 1
