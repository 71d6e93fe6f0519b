"""OpenTelemetry traces: one span per step run, a child of the trace its task was created in.

Needs the optional extra `otel` (`pip install 'tasker-pg[otel]'`: opentelemetry-api and -sdk);
nothing else in tasker-pg imports OpenTelemetry, and `require_otel()` names the extra when it is
missing. A worker traces only when asked (`Worker(tracing=True)`, `tasker-pg worker --otel`);
otherwise the step path makes no tracing call at all.

- A task carries the W3C trace context it was created under: the `traceparent` option of
  `create_task` (`TaskerClient.create_task(traceparent=...)`, `current_traceparent()` for the
  caller's current span), stored in `tasker.tasks.traceparent` and returned with every claim.
- `StepTracer` opens the span `tasker.step <namespace>/<template step>` (kind CONSUMER) when a
  handler starts and ends it when the handler returns, raises or times out; it is the current
  span while the handler runs (sync handlers too: their thread runs in a copy of the step's
  context). Its parent is the task's traceparent; a task without one gives root spans.
- The span's `tasker.step.outcome` is what the handler's outcome asks of the engine, by the
  engine's rule: `succeeded`, `checkpointed`, `retried` (a retryable failure with attempts left)
  or `failed`; `not_run` when the handler never returned (not registered in this worker: handed
  back; or cancelled at shutdown). The engine's answer arrives later, in a batched flush: an
  outcome it refuses as stale (the lease was lost meanwhile, the task cancelled) is counted in the
  worker's `stale` counter and metrics, not on the span, which has ended by then. A failure sets
  the span's status to ERROR and records the handler's exception.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from tasker_pg.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from tasker_pg.outcome import Outcome
    from tasker_pg.worker.state import Claim

EXTRA_HINT = "install the otel extra: pip install 'tasker-pg[otel]'"

# W3C trace context, version 00, as tasker.tasks.traceparent accepts it.
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

# The state the engine moves a step to, as the span's outcome (tasker_pg.worker.steplog's rule).
_OUTCOME_OF_STATE = {
    "complete": "succeeded",
    "in_progress": "checkpointed",
    "waiting_for_retry": "retried",
    "error": "failed",
}


def require_otel() -> None:
    """Raise `ConfigurationError` naming the extra when OpenTelemetry is not installed."""
    try:
        import opentelemetry.sdk
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        raise ConfigurationError(f"tracing needs OpenTelemetry; {EXTRA_HINT}") from None


def is_traceparent(value: str) -> bool:
    """Whether `value` is a traceparent the engine stores (version 00, ids not all zeros)."""
    return (
        TRACEPARENT_RE.match(value) is not None
        and value[3:35] != "0" * 32
        and value[36:52] != "0" * 16
    )


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the caller's current span, for `create_task(traceparent=...)`.

    None when OpenTelemetry is not installed or no span is recording here (an invalid context).
    """
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    value = carrier.get("traceparent")
    return value if value is not None and is_traceparent(value) else None


class StepTracer:
    """Opens and ends the span of each step run (see the module docstring).

    `tracer_provider` is the provider the spans go to; None uses the global one
    (`opentelemetry.trace.set_tracer_provider`, what the application configured).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        require_otel()
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from tasker_pg import __version__

        self._trace = trace
        self._context = context
        self._tracer = trace.get_tracer("tasker_pg", __version__, tracer_provider=tracer_provider)
        self._propagator = TraceContextTextMapPropagator()

    def start(self, claim: Claim, worker_id: str) -> tuple[Span, object]:
        """Start the span of `claim`'s run and make it current; returns it and the token
        `finish` detaches."""
        step = claim.step
        if step.traceparent is not None:
            parent = self._propagator.extract({"traceparent": step.traceparent})
        else:
            parent = self._context.Context()  # a root span, whatever the caller's context
        attributes: dict[str, Any] = {
            "tasker.task.uuid": step.task_uuid,
            "tasker.step.uuid": step.step_uuid,
            "tasker.step.name": step.step_name,
            "tasker.step.template": step.template_step,
            "tasker.namespace": claim.namespace,
            "tasker.step.attempt": step.attempt,
            "tasker.step.max_attempts": step.max_attempts,
            "tasker.worker.id": worker_id,
        }
        if step.task_name is not None:
            attributes["tasker.task.name"] = step.task_name
        if step.task_version is not None:
            attributes["tasker.task.version"] = step.task_version
        if step.claim_event != "claimed":
            attributes["tasker.step.claim_event"] = step.claim_event
        span = self._tracer.start_span(
            f"tasker.step {claim.namespace}/{step.template_step}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        return span, token

    def finish(self, span: Span, token: object, claim: Claim, outcome: Outcome | None) -> None:
        """Set the outcome on the span, end it, and restore the context `start` replaced."""
        from tasker_pg.worker.steplog import expected_state

        try:
            if outcome is None:
                span.set_attribute("tasker.step.outcome", "not_run")
            else:
                span.set_attribute(
                    "tasker.step.outcome", _OUTCOME_OF_STATE[expected_state(claim, outcome)]
                )
                if outcome.kind == "failure":
                    error = outcome.error
                    if error.error_code is not None:
                        span.set_attribute("tasker.step.error_code", error.error_code)
                    if claim.error is not None:
                        span.record_exception(claim.error)
                    span.set_status(
                        self._trace.Status(
                            self._trace.StatusCode.ERROR, f"{error.error_type}: {error.message}"
                        )
                    )
            span.end()
        finally:
            self._context.detach(token)  # type: ignore[arg-type]
