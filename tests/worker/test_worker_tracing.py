"""OpenTelemetry traces of real step runs: a real Worker on PostgreSQL, spans caught by the SDK's
in-memory exporter.

A task created with a `traceparent` yields one span per step, all in that trace and children of
the given span, with the step's ids, names, attempt, namespace and outcome as attributes; a
failing step's span has error status and the recorded exception; a task without one yields root
spans; a handler runs with its step's span as the current span (sync handlers in their thread).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tasker_pg import StepContext, StepHandler, StepHandlerResult, Worker, db
from tasker_pg.client import AsyncTaskerClient
from tasker_pg.errors import ValidationError
from tasker_pg.template import load_templates
from tasker_pg.tracing import current_traceparent
from tests.support import cli as cli_support
from tests.support.worker import (
    WORKFLOWS,
    assert_invariants,
    poll,
    registry_of,
    steps_of,
    templates,
    wait_final,
)
from tests.support.workflows import math_handlers

REPO = Path(__file__).resolve().parents[2]
FAST: dict[str, Any] = {"poll_interval": 0.1, "summary_interval": 0}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

PROBE_YAML = """
name: probe
namespace_name: traced
version: 2.1.0
steps:
  - name: sync_probe
    handler: {callable: trace_probe_sync}
  - name: async_probe
    depends_on: [sync_probe]
    handler: {callable: trace_probe_async}
"""

# what each probe handler saw: step name -> (current span id, context.traceparent)
SEEN: dict[str, tuple[int, str | None]] = {}


class SyncProbe(StepHandler):
    handler_name = "trace_probe_sync"

    def call(self, context: StepContext) -> StepHandlerResult:
        span_id = trace.get_current_span().get_span_context().span_id
        SEEN[context.step_name] = (span_id, context.traceparent)
        return self.success({"ok": True})


class AsyncProbe(StepHandler):
    handler_name = "trace_probe_async"

    async def call(self, context: StepContext) -> StepHandlerResult:  # type: ignore[override]
        span_id = trace.get_current_span().get_span_context().span_id
        SEEN[context.step_name] = (span_id, context.traceparent)
        return self.success({"ok": True})


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def step_spans(memory: InMemorySpanExporter, task: uuid.UUID) -> list[ReadableSpan]:
    return [
        s
        for s in memory.get_finished_spans()
        if s.attributes is not None and s.attributes.get("tasker.task.uuid") == str(task)
    ]


async def test_a_task_with_a_traceparent_gives_four_child_spans_of_it(
    dsn: str, conn: db.Connection, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("linear"),
        tracer_provider=provider,
        worker_id="tracing-worker",
        **FAST,
    ):
        task = await conn.create_task(
            "math", "linear_workflow", {"even_number": 6}, options={"traceparent": TRACEPARENT}
        )
        assert await wait_final(conn, [task]) == {task: "complete"}
    # the worker has stopped: every span it opened has ended
    spans = step_spans(memory, task)
    steps = await steps_of(conn, task)
    assert sorted(s.name for s in spans) == [
        f"tasker.step math/linear_step_{i}" for i in (1, 2, 3, 4)
    ]
    for span in spans:
        assert span.kind == SpanKind.CONSUMER
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None
        assert format(span.parent.span_id, "016x") == PARENT_ID
        assert span.parent.is_remote
        assert span.status.status_code == StatusCode.UNSET
        attrs = dict(span.attributes or {})
        name = attrs["tasker.step.name"]
        assert attrs == {
            "tasker.task.uuid": str(task),
            "tasker.step.uuid": str(steps[name]["step_uuid"]),
            "tasker.step.name": name,
            "tasker.step.template": name,
            "tasker.namespace": "math",
            "tasker.task.name": "linear_workflow",
            "tasker.task.version": "1.0.0",
            "tasker.step.attempt": 1,
            "tasker.step.max_attempts": steps[name]["max_attempts"],
            "tasker.worker.id": "tracing-worker",
            "tasker.step.outcome": "succeeded",
        }
    # the span covers the handler run: the steps ran one after the other, so did their spans
    ordered = sorted(spans, key=lambda s: s.attributes["tasker.step.name"])  # type: ignore[index]
    for before, after in itertools.pairwise(ordered):
        assert before.end_time is not None and after.start_time is not None
        assert before.end_time <= after.start_time


async def test_a_failing_step_span_has_error_status_and_without_traceparent_is_a_root(
    dsn: str, conn: db.Connection, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    outer = provider.get_tracer("test")
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("linear"),
        tracer_provider=provider,
        **FAST,
    ):
        # an odd number: the first step fails permanently (validation_error, not retryable)
        with outer.start_as_current_span("unrelated caller span"):
            task = await conn.create_task("math", "linear_workflow", {"even_number": 3})
        assert await wait_final(conn, [task]) == {task: "error"}
    [span] = step_spans(memory, task)
    assert span.name == "tasker.step math/linear_step_1"
    assert span.parent is None  # no traceparent: a root span, not the caller's context
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == ("validation_error: Task context must contain an even number")
    assert span.attributes is not None
    assert span.attributes["tasker.step.outcome"] == "failed"


async def test_the_step_span_is_current_in_sync_and_async_handlers(
    dsn: str,
    conn: db.Connection,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
    tmp_path: Path,
) -> None:
    provider, memory = exporter
    (tmp_path / "probe.yaml").write_text(PROBE_YAML)
    registry = registry_of()
    registry.register(SyncProbe)
    registry.register(AsyncProbe)
    SEEN.clear()
    async with Worker(
        ["traced"],
        registry,
        dsn=dsn,
        templates=load_templates(tmp_path / "probe.yaml"),
        tracer_provider=provider,
        **FAST,
    ):
        task = await conn.create_task("traced", "probe", {}, options={"traceparent": TRACEPARENT})
        assert await wait_final(conn, [task]) == {task: "complete"}
    spans = {s.attributes["tasker.step.name"]: s for s in step_spans(memory, task)}  # type: ignore[index]
    assert set(spans) == {"sync_probe", "async_probe"}
    for name, span in spans.items():
        assert SEEN[name] == (span.context.span_id, TRACEPARENT)
        assert span.attributes is not None
        assert span.attributes["tasker.task.version"] == "2.1.0"


async def test_the_client_takes_the_current_span_as_the_traceparent(
    dsn: str, conn: db.Connection, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, _ = exporter
    async with AsyncTaskerClient(dsn=dsn) as client:
        await client.register_templates(WORKFLOWS / "linear.yaml")
        with provider.get_tracer("test").start_as_current_span("create order") as span:
            traceparent = current_traceparent()
            created = await client.create_task(
                "linear_workflow",
                namespace="math",
                context={"even_number": 6},
                traceparent=traceparent,
            )
        context = span.get_span_context()
        flags = int(context.trace_flags)
        assert traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        stored = await conn.fetchval(
            "SELECT traceparent FROM tasker.tasks WHERE task_uuid = $1", created.task_uuid
        )
        assert stored == traceparent
        with pytest.raises(ValidationError, match="traceparent must be a W3C trace context"):
            await client.create_task(
                "linear_workflow", namespace="math", context={}, traceparent="00-abc-01"
            )
    # outside any span there is no trace context to pass on
    assert current_traceparent() is None


def test_the_core_imports_and_builds_a_worker_without_opentelemetry() -> None:
    code = """
import sys
for name in ("opentelemetry", "rich"):
    sys.modules[name] = None  # an import of it fails, as when it is not installed
import tasker_pg.cli, tasker_pg.client, tasker_pg.top
from tasker_pg import HandlerRegistry, Worker
from tasker_pg.errors import ConfigurationError
from tasker_pg.tracing import current_traceparent
assert current_traceparent() is None
Worker(["ns"], HandlerRegistry())
try:
    Worker(["ns"], HandlerRegistry(), tracing=True)
except ConfigurationError as exc:
    print(exc)
print(sorted(m for m, v in sys.modules.items()
             if v is not None and m.startswith(("opentelemetry", "rich"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "tracing needs OpenTelemetry; install the otel extra: pip install 'tasker-pg[otel]'",
        "[]",
    ]


def spawn_otel_worker(log_path: Path, dsn: str) -> subprocess.Popen[bytes]:
    """`tasker-pg worker --otel` running the checkout example, its output in `log_path`."""
    env = dict(os.environ, TASKER_DATABASE_URL=dsn)
    env.pop("OTEL_SERVICE_NAME", None)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                cli_support.console_script(),
                "worker",
                "--otel",
                "--handlers",
                "examples.ecommerce.handlers",
                "--templates",
                "examples/ecommerce",
                "--poll-interval",
                "0.2",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_worker_command_with_otel_exports_the_step_spans(dsn: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    proc = spawn_otel_worker(log_path, dsn)
    conn = await db.connect(dsn)
    try:

        async def started() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return "started: namespaces ecommerce" in log_path.read_text()

        await poll(started, what="the worker starting")
        task = await conn.create_task(
            "ecommerce",
            "checkout_workflow",
            {"cart_items": [{"product_id": 2, "quantity": 1}]},
            options={"traceparent": TRACEPARENT},
        )
        assert await wait_final(conn, [task]) == {task: "complete"}
        proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return proc.poll() is not None

        await poll(exited, what="the worker exiting")
        output = log_path.read_text()
        assert proc.returncode == 0, output
        # no OTLP exporter installed: the SDK's console exporter, one JSON object per span
        spans = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}$", output, re.M | re.S)]
        ours = [s for s in spans if s["attributes"].get("tasker.task.uuid") == str(task)]
        assert sorted(s["name"] for s in ours) == sorted(
            f"tasker.step ecommerce/{name}" for name in (await steps_of(conn, task))
        )
        assert len(ours) == 4
        for span in ours:
            assert span["context"]["trace_id"] == f"0x{TRACE_ID}"
            assert span["parent_id"] == f"0x{PARENT_ID}"
            assert span["kind"] == "SpanKind.CONSUMER"
            assert span["attributes"]["tasker.step.outcome"] == "succeeded"
            assert span["resource"]["attributes"]["service.name"] == "tasker-pg-worker"
        await assert_invariants(conn)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await conn.close()
