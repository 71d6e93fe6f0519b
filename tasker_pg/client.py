"""Submit and inspect work from Python: `TaskerClient` (blocking) and `AsyncTaskerClient`.

Both talk to PostgreSQL directly through the engine's SQL functions and views (there is no
server in between) and return the frozen dataclasses of `tasker_pg.responses`. The async client
owns a small connection pool, opened on first use (when the schema is checked), and one LISTEN
session for `wait_for_task`. The sync client runs an `AsyncTaskerClient` on an event loop in a
private background thread and hands each call to it, so it works the same in a plain script,
from several threads at once, and where an event loop already runs in the calling thread (a
notebook). Close either one (`close()`, or use it as a context manager) to release its
connections; nothing is done in finalizers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from tasker_pg import db, jsonutil, sqlfiles
from tasker_pg.errors import (
    ConnectionLostError,
    DatabaseNotFoundError,
    NotFoundError,
    SchemaError,
    TaskerError,
    ValidationError,
)
from tasker_pg.responses import (
    FINAL_TASK_STATES,
    TASK_STATES,
    FlowLaneResponse,
    HealthCheck,
    HealthResponse,
    Pagination,
    RateLimitResponse,
    RedrivenTask,
    RedriveResponse,
    ScheduleFire,
    ScheduleResponse,
    StepAuditResponse,
    StepNotCreated,
    StepResponse,
    TaskListResponse,
    TaskResponse,
    TemplateRegistration,
    WorkerStatus,
)
from tasker_pg.template import load_templates
from tasker_pg.tracing import is_traceparent

__all__ = [
    "AsyncTaskerClient",
    "ClientClosedError",
    "TaskTimeoutError",
    "TaskerClient",
]

# --- events --------------------------------------------------------------------------------
# Every statement the client sends is a method of `db.Connection` (text in tasker_pg.queries).

TASK_EVENTS_CHANNEL: Final = "tasker_task_events"
"""Channel on which the engine announces every task state change (JSON with task_uuid)."""

# --- defaults and limits ---------------------------------------------------------------------

DEFAULT_INITIATOR: Final = "tasker-core-python"
DEFAULT_SOURCE_SYSTEM: Final = "tasker-core"
POOL_MAX_SIZE: Final = 4
MAX_PAGE_SIZE: Final = 1000
REDRIVE_BATCH: Final = 1000
"""Most tasks one tasker.retry_failed call retries (each holds an operator lock until commit)."""
DEFAULT_MIN_WORKERS: Final = 0
DEFAULT_WORKER_STALE_AFTER: Final = 30.0
"""A worker writes its heartbeat row every 5 s; one older than this is not counted alive."""
DEFAULT_MAX_READY_AGE: Final = 300.0
DEFAULT_MAX_EXPIRED_LEASES: Final = 100
WAIT_RECHECK_SECONDS: Final = 5.0
"""While waiting for a task, its state is re-read this often even without a notification:
the safety net for a notification lost with a dropped LISTEN session."""

CREATE_OPTIONS: Final = (
    "priority",
    "tags",
    "idempotency_key",
    "correlation_id",
    "delay_seconds",
    "initiator",
    "source_system",
    "traceparent",
)
"""The keyword options `create_task` accepts besides context, version and reason."""

_PG_INT_MAX = 2_147_483_647

RATE_LIMIT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:\-]{0,127}")
"""A rate limit's name, as tasker.set_rate_limit checks it (the whole string must match)."""
MAX_RATE_PER_SECOND: Final = 1_000_000
MAX_RATE_BURST: Final = 1_000_000

logger = logging.getLogger(__name__)

T = TypeVar("T")


# --- errors ----------------------------------------------------------------------------------


class TaskTimeoutError(TaskerError, TimeoutError):
    """`wait_for_task` ran out of time before the task reached a final state.

    Also a builtin `TimeoutError`. `task_uuid`, `last_state` and `timeout` say which task, where
    it stood, and how long was waited; the task itself is untouched and keeps running.
    """

    error_code = "wait_timeout"

    def __init__(self, task_uuid: str, last_state: str, timeout: float) -> None:
        super().__init__(
            f"task {task_uuid} did not reach a final state "
            f"({', '.join(sorted(FINAL_TASK_STATES))}) within {timeout:g} s; it is {last_state}. "
            "It keeps running: wait again, or look at it with `tasker-pg task show "
            f"{task_uuid}`"
        )
        self.task_uuid = task_uuid
        self.last_state = last_state
        self.timeout = timeout


class ClientClosedError(TaskerError):
    """A client was used after `close()`."""

    error_code = "client_closed"


# --- argument checks -------------------------------------------------------------------------


def _uuid_text(value: object, what: str) -> str:
    """The canonical text of a uuid given as `uuid.UUID` or string; ValidationError otherwise."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(value.strip()))
    raise ValidationError(
        f"{what} {value!r} is not a valid UUID "
        "(expected 32 hex digits such as 6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f)",
        error_code="invalid_uuid",
    )


def _text(value: object, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value:
        return value
    raise ValidationError(
        f"{what} must be a non-empty string, got {value!r}", error_code="invalid_argument"
    )


def _json_check(value: object, what: str, error_code: str) -> None:
    """Refuse what cannot be stored as jsonb (NaN, sets, dates...) before it reaches SQL."""
    try:
        jsonutil.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"{what} is not plain JSON data: {exc}", error_code=error_code
        ) from None


def _integer(value: object, what: str, low: int, high: int) -> int:
    """`value` when it is an int (not a bool) from `low` to `high`; ValidationError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(
            f"{what} must be an integer from {low} to {high}, got {value!r:.100}",
            error_code="invalid_argument",
        )
    return value


def _redrive_arguments(
    namespace: object,
    name: object,
    since: object,
    before: object,
    limit: object,
    reason: object,
) -> tuple[str, str | None, int]:
    """The checked arguments of a bulk retry (the SQL function checks them again)."""
    ns = _text(namespace, "namespace")
    assert ns is not None
    template = _text(name, "template name", optional=True)
    _text(reason, "reason", optional=True)
    for value, what in ((since, "since"), (before, "before")):
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise ValidationError(
                f"{what} must be a timezone-aware datetime or None, got {value!r}",
                error_code="invalid_argument",
            )
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= REDRIVE_BATCH:
        raise ValidationError(
            f"limit must be a whole number from 1 to {REDRIVE_BATCH}, got {limit!r}",
            error_code="invalid_argument",
        )
    return ns, template, limit


def _redrive_response(
    namespace: str,
    name: str | None,
    since: datetime | None,
    before: datetime | None,
    dry_run: bool,
    batches: Sequence[Sequence[db.Row]],
) -> RedriveResponse:
    tasks = [RedrivenTask.from_row(r) for rows in batches for r in rows]
    return RedriveResponse(
        namespace=namespace,
        name=name,
        since=since,
        before=before,
        dry_run=bool(dry_run),
        batches=len(batches),
        tasks_matched=len(tasks),
        tasks_retried=sum(1 for t in tasks if t.retried),
        steps_retried=sum(len(t.steps) for t in tasks if t.retried),
        steps_to_retry=sum(len(t.steps) for t in tasks),
        tasks=tasks,
    )


def _task_context(context: object) -> dict[str, Any]:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ValidationError(
            f"task context must be a JSON object (a dict), got {type(context).__name__}",
            error_code="invalid_context",
        )
    result = dict(context)
    _json_check(result, "task context", "invalid_context")
    return result


def _task_options(
    kwargs: Mapping[str, Any], *, initiator: str, source_system: str, reason: str | None
) -> dict[str, Any]:
    """The options object of tasker.create_task, checked here so mistakes read clearly."""
    unknown = sorted(set(kwargs) - set(CREATE_OPTIONS))
    if unknown:
        raise ValidationError(
            f"create_task() got unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)} (valid: {', '.join(CREATE_OPTIONS)}; "
            "plus context, version and reason)",
            error_code="invalid_option",
        )
    given = {k: v for k, v in kwargs.items() if v is not None}

    def bad(message: str) -> ValidationError:
        return ValidationError(f"create_task(): {message}", error_code="invalid_option")

    priority = given.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > _PG_INT_MAX
    ):
        raise bad(f"priority must be an integer (higher runs first), got {priority!r}")
    delay = given.get("delay_seconds")
    if delay is not None and (
        isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0
    ):
        # (the upper bound is the SQL function's to state)
        raise bad(f"delay_seconds must be a number of seconds >= 0, got {delay!r}")
    tags = given.get("tags")
    if tags is not None:
        if isinstance(tags, str) or not isinstance(tags, list | tuple):
            raise bad(f"tags must be a list, got {tags!r}")
        given["tags"] = list(tags)
    for key in ("idempotency_key", "correlation_id", "initiator", "source_system"):
        if key in given and not isinstance(given[key], str):
            raise bad(f"{key} must be a string, got {given[key]!r}")
    traceparent = given.get("traceparent")
    if traceparent is not None and not (
        isinstance(traceparent, str) and is_traceparent(traceparent)
    ):
        raise bad(
            "traceparent must be a W3C trace context, 00-<32 hex trace id>-<16 hex span id>-"
            f"<2 hex flags> (tasker_pg.tracing.current_traceparent() gives the current span's), "
            f"got {traceparent!r:.100}"
        )
    options: dict[str, Any] = {"initiator": initiator, "source_system": source_system}
    if reason is not None:
        options["reason"] = _text(reason, "reason")
    options.update(given)
    _json_check(options, "create_task options", "invalid_option")
    return options


def _rate_limit_name(value: object) -> str:
    if isinstance(value, str) and RATE_LIMIT_NAME.fullmatch(value):
        return value
    raise ValidationError(
        "rate limit name must be 1 to 128 letters, digits, _, ., : and -, starting with a "
        f"letter, got {value!r:.200}",
        error_code="invalid_argument",
    )


def _rate_limit_arguments(
    name: object, per_second: object, burst: object
) -> tuple[str, float, int | None]:
    """The checked arguments of set_rate_limit (the SQL function checks them again)."""
    checked = _rate_limit_name(name)
    if (
        isinstance(per_second, bool)
        or not isinstance(per_second, int | float)
        or not math.isfinite(per_second)
        or not 0 < per_second <= MAX_RATE_PER_SECOND
    ):
        raise ValidationError(
            f"per_second must be a number > 0 and at most {MAX_RATE_PER_SECOND}, "
            f"got {per_second!r:.100}",
            error_code="invalid_argument",
        )
    most = None if burst is None else _integer(burst, "burst", 1, MAX_RATE_BURST)
    return checked, float(per_second), most


# --- the async client ------------------------------------------------------------------------


class _TaskEvents:
    """One LISTEN session on tasker_task_events per client; wakes the waiters of a task.

    Waiters register an `asyncio.Event` per task before reading the task's state, so a change
    committed after that read always sets the event. When the session is lost it is opened
    again on the next check, and every waiter is woken to re-read what it may have missed.
    """

    def __init__(self, dsn: str | None, connect_timeout: float) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: db.Connection | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    def subscribe(self, task_uuid: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(task_uuid, set()).add(event)
        return event

    def unsubscribe(self, task_uuid: str, event: asyncio.Event) -> None:
        events = self._waiters.get(task_uuid)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[task_uuid]

    async def ensure_listening(self) -> None:
        """Open (or reopen after a loss) the LISTEN session; cheap when it is up."""
        if self._conn is not None and not self._conn.is_closed():
            return
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            if self._closed:
                raise ClientClosedError("the client is closed; create a new one")
            reopened = self._conn is not None
            conn = await db.connect(self._dsn, check_schema=False, timeout=self._connect_timeout)
            try:
                await conn.listen(TASK_EVENTS_CHANNEL, self._on_notification)
                if self._closed:  # closed while this session was opening
                    raise ClientClosedError("the client is closed; create a new one")
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
            if reopened:
                for events in self._waiters.values():
                    for event in events:
                        event.set()

    def _on_notification(self, _channel: str, payload: str) -> None:
        try:
            message = jsonutil.loads(payload)
            task = str(uuid.UUID(str(message["task_uuid"])))
        except (ValueError, TypeError, KeyError):
            return
        for event in self._waiters.get(task, ()):
            event.set()

    async def close(self) -> None:
        """Close the session and wake every waiter (each then finds the client closed)."""
        self._closed = True
        conn, self._conn = self._conn, None
        for events in self._waiters.values():
            for event in events:
                event.set()
        if conn is not None:
            await conn.close()


class AsyncTaskerClient:
    """Create, inspect, wait for and operate on tasks; every method is a coroutine.

    `dsn=None` finds the database as everywhere in tasker-pg (TASKER_DATABASE_URL,
    DATABASE_URL, then the embedded cluster). Nothing connects until the first call; then a
    pool of at most four sessions opens and the schema is checked (an outdated schema raises
    `SchemaError` naming `tasker-pg migrate`). A client belongs to the event loop it is first
    used on. Close it with `await client.close()` or `async with AsyncTaskerClient() as c:`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        initiator: str = DEFAULT_INITIATOR,
        source_system: str = DEFAULT_SOURCE_SYSTEM,
        connect_timeout: float = 10,
    ) -> None:
        self.dsn = dsn
        self.initiator = initiator
        self.source_system = source_system
        self.connect_timeout = float(connect_timeout)
        self._pool: db.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._events = _TaskEvents(dsn, self.connect_timeout)
        self._closed = False

    def __repr__(self) -> str:
        where = db.mask_dsn(self.dsn) if self.dsn else "resolved from the environment"
        return f"{type(self).__name__}(dsn={where!r}, initiator={self.initiator!r})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the pool and the LISTEN session; calling it again does nothing."""
        self._closed = True
        pool, self._pool = self._pool, None
        await self._events.close()
        if pool is not None:
            await pool.close()

    async def _get_pool(self) -> db.Pool:
        if self._closed:
            raise ClientClosedError(f"{type(self).__name__} is closed; create a new one")
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                try:
                    # db.create_pool takes no connect timeout: bound the whole opening here.
                    pool = await asyncio.wait_for(
                        db.create_pool(self.dsn, min_size=1, max_size=POOL_MAX_SIZE),
                        self.connect_timeout,
                    )
                except TimeoutError:
                    where = db.mask_dsn(self.dsn) if self.dsn else "the configured database"
                    raise DatabaseNotFoundError(
                        f"could not connect to {where} within {self.connect_timeout:g} s "
                        "(connect_timeout); is the server running and reachable?"
                    ) from None
                if self.closed:  # closed while the pool was opening (a property: re-read)
                    await pool.close()
                    raise ClientClosedError(f"{type(self).__name__} is closed; create a new one")
                self._pool = pool
            return self._pool

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[db.Connection]:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            yield conn

    # --- tasks -------------------------------------------------------------------------------

    async def create_task(
        self,
        name: str,
        *,
        namespace: str,
        context: Mapping[str, Any] | None = None,
        version: str | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> TaskResponse:
        """Create a task from the registered template `namespace`/`name` (newest version
        unless `version` is given). Options: priority, tags, idempotency_key, correlation_id,
        delay_seconds, traceparent (the W3C trace context its steps' spans are children of:
        `tasker_pg.tracing.current_traceparent()`), and initiator/source_system to override
        the client's. A repeated idempotency_key returns the task created first, with
        `created` False."""
        name = str(_text(name, "task template name"))
        namespace = str(_text(namespace, "namespace"))
        version = _text(version, "version", optional=True)
        ctx = _task_context(context)
        options = _task_options(
            kwargs, initiator=self.initiator, source_system=self.source_system, reason=reason
        )
        async with self._session() as conn:
            task_uuid, created = await conn.create_or_get_task(
                namespace, name, ctx, version=version, options=options
            )
            task = await self._read_task(conn, str(task_uuid))
            return dataclasses.replace(task, created=created)

    async def create_tasks(
        self,
        name: str,
        *,
        namespace: str,
        contexts: Sequence[Mapping[str, Any] | None],
        version: str | None = None,
        **options: Any,
    ) -> list[str]:
        """Create one task per context from the template `namespace`/`name` in one set-based
        call (tasker.create_tasks), all or none; returns their uuids in the order of
        `contexts`. `options` are create_task's (reason, priority, tags, ...) and apply to
        every task; a repeated idempotency_key returns the task created first, so a key given
        here makes the whole batch one task."""
        name = str(_text(name, "task template name"))
        namespace = str(_text(namespace, "namespace"))
        version = _text(version, "version", optional=True)
        if isinstance(contexts, str | bytes | Mapping) or not isinstance(contexts, Sequence):
            raise ValidationError(
                f"contexts must be a list of JSON objects (one per task), got "
                f"{type(contexts).__name__}",
                error_code="invalid_context",
            )
        ctxs = [_task_context(c) for c in contexts]
        if not ctxs:
            return []
        reason = options.pop("reason", None)
        opts = _task_options(
            options, initiator=self.initiator, source_system=self.source_system, reason=reason
        )
        async with self._session() as conn:
            uuids = await conn.create_tasks(namespace, name, ctxs, version=version, options=opts)
        return [str(u) for u in uuids]

    async def get_task(self, task_uuid: str | uuid.UUID) -> TaskResponse:
        """The task's state, progress and creation details."""
        task = _uuid_text(task_uuid, "task uuid")
        async with self._session() as conn:
            return await self._read_task(conn, task)

    @staticmethod
    async def _read_task(conn: db.Connection, task: str) -> TaskResponse:
        row = await conn.task_row(task)
        if row is None:
            raise NotFoundError(f"task {task} does not exist", error_code="task_not_found")
        return TaskResponse.from_row(row)

    async def list_tasks(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        namespace: str | None = None,
        status: str | None = None,
    ) -> TaskListResponse:
        """A page of tasks, newest first, optionally of one namespace and/or in one state
        (the state `get_task` reports), with the total count of the filtered list."""
        limit = _integer(limit, "limit", 1, MAX_PAGE_SIZE)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValidationError(
                f"offset must be an integer >= 0, got {offset!r}", error_code="invalid_argument"
            )
        namespace = _text(namespace, "namespace", optional=True)
        raw_states: list[str] | None = None
        if status is not None:
            if status not in TASK_STATES:
                raise ValidationError(
                    f"unknown task status {status!r} (valid: {', '.join(TASK_STATES)})",
                    error_code="invalid_argument",
                )
            raw_states = ["pending", status] if status == "steps_in_process" else [status]
        async with self._session() as conn:
            rows = await conn.task_page_rows(
                namespace=namespace,
                status=status,
                raw_states=raw_states,
                limit=limit,
                offset=offset,
            )
            if rows:
                total = int(rows[0]["total_count"])
            else:
                total = await conn.count_tasks(
                    namespace=namespace, status=status, raw_states=raw_states
                )
        tasks = [TaskResponse.from_row(r) for r in rows]
        return TaskListResponse(
            tasks=tasks,
            pagination=Pagination.compute(
                total_count=total, limit=limit, offset=offset, returned=len(tasks)
            ),
        )

    async def cancel_task(
        self, task_uuid: str | uuid.UUID, reason: str | None = None
    ) -> dict[str, Any]:
        """Cancel every unfinished step of the task; returns tasker.cancel_task's summary
        (task_uuid, previous_state, state, cancelled_steps). A finished task raises
        InvalidStateError."""
        task = _uuid_text(task_uuid, "task uuid")
        reason = _text(reason, "reason", optional=True)
        async with self._session() as conn:
            return dict(await conn.cancel_task(task, reason))

    async def wait_for_task(
        self, task_uuid: str | uuid.UUID, timeout: float | None = 60.0
    ) -> TaskResponse:
        """Return the task as soon as it is complete, in error, cancelled or resolved manually.

        Listens for the engine's task notifications (no polling; the state is re-read every
        few seconds only as a safety net). `timeout=None` waits without limit; running out of
        time raises `TaskTimeoutError` (a `TimeoutError`) and leaves the task alone.
        """
        task = _uuid_text(task_uuid, "task uuid")
        if timeout is not None and (isinstance(timeout, bool) or timeout < 0):
            raise ValidationError(
                f"timeout must be a number of seconds >= 0 or None, got {timeout!r}",
                error_code="invalid_argument",
            )
        await self._get_pool()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        event = self._events.subscribe(task)
        current: TaskResponse | None = None
        try:
            while True:
                lost: TaskerError | None = None
                try:
                    # Listen first, then read: a change committed after the read sets the event.
                    await self._events.ensure_listening()
                    event.clear()
                    current = await self.get_task(task)
                except (ConnectionLostError, DatabaseNotFoundError) as exc:
                    if current is None:
                        raise  # never reached the task: report it at once
                    # Once waiting, a lost session (a database restart) is retried at the
                    # next re-check rather than ending the wait.
                    lost = exc
                    logger.warning("waiting for task %s: %s; retrying", task, exc)
                else:
                    if current.is_final:
                        return current
                wait = WAIT_RECHECK_SECONDS
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TaskTimeoutError(task, current.status, float(timeout or 0)) from lost
                    wait = min(wait, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait)
        finally:
            self._events.unsubscribe(task, event)

    # --- steps -------------------------------------------------------------------------------

    async def list_task_steps(self, task_uuid: str | uuid.UUID) -> list[StepResponse]:
        """Every step of the task in template order, with readiness and its reason."""
        task = _uuid_text(task_uuid, "task uuid")
        async with self._session() as conn:
            rows = await conn.step_rows(task)
            if not rows:  # every task has a step: none means no such task
                await self._require_task(conn, task)
        return [StepResponse.from_row(r) for r in rows]

    async def list_steps_not_created(self, task_uuid: str | uuid.UUID) -> list[StepNotCreated]:
        """The template steps the task has no row for, in template order, each with why: a
        branch its decision did not choose, a step waiting for its decision or fan-out, the
        template of batch workers. Empty for a task of a static template."""
        task = _uuid_text(task_uuid, "task uuid")
        async with self._session() as conn:
            rows = await conn.steps_not_created_rows(task)
            if not rows:
                await self._require_task(conn, task)
        return [StepNotCreated(name=r["name"], reason=r["reason"]) for r in rows]

    @staticmethod
    async def _require_task(conn: db.Connection, task: str) -> None:
        # Whether step_readiness runs (and raises task_not_found) depends on the plan; ask.
        if not await conn.task_exists(task):
            raise NotFoundError(f"task {task} does not exist", error_code="task_not_found")

    async def get_step(
        self, task_uuid: str | uuid.UUID, step_uuid: str | uuid.UUID
    ) -> StepResponse:
        """One step of the task; NotFoundError when the task has no such step."""
        task = _uuid_text(task_uuid, "task uuid")
        step = _uuid_text(step_uuid, "step uuid")
        async with self._session() as conn:
            rows = await conn.step_rows(task, step)
            if not rows:
                await self._require_task(conn, task)
                raise NotFoundError(
                    f"step {step} does not exist in task {task}", error_code="step_not_found"
                )
        return StepResponse.from_row(rows[0])

    async def get_step_audit_history(
        self, task_uuid: str | uuid.UUID, step_uuid: str | uuid.UUID
    ) -> list[StepAuditResponse]:
        """Every state change of the step, oldest first."""
        task = _uuid_text(task_uuid, "task uuid")
        step = _uuid_text(step_uuid, "step uuid")
        async with self._session() as conn:
            rows = await conn.step_audit_rows(task, step)
            # Every step has at least its creation row: none means an unknown task or step.
            if not rows:
                await self._require_task(conn, task)
                raise NotFoundError(
                    f"step {step} does not exist in task {task}", error_code="step_not_found"
                )
        return [StepAuditResponse.from_row(r) for r in rows]

    async def retry_step(self, step_uuid: str | uuid.UUID) -> dict[str, Any]:
        """Send a step in error back to the queue with fresh attempts (tasker.retry_step);
        returns its summary (step_uuid, state, task_uuid, task_state)."""
        step = _uuid_text(step_uuid, "step uuid")
        async with self._session() as conn:
            return dict(await conn.retry_step(step))

    async def retry_failed(
        self,
        namespace: str,
        name: str | None = None,
        *,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = REDRIVE_BATCH,
        dry_run: bool = False,
        reason: str | None = None,
    ) -> RedriveResponse:
        """Redrive dead letters, one batch (tasker.retry_failed): every step in error of the
        `limit` (1 to 1000) oldest tasks in error of `namespace` (of template `name` when
        given) that entered error at or after `since` and before `before` (each optional,
        timezone-aware) is retried as `retry_step` does it; `reason` is recorded in the
        steps' transitions with who asked. With `dry_run` nothing changes and the response
        says what would be retried."""
        namespace, name, limit = _redrive_arguments(namespace, name, since, before, limit, reason)
        async with self._session() as conn:
            rows = await conn.retry_failed(
                namespace,
                name,
                since=since,
                before=before,
                limit=limit,
                dry_run=bool(dry_run),
                reason=reason,
            )
        return _redrive_response(namespace, name, since, before, dry_run, [rows])

    async def retry_all_failed(
        self,
        namespace: str,
        name: str | None = None,
        *,
        since: datetime | None = None,
        max_tasks: int | None = None,
        batch_size: int = REDRIVE_BATCH,
        reason: str | None = None,
    ) -> RedriveResponse:
        """`retry_failed` in batches of `batch_size` (one transaction each), oldest first,
        until no task is left that entered error at or after `since` and before this call
        started (by the database's clock), or `max_tasks` tasks were matched. A task that fails
        again while this runs is therefore not retried twice."""
        namespace, name, batch_size = _redrive_arguments(
            namespace, name, since, None, batch_size, reason
        )
        if max_tasks is not None and (
            isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1
        ):
            raise ValidationError(
                f"max_tasks must be a whole number >= 1 or None, got {max_tasks!r}",
                error_code="invalid_argument",
            )
        batches: list[list[db.Row]] = []
        left = max_tasks
        async with self._session() as conn:
            before = await conn.database_now()
            while left is None or left > 0:
                size = batch_size if left is None else min(batch_size, left)
                rows = await conn.retry_failed(
                    namespace, name, since=since, before=before, limit=size, reason=reason
                )
                batches.append(rows)
                if left is not None:
                    left -= len(rows)
                # Tasks of a full batch that were not retried (another operator took them
                # meanwhile) are no longer in error, so the next batch does not match them.
                if len(rows) < size:
                    break
        return _redrive_response(namespace, name, since, before, False, batches)

    async def resolve_step(self, step_uuid: str | uuid.UUID, result: Any = None) -> dict[str, Any]:
        """Complete an unfinished step by hand with `result`, satisfying its dependents
        (tasker.resolve_step); returns its summary."""
        step = _uuid_text(step_uuid, "step uuid")
        _json_check(result, "step result", "invalid_result")
        async with self._session() as conn:
            return dict(await conn.resolve_step(step, result))

    # --- schedules ---------------------------------------------------------------------------

    async def create_schedule(
        self,
        name: str,
        *,
        namespace: str,
        template: str,
        cron: str,
        time_zone: str = "UTC",
        context: Mapping[str, Any] | None = None,
        overlap: str = "skip",
        catchup_window: timedelta = timedelta(hours=1),
        version: str | None = None,
        enabled: bool = True,
    ) -> ScheduleResponse:
        """Create a cron schedule (tasker.create_schedule): every slot of `cron` in
        `time_zone` creates a task of the template (`version` None: the newest at each firing)
        with `context`. `overlap`: skip (no task while the last one is pending or running),
        allow, or cancel_previous; `catchup_window`: after downtime, missed slots at most this
        old still fire (1 minute to 366 days)."""
        _json_check(dict(context or {}), "schedule context", "invalid_context")
        async with self._session() as conn:
            row = await conn.create_schedule(
                name,
                namespace,
                template,
                cron,
                time_zone=time_zone,
                context=context,
                overlap=overlap,
                catchup_window=catchup_window,
                version=version,
                enabled=enabled,
            )
        return ScheduleResponse.from_row(row)

    async def list_schedules(self) -> list[ScheduleResponse]:
        """Every schedule, by name, with its next and last fire and its last task's state."""
        async with self._session() as conn:
            rows = await conn.list_schedules()
        return [ScheduleResponse.from_row(r) for r in rows]

    async def pause_schedule(self, name: str) -> ScheduleResponse:
        """Stop a schedule firing until `resume_schedule` (tasker.pause_schedule)."""
        async with self._session() as conn:
            return ScheduleResponse.from_row(await conn.change_schedule("pause", name))

    async def resume_schedule(self, name: str) -> ScheduleResponse:
        """Fire a paused schedule again from its first slot after now (the pause is not
        caught up)."""
        async with self._session() as conn:
            return ScheduleResponse.from_row(await conn.change_schedule("resume", name))

    async def delete_schedule(self, name: str) -> bool:
        """Delete a schedule (its tasks stay); False when there was none."""
        async with self._session() as conn:
            return await conn.delete_schedule(name)

    async def trigger_schedule(self, name: str) -> str:
        """Create a task of a schedule now, whatever its overlap policy; its uuid."""
        async with self._session() as conn:
            return str(await conn.trigger_schedule(name))

    async def backfill_schedule(
        self, name: str, start: datetime, end: datetime | None = None, *, limit: int = 1000
    ) -> list[ScheduleFire]:
        """Create the tasks of every slot from `start` to `end` (both included, timezone-aware;
        `end` None or in the future: now), at most `limit` (1 to 10000), oldest first. A slot
        that already fired keeps its task (action `existing`), so a backfill can be repeated."""
        for value, what in ((start, "start"), (end, "end")):
            if value is not None and value.tzinfo is None:
                raise ValidationError(
                    f"{what} must be timezone-aware", error_code="invalid_argument"
                )
        async with self._session() as conn:
            rows = await conn.backfill_schedule(name, start, end, limit)
        return [
            ScheduleFire(
                schedule_name=name,
                slot=r["slot"],
                task_uuid=str(r["task_uuid"]),
                action="created" if r["created"] else "existing",
            )
            for r in rows
        ]

    async def fire_due_schedules(self, *, limit: int = 1000) -> list[ScheduleFire]:
        """Fire every due slot now (tasker.fire_due_schedules; workers do it periodically)."""
        async with self._session() as conn:
            rows = await conn.fire_due_schedules(limit)
        return [
            ScheduleFire(
                schedule_name=r["schedule_name"],
                slot=r["slot"],
                task_uuid=None if r["task_uuid"] is None else str(r["task_uuid"]),
                action=r["action"],
            )
            for r in rows
        ]

    # --- flow control ------------------------------------------------------------------------

    async def set_rate_limit(
        self, name: str, per_second: float, burst: int | None = None
    ) -> RateLimitResponse:
        """Create a rate limit, or change one (tasker.set_rate_limit): a token bucket that
        template steps name with `rate_limit: NAME`; each start of such a step takes a token,
        tokens come back at `per_second` (> 0, at most 1000000), at most `burst` (1 to 1000000;
        None: ceil(per_second)) held at once. A new bucket starts full; a changed one keeps
        its tokens, up to the new burst."""
        checked, rate, most = _rate_limit_arguments(name, per_second, burst)
        async with self._session() as conn:
            row = await conn.set_rate_limit(checked, rate, most)
        return RateLimitResponse.from_row(row)

    async def delete_rate_limit(self, name: str) -> bool:
        """Delete a rate limit (tasker.delete_rate_limit); False when there was none. A rate
        limit a template step names cannot be deleted: ValidationError `rate_limit_in_use`
        (set a higher rate instead)."""
        checked = _rate_limit_name(name)
        async with self._session() as conn:
            try:
                return await conn.delete_rate_limit(checked)
            except ValidationError as exc:
                if exc.sqlstate != "TV002":
                    raise
                refused = ValidationError(exc.message, error_code="rate_limit_in_use")
                refused.sqlstate = exc.sqlstate
                raise refused from None

    async def list_rate_limits(self) -> list[RateLimitResponse]:
        """Every rate limit, by name, with its tokens now (tasker.v_rate_limits)."""
        async with self._session() as conn:
            rows = await conn.list_rate_limits()
        return [RateLimitResponse.from_row(r) for r in rows]

    async def list_flow_lanes(
        self, namespace: str | None = None, *, limit: int = MAX_PAGE_SIZE
    ) -> list[FlowLaneResponse]:
        """The fairness lanes (tasker.v_flow_lanes) of a namespace, or of every one: by
        namespace, then in turn order (the lane served least first); at most `limit` (1 to
        1000). A namespace has lanes only while steps with a fairness key are queued or in
        progress."""
        queue = _text(namespace, "namespace", optional=True)
        most = _integer(limit, "limit", 1, MAX_PAGE_SIZE)
        async with self._session() as conn:
            rows = await conn.list_flow_lanes(queue, most)
        return [FlowLaneResponse.from_row(r) for r in rows]

    # --- durable waits ----------------------------------------------------------------------

    async def emit_event(self, name: str, key: str, payload: Any = None) -> db.EmittedEvent:
        """Emit an event (tasker.emit_event): every wait_for_event step waiting on `name` and
        `key` completes with `payload` as its result (None: {}); the event is kept (7 days by
        default) for steps that reach their wait later. Returns the event's id and how many
        steps it completed."""
        event = _text(name, "event name")
        event_key = _text(key, "event key")
        assert event is not None and event_key is not None
        _json_check(payload, "event payload", "invalid_argument")
        async with self._session() as conn:
            return await conn.emit_event(event, event_key, payload)

    # --- templates and health ----------------------------------------------------------------

    async def register_templates(self, path: str | Path) -> list[TemplateRegistration]:
        """Register the template YAML file at `path`, or every one in the directory, all in
        one transaction (all or none). Registering an unchanged template again is a no-op."""
        templates = await asyncio.to_thread(load_templates, path)
        registered: list[TemplateRegistration] = []
        async with self._session() as conn, conn.transaction():
            for template in templates:
                named_task_id = await conn.register_template(template.to_json())
                registered.append(TemplateRegistration.of(named_task_id, template))
        return registered

    async def health_check(
        self,
        *,
        min_workers: int = DEFAULT_MIN_WORKERS,
        worker_stale_after: float = DEFAULT_WORKER_STALE_AFTER,
        max_ready_age: float | None = DEFAULT_MAX_READY_AGE,
        max_expired_leases: int | None = DEFAULT_MAX_EXPIRED_LEASES,
        max_tasks_in_error: int | None = None,
    ) -> HealthResponse:
        """Is the database reachable, is its schema current, and does the engine work? Never
        raises for a database that cannot be reached or is outdated: the response says so.

        On a current schema it also reads `tasker.engine_metrics()` and the workers' heartbeat
        rows and checks: at least `min_workers` workers with a heartbeat within
        `worker_stale_after` seconds (default 0: reported only); the oldest ready step ready for
        at most `max_ready_age` seconds (default 300); at most `max_expired_leases` expired
        leases not yet recorded by a claim (default 100; workers record them within a poll
        interval, so a lasting count means no worker claims from that namespace); at most
        `max_tasks_in_error` tasks in error (default None: reported only). A None threshold
        reports the value without checking it. A failed check makes the status `degraded`
        (and `healthy` false); `checks` says which.
        """
        if self._closed:
            raise ClientClosedError(f"{type(self).__name__} is closed; create a new one")
        expected = sqlfiles.expected_version()
        reachable = False

        async def probe(conn: db.Connection) -> HealthResponse:
            nonlocal reachable
            reachable = True
            started = time.perf_counter()
            server_version = await conn.server_version()
            latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
            current = await db.schema_version(conn)
            message: str | None = None
            try:
                await db.check_schema(conn)
            except SchemaError as exc:
                message = exc.message
            if message is not None:
                return HealthResponse(
                    healthy=False,
                    status="schema_outdated",
                    database_reachable=True,
                    schema_version=current,
                    expected_schema_version=expected,
                    server_version=server_version,
                    latency_ms=latency_ms,
                    message=message,
                )
            workers = [_worker_status(r) for r in await conn.worker_rows()]
            engine = await conn.engine_metrics()

            def total(metric: str, label: str | None = None) -> float:
                return sum(
                    float(r["value"])
                    for r in engine
                    if r["metric"] == metric and (label is None or r["label"] == label)
                )

            alive = sum(1 for w in workers if w.heartbeat_age_seconds <= worker_stale_after)
            oldest = max(
                (float(r["value"]) for r in engine if r["metric"] == "oldest_ready_age_seconds"),
                default=0.0,
            )
            expired = int(total("expired_leases"))
            in_error = int(total("tasks", "error"))
            checks = [
                _health_check(
                    "workers_alive",
                    alive,
                    min_workers or None,
                    minimum=True,
                    what=f"worker(s) with a heartbeat within {worker_stale_after:g}s",
                ),
                _health_check(
                    "oldest_ready_age_seconds",
                    round(oldest, 3),
                    max_ready_age,
                    what="seconds the oldest ready step has waited",
                ),
                _health_check(
                    "expired_leases", expired, max_expired_leases, what="expired lease(s)"
                ),
                _health_check(
                    "tasks_in_error", in_error, max_tasks_in_error, what="task(s) in error"
                ),
            ]
            failed = [c for c in checks if not c.ok]
            return HealthResponse(
                healthy=not failed,
                status="degraded" if failed else "healthy",
                database_reachable=True,
                schema_version=current,
                expected_schema_version=expected,
                server_version=server_version,
                latency_ms=latency_ms,
                message="; ".join(c.message for c in failed) or None,
                workers=workers,
                workers_alive=alive,
                ready_steps=int(total("ready_steps")),
                oldest_ready_age_seconds=round(oldest, 3),
                expired_leases=expired,
                tasks_in_error=in_error,
                checks=checks,
            )

        async def run() -> HealthResponse:
            # The pool exists only once the schema was found current; before that (and when
            # it is outdated) a session of its own answers, without the schema check.
            if self._pool is not None:
                async with self._pool.acquire() as conn:
                    return await probe(conn)
            conn = await db.connect(self.dsn, check_schema=False, timeout=self.connect_timeout)
            try:
                return await probe(conn)
            finally:
                await conn.close()

        try:
            async with asyncio.timeout(self.connect_timeout):
                return await run()
        except (TaskerError, TimeoutError) as exc:
            message = (
                str(exc)
                if isinstance(exc, TaskerError)
                else f"the database did not answer within {self.connect_timeout:g} s"
            )
            return HealthResponse(
                healthy=False,
                status="unhealthy",
                database_reachable=reachable,
                schema_version=None,
                expected_schema_version=expected,
                server_version=None,
                latency_ms=None,
                message=message,
            )


# --- the sync client -------------------------------------------------------------------------


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


class TaskerClient:
    """The blocking client: the methods of `AsyncTaskerClient`, each returning its result.

    Calls run on an event loop in a background thread owned by this client (started on first
    use), so the client can be shared by threads and used where an event loop already runs.
    Close it with `close()` or `with TaskerClient() as client:`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        initiator: str = DEFAULT_INITIATOR,
        source_system: str = DEFAULT_SOURCE_SYSTEM,
        connect_timeout: float = 10,
    ) -> None:
        self._client = AsyncTaskerClient(
            dsn,
            initiator=initiator,
            source_system=source_system,
            connect_timeout=connect_timeout,
        )
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return repr(self._client).replace("AsyncTaskerClient", "TaskerClient", 1)

    @property
    def dsn(self) -> str | None:
        return self._client.dsn

    @property
    def initiator(self) -> str:
        return self._client.initiator

    @property
    def source_system(self) -> str:
        return self._client.source_system

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connections and stop the background thread; calling it again does
        nothing. Calls still running in other threads are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("TaskerClient.close() cannot be called from its own loop thread")
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    async def _shutdown(self) -> None:
        # Calls still running first (they may hold pool sessions the pool would wait for).
        current = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._client.close()
        loop = asyncio.get_running_loop()
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's loop and wait for its result in this thread."""
        with self._lock:
            if self._closed:
                coro.close()
                raise ClientClosedError("TaskerClient is closed; create a new one")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_run_loop, args=(loop,), name="tasker-pg-client", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            # Submitted under the lock: close() cannot stop the loop between check and submit.
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in the caller (Ctrl-C during wait_for_task): stop the call too.
            future.cancel()
            raise

    # --- the methods -------------------------------------------------------------------------

    def create_task(
        self,
        name: str,
        *,
        namespace: str,
        context: Mapping[str, Any] | None = None,
        version: str | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> TaskResponse:
        """See `AsyncTaskerClient.create_task`."""
        return self._run(
            self._client.create_task(
                name,
                namespace=namespace,
                context=context,
                version=version,
                reason=reason,
                **kwargs,
            )
        )

    def create_tasks(
        self,
        name: str,
        *,
        namespace: str,
        contexts: Sequence[Mapping[str, Any] | None],
        version: str | None = None,
        **options: Any,
    ) -> list[str]:
        """See `AsyncTaskerClient.create_tasks`."""
        return self._run(
            self._client.create_tasks(
                name, namespace=namespace, contexts=contexts, version=version, **options
            )
        )

    def get_task(self, task_uuid: str | uuid.UUID) -> TaskResponse:
        """See `AsyncTaskerClient.get_task`."""
        return self._run(self._client.get_task(task_uuid))

    def list_tasks(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        namespace: str | None = None,
        status: str | None = None,
    ) -> TaskListResponse:
        """See `AsyncTaskerClient.list_tasks`."""
        return self._run(
            self._client.list_tasks(limit=limit, offset=offset, namespace=namespace, status=status)
        )

    def cancel_task(self, task_uuid: str | uuid.UUID, reason: str | None = None) -> dict[str, Any]:
        """See `AsyncTaskerClient.cancel_task`."""
        return self._run(self._client.cancel_task(task_uuid, reason))

    def wait_for_task(
        self, task_uuid: str | uuid.UUID, timeout: float | None = 60.0
    ) -> TaskResponse:
        """See `AsyncTaskerClient.wait_for_task`."""
        return self._run(self._client.wait_for_task(task_uuid, timeout))

    def list_task_steps(self, task_uuid: str | uuid.UUID) -> list[StepResponse]:
        """See `AsyncTaskerClient.list_task_steps`."""
        return self._run(self._client.list_task_steps(task_uuid))

    def list_steps_not_created(self, task_uuid: str | uuid.UUID) -> list[StepNotCreated]:
        """See `AsyncTaskerClient.list_steps_not_created`."""
        return self._run(self._client.list_steps_not_created(task_uuid))

    def get_step(self, task_uuid: str | uuid.UUID, step_uuid: str | uuid.UUID) -> StepResponse:
        """See `AsyncTaskerClient.get_step`."""
        return self._run(self._client.get_step(task_uuid, step_uuid))

    def get_step_audit_history(
        self, task_uuid: str | uuid.UUID, step_uuid: str | uuid.UUID
    ) -> list[StepAuditResponse]:
        """See `AsyncTaskerClient.get_step_audit_history`."""
        return self._run(self._client.get_step_audit_history(task_uuid, step_uuid))

    def retry_step(self, step_uuid: str | uuid.UUID) -> dict[str, Any]:
        """See `AsyncTaskerClient.retry_step`."""
        return self._run(self._client.retry_step(step_uuid))

    def retry_failed(
        self,
        namespace: str,
        name: str | None = None,
        *,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = REDRIVE_BATCH,
        dry_run: bool = False,
        reason: str | None = None,
    ) -> RedriveResponse:
        """See `AsyncTaskerClient.retry_failed`."""
        return self._run(
            self._client.retry_failed(
                namespace,
                name,
                since=since,
                before=before,
                limit=limit,
                dry_run=dry_run,
                reason=reason,
            )
        )

    def retry_all_failed(
        self,
        namespace: str,
        name: str | None = None,
        *,
        since: datetime | None = None,
        max_tasks: int | None = None,
        batch_size: int = REDRIVE_BATCH,
        reason: str | None = None,
    ) -> RedriveResponse:
        """See `AsyncTaskerClient.retry_all_failed`."""
        return self._run(
            self._client.retry_all_failed(
                namespace,
                name,
                since=since,
                max_tasks=max_tasks,
                batch_size=batch_size,
                reason=reason,
            )
        )

    def resolve_step(self, step_uuid: str | uuid.UUID, result: Any = None) -> dict[str, Any]:
        """See `AsyncTaskerClient.resolve_step`."""
        return self._run(self._client.resolve_step(step_uuid, result))

    def create_schedule(
        self,
        name: str,
        *,
        namespace: str,
        template: str,
        cron: str,
        time_zone: str = "UTC",
        context: Mapping[str, Any] | None = None,
        overlap: str = "skip",
        catchup_window: timedelta = timedelta(hours=1),
        version: str | None = None,
        enabled: bool = True,
    ) -> ScheduleResponse:
        """See `AsyncTaskerClient.create_schedule`."""
        return self._run(
            self._client.create_schedule(
                name,
                namespace=namespace,
                template=template,
                cron=cron,
                time_zone=time_zone,
                context=context,
                overlap=overlap,
                catchup_window=catchup_window,
                version=version,
                enabled=enabled,
            )
        )

    def list_schedules(self) -> list[ScheduleResponse]:
        """See `AsyncTaskerClient.list_schedules`."""
        return self._run(self._client.list_schedules())

    def pause_schedule(self, name: str) -> ScheduleResponse:
        """See `AsyncTaskerClient.pause_schedule`."""
        return self._run(self._client.pause_schedule(name))

    def resume_schedule(self, name: str) -> ScheduleResponse:
        """See `AsyncTaskerClient.resume_schedule`."""
        return self._run(self._client.resume_schedule(name))

    def delete_schedule(self, name: str) -> bool:
        """See `AsyncTaskerClient.delete_schedule`."""
        return self._run(self._client.delete_schedule(name))

    def trigger_schedule(self, name: str) -> str:
        """See `AsyncTaskerClient.trigger_schedule`."""
        return self._run(self._client.trigger_schedule(name))

    def backfill_schedule(
        self, name: str, start: datetime, end: datetime | None = None, *, limit: int = 1000
    ) -> list[ScheduleFire]:
        """See `AsyncTaskerClient.backfill_schedule`."""
        return self._run(self._client.backfill_schedule(name, start, end, limit=limit))

    def fire_due_schedules(self, *, limit: int = 1000) -> list[ScheduleFire]:
        """See `AsyncTaskerClient.fire_due_schedules`."""
        return self._run(self._client.fire_due_schedules(limit=limit))

    def set_rate_limit(
        self, name: str, per_second: float, burst: int | None = None
    ) -> RateLimitResponse:
        """See `AsyncTaskerClient.set_rate_limit`."""
        return self._run(self._client.set_rate_limit(name, per_second, burst))

    def delete_rate_limit(self, name: str) -> bool:
        """See `AsyncTaskerClient.delete_rate_limit`."""
        return self._run(self._client.delete_rate_limit(name))

    def list_rate_limits(self) -> list[RateLimitResponse]:
        """See `AsyncTaskerClient.list_rate_limits`."""
        return self._run(self._client.list_rate_limits())

    def list_flow_lanes(
        self, namespace: str | None = None, *, limit: int = MAX_PAGE_SIZE
    ) -> list[FlowLaneResponse]:
        """See `AsyncTaskerClient.list_flow_lanes`."""
        return self._run(self._client.list_flow_lanes(namespace, limit=limit))

    def emit_event(self, name: str, key: str, payload: Any = None) -> db.EmittedEvent:
        """See `AsyncTaskerClient.emit_event`."""
        return self._run(self._client.emit_event(name, key, payload))

    def register_templates(self, path: str | Path) -> list[TemplateRegistration]:
        """See `AsyncTaskerClient.register_templates`."""
        return self._run(self._client.register_templates(path))

    def health_check(
        self,
        *,
        min_workers: int = DEFAULT_MIN_WORKERS,
        worker_stale_after: float = DEFAULT_WORKER_STALE_AFTER,
        max_ready_age: float | None = DEFAULT_MAX_READY_AGE,
        max_expired_leases: int | None = DEFAULT_MAX_EXPIRED_LEASES,
        max_tasks_in_error: int | None = None,
    ) -> HealthResponse:
        """See `AsyncTaskerClient.health_check`."""
        return self._run(
            self._client.health_check(
                min_workers=min_workers,
                worker_stale_after=worker_stale_after,
                max_ready_age=max_ready_age,
                max_expired_leases=max_expired_leases,
                max_tasks_in_error=max_tasks_in_error,
            )
        )


def _health_check(
    name: str, value: float, threshold: float | None, *, what: str, minimum: bool = False
) -> HealthCheck:
    """`value` held to `threshold` (at least it when `minimum`, else at most; None: reported)."""
    if threshold is None:
        return HealthCheck(name, True, value, None, f"{value:g} {what}")
    ok = value >= threshold if minimum else value <= threshold
    bound = "at least" if minimum else "at most"
    return HealthCheck(name, ok, value, threshold, f"{value:g} {what} ({bound} {threshold:g})")


def _worker_status(row: db.Row) -> WorkerStatus:
    return WorkerStatus(
        worker_id=row["worker_id"],
        host=row["host"],
        pid=row["pid"],
        status=row["status"],
        heartbeat_age_seconds=round(float(row["heartbeat_age"]), 3),
        in_flight=int(row["in_flight"]),
        namespaces=list(row["namespaces"] or []),
        missing_handlers=dict(row["missing_handlers"] or {}),
    )
