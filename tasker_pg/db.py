"""The one module that talks to asyncpg.

Everything else in tasker-pg goes through `Connection` (and `Pool`): they set the JSON codecs,
check the schema version on connect, and translate asyncpg's exceptions into the project's own
in one place (`translate_error`). The queue layer's thin wrapper lives here too.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from tasker_pg import jsonutil, queries, sqlfiles
from tasker_pg.dsn import ResolvedDsn, no_database_message, resolve_dsn
from tasker_pg.errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseError,
    DatabaseNotFoundError,
    InvalidStateError,
    NotFoundError,
    SchemaError,
    TaskerError,
    TransientDatabaseError,
    ValidationError,
)
from tasker_pg.rows import ClaimedStep

Row = Mapping[str, Any]
NotificationHandler = Callable[[str, str], None]

# Our own SQLSTATEs (raised by the SQL functions): class letter -> exception type.
_SQLSTATE_CLASSES: dict[str, type[TaskerError]] = {
    "TV": ValidationError,
    "TN": NotFoundError,
    "TS": InvalidStateError,
}
# Stable error codes for the SQLSTATEs the SQL side raises.
SQLSTATE_ERROR_CODES: dict[str, str] = {
    "TV001": "invalid_queue_name",
    "TV002": "invalid_argument",
    "TN001": "queue_not_found",
    "TV010": "invalid_template",
    "TV011": "template_version_conflict",
    "TV020": "invalid_context",
    "TV021": "payload_too_large",
    "TV022": "invalid_option",
    "TV030": "invalid_outcome",
    "TV031": "invalid_claims",
    "TV040": "invalid_schedule",
    "TN002": "template_not_found",
    "TN003": "task_not_found",
    "TN004": "step_not_found",
    "TN005": "schedule_not_found",
    "TS001": "task_finished",
    "TS002": "step_not_in_error",
    "TS003": "step_finished",
    "TS004": "queue_has_live_steps",
    "TS005": "engine_queue",
}
# How a SQLSTATE is treated by code that must decide whether to send something again (the
# worker's delivery of outcomes). Longest matching prefix wins; see `classify_sqlstate`.
#   refusal: the database looked at what was sent and said no, and would say no again: our own
#     TVxxx (bad input), TNxxx (not found) and TSxxx (wrong state), data exceptions (22xxx:
#     value too long, invalid text representation, untranslatable character) and program
#     limits (54xxx: a jsonb value too large).
#   connection: the session is gone (08xxx, and 57Pxx: admin or crash shutdown).
#   transient: anything else, by name or not: serialization failures and deadlocks (40xxx),
#     insufficient resources (53xxx: out of memory, disk full, too many connections),
#     lock_not_available (55P03, lock_timeout), query_canceled (57014: statement_timeout, a
#     cancel request). An error nobody recognises is never taken for a verdict.
SqlstateClass = Literal["refusal", "transient", "connection"]
_SQLSTATE_CLASSIFICATION: dict[str, SqlstateClass] = {
    "TV": "refusal",
    "TN": "refusal",
    "TS": "refusal",
    "22": "refusal",
    "54": "refusal",
    "08": "connection",
    "57P": "connection",
    "40": "transient",
    "53": "transient",
    "55P03": "transient",
    "57014": "transient",
}
_CONNECTION_SQLSTATE_PREFIXES = tuple(
    p for p, c in _SQLSTATE_CLASSIFICATION.items() if c == "connection"
)
_TRANSIENT_SQLSTATE_PREFIXES = tuple(
    p for p, c in _SQLSTATE_CLASSIFICATION.items() if c == "transient"
)


def classify_sqlstate(sqlstate: str | None) -> SqlstateClass:
    """Whether an error with this SQLSTATE is a refusal, transient, or a lost connection.

    A refusal is deterministic (the same statement with the same values fails the same way);
    anything not known to be one, an unknown or missing SQLSTATE included, is transient.
    """
    if not sqlstate:
        return "transient"
    for length in (5, 3, 2):
        found = _SQLSTATE_CLASSIFICATION.get(sqlstate[:length])
        if found is not None:
            return found
    return "transient"


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` says the database refused what was sent, and would refuse it again.

    True for the refusal SQLSTATEs of `classify_sqlstate` and for a value the driver refused
    to encode before sending it (a `ValidationError` without a SQLSTATE). False for everything
    else, unknown errors included: code that holds something it must not lose (an outcome)
    sends it again instead of giving up on it.
    """
    if not isinstance(exc, TaskerError) or isinstance(exc, TransientDatabaseError):
        return False
    if exc.sqlstate:
        return classify_sqlstate(exc.sqlstate) == "refusal"
    return isinstance(exc, ValidationError)


SERVER_SETTINGS = {
    "application_name": "tasker-pg",
    # JIT compilation costs milliseconds on queries that run in microseconds.
    "jit": "off",
}


def translate_error(exc: BaseException) -> TaskerError:
    """Turn an asyncpg/OS-level exception into the matching tasker-pg exception."""
    if isinstance(exc, TaskerError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate: str | None = getattr(exc, "sqlstate", None)
        message = str(getattr(exc, "message", None) or exc)
        hint = getattr(exc, "hint", None)
        if hint:
            message = f"{message} (hint: {hint})"
        position_text = getattr(exc, "position", None)
        position = int(position_text) - 1 if position_text else None
        error: TaskerError
        if sqlstate and sqlstate[:2] in _SQLSTATE_CLASSES:
            cls = _SQLSTATE_CLASSES[sqlstate[:2]]
            error = cls(message, error_code=SQLSTATE_ERROR_CODES.get(sqlstate))
        elif sqlstate and sqlstate.startswith(_CONNECTION_SQLSTATE_PREFIXES):
            error = ConnectionLostError(message, sqlstate=sqlstate)
        elif sqlstate and sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            error = TransientDatabaseError(message, sqlstate=sqlstate, position=position)
        else:
            error = DatabaseError(message, sqlstate=sqlstate, position=position)
        error.sqlstate = sqlstate
        return error
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        # asyncpg refused a query argument before sending it (e.g. a value the JSON codec
        # cannot encode): bad input, not a broken connection.
        return ValidationError(f"invalid query argument: {exc}", error_code="invalid_argument")
    if isinstance(
        exc,
        asyncpg.ClientConfigurationError
        | asyncpg.exceptions._base.UnsupportedClientFeatureError
        | asyncpg.exceptions._base.UnsupportedServerFeatureError,
    ):
        return DatabaseError(f"{type(exc).__name__}: {exc}")
    if isinstance(
        exc,
        asyncpg.ConnectionDoesNotExistError
        | asyncpg.InterfaceError
        # raised by a connection whose backend was terminated while it sat idle
        | asyncpg.InternalClientError
        | ConnectionError
        | OSError
        | TimeoutError,
    ):
        return ConnectionLostError(f"lost the database connection: {exc or type(exc).__name__}")
    return DatabaseError(f"{type(exc).__name__}: {exc}")


_TRANSLATED = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


@contextlib.contextmanager
def _translating() -> Iterator[None]:
    try:
        yield
    except _TRANSLATED as exc:
        raise translate_error(exc) from exc


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for messages and logs."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


async def _init_connection(raw: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await raw.set_type_codec(
            typename,
            encoder=jsonutil.dumps,
            decoder=jsonutil.loads,
            schema="pg_catalog",
            format="text",
        )


@dataclass(frozen=True)
class Message:
    """A queue message as `read`/`pop`/`set_vt` return it."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    priority: int
    message: Any

    @classmethod
    def from_row(cls, row: Row) -> Message:
        return cls(
            msg_id=row["msg_id"],
            read_ct=row["read_ct"],
            enqueued_at=row["enqueued_at"],
            vt=row["vt"],
            priority=row["priority"],
            message=row["message"],
        )


@dataclass(frozen=True)
class QueueMetrics:
    """`tasker.metrics(queue)`: length, visible now, newest/oldest age, total ever sent."""

    queue_name: str
    queue_length: int
    queue_visible_length: int
    newest_msg_age_sec: float | None
    oldest_msg_age_sec: float | None
    total_messages: int
    scrape_time: datetime

    @classmethod
    def from_row(cls, row: Row) -> QueueMetrics:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PurgeCounts:
    """What `tasker.purge_finished` deleted (summed over batches by `+`); `more`: call again."""

    tasks: int = 0
    steps: int = 0
    step_edges: int = 0
    step_transitions: int = 0
    task_transitions: int = 0
    archived_messages: int = 0
    idempotency_keys_kept: int = 0
    idempotency_keys_expired: int = 0
    more: bool = False

    @classmethod
    def from_row(cls, row: Row) -> PurgeCounts:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def __add__(self, other: PurgeCounts) -> PurgeCounts:
        return PurgeCounts(
            **{
                k: getattr(self, k) + getattr(other, k)
                for k in self.__dataclass_fields__
                if k != "more"
            },
            more=other.more,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class EmittedEvent:
    """What `tasker.emit_event` did: the stored event's id and how many waiting steps it
    completed."""

    event_id: int
    completed_steps: int

    @classmethod
    def from_row(cls, row: Row) -> EmittedEvent:
        return cls(event_id=int(row["event_id"]), completed_steps=int(row["completed_steps"]))

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "completed_steps": self.completed_steps}


@dataclass(frozen=True)
class WakeCounts:
    """What one `tasker.wake_waits` call did; `more`: a full batch was due, call again."""

    completed: int = 0
    timed_out: int = 0
    rechecked: int = 0
    events_deleted: int = 0
    more: bool = False

    @classmethod
    def from_row(cls, row: Row) -> WakeCounts:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


class Connection:
    """One database session; every call translates errors into tasker-pg exceptions."""

    def __init__(self, raw: asyncpg.Connection, source: str = "") -> None:
        self._raw = raw
        self.source = source

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def raw(self) -> asyncpg.Connection:
        """The asyncpg connection, for code in this module's family only (tests, benchmarks)."""
        return self._raw

    @property
    def backend_pid(self) -> int:
        return int(self._raw.get_server_pid())

    def is_closed(self) -> bool:
        return bool(self._raw.is_closed())

    async def close(self) -> None:
        with contextlib.suppress(*_TRANSLATED):
            await self._raw.close(timeout=5)

    def terminate(self) -> None:
        self._raw.terminate()

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        with _translating():
            return str(await self._raw.execute(query, *args, timeout=timeout))

    async def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> None:
        with _translating():
            await self._raw.executemany(query, args)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Row]:
        with _translating():
            return list(await self._raw.fetch(query, *args, timeout=timeout))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Row | None:
        with _translating():
            row: Row | None = await self._raw.fetchrow(query, *args, timeout=timeout)
            return row

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        with _translating():
            return await self._raw.fetchval(query, *args, timeout=timeout)

    @contextlib.asynccontextmanager
    async def transaction(self, *, isolation: str | None = None) -> AsyncIterator[None]:
        """A transaction; errors raised at BEGIN/COMMIT are translated like any other."""
        with _translating():
            async with self._raw.transaction(isolation=isolation):
                yield

    async def listen(self, channel: str, handler: NotificationHandler) -> None:
        """Call `handler(channel, payload)` for each notification on `channel`."""

        def _callback(_conn: object, _pid: int, chan: str, payload: str) -> None:
            handler(chan, payload)

        with _translating():
            await self._raw.add_listener(channel, _callback)

    def on_termination(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once when the connection is lost or closed (an idle one too)."""

        def _callback(_conn: object) -> None:
            callback()

        self._raw.add_termination_listener(_callback)

    async def unlisten_all(self) -> None:
        with _translating():
            await self._raw.execute("UNLISTEN *")

    # --- queue layer -------------------------------------------------------------------------

    async def create_queue(self, queue: str) -> None:
        await self.execute("SELECT tasker.create_queue($1)", queue)

    async def drop_queue(self, queue: str) -> bool:
        return bool(await self.fetchval("SELECT tasker.drop_queue($1)", queue))

    async def send(
        self, queue: str, message: Any, *, delay_seconds: float = 0, priority: int = 0
    ) -> int:
        return int(
            await self.fetchval(
                "SELECT tasker.send($1, $2::jsonb, $3, $4)",
                queue,
                message,
                float(delay_seconds),
                priority,
            )
        )

    async def send_batch(
        self, queue: str, messages: Sequence[Any], *, delay_seconds: float = 0, priority: int = 0
    ) -> list[int]:
        rows = await self.fetch(
            "SELECT msg_id FROM tasker.send_batch($1, $2::jsonb[], $3, $4) AS msg_id",
            queue,
            list(messages),
            float(delay_seconds),
            priority,
        )
        return [int(r["msg_id"]) for r in rows]

    async def read(self, queue: str, vt_seconds: float, qty: int = 1) -> list[Message]:
        rows = await self.fetch(
            "SELECT * FROM tasker.read($1, $2, $3)", queue, float(vt_seconds), qty
        )
        return [Message.from_row(r) for r in rows]

    async def pop(self, queue: str, qty: int = 1) -> list[Message]:
        rows = await self.fetch("SELECT * FROM tasker.pop($1, $2)", queue, qty)
        return [Message.from_row(r) for r in rows]

    async def set_vt(self, queue: str, msg_id: int, vt_seconds: float) -> Message | None:
        row = await self.fetchrow(
            "SELECT * FROM tasker.set_vt($1, $2, $3)", queue, msg_id, float(vt_seconds)
        )
        return Message.from_row(row) if row else None

    async def delete(self, queue: str, msg_id: int) -> bool:
        return bool(await self.fetchval("SELECT tasker.delete($1, $2::bigint)", queue, msg_id))

    async def delete_batch(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        rows = await self.fetch(
            "SELECT msg_id FROM tasker.delete($1, $2::bigint[]) AS msg_id", queue, list(msg_ids)
        )
        return [int(r["msg_id"]) for r in rows]

    async def archive(self, queue: str, msg_id: int) -> bool:
        return bool(await self.fetchval("SELECT tasker.archive($1, $2::bigint)", queue, msg_id))

    async def archive_batch(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        rows = await self.fetch(
            "SELECT msg_id FROM tasker.archive($1, $2::bigint[]) AS msg_id", queue, list(msg_ids)
        )
        return [int(r["msg_id"]) for r in rows]

    async def purge_queue(self, queue: str) -> int:
        return int(await self.fetchval("SELECT tasker.purge_queue($1)", queue))

    async def metrics(self, queue: str) -> QueueMetrics:
        row = await self.fetchrow("SELECT * FROM tasker.metrics($1)", queue)
        assert row is not None
        return QueueMetrics.from_row(row)

    async def metrics_all(self) -> list[QueueMetrics]:
        rows = await self.fetch("SELECT * FROM tasker.metrics_all()")
        return [QueueMetrics.from_row(r) for r in rows]

    # --- workflow engine ---------------------------------------------------------------------

    async def register_template(self, template: Mapping[str, Any]) -> int:
        """Store a template version (canonical JSON body); returns its named_task_id."""
        return int(await self.fetchval("SELECT tasker.register_template($1::jsonb)", template))

    async def latest_templates(self, namespaces: Sequence[str]) -> list[Row]:
        """The newest registered version of every template of `namespaces`.

        One row per (namespace, name): namespace, name, version and the normalised template body.
        """
        return await self.fetch(
            """
            SELECT DISTINCT ON (nt.namespace, nt.name)
                   nt.namespace, nt.name, nt.version, nt.template
              FROM tasker.v_templates nt
             WHERE nt.namespace = ANY($1::text[])
             ORDER BY nt.namespace, nt.name, nt.version_major DESC, nt.version_minor DESC,
                      nt.version_patch DESC, nt.version_pre IS NULL DESC,
                      tasker._semver_pre_key(nt.version_pre) DESC
            """,
            list(namespaces),
        )

    async def create_task(
        self,
        namespace: str,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        version: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> uuid.UUID:
        """Create a task from a registered template; returns its uuid."""
        value = await self.fetchval(
            "SELECT tasker.create_task($1, $2, $3::jsonb, $4, $5::jsonb)",
            namespace,
            name,
            dict(context) if context is not None else {},
            version,
            dict(options or {}),
        )
        return value  # type: ignore[no-any-return]

    async def create_or_get_task(
        self,
        namespace: str,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        version: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[uuid.UUID, bool]:
        """`create_task`, and whether the task was created (False: its idempotency key
        returned the task created earlier)."""
        row = await self.fetchrow(
            "SELECT task_uuid, created"
            " FROM tasker.create_or_get_task($1, $2, $3::jsonb, $4, $5::jsonb)",
            namespace,
            name,
            dict(context) if context is not None else {},
            version,
            dict(options or {}),
        )
        assert row is not None
        return row["task_uuid"], bool(row["created"])

    async def create_tasks(
        self,
        namespace: str,
        name: str,
        contexts: Sequence[Mapping[str, Any]],
        *,
        version: str | None = None,
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> list[uuid.UUID]:
        """Create many tasks of one template in one set-based call; uuids in input order.

        `options` is one mapping for every task, or a sequence with one mapping per context.
        """
        opts: Any = dict(options) if isinstance(options, Mapping) else list(options or [{}])
        if options is None:
            opts = {}
        rows = await self.fetch(
            "SELECT t AS task_uuid FROM tasker.create_tasks($1, $2, $3::jsonb, $4, $5::jsonb) t",
            namespace,
            name,
            list(contexts),
            version,
            opts,
        )
        return [r["task_uuid"] for r in rows]

    async def claim_steps(
        self,
        queue: str,
        worker_id: str,
        qty: int,
        lease_seconds: float,
        *,
        visible_since: datetime | None = None,
    ) -> list[ClaimedStep]:
        """Claim up to `qty` ready steps of `queue`, each with everything its handler needs.

        `visible_since` limits the messages read to those visible since then (a claim window,
        see `tasker_pg.worker.window`); None reads every visible message."""
        rows = await self.claim_step_rows(
            queue, worker_id, qty, lease_seconds, visible_since=visible_since
        )
        return [ClaimedStep.from_row(r) for r in rows]

    async def claim_step_rows(
        self,
        queue: str,
        worker_id: str,
        qty: int,
        lease_seconds: float,
        *,
        visible_since: datetime | None = None,
    ) -> list[Row]:
        """`claim_steps` as the SQL function returns it (untyped rows), for tests of the SQL."""
        return await self.fetch(
            "SELECT * FROM tasker.claim_steps($1, $2, $3, $4, $5)",
            queue,
            worker_id,
            qty,
            float(lease_seconds),
            visible_since,
        )

    async def dependency_results(
        self,
        step_uuid: uuid.UUID | str,
        prefix: str | None = None,
        after: str | None = None,
        limit: int = 100,
        *,
        timeout: float | None = None,
    ) -> list[tuple[str, Any]]:
        """One page of a step's finished ancestors' results, `(name, result)` in name order
        (byte order): names starting with `prefix`, after `after`, at most `limit` (1..1000)."""
        rows = await self.fetch(
            "SELECT name, results FROM tasker.dependency_results($1::uuid, $2, $3, $4)",
            str(step_uuid),
            prefix,
            after,
            limit,
            timeout=timeout,
        )
        return [(str(r["name"]), r["results"]) for r in rows]

    async def complete_steps(self, outcomes: Sequence[Mapping[str, Any]]) -> list[Row]:
        """Apply a batch of outcomes; one row per outcome: step_uuid, attempt, status, detail."""
        return await self.fetch(
            "SELECT * FROM tasker.complete_steps($1::jsonb)", [dict(o) for o in outcomes]
        )

    async def complete_and_claim(
        self,
        outcomes: Sequence[Mapping[str, Any]],
        worker_id: str,
        handoff: int,
        lease_seconds: float,
    ) -> tuple[list[Row], list[ClaimedStep]]:
        """Apply a batch of outcomes and claim up to `handoff` of the children they made ready.

        Returns the outcome rows (step_uuid, attempt, status, detail; one per outcome, in
        order) and the steps handed off to `worker_id`, leased for `lease_seconds`."""
        rows = await self.fetch(
            "SELECT * FROM tasker.complete_and_claim($1::jsonb, $2, $3, $4)",
            [dict(o) for o in outcomes],
            worker_id,
            handoff,
            float(lease_seconds),
        )
        answers = [r for r in rows if r["status"] != "claimed"]
        if len(answers) == len(rows):
            return answers, []
        return answers, [ClaimedStep.from_row(r) for r in rows if r["status"] == "claimed"]

    async def extend_leases(
        self, claims: Sequence[Mapping[str, Any]], lease_seconds: float
    ) -> list[Row]:
        """Heartbeat: push the lease of each still-held claim to now + lease_seconds."""
        return await self.fetch(
            "SELECT * FROM tasker.extend_leases($1::jsonb, $2)",
            [dict(c) for c in claims],
            float(lease_seconds),
        )

    async def cancel_task(self, task_uuid: uuid.UUID | str, reason: str | None = None) -> Any:
        """Cancel every unfinished step of a task; returns a summary object."""
        return await self.fetchval(
            "SELECT tasker.cancel_task($1::uuid, $2)", str(task_uuid), reason
        )

    async def retry_step(self, step_uuid: uuid.UUID | str) -> Any:
        """Send a step in error back to the queue with fresh attempts."""
        return await self.fetchval("SELECT tasker.retry_step($1::uuid)", str(step_uuid))

    async def retry_failed(
        self,
        namespace: str,
        name: str | None = None,
        *,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 1000,
        dry_run: bool = False,
        reason: str | None = None,
    ) -> list[Row]:
        """Retry every step in error of the oldest `limit` tasks in error of a namespace (and
        template) that entered error in [since, before); one row per task matched."""
        return await self.fetch(
            "SELECT * FROM tasker.retry_failed($1, $2, $3, $4, $5, $6, $7)",
            namespace,
            name,
            since,
            limit,
            dry_run,
            before,
            reason,
        )

    async def database_now(self) -> datetime:
        """The database server's clock (clock_timestamp())."""
        value: datetime = await self.fetchval(queries.DATABASE_NOW)
        return value

    async def resolve_step(self, step_uuid: uuid.UUID | str, result: Any = None) -> Any:
        """Complete an unfinished step by hand with `result`; it satisfies its children."""
        return await self.fetchval(
            "SELECT tasker.resolve_step($1::uuid, $2::jsonb)", str(step_uuid), result
        )

    async def step_readiness(self, task_uuid: uuid.UUID | str) -> list[Row]:
        """Per step: ready or not, and why not in plain words."""
        return await self.fetch("SELECT * FROM tasker.step_readiness($1::uuid)", str(task_uuid))

    async def task_execution_context(self, task_uuid: uuid.UUID | str) -> Row | None:
        """Step counts per state, execution status and completion percentage of a task."""
        return await self.fetchrow(
            "SELECT * FROM tasker.task_execution_context($1::uuid)", str(task_uuid)
        )

    async def check_invariants(self) -> list[Row]:
        """Violations of the engine's invariants over the whole database (empty: healthy)."""
        return await self.fetch("SELECT * FROM tasker.check_invariants()")

    async def release_steps(
        self,
        claims: Sequence[Mapping[str, Any]],
        *,
        delay_seconds: float = 0.0,
        reason: str = "shutdown",
        worker_id: str | None = None,
    ) -> list[Row]:
        """Hand back claims whose handler never started, without spending an attempt.

        `reason` is `shutdown` or `handler_missing`; the message becomes visible again after
        `delay_seconds`; the `released` transition names `worker_id`.
        """
        return await self.fetch(
            "SELECT * FROM tasker.release_steps($1::jsonb, $2, $3, $4)",
            [dict(c) for c in claims],
            float(delay_seconds),
            reason,
            worker_id,
        )

    async def repair_messages(self) -> list[Row]:
        """`tasker.repair_messages()`: re-send lost messages, enqueue stranded ready steps.

        One row per repaired step (kind, step_uuid, task_uuid, namespace, step_state, msg_id);
        none when nothing needed repair or another session was repairing.
        """
        return await self.fetch("SELECT * FROM tasker.repair_messages()")

    async def purge_finished(self, batch: int = 1000) -> PurgeCounts:
        """`tasker.purge_finished`: one batch of tasks the namespaces' retention policies no
        longer keep, deleted with all their rows (its own transaction unless one is open).

        All zero when another session is purging; `more` when a full batch went: call again.
        """
        row = await self.fetchrow("SELECT * FROM tasker.purge_finished($1)", batch)
        assert row is not None
        return PurgeCounts.from_row(row)

    # --- schedules (sql/functions/87_schedules.sql) ----------------------------------------

    async def create_schedule(
        self,
        name: str,
        namespace: str,
        template: str,
        cron: str,
        *,
        time_zone: str = "UTC",
        context: Mapping[str, Any] | None = None,
        overlap: str = "skip",
        catchup_window: timedelta = timedelta(hours=1),
        version: str | None = None,
        enabled: bool = True,
    ) -> Row:
        """`tasker.create_schedule`: the new schedule's row (as `list_schedules` gives it)."""
        row = await self.fetchrow(
            "SELECT * FROM tasker.create_schedule($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            name,
            namespace,
            template,
            cron,
            time_zone,
            dict(context or {}),
            overlap,
            catchup_window,
            version,
            enabled,
        )
        assert row is not None
        return row

    async def list_schedules(self) -> list[Row]:
        """`tasker.list_schedules()`: every schedule with its next and last fire."""
        return await self.fetch("SELECT * FROM tasker.list_schedules()")

    async def change_schedule(self, action: str, name: str) -> Row:
        """`tasker.pause_schedule` or `tasker.resume_schedule` (`action`: pause, resume)."""
        if action not in ("pause", "resume"):
            raise ValueError(f"unknown schedule action {action!r}")
        row = await self.fetchrow(f"SELECT * FROM tasker.{action}_schedule($1)", name)
        assert row is not None
        return row

    async def delete_schedule(self, name: str) -> bool:
        """`tasker.delete_schedule`: False when there was no such schedule."""
        return bool(await self.fetchval("SELECT tasker.delete_schedule($1)", name))

    async def trigger_schedule(self, name: str) -> uuid.UUID:
        """`tasker.trigger_schedule`: the task created now."""
        task: uuid.UUID = await self.fetchval("SELECT tasker.trigger_schedule($1)", name)
        return task

    async def backfill_schedule(
        self, name: str, start: datetime, end: datetime | None, limit: int = 1000
    ) -> list[Row]:
        """`tasker.backfill_schedule`: one row (slot, task_uuid, created) per slot fired
        (`end` None or after now: now)."""
        return await self.fetch(
            "SELECT * FROM tasker.backfill_schedule($1, $2, $3, $4)", name, start, end, limit
        )

    async def fire_due_schedules(self, limit: int = 1000, *, exclusive: bool = False) -> list[Row]:
        """`tasker.fire_due_schedules`: one row per slot handled (schedule_name, slot,
        task_uuid, action). With `exclusive`, only when no other `exclusive` caller is firing
        (a transaction-level advisory lock; an empty list otherwise): what workers do, so one
        of them scans the schedules per interval."""
        if not exclusive:
            return await self.fetch("SELECT * FROM tasker.fire_due_schedules($1)", limit)
        async with self.transaction():
            if not await self.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtextextended('tasker.fire_due_schedules', 0))"
            ):
                return []
            return await self.fetch("SELECT * FROM tasker.fire_due_schedules($1)", limit)

    # --- flow control (sql/functions/55_flow.sql) ---------------------------------------------

    async def set_rate_limit(self, name: str, per_second: float, burst: int | None) -> Row:
        """`tasker.set_rate_limit`, then the bucket's row of `tasker.v_rate_limits` (one
        transaction unless one is open; `burst` None: ceil(per_second))."""
        async with self.transaction():
            await self.execute("SELECT tasker.set_rate_limit($1, $2, $3)", name, per_second, burst)
            row = await self.fetchrow("SELECT * FROM tasker.v_rate_limits WHERE name = $1", name)
        assert row is not None
        return row

    async def delete_rate_limit(self, name: str) -> bool:
        """`tasker.delete_rate_limit`: False when there was none (TV002 when a template step
        names it)."""
        return bool(await self.fetchval("SELECT tasker.delete_rate_limit($1)", name))

    async def list_rate_limits(self) -> list[Row]:
        """`tasker.v_rate_limits`, by name."""
        return await self.fetch("SELECT * FROM tasker.v_rate_limits ORDER BY name")

    async def list_flow_lanes(self, queue: str | None, limit: int) -> list[Row]:
        """`tasker.v_flow_lanes` (of one queue, or all), in turn order: by queue, then the
        lanes served least first; at most `limit` rows."""
        return await self.fetch(
            "SELECT * FROM tasker.v_flow_lanes WHERE ($1::text IS NULL OR queue = $1)"
            " ORDER BY queue, vtime, lane LIMIT $2",
            queue,
            limit,
        )

    async def emit_event(self, name: str, key: str, payload: Any = None) -> EmittedEvent:
        """`tasker.emit_event`: completes every step waiting on (`name`, `key`) with `payload`
        as its result (None: {}), and keeps the event for steps that wait later (its own
        transaction unless one is open: a rollback completes nothing)."""
        row = await self.fetchrow(
            "SELECT * FROM tasker.emit_event($1, $2, $3::jsonb)", name, key, payload
        )
        assert row is not None
        return EmittedEvent.from_row(row)

    async def wake_waits(self, batch: int = 1000) -> WakeCounts:
        """`tasker.wake_waits`: ends due sleeps, applies wait timeouts, matches events that came
        before their waits, deletes expired events. All zero when another session is at it."""
        row = await self.fetchrow("SELECT * FROM tasker.wake_waits($1)", batch)
        assert row is not None
        return WakeCounts.from_row(row)

    async def worker_heartbeat(
        self,
        *,
        worker_id: str,
        host: str,
        pid: int,
        namespaces: Sequence[str],
        handlers: Sequence[str],
        started_at: datetime,
        in_flight: int,
        missing_handlers: Mapping[str, str],
    ) -> None:
        """Upsert this worker's `tasker.workers` row (`tasker.worker_heartbeat`)."""
        await self.execute(
            "SELECT tasker.worker_heartbeat($1, $2, $3, $4::text[], $5::text[], $6, $7, $8::jsonb)",
            worker_id,
            host,
            pid,
            list(namespaces),
            list(handlers),
            started_at,
            in_flight,
            dict(missing_handlers),
        )

    # --- reads of the client and the operator CLI (statements in tasker_pg.queries) ----------

    async def task_row(self, task_uuid: uuid.UUID | str) -> Row | None:
        """One task with its progress counts; None when there is no such task."""
        return await self.fetchrow(queries.GET_TASK, str(task_uuid))

    async def task_page_rows(
        self,
        *,
        namespace: str | None,
        status: str | None,
        raw_states: Sequence[str] | None,
        limit: int,
        offset: int,
    ) -> list[Row]:
        """A page of tasks, newest first, each row carrying the filter's `total_count`.

        `status` is the effective state; `raw_states` the stored states that can show as it.
        """
        states = None if raw_states is None else list(raw_states)
        return await self.fetch(queries.LIST_TASKS, namespace, status, states, limit, offset)

    async def count_tasks(
        self, *, namespace: str | None, status: str | None, raw_states: Sequence[str] | None
    ) -> int:
        """How many tasks the filter of `task_page_rows` matches."""
        states = None if raw_states is None else list(raw_states)
        return int(await self.fetchval(queries.COUNT_TASKS, namespace, status, states))

    async def step_rows(
        self, task_uuid: uuid.UUID | str, step_uuid: uuid.UUID | str | None = None
    ) -> list[Row]:
        """The task's steps (or its one step `step_uuid`) in template order, with readiness."""
        step = None if step_uuid is None else str(step_uuid)
        return await self.fetch(queries.LIST_STEPS, str(task_uuid), step)

    async def steps_not_created_rows(self, task_uuid: uuid.UUID | str) -> list[Row]:
        """The task's template steps that have no row (not chosen, not yet created), with why."""
        return await self.fetch(queries.STEPS_NOT_CREATED, str(task_uuid))

    async def step_audit_rows(
        self, task_uuid: uuid.UUID | str, step_uuid: uuid.UUID | str
    ) -> list[Row]:
        """Every recorded state change of a step, oldest first."""
        return await self.fetch(queries.STEP_AUDIT, str(task_uuid), str(step_uuid))

    async def task_exists(self, task_uuid: uuid.UUID | str) -> bool:
        return bool(await self.fetchval(queries.TASK_EXISTS, str(task_uuid)))

    async def task_of_step(self, step_uuid: uuid.UUID | str) -> uuid.UUID | None:
        """The task a step belongs to; None when there is no such step."""
        value = await self.fetchval(queries.STEP_TASK, str(step_uuid))
        return value  # type: ignore[no-any-return]

    async def step_uuid_by_name(self, task_uuid: uuid.UUID | str, name: str) -> uuid.UUID | None:
        """The step of the task named `name`; None when the task has no such step."""
        value = await self.fetchval(queries.STEP_BY_NAME, str(task_uuid), name)
        return value  # type: ignore[no-any-return]

    async def step_names(self, task_uuid: uuid.UUID | str) -> list[str]:
        """The names of the task's steps in template order (empty for an unknown task)."""
        return [str(r["name"]) for r in await self.fetch(queries.STEP_NAMES, str(task_uuid))]

    async def template_rows(self, namespace: str | None = None) -> list[Row]:
        """Registered templates (of one namespace, or all), newest version first per name."""
        return await self.fetch(queries.TEMPLATES, namespace)

    async def server_version(self) -> str:
        return str(await self.fetchval(queries.SERVER_VERSION))

    async def worker_rows(self) -> list[Row]:
        """The workers' heartbeat rows (tasker.v_workers), alive ones first."""
        return await self.fetch(queries.WORKERS)

    async def engine_metrics(self) -> list[Row]:
        """`tasker.engine_metrics()`: rows (metric, namespace, label, value)."""
        return await self.fetch(queries.ENGINE_METRICS)


async def connect(
    dsn: str | None = None,
    *,
    check_schema: bool = True,
    timeout: float = 10.0,
    server_settings: Mapping[str, str] | None = None,
) -> Connection:
    """Open a session on the resolved database; refuse a missing or outdated schema.

    `check_schema=False` is for the migrator and for administrative tools that create or
    inspect databases. `server_settings` are PostgreSQL settings of the session (e.g.
    `{"lock_timeout": "5s"}`), on top of tasker-pg's own.
    """
    resolved = resolve_dsn(dsn)
    raw = await _raw_connect(resolved, timeout=timeout, server_settings=server_settings)
    conn = Connection(raw, resolved.source)
    if check_schema:
        try:
            await _check_schema(conn, resolved)
        except BaseException:
            await conn.close()
            raise
    return conn


async def schema_version(conn: Connection) -> int | None:
    """The newest applied migration (0 when none is), None when tasker was never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('tasker.schema_migrations') IS NOT NULL")
    if not exists:
        return None
    value = await conn.fetchval("SELECT max(version) FROM tasker.schema_migrations")
    return int(value) if value is not None else 0


async def check_schema(conn: Connection, *, migrate_hint: str = sqlfiles.MIGRATE_HINT) -> int:
    """Refuse a missing, outdated or newer schema, naming the command that fixes it.

    Outdated means a pending migration or a function file whose checksum differs from the
    package's; newer means a newer tasker-pg migrated the database.
    """
    current = await schema_version(conn)
    needed = sqlfiles.expected_version()
    if current is None:
        raise SchemaError(
            "the database has no tasker schema; " + migrate_hint, error_code="schema_missing"
        )
    has_state = await conn.fetchval(
        "SELECT to_regclass('tasker.schema_functions') IS NOT NULL"
        " AND to_regclass('tasker.schema_engine') IS NOT NULL"
    )
    state = (
        await conn.fetchrow(
            "SELECT (SELECT jsonb_object_agg(file, checksum) FROM tasker.schema_functions)"
            " AS files, (SELECT engine_version FROM tasker.schema_engine) AS engine_version"
        )
        if has_state
        else None
    )
    engine = state["engine_version"] if state is not None else None
    if engine is not None and int(engine) > sqlfiles.ENGINE_VERSION:
        raise SchemaError(
            f"the database was migrated by a newer tasker-pg (engine version {engine}; this "
            f"one has {sqlfiles.ENGINE_VERSION}): upgrade tasker-pg to use it",
            error_code="schema_newer",
        )
    if current < needed:
        pending = [m.filename for m in sqlfiles.load_migrations() if m.version > current]
        raise SchemaError(
            f"the database schema is at version {current}, this tasker-pg needs {needed} "
            f"(pending: {', '.join(pending)}); " + migrate_hint
        )
    recorded: Mapping[str, Any] = (state["files"] or {}) if state is not None else {}
    differ = [f.name for f in sqlfiles.load_function_files() if recorded.get(f.name) != f.checksum]
    if differ:
        raise SchemaError(
            f"the database's engine functions differ from this tasker-pg's "
            f"({', '.join(differ)} changed); " + migrate_hint
        )
    return current


def _migrate_hint(resolved: ResolvedDsn) -> str:
    """The migrate command for the database the user chose, the same way they chose it."""
    if resolved.source == "--dsn":
        return f"run `tasker-pg migrate --dsn '{mask_dsn(resolved.dsn)}'` against this database"
    return sqlfiles.MIGRATE_HINT


async def _check_schema(conn: Connection, resolved: ResolvedDsn) -> None:
    await check_schema(conn, migrate_hint=_migrate_hint(resolved))


# SQLSTATEs of a session setting the server refused at connect: a bad value (class 22), an
# unknown name (42704), one that cannot be set per session (55P02), or only by a superuser
# (42501).
_SETTING_REFUSALS = ("22", "42704", "55P02", "42501")


def _raise_if_setting_refused(exc: BaseException, settings: Mapping[str, str] | None) -> None:
    """A refused session setting is a configuration error naming the settings, not "could not
    connect" (the server is there and said why)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if not settings or not isinstance(sqlstate, str):
        return
    if sqlstate.startswith(_SETTING_REFUSALS):
        given = ", ".join(f"{k}={v}" for k, v in settings.items())
        raise ConfigurationError(
            f"the server refused a session setting ({exc}); the settings given were: {given} "
            "(--pg-setting or server_settings)"
        ) from exc


async def _raw_connect(
    resolved: ResolvedDsn, *, timeout: float, server_settings: Mapping[str, str] | None = None
) -> asyncpg.Connection:
    settings = {**SERVER_SETTINGS, **(server_settings or {})}
    try:
        raw = await asyncpg.connect(resolved.dsn, timeout=timeout, server_settings=settings)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _raise_if_setting_refused(exc, server_settings)
        raise DatabaseNotFoundError(
            f"could not connect to {mask_dsn(resolved.dsn)} (from {resolved.source}): "
            f"{exc or type(exc).__name__}. Is the server running? {no_database_message()}"
        ) from exc
    await _init_connection(raw)
    return raw


class Pool:
    """A small pool of sessions sharing the codecs and error translation of `Connection`."""

    def __init__(self, raw: asyncpg.Pool, source: str) -> None:
        self._raw = raw
        self.source = source

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        with _translating():
            async with self._raw.acquire() as raw:
                yield Connection(raw, self.source)

    async def close(self) -> None:
        with contextlib.suppress(*_TRANSLATED):
            await self._raw.close()

    def terminate(self) -> None:
        self._raw.terminate()


async def create_pool(
    dsn: str | None = None,
    *,
    min_size: int = 1,
    max_size: int = 4,
    check_schema: bool = True,
    setup: Callable[[Connection], Awaitable[None]] | None = None,
    timeout: float = 10.0,
    server_settings: Mapping[str, str] | None = None,
) -> Pool:
    """A pool on the resolved database (schema checked once, on the first session).

    `server_settings` are PostgreSQL settings of its sessions, on top of tasker-pg's own.
    """
    resolved = resolve_dsn(dsn)
    try:
        raw_pool = await asyncpg.create_pool(
            resolved.dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={**SERVER_SETTINGS, **(server_settings or {})},
            init=_init_connection,
            timeout=timeout,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseNotFoundError(
            f"could not connect to {mask_dsn(resolved.dsn)} (from {resolved.source}): "
            f"{exc or type(exc).__name__}. {no_database_message()}"
        ) from exc
    pool = Pool(raw_pool, resolved.source)
    if check_schema or setup is not None:
        try:
            async with pool.acquire() as conn:
                if check_schema:
                    await _check_schema(conn, resolved)
                if setup is not None:
                    await setup(conn)
        except BaseException:
            await pool.close()
            raise
    return pool
