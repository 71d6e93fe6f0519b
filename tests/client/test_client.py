"""TaskerClient and AsyncTaskerClient against a real database: every method, sync and async.

Most tests take `client`, the async client. The sync client delegates every method to it on
a background loop: one test checks that both have the same methods with the same signatures,
and one smoke test calls the sync client's methods through a task's life (wrapped so each call
runs in a worker thread, `InThread`: the test's event loop stays free to drive steps while a
call blocks). Separate tests use the sync client the other ways people do: in a plain script,
directly inside a running event loop (a notebook), and from several threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import io
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tasker_pg import AsyncTaskerClient, TaskerClient, db
from tasker_pg import client as client_module
from tasker_pg.client import ClientClosedError, TaskTimeoutError
from tasker_pg.errors import (
    DatabaseNotFoundError,
    InvalidStateError,
    NotFoundError,
    SchemaError,
    TaskerError,
    ValidationError,
)
from tasker_pg.migrations import expected_version, load_migrations
from tasker_pg.responses import (
    HealthResponse,
    StepAuditResponse,
    StepResponse,
    TaskListResponse,
    TaskResponse,
    TemplateRegistration,
)
from tests.support.engine import (
    assert_healthy,
    claim,
    complete,
    diamond,
    drive,
    failure,
    linear,
    single,
    success,
    wait_for_claim,
)

pytestmark = pytest.mark.timeout(60)

UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/x"
SHOP = "shop"


# --- fixtures ---------------------------------------------------------------------------------


class InThread:
    """The sync client with awaitable methods: every call runs in a worker thread."""

    def __init__(self, sync: TaskerClient) -> None:
        self.sync = sync

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sync, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attr, *args, **kwargs)

        return call


MakeClient = Callable[..., Any]


@pytest.fixture(params=["async"])
async def make_client(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[MakeClient]:
    """Factory of clients of the parametrized kind (sync ones wrapped in `InThread`).

    Takes `dsn` so the test database outlives the clients (teardown runs in reverse)."""
    made: list[AsyncTaskerClient | TaskerClient] = []

    def make(dsn: str | None, **kwargs: Any) -> Any:
        if request.param == "async":
            async_client = AsyncTaskerClient(dsn, **kwargs)
            made.append(async_client)
            return async_client
        sync_client = TaskerClient(dsn, **kwargs)
        made.append(sync_client)
        return InThread(sync_client)

    yield make
    for c in made:
        if isinstance(c, AsyncTaskerClient):
            await c.close()
        else:
            await asyncio.to_thread(c.close)


@pytest.fixture
def client(make_client: MakeClient, dsn: str) -> Any:
    return make_client(dsn)


@pytest.fixture
async def shop(conn: db.Connection) -> dict[str, Any]:
    """Templates in namespace `shop`: `order` (a diamond) and `one` (a single step)."""
    order = diamond(name="order", namespace=SHOP)
    one = single(name="one", namespace=SHOP)
    await conn.register_template(order)
    await conn.register_template(one)
    return {"order": order, "one": one}


# --- helpers ----------------------------------------------------------------------------------


async def poll(predicate: Callable[[], Awaitable[Any]], *, deadline: float = 10.0) -> Any:
    """Await `predicate()` until it is truthy (a deadline, never a fixed sleep)."""
    end = time.monotonic() + deadline
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline}s")
        await asyncio.sleep(0.02)


async def listener_pids(conn: db.Connection) -> set[int]:
    """Backends of this database whose last statement was LISTEN on the task-events channel."""
    rows = await conn.fetch(
        """
        SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%tasker_task_events%'
        """
    )
    return {int(r["pid"]) for r in rows}


async def fail_permanently(conn: db.Connection, queue: str = SHOP, message: str = "boom") -> None:
    rows = await wait_for_claim(conn, queue, qty=1)
    await complete(conn, failure(rows[0], message, retryable=False))


def write_yaml(
    path: Path, name: str, *, namespace: str = "yamlns", version: str = "1.0.0", steps: int = 2
) -> Path:
    lines = [f"name: {name}", f"namespace_name: {namespace}", f"version: {version}", "steps:"]
    for i in range(1, steps + 1):
        lines += [f"  - name: s{i}", "    handler:", f"      callable: h.s{i}"]
        if i > 1:
            lines += [f"    dependencies: [s{i - 1}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the sync client delegates -----------------------------------------------------------------


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(value)
        for name, value in vars(cls).items()
        if not name.startswith("_") and callable(value)
    }


def test_the_sync_client_has_every_method_of_the_async_one() -> None:
    """Same names, same parameters (kinds, defaults, annotations) and same return types."""
    assert _public_methods(TaskerClient) == _public_methods(AsyncTaskerClient)


async def test_the_sync_client_runs_a_task_through_its_life(
    dsn: str, shop: dict[str, Any], conn: db.Connection, tmp_path: Path
) -> None:
    """Each sync method once, in a worker thread, while this loop drives the steps."""
    sync = InThread(TaskerClient(dsn, initiator="sync-smoke"))
    try:
        assert (await sync.health_check()).status == "healthy"
        [registered] = await sync.register_templates(write_yaml(tmp_path / "t.yaml", "sync_t"))
        assert registered.name == "sync_t"
        task = await sync.create_task("order", namespace=SHOP, context={"n": 1})
        assert task.initiator == "sync-smoke"
        assert (await sync.get_task(task.task_uuid)).task_uuid == task.task_uuid
        steps = await sync.list_task_steps(task.task_uuid)
        start = next(s for s in steps if s.name == "start")
        assert (await sync.get_step(task.task_uuid, start.step_uuid)).name == "start"
        assert len(await sync.get_step_audit_history(task.task_uuid, start.step_uuid)) >= 1
        await sync.resolve_step(start.step_uuid, {"by": "hand"})
        waiter = asyncio.create_task(sync.wait_for_task(task.task_uuid, timeout=30))
        await drive(conn, SHOP, lambda r: None)
        assert (await waiter).status == "complete"
        [other] = await sync.create_tasks("one", namespace=SHOP, contexts=[{}])
        listed = await sync.list_tasks(namespace=SHOP)
        assert {t.task_uuid for t in listed.tasks} == {task.task_uuid, other}
        await fail_permanently(conn, SHOP)  # the other task's only step
        failed = next(s for s in await sync.list_task_steps(other) if s.name == "only")
        assert (await sync.retry_step(failed.step_uuid))["state"] == "enqueued"
        await fail_permanently(conn, SHOP)
        dry = await sync.retry_failed(SHOP, "one", dry_run=True)
        assert [(t.task_uuid, t.retried) for t in dry.tasks] == [(other, False)]
        redriven = await sync.retry_all_failed(SHOP, "one", reason="smoke")
        assert [(t.task_uuid, t.retried) for t in redriven.tasks] == [(other, True)]
        assert (await sync.cancel_task(other))["state"] == "cancelled"
    finally:
        await asyncio.to_thread(sync.sync.close)


# --- create_task / get_task -------------------------------------------------------------------


async def test_create_task_returns_the_task_and_get_task_reads_it(
    client: Any, shop: dict[str, Any]
) -> None:
    created = await client.create_task(
        "order",
        namespace=SHOP,
        context={"order_id": 7, "items": [{"sku": "a", "qty": 2}]},
        reason="New order received",
        priority=5,
        tags=["web", "eu"],
        correlation_id="corr-1",
        idempotency_key="order-7",
    )
    assert isinstance(created, TaskResponse)
    assert str(uuid.UUID(created.task_uuid)) == created.task_uuid
    assert (created.namespace, created.name, created.version) == (SHOP, "order", "1.0.0")
    assert created.status == "pending"
    assert created.execution_status == "has_ready_steps"
    assert (created.total_steps, created.completed_steps, created.failed_steps) == (4, 0, 0)
    assert created.ready_steps == 1
    assert created.step_counts == {
        "pending": 3,
        "enqueued": 1,
        "in_progress": 0,
        "waiting_for_retry": 0,
        "waiting": 0,
        "complete": 0,
        "error": 0,
        "cancelled": 0,
        "resolved_manually": 0,
    }
    assert created.completion_percentage == 0.0
    assert created.context == {"order_id": 7, "items": [{"sku": "a", "qty": 2}]}
    assert created.initiator == "tasker-core-python"
    assert created.source_system == "tasker-core"
    assert created.reason == "New order received"
    assert created.tags == ["web", "eu"]
    assert created.priority == 5
    assert created.correlation_id == "corr-1"
    assert created.idempotency_key == "order-7"
    assert isinstance(created.created_at, datetime)
    assert created.completed_at is None
    assert not created.is_final

    assert created.created is True
    assert await client.get_task(created.task_uuid) == created
    assert (await client.get_task(uuid.UUID(created.task_uuid))).created is None  # only read
    # the same idempotency key returns the first task, not a second one, and says so
    again = await client.create_task("order", namespace=SHOP, idempotency_key="order-7")
    assert again.task_uuid == created.task_uuid
    assert again.created is False
    assert (await client.list_tasks()).pagination.total_count == 1


async def test_get_task_follows_progress(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    task = await client.create_task("order", namespace=SHOP)
    [row] = await claim(conn, SHOP)
    running = await client.get_task(task.task_uuid)
    assert running.status == "steps_in_process"  # the effective state: a step was claimed
    assert running.execution_status == "processing"
    assert running.step_counts["in_progress"] == 1
    await complete(conn, success(row))
    progressed = await client.get_task(task.task_uuid)
    assert progressed.status == "steps_in_process"
    assert progressed.completed_steps == 1
    assert progressed.completion_percentage == 25.0
    assert progressed.ready_steps == 2
    await drive(conn, SHOP, lambda r: None)
    done = await client.get_task(task.task_uuid)
    assert (done.status, done.execution_status) == ("complete", "all_complete")
    assert done.completion_percentage == 100.0
    # the moment of the task's transition to complete
    assert done.completed_at == await conn.fetchval(
        "SELECT created_at FROM tasker.task_transitions"
        " WHERE task_uuid = $1 AND to_state = 'complete'",
        task.task_uuid,
    )
    assert done.is_final


async def test_initiator_and_source_system_from_the_client_and_per_call(
    make_client: MakeClient, dsn: str, shop: dict[str, Any]
) -> None:
    c = make_client(dsn, initiator="my-service", source_system="my-api")
    task = await c.create_task("one", namespace=SHOP)
    assert (task.initiator, task.source_system) == ("my-service", "my-api")
    task = await c.create_task("one", namespace=SHOP, initiator="cron", source_system="ops")
    assert (task.initiator, task.source_system) == ("cron", "ops")


async def test_create_task_picks_the_newest_version_unless_told(
    client: Any, conn: db.Connection
) -> None:
    for version in ("1.2.0", "1.10.0", "1.9.0"):
        await conn.register_template(single(name="v", namespace=SHOP, version=version))
    assert (await client.create_task("v", namespace=SHOP)).version == "1.10.0"
    assert (await client.create_task("v", namespace=SHOP, version="1.2.0")).version == "1.2.0"


async def test_delay_seconds_schedules_the_first_step(client: Any, shop: dict[str, Any]) -> None:
    task = await client.create_task("one", namespace=SHOP, delay_seconds=3600)
    [only] = await client.list_task_steps(task.task_uuid)
    assert only.current_state == "enqueued"
    assert not only.ready
    assert only.readiness_reason.startswith("scheduled to start at")
    assert only.next_attempt_at is not None and only.next_attempt_at > task.created_at


async def test_unknown_create_task_options_are_named_with_the_valid_ones(
    client: Any, shop: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError) as info:
        await client.create_task("one", namespace=SHOP, colour="red", size=2)
    message = str(info.value)
    assert info.value.error_code == "invalid_option"
    assert "colour, size" in message
    for valid in ("priority", "tags", "idempotency_key", "correlation_id", "delay_seconds"):
        assert valid in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"priority": "high"}, "priority must be an integer"),
        ({"priority": True}, "priority must be an integer"),
        ({"delay_seconds": -1}, "delay_seconds must be a number of seconds >= 0"),
        ({"delay_seconds": 10**9}, "delay_seconds must be a number of seconds between 0 and"),
        ({"tags": "a,b"}, "tags must be a list"),
        ({"idempotency_key": 12}, "idempotency_key must be a string"),
    ],
)
async def test_bad_option_values(
    client: Any, shop: dict[str, Any], kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await client.create_task("one", namespace=SHOP, **kwargs)
    assert info.value.error_code == "invalid_option"
    assert fragment in str(info.value)


async def test_unknown_template_lists_what_exists(client: Any, conn: db.Connection) -> None:
    await conn.register_template(single(name="order", namespace=SHOP, version="1.0.0"))
    await conn.register_template(single(name="order", namespace=SHOP, version="1.1.0"))
    await conn.register_template(single(name="refund", namespace=SHOP))
    with pytest.raises(NotFoundError) as info:
        await client.create_task("order", namespace=SHOP, version="2.0.0")
    assert info.value.error_code == "template_not_found"
    assert "shop/order has no version '2.0.0'" in str(info.value)
    assert "registered versions: 1.0.0, 1.1.0" in str(info.value)

    with pytest.raises(NotFoundError) as info:
        await client.create_task("ordr", namespace=SHOP)
    assert "no template shop/ordr is registered" in str(info.value)
    assert "order" in str(info.value) and "refund" in str(info.value)

    with pytest.raises(NotFoundError) as info:
        await client.create_task("order", namespace="elsewhere")
    assert "templates in namespace 'elsewhere': none" in str(info.value)


@pytest.mark.parametrize(
    ("context", "fragment"),
    [
        (["not", "an", "object"], "must be a JSON object (a dict), got list"),
        ("text", "must be a JSON object (a dict), got str"),
        ({"price": math.nan}, "not plain JSON data"),
        ({"at": datetime(2024, 1, 1)}, "not plain JSON data"),
        ({"ids": {1, 2}}, "not plain JSON data"),
    ],
)
async def test_bad_context_is_refused(
    client: Any, shop: dict[str, Any], conn: db.Connection, context: Any, fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await client.create_task("one", namespace=SHOP, context=context)
    assert info.value.error_code == "invalid_context"
    assert fragment in str(info.value)
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_oversized_context_is_refused_by_the_database(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    await conn.execute("UPDATE tasker.settings SET value = 1024 WHERE name = 'max_payload_bytes'")
    with pytest.raises(ValidationError) as info:
        await client.create_task("one", namespace=SHOP, context={"blob": "x" * 2000})
    assert info.value.error_code == "payload_too_large"
    assert "more than the limit of 1024 bytes" in str(info.value)


# --- unknown and malformed ids ----------------------------------------------------------------

CALLS_WITH_A_TASK = [
    ("get_task", lambda c, t, s: c.get_task(t)),
    ("cancel_task", lambda c, t, s: c.cancel_task(t)),
    ("list_task_steps", lambda c, t, s: c.list_task_steps(t)),
    ("get_step", lambda c, t, s: c.get_step(t, s)),
    ("get_step_audit_history", lambda c, t, s: c.get_step_audit_history(t, s)),
    ("wait_for_task", lambda c, t, s: c.wait_for_task(t, timeout=1)),
]
CALLS_WITH_A_STEP = [
    ("retry_step", lambda c, t, s: c.retry_step(s)),
    ("resolve_step", lambda c, t, s: c.resolve_step(s, {"by": "hand"})),
]


@pytest.mark.parametrize(
    ("method", "call"), CALLS_WITH_A_TASK, ids=[m for m, _ in CALLS_WITH_A_TASK]
)
async def test_unknown_task_is_not_found(
    client: Any, shop: dict[str, Any], method: str, call: Any
) -> None:
    existing = await client.create_task("one", namespace=SHOP)
    [existing_step] = await client.list_task_steps(existing.task_uuid)
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as info:
        await call(client, missing, existing_step.step_uuid)
    assert info.value.error_code == "task_not_found"
    assert str(info.value) == f"task {missing} does not exist"


@pytest.mark.parametrize(
    ("method", "call"), CALLS_WITH_A_STEP, ids=[m for m, _ in CALLS_WITH_A_STEP]
)
async def test_unknown_step_is_not_found(client: Any, method: str, call: Any) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as info:
        await call(client, None, missing)
    assert info.value.error_code == "step_not_found"
    assert f"step {missing} does not exist" in str(info.value)


async def test_step_of_another_task_is_not_found(client: Any, shop: dict[str, Any]) -> None:
    mine = await client.create_task("one", namespace=SHOP)
    other = await client.create_task("one", namespace=SHOP)
    [theirs] = await client.list_task_steps(other.task_uuid)
    for call in (client.get_step, client.get_step_audit_history):
        with pytest.raises(NotFoundError) as info:
            await call(mine.task_uuid, theirs.step_uuid)
        assert info.value.error_code == "step_not_found"
        assert str(info.value) == (
            f"step {theirs.step_uuid} does not exist in task {mine.task_uuid}"
        )


@pytest.mark.parametrize(
    ("method", "call"),
    CALLS_WITH_A_TASK + CALLS_WITH_A_STEP,
    ids=[m for m, _ in CALLS_WITH_A_TASK + CALLS_WITH_A_STEP],
)
@pytest.mark.parametrize("bad", ["not-a-uuid", "1234", 42])
async def test_malformed_uuids_are_validation_errors(
    client: Any, method: str, call: Any, bad: Any
) -> None:
    good = str(uuid.uuid4())
    for task, step_ in ((bad, good), (good, bad)):
        if method in ("retry_step", "resolve_step") and step_ == good:
            continue
        if method in ("get_task", "cancel_task", "list_task_steps", "wait_for_task") and (
            task == good
        ):
            continue
        with pytest.raises(ValidationError) as info:
            await call(client, task, step_)
        assert info.value.error_code == "invalid_uuid"
        assert f"{bad!r} is not a valid UUID" in str(info.value)


# --- list_tasks -------------------------------------------------------------------------------


@pytest.fixture
async def twelve_tasks(conn: db.Connection) -> dict[str, Any]:
    """12 tasks over two namespaces and templates, in every task state but resolved_manually.

    alpha/one (single step): 2 complete, 1 error, 4 pending.
    beta/four (diamond): 1 cancelled, 1 steps_in_process (its first step claimed), 3 pending.
    """
    await conn.register_template(single(name="one", namespace="alpha"))
    await conn.register_template(diamond(name="four", namespace="beta"))
    created: list[str] = []

    async def create(namespace: str, name: str) -> str:
        created.append(str(await conn.create_task(namespace, name)))
        return created[-1]

    complete_ = [await create("alpha", "one") for _ in range(2)]
    await drive(conn, "alpha", lambda r: None)
    error = await create("alpha", "one")
    await fail_permanently(conn, "alpha")
    alpha_pending = [await create("alpha", "one") for _ in range(4)]
    beta = [await create("beta", "four") for _ in range(5)]
    await conn.cancel_task(beta[0])
    [claimed] = await claim(conn, "beta", qty=1)
    in_process = str(claimed["task_uuid"])
    return {
        "newest_first": created[::-1],
        "alpha": [t for t in created[::-1] if t in [*complete_, error, *alpha_pending]],
        "beta": [t for t in created[::-1] if t in beta],
        "complete": complete_[::-1],
        "error": [error],
        "cancelled": [beta[0]],
        "steps_in_process": [in_process],
        "pending": [t for t in created[::-1] if t in alpha_pending + beta[1:] and t != in_process],
    }


def uuids(page: TaskListResponse) -> list[str]:
    return [t.task_uuid for t in page.tasks]


async def test_list_tasks_pages_newest_first(client: Any, twelve_tasks: dict[str, Any]) -> None:
    newest_first = twelve_tasks["newest_first"]
    first = await client.list_tasks(limit=5)
    assert isinstance(first, TaskListResponse)
    assert uuids(first) == newest_first[:5]
    p = first.pagination
    assert (p.total_count, p.page, p.per_page, p.total_pages) == (12, 1, 5, 3)
    assert (p.has_next, p.has_previous) == (True, False)

    second = await client.list_tasks(limit=5, offset=5)
    assert uuids(second) == newest_first[5:10]
    p = second.pagination
    assert (p.total_count, p.page, p.total_pages, p.has_next, p.has_previous) == (
        12,
        2,
        3,
        True,
        True,
    )

    last = await client.list_tasks(limit=5, offset=10)
    assert uuids(last) == newest_first[10:]
    p = last.pagination
    assert (p.page, p.has_next, p.has_previous) == (3, False, True)

    beyond = await client.list_tasks(limit=5, offset=15)
    assert beyond.tasks == []
    assert (beyond.pagination.total_count, beyond.pagination.page) == (12, 4)
    assert not beyond.pagination.has_next

    everything = await client.list_tasks()
    assert uuids(everything) == newest_first
    assert (everything.pagination.per_page, everything.pagination.total_pages) == (50, 1)
    assert [t.created_at for t in everything.tasks] == sorted(
        (t.created_at for t in everything.tasks), reverse=True
    )
    # every listed task is the full TaskResponse get_task returns
    for listed in everything.tasks:
        assert listed == await client.get_task(listed.task_uuid)


async def test_list_tasks_filters_by_namespace_and_status(
    client: Any, twelve_tasks: dict[str, Any]
) -> None:
    alpha = await client.list_tasks(namespace="alpha")
    assert uuids(alpha) == twelve_tasks["alpha"]
    assert alpha.pagination.total_count == 7
    beta = await client.list_tasks(namespace="beta", limit=2)
    assert uuids(beta) == twelve_tasks["beta"][:2]
    assert (beta.pagination.total_count, beta.pagination.total_pages) == (5, 3)

    total = 0
    for status in ("pending", "steps_in_process", "complete", "error", "cancelled"):
        page = await client.list_tasks(status=status)
        assert uuids(page) == twelve_tasks[status], status
        assert page.pagination.total_count == len(twelve_tasks[status])
        assert {t.status for t in page.tasks} == {status}
        total += page.pagination.total_count
    assert total == 12
    assert (await client.list_tasks(status="resolved_manually")).pagination.total_count == 0

    both = await client.list_tasks(namespace="alpha", status="pending", limit=3)
    assert both.pagination.total_count == 4
    assert uuids(both) == [t for t in twelve_tasks["pending"] if t in twelve_tasks["alpha"]][:3]
    assert [t.execution_status for t in (await client.list_tasks(status="error")).tasks] == [
        "blocked_by_failures"
    ]

    nothing = await client.list_tasks(namespace="nowhere")
    assert nothing.tasks == []
    p = nothing.pagination
    assert (p.total_count, p.page, p.total_pages, p.has_next, p.has_previous) == (
        0,
        1,
        0,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"status": "running"}, "unknown task status 'running' (valid: pending, steps_in_process"),
        ({"limit": 0}, "limit must be an integer from 1 to 1000"),
        ({"limit": 1001}, "limit must be an integer from 1 to 1000"),
        ({"offset": -1}, "offset must be an integer >= 0"),
        ({"namespace": ""}, "namespace must be a non-empty string"),
    ],
)
async def test_list_tasks_refuses_bad_arguments(
    client: Any, kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await client.list_tasks(**kwargs)
    assert fragment in str(info.value)


# --- cancel_task ------------------------------------------------------------------------------


async def test_cancel_task(client: Any, shop: dict[str, Any], conn: db.Connection) -> None:
    task = await client.create_task("order", namespace=SHOP)
    summary = await client.cancel_task(task.task_uuid, reason="customer changed their mind")
    assert summary == {
        "task_uuid": task.task_uuid,
        "previous_state": "pending",
        "state": "cancelled",
        "cancelled_steps": 4,
    }
    cancelled = await client.get_task(task.task_uuid)
    assert (cancelled.status, cancelled.execution_status) == ("cancelled", "cancelled")
    assert cancelled.step_counts["cancelled"] == 4
    [first, *_] = await client.list_task_steps(task.task_uuid)
    [*_, last] = await client.get_step_audit_history(task.task_uuid, first.step_uuid)
    assert (last.to_state, last.event) == ("cancelled", "task_cancelled")
    assert last.metadata == {"reason": "customer changed their mind"}

    with pytest.raises(InvalidStateError) as info:
        await client.cancel_task(task.task_uuid)
    assert "is cancelled and cannot be cancelled" in str(info.value)
    await assert_healthy(conn)


# --- steps ------------------------------------------------------------------------------------


async def test_list_task_steps_and_get_step(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    task = await client.create_task("order", namespace=SHOP)
    steps = await client.list_task_steps(task.task_uuid)
    assert all(isinstance(s, StepResponse) for s in steps)
    assert [s.name for s in steps] == ["start", "b", "c", "end"]  # template order
    assert [s.current_state for s in steps] == ["enqueued", "pending", "pending", "pending"]
    assert [s.dependencies for s in steps] == [[], ["start"], ["start"], ["b", "c"]]
    assert [s.ready for s in steps] == [True, False, False, False]
    assert [s.readiness_reason for s in steps] == [
        "ready: waiting for a worker",
        "waiting for start",
        "waiting for start",
        "waiting for b, c",
    ]
    start = steps[0]
    assert start.task_uuid == task.task_uuid
    assert start.handler == "handlers.start"
    assert (start.attempts, start.max_attempts, start.retryable) == (0, 3, True)
    assert (start.results, start.last_error, start.duration_ms) == (None, None, None)
    assert start.dependencies_satisfied and not steps[3].dependencies_satisfied
    assert await client.get_step(task.task_uuid, start.step_uuid) == start
    assert await client.get_step(uuid.UUID(task.task_uuid), uuid.UUID(start.step_uuid)) == start

    [row] = await claim(conn, SHOP, worker="w-7")
    running = await client.get_step(task.task_uuid, start.step_uuid)
    assert (running.current_state, running.attempts, running.worker_id) == ("in_progress", 1, "w-7")
    assert running.readiness_reason == "running on w-7 (attempt 1 of 3)"
    assert running.lease_expires_at == row["lease_expires_at"]  # the lease claim_steps gave
    await complete(conn, success(row, {"ok": 1}, metadata={"rows": 3}))

    done = await client.get_step(task.task_uuid, start.step_uuid)
    assert done.current_state == "complete"
    assert done.results == {"ok": 1}
    assert done.metadata == {"rows": 3}
    assert done.readiness_reason == "complete"
    assert done.started_at == running.started_at  # the claim's start, kept at completion
    assert done.completed_at is not None and done.completed_at > done.started_at
    assert done.duration_ms == pytest.approx(
        (done.completed_at - done.started_at).total_seconds() * 1000
    )
    b = await client.get_step(task.task_uuid, steps[1].step_uuid)
    assert (b.current_state, b.ready, b.dependencies_satisfied) == ("enqueued", True, True)


async def test_step_audit_history_oldest_first(client: Any, conn: db.Connection) -> None:
    await conn.register_template(single(name="flaky", namespace=SHOP, retry={"backoff": "none"}))
    task = await client.create_task("flaky", namespace=SHOP)
    [row] = await claim(conn, SHOP)
    await complete(conn, failure(row, "db down", retry_after=0))
    [row] = await wait_for_claim(conn, SHOP, worker="w2")
    await complete(conn, success(row, {"n": 2}, worker="w2"))

    [only] = await client.list_task_steps(task.task_uuid)
    history = await client.get_step_audit_history(task.task_uuid, only.step_uuid)
    assert all(isinstance(h, StepAuditResponse) for h in history)
    assert [(h.from_state, h.to_state, h.event, h.attempt) for h in history] == [
        (None, "enqueued", "created", 0),
        ("enqueued", "in_progress", "claimed", 1),
        ("in_progress", "waiting_for_retry", "retry_scheduled", 1),
        ("waiting_for_retry", "in_progress", "claimed", 2),
        ("in_progress", "complete", "succeeded", 2),
    ]
    assert [h.worker_id for h in history] == [None, "w1", "w1", "w2", "w2"]
    assert history[2].error_summary == "RuntimeError: db down"
    assert history[2].duration_ms == 1.5
    assert [h.transition_id for h in history] == sorted(h.transition_id for h in history)
    assert [h.created_at for h in history] == sorted(h.created_at for h in history)
    assert {(h.task_uuid, h.step_uuid) for h in history} == {(task.task_uuid, only.step_uuid)}


async def test_retry_step_and_resolve_step(client: Any, conn: db.Connection) -> None:
    await conn.register_template(linear(3, name="chain", namespace=SHOP))
    task = await client.create_task("chain", namespace=SHOP)
    await fail_permanently(conn, message="card declined")
    failed = await client.get_task(task.task_uuid)
    assert (failed.status, failed.execution_status, failed.failed_steps) == (
        "error",
        "blocked_by_failures",
        1,
    )
    s1, s2, _s3 = await client.list_task_steps(task.task_uuid)
    assert s1.current_state == "error"
    assert s1.last_error is not None and s1.last_error["message"] == "card declined"
    assert s1.readiness_reason.startswith("failed: RuntimeError: card declined")

    retried = await client.retry_step(s1.step_uuid)
    assert retried == {
        "step_uuid": s1.step_uuid,
        "state": "enqueued",
        "task_uuid": task.task_uuid,
        "task_state": "steps_in_process",
    }
    assert (await client.get_step(task.task_uuid, s1.step_uuid)).attempts == 0
    with pytest.raises(InvalidStateError) as info:
        await client.retry_step(s1.step_uuid)
    assert "only a step in error can be retried" in str(info.value)

    resolved = await client.resolve_step(s1.step_uuid, {"charged": "by hand"})
    assert resolved["state"] == "resolved_manually"
    assert resolved["previous_state"] == "enqueued"
    s1_now = await client.get_step(task.task_uuid, s1.step_uuid)
    assert (s1_now.current_state, s1_now.results) == ("resolved_manually", {"charged": "by hand"})
    s2_now = await client.get_step(task.task_uuid, s2.step_uuid)
    assert (s2_now.current_state, s2_now.ready) == ("enqueued", True)
    with pytest.raises(InvalidStateError):
        await client.resolve_step(s1.step_uuid)
    with pytest.raises(ValidationError) as verr:
        await client.resolve_step(s2.step_uuid, {"nan": math.nan})
    assert verr.value.error_code == "invalid_result"
    await assert_healthy(conn)


async def test_retry_failed_redrives_the_dead_letters_oldest_first(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    tasks = []
    for n in range(5):
        tasks.append((await client.create_task("one", namespace=SHOP, context={"n": n})).task_uuid)
        await fail_permanently(conn)
    running = await client.create_task("order", namespace=SHOP)  # not in error: not touched
    since = min(t.failed_at for t in (await client.retry_failed(SHOP, dry_run=True)).tasks)

    dry = await client.retry_failed(SHOP, "one", since=since, limit=2, dry_run=True)
    assert (dry.dry_run, dry.tasks_matched, dry.tasks_retried, dry.steps_retried) == (
        True,
        2,
        0,
        0,
    )
    assert dry.steps_to_retry == 2
    assert [(t.task_uuid, t.steps, t.retried, t.status) for t in dry.tasks] == [
        (tasks[0], ["only"], False, "error"),
        (tasks[1], ["only"], False, "error"),
    ]
    assert (await client.get_task(tasks[0])).status == "error"  # nothing changed

    one = await client.retry_failed(SHOP, "one", limit=1, reason="first one")
    assert [(t.task_uuid, t.retried, t.status) for t in one.tasks] == [
        (tasks[0], True, "steps_in_process")
    ]
    rest = await client.retry_all_failed(SHOP, since=since, batch_size=2, reason="the rest")
    # two full batches, then an empty one that ends the run
    assert (rest.batches, rest.tasks_matched, rest.tasks_retried, rest.steps_retried) == (
        3,
        4,
        4,
        4,
    )
    assert [t.task_uuid for t in rest.tasks] == tasks[1:]
    assert rest.before is not None and rest.since == since
    assert all(t.failed_at < rest.before for t in rest.tasks)
    assert json.loads(json.dumps(rest.to_dict())) == rest.to_dict()
    assert (await client.retry_all_failed(SHOP)).tasks == []
    for task in tasks:
        assert (await client.get_task(task)).status == "steps_in_process"
    assert (await client.get_task(running.task_uuid)).status == "pending"

    # max_tasks: the oldest ones only. They all failed in one complete_steps call, at one
    # time: ties go by task uuid.
    log = await drive(conn, SHOP, lambda r: failure(r, "again", retryable=False))
    assert len(log.rounds) == 1
    capped = await client.retry_all_failed(SHOP, "one", max_tasks=3, batch_size=2)
    assert (capped.batches, [t.task_uuid for t in capped.tasks]) == (2, sorted(tasks)[:3])
    await assert_healthy(conn)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"limit": 0}, "limit must be a whole number from 1 to 1000, got 0"),
        ({"limit": 1001}, "limit must be a whole number from 1 to 1000"),
        ({"limit": True}, "limit must be a whole number"),
        ({"since": datetime(2026, 1, 1)}, "since must be a timezone-aware datetime"),
        ({"before": "yesterday"}, "before must be a timezone-aware datetime"),
        ({"name": ""}, "template name must be a non-empty string"),
    ],
)
async def test_retry_failed_refuses_bad_arguments(
    client: Any, shop: dict[str, Any], kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValidationError, match=needle) as info:
        await client.retry_failed(SHOP, **kwargs)
    assert info.value.error_code == "invalid_argument"
    with pytest.raises(ValidationError, match="max_tasks must be"):
        await client.retry_all_failed(SHOP, max_tasks=0)
    with pytest.raises(NotFoundError) as nf:
        await client.retry_failed("nowhere")
    assert nf.value.error_code == "template_not_found"


# --- wait_for_task ----------------------------------------------------------------------------


async def test_wait_for_task_returns_on_completion_via_notification(
    client: Any, shop: dict[str, Any], conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No safety re-check during this test: only the notification can end the wait early.
    monkeypatch.setattr(client_module, "WAIT_RECHECK_SECONDS", 60.0)
    task = await client.create_task("order", namespace=SHOP)
    waiter = asyncio.create_task(client.wait_for_task(task.task_uuid, timeout=30))
    await poll(lambda: listener_pids(conn))
    await drive(conn, SHOP, lambda r: None)
    finished = time.monotonic()
    result = await asyncio.wait_for(waiter, 10)
    assert time.monotonic() - finished < 2.0
    assert isinstance(result, TaskResponse)
    assert (result.task_uuid, result.status, result.completed_steps) == (
        task.task_uuid,
        "complete",
        4,
    )


async def test_wait_for_task_returns_on_permanent_failure(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    task = await client.create_task("order", namespace=SHOP)
    waiter = asyncio.create_task(client.wait_for_task(task.task_uuid, timeout=30))
    await poll(lambda: listener_pids(conn))
    await fail_permanently(conn)
    result = await asyncio.wait_for(waiter, 10)
    assert (result.status, result.failed_steps) == ("error", 1)


async def test_wait_for_task_returns_on_cancel(client: Any, shop: dict[str, Any]) -> None:
    task = await client.create_task("order", namespace=SHOP)
    waiter = asyncio.create_task(client.wait_for_task(task.task_uuid, timeout=30))
    await asyncio.sleep(0)  # let the waiter start; either order must work
    await client.cancel_task(task.task_uuid)
    assert (await asyncio.wait_for(waiter, 10)).status == "cancelled"


async def test_wait_for_a_finished_task_returns_at_once(
    client: Any, shop: dict[str, Any], conn: db.Connection
) -> None:
    task = await client.create_task("one", namespace=SHOP)
    await drive(conn, SHOP, lambda r: None)
    assert (await client.wait_for_task(task.task_uuid, timeout=0)).status == "complete"


async def test_wait_for_task_times_out(client: Any, shop: dict[str, Any]) -> None:
    task = await client.create_task("order", namespace=SHOP)
    started = time.monotonic()
    with pytest.raises(TaskTimeoutError) as info:
        await client.wait_for_task(task.task_uuid, timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.5  # it waited the whole timeout (no upper bound: CI stalls)
    error = info.value
    assert isinstance(error, TimeoutError) and isinstance(error, TaskerError)
    assert error.error_code == "wait_timeout"
    assert (error.task_uuid, error.last_state, error.timeout) == (task.task_uuid, "pending", 0.5)
    assert f"task {task.task_uuid} did not reach a final state" in str(error)
    assert "within 0.5 s; it is pending" in str(error)


async def test_wait_for_task_survives_a_lost_listen_session(
    client: Any, shop: dict[str, Any], conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "WAIT_RECHECK_SECONDS", 0.2)
    task = await client.create_task("one", namespace=SHOP)
    waiter = asyncio.create_task(client.wait_for_task(task.task_uuid, timeout=30))
    [first] = await poll(lambda: listener_pids(conn))
    await conn.execute("SELECT pg_terminate_backend($1)", first)
    # the next safety re-check opens a new LISTEN session

    async def new_listener() -> set[int]:
        return await listener_pids(conn) - {first}

    await poll(new_listener, deadline=30)  # reconnects back off; a loaded CI box is slow
    await drive(conn, SHOP, lambda r: None)
    assert (await asyncio.wait_for(waiter, 30)).status == "complete"


async def test_wait_for_task_survives_losing_every_session(
    client: Any, shop: dict[str, Any], conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a database restart does to a waiter: its pool sessions and LISTEN session die."""
    monkeypatch.setattr(client_module, "WAIT_RECHECK_SECONDS", 0.2)
    task = await client.create_task("one", namespace=SHOP)
    # Kill only once the waiter has read the task: a session lost before that first read is
    # reported at once (the wait never reached the task), which is not what this test is about.
    read_once = asyncio.Event()
    get_task = client.get_task

    async def get_task_and_tell(*args: Any, **kwargs: Any) -> Any:
        found = await get_task(*args, **kwargs)
        read_once.set()
        return found

    monkeypatch.setattr(client, "get_task", get_task_and_tell)
    waiter = asyncio.create_task(client.wait_for_task(task.task_uuid, timeout=30))
    await asyncio.wait_for(read_once.wait(), 30)
    [first] = await poll(lambda: listener_pids(conn))
    killed = await conn.fetchval(
        """
        SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND application_name = 'tasker-pg'
        """
    )
    assert killed >= 2  # the LISTEN session and at least one pooled session

    async def new_listener() -> set[int]:
        return await listener_pids(conn) - {first}

    await poll(new_listener, deadline=30)  # reconnects back off; a loaded CI box is slow
    await drive(conn, SHOP, lambda r: None)
    assert (await asyncio.wait_for(waiter, 30)).status == "complete"


# --- register_templates -----------------------------------------------------------------------


async def test_register_templates_from_a_directory_and_a_file(
    client: Any, tmp_path: Path, conn: db.Connection
) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    write_yaml(folder / "b_refund.yml", "refund", steps=1)
    write_yaml(folder / "a_order.yaml", "order", steps=3)
    (folder / "notes.txt").write_text("not a template")

    registered = await client.register_templates(folder)
    assert all(isinstance(r, TemplateRegistration) for r in registered)
    assert [(r.namespace, r.name, r.version, r.step_count) for r in registered] == [
        ("yamlns", "order", "1.0.0", 3),
        ("yamlns", "refund", "1.0.0", 1),
    ]
    ids = await conn.fetch("SELECT name, named_task_id FROM tasker.named_tasks ORDER BY name")
    assert [r.named_task_id for r in registered] == [r["named_task_id"] for r in ids]
    # unchanged templates register again as a no-op, with the same ids
    assert await client.register_templates(str(folder)) == registered

    [single_file] = await client.register_templates(
        write_yaml(tmp_path / "ship.yaml", "ship", version="2.0.0")
    )
    assert (single_file.name, single_file.version) == ("ship", "2.0.0")
    task = await client.create_task("ship", namespace="yamlns")
    assert task.total_steps == 2


async def test_register_templates_is_all_or_nothing(
    client: Any, tmp_path: Path, conn: db.Connection
) -> None:
    write_yaml(tmp_path / "a.yaml", "order", steps=2)
    await client.register_templates(tmp_path / "a.yaml")
    write_yaml(tmp_path / "a.yaml", "order", steps=3)  # a different body, same version
    write_yaml(tmp_path / "b.yaml", "refund")
    with pytest.raises(ValidationError) as info:
        await client.register_templates(tmp_path)
    assert info.value.error_code == "template_version_conflict"
    assert "register the change as a new version" in str(info.value)
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_tasks") == 1

    with pytest.raises(ValidationError) as info:
        await client.register_templates(tmp_path / "missing.yaml")
    assert "does not exist" in str(info.value)


# --- health_check -----------------------------------------------------------------------------


async def test_health_check_healthy(client: Any, shop: dict[str, Any]) -> None:
    for _ in range(2):  # before the pool exists, then through it
        health = await client.health_check()
        assert isinstance(health, HealthResponse)
        assert (health.healthy, health.status, health.database_reachable) == (
            True,
            "healthy",
            True,
        )
        assert health.schema_version == health.expected_schema_version == expected_version()
        assert health.server_version and health.server_version[0].isdigit()
        assert health.latency_ms is not None and health.latency_ms >= 0
        assert health.message is None
        await client.list_tasks()


async def test_health_check_reports_an_outdated_schema(client: Any, conn: db.Connection) -> None:
    await conn.execute(
        "DELETE FROM tasker.schema_migrations "
        "WHERE version = (SELECT max(version) FROM tasker.schema_migrations)"
    )
    health = await client.health_check()
    assert (health.healthy, health.status, health.database_reachable) == (
        False,
        "schema_outdated",
        True,
    )
    # the version before the newest (versions need not be consecutive)
    previous = [m.version for m in load_migrations()][-2]
    assert (health.schema_version, health.expected_schema_version) == (
        previous,
        expected_version(),
    )
    assert health.message is not None and "tasker-pg migrate" in health.message
    # every other call refuses to work on it, naming the fix
    with pytest.raises(SchemaError) as info:
        await client.get_task(str(uuid.uuid4()))
    assert "tasker-pg migrate" in str(info.value)


async def test_health_check_reports_an_unreachable_database(make_client: MakeClient) -> None:
    c = make_client(UNREACHABLE_DSN, connect_timeout=5)
    started = time.monotonic()
    health = await c.health_check()
    assert time.monotonic() - started < 6
    assert (health.healthy, health.status, health.database_reachable) == (
        False,
        "unhealthy",
        False,
    )
    assert (health.schema_version, health.server_version, health.latency_ms) == (None, None, None)
    assert health.message is not None and "127.0.0.1:1" in health.message
    with pytest.raises(DatabaseNotFoundError):
        await c.get_task(str(uuid.uuid4()))


# --- responses --------------------------------------------------------------------------------


async def test_every_response_turns_into_json(
    client: Any, shop: dict[str, Any], conn: db.Connection, tmp_path: Path
) -> None:
    task = await client.create_task("order", namespace=SHOP, context={"a": [1, 2]})
    [row] = await claim(conn, SHOP)
    await complete(conn, failure(row, "oops", retry_after=0))
    steps = await client.list_task_steps(task.task_uuid)
    responses = [
        task,
        await client.list_tasks(),
        steps[0],
        (await client.get_step_audit_history(task.task_uuid, steps[0].step_uuid))[-1],
        await client.health_check(),
        (await client.register_templates(write_yaml(tmp_path / "t.yaml", "t")))[0],
    ]
    for response in responses:
        data = json.loads(json.dumps(response.to_dict()))
        assert data == response.to_dict()
    as_dict = task.to_dict()
    assert as_dict["task_uuid"] == task.task_uuid
    assert as_dict["created_at"] == task.created_at.isoformat()
    assert as_dict["step_counts"]["enqueued"] == 1
    listed = responses[1].to_dict()
    assert listed["pagination"]["total_count"] == 1
    assert listed["tasks"][0]["task_uuid"] == task.task_uuid
    step_dict = steps[0].to_dict()
    assert step_dict["last_error"]["message"] == "oops"
    assert steps[0].next_attempt_at is not None
    assert step_dict["next_attempt_at"] == steps[0].next_attempt_at.isoformat()
    with pytest.raises(AttributeError):
        task.status = "complete"  # type: ignore[misc]


# --- the guide's example ----------------------------------------------------------------------

# The "Submitting Tasks via Client SDK" section of the Python guide, verbatim apart from the
# import line (tasker_core -> tasker_pg).
GUIDE_CLIENT_EXAMPLE = """
from tasker_pg import TaskerClient

# Create a client (defaults: initiator="tasker-core-python", source_system="tasker-core")
client = TaskerClient(initiator="my-service", source_system="my-api")

# Create a task
response = client.create_task(
    "order_fulfillment",
    namespace="ecommerce",
    context={
        "customer": {"id": 123, "email": "customer@example.com"},
        "items": [
            {"product_id": 1, "quantity": 2, "price": 29.99}
        ],
    },
    reason="New order received",
)
print(f"Task created: {response.task_uuid}")
print(f"Status: {response.status}")

# Get task status
task = client.get_task(response.task_uuid)
print(f"Task status: {task.status}")

# List tasks with filters
task_list = client.list_tasks(namespace="ecommerce", limit=10)
for t in task_list.tasks:
    print(f"  {t.task_uuid}: {t.status}")
print(f"Total: {task_list.pagination.total_count}")

# List task steps
steps = client.list_task_steps(response.task_uuid)
for step in steps:
    print(f"Step {step.name}: {step.current_state}")

# Check health
health = client.health_check()
print(f"API healthy: {health.healthy}")

# Cancel a task
client.cancel_task(response.task_uuid)
"""


ORDER_FULFILLMENT_YAML = """
name: order_fulfillment
namespace_name: ecommerce
version: 1.0.0
steps:
  - name: validate_cart
    handler: {callable: ecommerce.ValidateCartHandler}
  - name: process_payment
    handler: {callable: ecommerce.ProcessPaymentHandler}
    dependencies: [validate_cart]
  - name: update_inventory
    handler: {callable: ecommerce.UpdateInventoryHandler}
    dependencies: [validate_cart]
  - name: send_confirmation
    handler: {callable: ecommerce.SendConfirmationHandler}
    dependencies: [process_payment, update_inventory]
"""


def test_the_guides_client_example_runs(
    dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A plain script: no event loop in this thread, the DSN from TASKER_DATABASE_URL."""
    monkeypatch.setenv("TASKER_DATABASE_URL", dsn)
    (tmp_path / "order_fulfillment.yaml").write_text(ORDER_FULFILLMENT_YAML)
    with TaskerClient() as setup:
        setup.register_templates(tmp_path / "order_fulfillment.yaml")

    out = io.StringIO()
    namespace: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(GUIDE_CLIENT_EXAMPLE, "python-guide.md", "exec"), namespace)
    finally:
        if "client" in namespace:
            namespace["client"].close()
    task_uuid = namespace["response"].task_uuid
    assert out.getvalue().splitlines() == [
        f"Task created: {task_uuid}",
        "Status: pending",
        "Task status: pending",
        f"  {task_uuid}: pending",
        "Total: 1",
        "Step validate_cart: enqueued",
        "Step process_payment: pending",
        "Step update_inventory: pending",
        "Step send_confirmation: pending",
        "API healthy: True",
    ]
    with TaskerClient(dsn) as check:
        after = check.get_task(task_uuid)
    assert after.status == "cancelled"
    assert (after.initiator, after.source_system) == ("my-service", "my-api")


# --- the sync client: in a running loop, in threads, lifecycle -------------------------------


async def test_sync_client_inside_a_running_event_loop(
    dsn: str, shop: dict[str, Any], conn: db.Connection
) -> None:
    """What a notebook does: blocking calls straight from a coroutine."""
    asyncio.get_running_loop()
    with TaskerClient(dsn) as sync:
        task = sync.create_task("one", namespace=SHOP, context={"n": 1})
        assert sync.get_task(task.task_uuid) == task
        assert sync.list_tasks().pagination.total_count == 1
        [only] = sync.list_task_steps(task.task_uuid)
        assert sync.get_step(task.task_uuid, only.step_uuid) == only
        assert sync.health_check().healthy
        with pytest.raises(TaskTimeoutError):
            sync.wait_for_task(task.task_uuid, timeout=0.2)
        await drive(conn, SHOP, lambda r: None)
        assert sync.wait_for_task(task.task_uuid, timeout=5).status == "complete"
        assert len(sync.get_step_audit_history(task.task_uuid, only.step_uuid)) == 3


def test_sync_client_from_four_threads_at_once(dsn: str, shop: dict[str, Any]) -> None:
    per_thread = 5
    barrier = threading.Barrier(4)
    with TaskerClient(dsn) as sync:

        def work(index: int) -> list[str]:
            barrier.wait(timeout=10)
            made = []
            for i in range(per_thread):
                task = sync.create_task("one", namespace=SHOP, context={"thread": index, "i": i})
                assert sync.get_task(task.task_uuid).context == {"thread": index, "i": i}
                sync.list_tasks(limit=5)
                made.append(task.task_uuid)
            return made

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(work, range(4)))
        created = [t for r in results for t in r]
        assert len(set(created)) == 4 * per_thread
        listed = sync.list_tasks(limit=100)
        assert listed.pagination.total_count == 4 * per_thread
        assert set(created) == {t.task_uuid for t in listed.tasks}


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tasker-pg-client"]


def test_sync_client_close_is_idempotent_and_final(dsn: str) -> None:
    before = len(_client_threads())
    TaskerClient(dsn).close()  # never used: nothing to stop
    sync = TaskerClient(dsn)
    assert "TaskerClient" in repr(sync)
    assert sync.health_check().healthy
    assert len(_client_threads()) == before + 1
    sync.close()
    sync.close()
    assert sync.closed
    assert len(_client_threads()) == before
    with pytest.raises(ClientClosedError) as info:
        sync.list_tasks()
    assert info.value.error_code == "client_closed"
    with TaskerClient(dsn) as managed:
        managed.health_check()
    assert managed.closed
    assert len(_client_threads()) == before


def test_sync_close_cancels_a_wait_in_another_thread(dsn: str, shop: dict[str, Any]) -> None:
    sync = TaskerClient(dsn)
    task = sync.create_task("one", namespace=SHOP)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(sync.wait_for_task, task.task_uuid, 30)
        deadline = time.monotonic() + 10
        while not _waiting_in(sync) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        sync.close()
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result(timeout=10)
        assert time.monotonic() - started < 5


def _waiting_in(sync: TaskerClient) -> bool:
    return bool(sync._client._events._waiters)


async def test_async_client_lifecycle(dsn: str) -> None:
    async with AsyncTaskerClient(dsn) as c:
        assert (await c.health_check()).healthy
        assert "AsyncTaskerClient" in repr(c)
    assert c.closed
    await c.close()  # again: nothing happens
    with pytest.raises(ClientClosedError):
        await c.list_tasks()
    with pytest.raises(ClientClosedError):
        await c.health_check()


async def test_async_close_ends_a_wait_at_once(dsn: str, shop: dict[str, Any]) -> None:
    c = AsyncTaskerClient(dsn)
    task = await c.create_task("one", namespace=SHOP)
    waiter = asyncio.create_task(c.wait_for_task(task.task_uuid, timeout=30))

    async def waiting() -> bool:
        return bool(c._events._waiters)

    await poll(waiting)
    await c.close()
    with pytest.raises(ClientClosedError):
        await asyncio.wait_for(waiter, 2)


async def test_dsn_none_is_resolved_from_the_environment(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKER_DATABASE_URL", dsn)
    async with AsyncTaskerClient() as c:
        assert (await c.list_tasks()).pagination.total_count == 0
