"""What `TaskerClient` and `AsyncTaskerClient` return: frozen, typed dataclasses.

Each type is built from the rows of the client's named queries (`from_row`) and turns itself
into plain JSON data with `to_dict()` (timestamps as ISO 8601 strings), which is what the CLI's
`--json` prints. States are the engine's own words (see sql/migrations/0002_engine.sql).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from tasker_pg.template import TaskTemplate

__all__ = [
    "FINAL_TASK_STATES",
    "STEP_STATES",
    "TASK_STATES",
    "FlowLaneResponse",
    "HealthCheck",
    "HealthResponse",
    "HealthStatus",
    "Pagination",
    "RateLimitResponse",
    "RedriveResponse",
    "RedrivenTask",
    "ScheduleFire",
    "ScheduleResponse",
    "StepAuditResponse",
    "StepNotCreated",
    "StepResponse",
    "StepState",
    "TaskListResponse",
    "TaskResponse",
    "TaskState",
    "TemplateRegistration",
    "WorkerStatus",
]

TaskState = Literal[
    "pending", "steps_in_process", "complete", "error", "cancelled", "resolved_manually"
]
"""A task's state as `tasker.v_tasks` shows it (pending with a claimed step reads in process)."""

StepState = Literal[
    "pending",
    "enqueued",
    "in_progress",
    "waiting_for_retry",
    "waiting",
    "complete",
    "error",
    "cancelled",
    "resolved_manually",
]

HealthStatus = Literal["healthy", "degraded", "unhealthy", "schema_outdated"]
"""`degraded`: the database is reachable and current, but a check of the engine failed."""

TASK_STATES: tuple[TaskState, ...] = (
    "pending",
    "steps_in_process",
    "complete",
    "error",
    "cancelled",
    "resolved_manually",
)
STEP_STATES: tuple[StepState, ...] = (
    "pending",
    "enqueued",
    "in_progress",
    "waiting_for_retry",
    "waiting",
    "complete",
    "error",
    "cancelled",
    "resolved_manually",
)
FINAL_TASK_STATES: frozenset[str] = frozenset(
    {"complete", "error", "cancelled", "resolved_manually"}
)
"""States `wait_for_task` stops at. `error` is not terminal (an operator may retry or resolve
the failed step) but nothing more happens to the task without one, so a waiter returns."""

Row = Mapping[str, Any]


def _jsonable(value: Any) -> Any:
    """Plain JSON data: timestamps as ISO strings, uuids as text, Decimals as floats."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """The response as plain JSON data (what `--json` prints)."""
        result = _jsonable(self)
        assert isinstance(result, dict)
        return result


def _interval_ms(value: timedelta | None) -> float | None:
    return None if value is None else round(value.total_seconds() * 1000.0, 3)


@dataclasses.dataclass(frozen=True)
class TaskResponse(_ToDict):
    """One task: where it stands, its counts per step state, and what it was created with."""

    task_uuid: str
    name: str
    namespace: str
    version: str
    status: TaskState
    """The task state as `tasker.v_tasks` shows it."""
    execution_status: str
    """What the task is doing as a whole (`tasker.task_execution_context`): all_complete,
    blocked_by_failures, has_ready_steps, processing, waiting_for_retry,
    waiting_for_event_or_time, waiting_for_dependencies, or cancelled."""
    total_steps: int
    completed_steps: int
    """Steps complete or resolved manually."""
    failed_steps: int
    """Steps in error."""
    ready_steps: int
    step_counts: dict[str, int]
    """Steps per step state; every state is present, most with 0."""
    completion_percentage: float
    context: dict[str, Any]
    initiator: str | None
    source_system: str | None
    reason: str | None
    tags: list[Any]
    priority: int
    correlation_id: str | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    created: bool | None = dataclasses.field(default=None, compare=False)
    """Set by `create_task`: True for a new task, False when its idempotency key returned the
    task created earlier; None where the task was only read."""

    @property
    def is_final(self) -> bool:
        """True when nothing more happens without an operator (what `wait_for_task` waits for)."""
        return self.status in FINAL_TASK_STATES

    @classmethod
    def from_row(cls, row: Row) -> TaskResponse:
        """From a row of v_tasks columns joined with task_execution_context's `*_steps` counts."""
        counts = {
            "pending": int(row["pending_steps"]),
            "enqueued": int(row["enqueued_steps"]),
            "in_progress": int(row["in_progress_steps"]),
            "waiting_for_retry": int(row["waiting_for_retry_steps"]),
            "waiting": int(row["waiting_steps"]),
            "complete": int(row["complete_steps"]),
            "error": int(row["error_steps"]),
            "cancelled": int(row["cancelled_steps"]),
            "resolved_manually": int(row["resolved_steps"]),
        }
        return cls(
            task_uuid=str(row["task_uuid"]),
            name=row["name"],
            namespace=row["namespace"],
            version=row["version"],
            status=cast(TaskState, row["state"]),
            execution_status=row["execution_status"],
            total_steps=int(row["total_steps"]),
            completed_steps=counts["complete"] + counts["resolved_manually"],
            failed_steps=counts["error"],
            ready_steps=int(row["ready_steps"]),
            step_counts=counts,
            completion_percentage=float(row["completion_percentage"]),
            context=dict(row["context"] or {}),
            initiator=row["initiator"],
            source_system=row["source_system"],
            reason=row["reason"],
            tags=list(row["tags"] or []),
            priority=int(row["priority"]),
            correlation_id=row["correlation_id"],
            idempotency_key=row["idempotency_key"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            completed_at=row["completed_at"],
        )


@dataclasses.dataclass(frozen=True)
class Pagination(_ToDict):
    """Where a page of `list_tasks` sits in the whole filtered list."""

    total_count: int
    page: int
    """1-based; offset // per_page + 1."""
    per_page: int
    total_pages: int
    """ceil(total_count / per_page); 0 when nothing matches."""
    has_next: bool
    has_previous: bool
    offset: int

    @classmethod
    def compute(cls, *, total_count: int, limit: int, offset: int, returned: int) -> Pagination:
        return cls(
            total_count=total_count,
            page=offset // limit + 1,
            per_page=limit,
            total_pages=math.ceil(total_count / limit),
            has_next=offset + returned < total_count,
            has_previous=offset > 0,
            offset=offset,
        )


@dataclasses.dataclass(frozen=True)
class TaskListResponse(_ToDict):
    """One page of tasks, newest first, and the pagination around it."""

    tasks: list[TaskResponse]
    pagination: Pagination


@dataclasses.dataclass(frozen=True)
class StepResponse(_ToDict):
    """One step: its state, attempts, results, last error, and whether (or why not) it runs."""

    step_uuid: str
    task_uuid: str
    name: str
    handler: str | None
    """None for wait_for_event and sleep steps, which run no handler."""
    current_state: StepState
    dependencies: list[str]
    """Names of the steps this one depends on (its parents in the DAG)."""
    attempts: int
    max_attempts: int
    retryable: bool
    results: Any
    metadata: dict[str, Any] | None
    last_error: dict[str, Any] | None
    ready: bool
    """A worker may claim it now."""
    readiness_reason: str
    """Why it is (not) running, in words (`tasker.step_readiness`)."""
    dependencies_satisfied: bool
    worker_id: str | None
    next_attempt_at: datetime | None
    """When it becomes claimable: the retry time, or the delayed start of an enqueued step."""
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: float | None
    """completed_at - started_at of the last run, when both are known."""

    @classmethod
    def from_row(cls, row: Row) -> StepResponse:
        """From a row of v_steps columns joined with step_readiness and the parent names."""
        return cls(
            step_uuid=str(row["step_uuid"]),
            task_uuid=str(row["task_uuid"]),
            name=row["name"],
            handler=row["handler"],
            current_state=cast(StepState, row["state"]),
            dependencies=list(row["dependencies"] or []),
            attempts=int(row["attempts"]),
            max_attempts=int(row["max_attempts"]),
            retryable=bool(row["retryable"]),
            results=row["results"],
            metadata=row["metadata"],
            last_error=row["last_error"],
            ready=bool(row["ready"]),
            readiness_reason=row["reason"],
            dependencies_satisfied=bool(row["dependencies_satisfied"]),
            worker_id=row["worker_id"],
            next_attempt_at=row["ready_at"],
            lease_expires_at=row["lease_expires_at"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            duration_ms=_interval_ms(row["last_run_duration"]),
        )


@dataclasses.dataclass(frozen=True)
class StepAuditResponse(_ToDict):
    """One state change of a step, as `tasker.step_transitions` recorded it."""

    transition_id: int
    step_uuid: str
    task_uuid: str
    from_state: str | None
    to_state: str
    event: str
    attempt: int
    worker_id: str | None
    duration_ms: float | None
    error_summary: str | None
    created_at: datetime
    metadata: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Row) -> StepAuditResponse:
        return cls(
            transition_id=int(row["transition_id"]),
            step_uuid=str(row["step_uuid"]),
            task_uuid=str(row["task_uuid"]),
            from_state=row["from_state"],
            to_state=row["to_state"],
            event=row["event"],
            attempt=int(row["attempt"]),
            worker_id=row["worker_id"],
            duration_ms=row["duration_ms"],
            error_summary=row["error_summary"],
            created_at=row["created_at"],
            metadata=row["metadata"],
        )


@dataclasses.dataclass(frozen=True)
class HealthCheck(_ToDict):
    """One check of `health_check`: a value measured against its threshold."""

    name: str
    """`workers_alive`, `oldest_ready_age_seconds`, `expired_leases` or `tasks_in_error`."""
    ok: bool
    value: float
    threshold: float | None
    """The bound it is held to (a minimum for `workers_alive`, else a maximum); None: only
    reported."""
    message: str
    """The value and the bound in words."""


@dataclasses.dataclass(frozen=True)
class HealthResponse(_ToDict):
    """Can the database be reached, is its schema the one this tasker-pg needs, and does the
    engine work: workers seen recently, the oldest ready step, expired leases, tasks in error."""

    healthy: bool
    status: HealthStatus
    database_reachable: bool
    schema_version: int | None
    """Newest applied migration; None when the database was never migrated (or not reached)."""
    expected_schema_version: int
    server_version: str | None
    latency_ms: float | None
    """Round trip of one query on an open session."""
    message: str | None
    """What is wrong and what to do about it, when something is."""
    workers: list[WorkerStatus] = dataclasses.field(default_factory=list)
    """The workers' heartbeat rows (empty when the schema is outdated or nothing runs)."""
    workers_alive: int | None = None
    """Workers whose heartbeat is more recent than `worker_stale_after`."""
    ready_steps: int | None = None
    """Steps ready to run now, in every namespace."""
    oldest_ready_age_seconds: float | None = None
    """How long the longest-waiting ready step (of any namespace) has been ready."""
    expired_leases: int | None = None
    """Claimed steps whose lease expired and that no claim has recorded yet (a namespace no
    worker claims from)."""
    tasks_in_error: int | None = None
    """Tasks in `error` (dead letters until retried or resolved)."""
    checks: list[HealthCheck] = dataclasses.field(default_factory=list)
    """Each engine check with its threshold; `status` is `degraded` when one fails."""


@dataclasses.dataclass(frozen=True)
class RedrivenTask(_ToDict):
    """One task in error that `retry_failed` matched (a row of `tasker.retry_failed`)."""

    task_uuid: str
    name: str
    """The template name."""
    failed_at: datetime
    """When the task entered error."""
    steps: list[str]
    """Its steps in error (retried, or to retry in a dry run), by name."""
    step_uuids: list[str]
    retried: bool
    """False in a dry run, and for a task that left the error state (cancelled, retried or
    resolved by someone else) before its lock was granted."""
    status: str
    """The task's state afterwards."""

    @classmethod
    def from_row(cls, row: Row) -> RedrivenTask:
        return cls(
            task_uuid=str(row["task_uuid"]),
            name=row["name"],
            failed_at=row["failed_at"],
            steps=list(row["steps"]),
            step_uuids=[str(u) for u in row["step_uuids"]],
            retried=bool(row["retried"]),
            status=row["task_state"],
        )


@dataclasses.dataclass(frozen=True)
class RedriveResponse(_ToDict):
    """What `retry_failed` / `retry_all_failed` did (or, with `dry_run`, would do)."""

    namespace: str
    name: str | None
    since: datetime | None
    before: datetime | None
    dry_run: bool
    batches: int
    """Calls of tasker.retry_failed made."""
    tasks_matched: int
    tasks_retried: int
    steps_retried: int
    """Steps sent back to the queue (0 in a dry run)."""
    steps_to_retry: int
    """Steps in error of the matched tasks still in error: what a dry run would retry."""
    tasks: list[RedrivenTask]
    """Every task matched, oldest entry into error first (batch after batch)."""


@dataclasses.dataclass(frozen=True)
class StepNotCreated(_ToDict):
    """A template step of a conditional or batch workflow that has no row in a task: a branch
    its decision did not choose, a step still waiting for its decision or fan-out, or the
    template of batch workers. `reason` says which (from `tasker.step_readiness`)."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class WorkerStatus(_ToDict):
    """One worker process as its heartbeat row in `tasker.workers` describes it."""

    worker_id: str
    host: str | None
    pid: int | None
    status: str
    """`alive` (heartbeat within a minute) or `stale`."""
    heartbeat_age_seconds: float
    in_flight: int
    namespaces: list[str]
    missing_handlers: dict[str, Any]
    """Handler name -> when this worker first lacked it (it hands such steps back)."""


@dataclasses.dataclass(frozen=True)
class ScheduleResponse(_ToDict):
    """One schedule (a row of `tasker.list_schedules()`): what it creates, when, and how its
    last task is doing."""

    name: str
    namespace: str
    template_name: str
    template_version: str | None
    """None: the newest version at each firing."""
    cron: str
    time_zone: str
    context: dict[str, Any]
    overlap: str
    """skip, allow or cancel_previous."""
    catchup_window_seconds: float
    enabled: bool
    next_fire_at: datetime | None
    """The next slot (None while paused)."""
    last_slot: datetime | None
    last_fired_at: datetime | None
    last_task_uuid: str | None
    last_task_state: str | None
    """None when there is no last task, or it was purged."""
    last_error: str | None
    declared_by: str | None
    """The template version whose `schedules:` declared it (None: made by create_schedule)."""

    @classmethod
    def from_row(cls, row: Row) -> ScheduleResponse:
        return cls(
            name=row["name"],
            namespace=row["namespace"],
            template_name=row["template_name"],
            template_version=row["template_version"],
            cron=row["cron"],
            time_zone=row["time_zone"],
            context=dict(row["context"]),
            overlap=row["overlap"],
            catchup_window_seconds=row["catchup_window"].total_seconds(),
            enabled=bool(row["enabled"]),
            next_fire_at=row["next_fire_at"],
            last_slot=row["last_slot"],
            last_fired_at=row["last_fired_at"],
            last_task_uuid=None if row["last_task_uuid"] is None else str(row["last_task_uuid"]),
            last_task_state=row["last_task_state"],
            last_error=row["last_error"],
            declared_by=row["declared_by"],
        )


@dataclasses.dataclass(frozen=True)
class ScheduleFire(_ToDict):
    """One slot a schedule fired (`fire_due_schedules`, `backfill_schedule`)."""

    schedule_name: str
    slot: datetime
    task_uuid: str | None
    """None for a slot skipped by the overlap policy or one that failed."""
    action: str
    """created, existing (the slot had fired: its task), skipped (overlap) or error."""


@dataclasses.dataclass(frozen=True)
class RateLimitResponse(_ToDict):
    """One rate limit, a token bucket (a row of `tasker.v_rate_limits`): each start of a step
    that names it takes a token; tokens come back at `per_second`, at most `burst` held."""

    name: str
    per_second: float
    burst: int
    tokens_now: float
    """The tokens in the bucket now (a claim takes one per step it starts)."""
    parked_until: datetime | None
    """Up to when the steps it holds back were given their turns (None: none held)."""
    created_at: datetime
    updated_at: datetime
    template_steps: int
    """How many template steps name it (it cannot be deleted while any does)."""

    @classmethod
    def from_row(cls, row: Row) -> RateLimitResponse:
        return cls(
            name=row["name"],
            per_second=float(row["per_second"]),
            burst=int(row["burst"]),
            tokens_now=float(row["tokens_now"]),
            parked_until=row["parked_until"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            template_steps=int(row["template_steps"]),
        )


@dataclasses.dataclass(frozen=True)
class FlowLaneResponse(_ToDict):
    """One fairness lane of a namespace's queue (a row of `tasker.v_flow_lanes`): claims serve
    the lanes with the lowest `vtime` first."""

    queue: str
    """The namespace (its queue has its name)."""
    lane: str
    """The fairness key's value; '' is the lane of the steps without one."""
    vtime: int
    """How much the lane was served: its turn (lowest goes first)."""
    concurrency_limit: int | None
    """The limit of its steps when the lane is their concurrency key, else None."""
    in_progress: int
    visible: int
    """Messages claimable now."""
    queued: int
    """Messages in all (visible, delayed and held back)."""

    @classmethod
    def from_row(cls, row: Row) -> FlowLaneResponse:
        limit = row["concurrency_limit"]
        return cls(
            queue=row["queue"],
            lane=row["lane"],
            vtime=int(row["vtime"]),
            concurrency_limit=None if limit is None else int(limit),
            in_progress=int(row["in_progress"]),
            visible=int(row["visible"]),
            queued=int(row["queued"]),
        )


@dataclasses.dataclass(frozen=True)
class TemplateRegistration(_ToDict):
    """A template version stored by `register_templates`."""

    namespace: str
    name: str
    version: str
    named_task_id: int
    step_count: int

    @classmethod
    def of(cls, named_task_id: int, template: TaskTemplate) -> TemplateRegistration:
        return cls(
            namespace=template.namespace_name,
            name=template.name,
            version=template.version,
            named_task_id=named_task_id,
            step_count=len(template.static_steps),
        )
