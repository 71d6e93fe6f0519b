"""Typed rows crossing the database boundary: a claimed step and the fence that names its claim.

`ClaimedStep.from_row` is the one place a `tasker.claim_steps` row is parsed; `tasker_pg.db`
builds these, the worker keeps them, and `StepContext` reads them. Every column that a row may
lack (a hand-built mapping in a test, say) takes its default here, and only here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasker_pg import jsonutil
from tasker_pg.errors import ValidationError

# The template defaults of a step's retry settings (tasker.normalize_step in the SQL).
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF = "exponential"
DEFAULT_BACKOFF_BASE_MS = 1000
DEFAULT_MAX_BACKOFF_MS = 60000

_REQUIRED = ("task_uuid", "step_uuid", "step_name", "handler")


@dataclass(frozen=True, slots=True)
class Fence:
    """The claim an outcome, heartbeat or release is for: it applies only while it is current.

    `attempt` alone repeats (an operator retry resets it, a checkpoint continuation keeps it);
    `claim_seq` changes at every claim, so a zombie run can never write over a newer one.
    """

    step_uuid: str
    attempt: int
    claim_seq: int

    def to_json(self) -> dict[str, Any]:
        """The claim as `tasker.extend_leases` and `tasker.release_steps` take it."""
        return {"step_uuid": self.step_uuid, "attempt": self.attempt, "claim_seq": self.claim_seq}


@dataclass(frozen=True, slots=True)
class ClaimedStep:
    """One row of `tasker.claim_steps`: a step this worker now holds, with all its handler needs.

    UUIDs are kept as text; JSON columns are decoded objects (`checkpoint` and `inputs` are None
    when absent, an empty checkpoint object counts as none).
    """

    step_uuid: str
    task_uuid: str
    step_name: str
    handler: str
    attempt: int = 1
    claim_seq: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retryable: bool = True
    backoff: str = DEFAULT_BACKOFF
    backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS
    max_backoff_ms: int = DEFAULT_MAX_BACKOFF_MS
    jitter: float = 0.0
    timeout_seconds: float | None = None
    config: dict[str, Any] | None = None
    task_context: dict[str, Any] | None = None
    dependency_results: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    namespace: str | None = None
    task_name: str | None = None
    task_version: str | None = None
    msg_id: int | None = None
    lease_expires_at: datetime | None = None
    # claimed (a new attempt) | resumed (a checkpoint continuation); an expired lease is never
    # handed out: the engine records it and retries the step after its backoff
    claim_event: str = "claimed"
    # true when some batch workers' results were left out of dependency_results (over
    # max_claim_dependency_bytes): fetch them with tasker.dependency_results
    dependency_results_partial: bool = False
    # the template step this step was made from: its own name, except for the workers of a
    # batch fan-out (`process_batch_001` is `process_batch`'s); bounded, so metrics label by it
    template_step: str = ""
    # the W3C trace context (`traceparent`) the task was created under, or None
    traceparent: str | None = None
    # how many steps wait on this one: its success can make that many ready, which
    # `tasker.complete_and_claim` may hand to the worker that sends it
    dependents: int = 0

    def __post_init__(self) -> None:
        if not self.template_step:
            object.__setattr__(self, "template_step", self.step_name)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ClaimedStep:
        """Parse a claim row (asyncpg record or any mapping); missing or NULL columns default.

        `task_uuid`, `step_uuid`, `step_name` and `handler` are required. UUIDs may be
        `uuid.UUID`; JSON columns may arrive decoded or as JSON text. Raises `ValidationError`
        naming what is wrong.
        """
        get = row.get
        step_uuid = get("step_uuid")
        task_uuid = get("task_uuid")
        step_name = get("step_name")
        handler = get("handler")
        if not (step_uuid and task_uuid and step_name and handler):
            missing = [k for k in _REQUIRED if not get(k)]
            raise ValidationError(
                f"claim row is missing required field(s) {', '.join(missing)}; "
                "it must come from tasker.claim_steps"
            )
        attempt = get("attempt")
        claim_seq = get("claim_seq")
        max_attempts = get("max_attempts")
        retryable = get("retryable")
        backoff = get("backoff")
        base_ms = get("backoff_base_ms")
        cap_ms = get("max_backoff_ms")
        jitter = get("jitter")
        timeout = get("timeout_seconds")
        msg_id = get("msg_id")
        namespace = get("namespace")
        task_name = get("task_name")
        task_version = get("task_version")
        claim_event = get("claim_event")
        return cls(
            step_uuid=str(step_uuid),
            task_uuid=str(task_uuid),
            step_name=str(step_name),
            handler=str(handler),
            attempt=int(attempt) if attempt is not None else 1,
            claim_seq=int(claim_seq) if claim_seq is not None else 0,
            max_attempts=int(max_attempts) if max_attempts is not None else DEFAULT_MAX_ATTEMPTS,
            retryable=bool(retryable) if retryable is not None else True,
            backoff=str(backoff) if backoff is not None else DEFAULT_BACKOFF,
            backoff_base_ms=int(base_ms) if base_ms is not None else DEFAULT_BACKOFF_BASE_MS,
            max_backoff_ms=int(cap_ms) if cap_ms is not None else DEFAULT_MAX_BACKOFF_MS,
            jitter=float(jitter) if jitter is not None else 0.0,
            timeout_seconds=float(timeout) if timeout is not None else None,
            config=_json_object(get("config"), "config"),
            task_context=_json_object(get("task_context"), "task_context"),
            dependency_results=_json_object(get("dependency_results"), "dependency_results"),
            checkpoint=_json_object(get("checkpoint"), "checkpoint") or None,
            inputs=_json_object(get("inputs"), "inputs"),
            namespace=None if namespace is None else str(namespace),
            task_name=None if task_name is None else str(task_name),
            task_version=None if task_version is None else str(task_version),
            msg_id=int(msg_id) if msg_id is not None else None,
            lease_expires_at=get("lease_expires_at"),
            claim_event=str(claim_event) if claim_event else "claimed",
            dependency_results_partial=bool(get("dependency_results_partial")),
            template_step=str(get("template_step") or step_name),
            traceparent=_optional_text(get("traceparent")),
            dependents=int(get("dependents") or 0),
        )

    @property
    def fence(self) -> Fence:
        """This claim's fence, to send back with its outcome, heartbeats and release."""
        return Fence(self.step_uuid, self.attempt, self.claim_seq)

    def retry_delay_seconds(self) -> tuple[float, float]:
        """The shortest and longest wait before a retry of this attempt, from its backoff settings.

        The same rule as `tasker.backoff_seconds`: exponential base*2^(n-1), linear base*n,
        fixed base, none 0; capped at max_backoff_ms; jitter takes up to that share off.
        """
        base = float(self.backoff_base_ms)
        n = max(self.attempt, 1)
        if self.backoff == "exponential":
            delay = base * 2.0 ** min(n - 1, 60)
        elif self.backoff == "linear":
            delay = base * n
        elif self.backoff == "fixed":
            delay = base
        else:
            delay = 0.0
        longest = min(float(self.max_backoff_ms), delay) / 1000.0
        return longest * (1.0 - self.jitter), longest


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_object(value: Any, key: str) -> dict[str, Any] | None:
    """A jsonb object column of the claim row, decoded when it arrived as JSON text.

    Returns None for SQL/JSON null; anything that is not an object is a broken claim row and
    raises `ValidationError` naming the column.
    """
    if value is None or type(value) is dict:  # the common case, first
        return value
    if isinstance(value, str | bytes):
        value = jsonutil.loads(value)
        if value is None or isinstance(value, dict):
            return value
    if isinstance(value, Mapping):
        return dict(value)
    raise ValidationError(
        f"claim row field {key!r} must be a JSON object, got {type(value).__name__}"
    )
