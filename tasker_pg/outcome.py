"""The outcome rules: what a handler returned or raised becomes one outcome for `complete_steps`.

These are pure functions. The worker collects their dicts into a JSON array and passes it to
`tasker.complete_steps`, which applies each outcome fenced by `(step_uuid, attempt)`.

Every outcome has `step_uuid`, `attempt`, `kind` ("success" | "failure" | "checkpoint"),
`duration_ms` and `worker_id`, plus per kind:

- success: `result` (any JSON value) and `metadata` (a JSON object, `{}` when none);
- failure: `error` = `{message, error_type, error_code, retryable, retry_after, context,
  traceback}` and `metadata`;
- checkpoint: `checkpoint` = `{cursor, items_processed, accumulated_results}`.

The rules make sure an outcome is always valid JSON and never huge: a result that cannot be
stored becomes a permanent failure that says why, and error messages, tracebacks and error
contexts are capped.
"""

from __future__ import annotations

import math
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from tasker_pg import jsonutil
from tasker_pg.errors import PermanentError, RetryableError, TaskerError
from tasker_pg.result import StepHandlerResult

Outcome = dict[str, Any]
"""One element of the JSON array passed to `tasker.complete_steps`."""

MAX_MESSAGE_BYTES = 4 * 1024
"""Error messages longer than this (UTF-8) are cut, keeping the start."""

MAX_TRACEBACK_BYTES = 16 * 1024
"""Tracebacks longer than this (UTF-8) are cut, keeping the end (where the error is)."""

MAX_ERROR_CONTEXT_BYTES = 16 * 1024
"""An error context whose JSON is longer than this is replaced by a truncated preview."""

_JSON_ERRORS = (TypeError, ValueError, RecursionError)

_FIX_INVALID_RETURN = (
    "call() must return self.success(...), self.failure(...) or "
    "StepHandlerResult.checkpoint(...), e.g. `return self.success({...})`"
)


def outcome_from_result(
    value: object,
    *,
    step_uuid: str | uuid.UUID,
    attempt: int,
    duration_ms: float,
    worker_id: str | None = None,
    handler_name: str | None = None,
) -> Outcome:
    """The outcome for whatever `call()` returned (awaited already, for async handlers).

    A `StepHandlerResult` maps to its kind. Anything else (None included), and a result,
    metadata or checkpoint that is not JSON-serialisable, is a permanent failure with
    error_type "invalid_result" whose message names the handler (when given) and the fix.
    """
    base = _base(step_uuid, attempt, duration_ms, worker_id)
    who = f"step handler {handler_name!r}" if handler_name else "step handler"

    if not isinstance(value, StepHandlerResult):
        return _invalid_result(base, _invalid_return_message(who, value))

    if value.kind == "success":
        metadata: object = value.metadata  # typed dict, but users may pass anything
        problem = _json_problem([value.result, metadata])
        if problem is not None:
            return _invalid_result(base, _not_serialisable(who, value.result, metadata))
        if not isinstance(metadata, Mapping):
            return _invalid_result(
                base,
                f"{who} returned success metadata of type {type(metadata).__name__}; "
                "metadata must be a JSON object (a dict) or None",
            )
        base["kind"] = "success"
        base["result"] = value.result
        base["metadata"] = metadata
        return base

    if value.kind == "checkpoint":
        checkpoint = {
            "cursor": value.cursor,
            "items_processed": value.items_processed,
            "accumulated_results": value.accumulated_results,
        }
        problem = _json_problem(checkpoint)
        if problem is not None:
            return _invalid_result(
                base,
                f"{who} returned a checkpoint that is not JSON-serialisable: {problem}. "
                "The cursor and accumulated_results must be plain JSON data "
                "(dict, list, str, int, float, bool, None).",
            )
        base["kind"] = "checkpoint"
        base["checkpoint"] = checkpoint
        return base

    return _failure(
        base,
        message=value.error_message or "",
        error_type=value.error_type or "unexpected_error",
        error_code=value.error_code,
        retryable=bool(value.retryable),
        retry_after=value.retry_after if value.retryable else None,
        context=value.error_context,
        tb=None,
        metadata=value.metadata,
    )


def outcome_from_exception(
    exc: BaseException,
    *,
    step_uuid: str | uuid.UUID,
    attempt: int,
    duration_ms: float,
    worker_id: str | None = None,
) -> Outcome:
    """The outcome for an exception raised by `call()`.

    `PermanentError` is a permanent failure (error_type "PermanentError", its error_code and
    context); `RetryableError` is a retryable one honouring `retry_after` (error_type
    "RetryableError"). Any other exception is a retryable failure whose error_type is the
    exception's class name, with the formatted traceback. The worker should let
    `asyncio.CancelledError`, `KeyboardInterrupt` and `SystemExit` propagate rather than turn
    them into outcomes.
    """
    base = _base(step_uuid, attempt, duration_ms, worker_id)
    if isinstance(exc, PermanentError):
        return _failure(
            base,
            message=_exception_message(exc),
            error_type="PermanentError",
            error_code=exc.error_code or PermanentError.error_code,
            retryable=False,
            retry_after=None,
            context=exc.context,
            tb=None,
        )
    if isinstance(exc, RetryableError):
        return _failure(
            base,
            message=_exception_message(exc),
            error_type="RetryableError",
            error_code=exc.error_code or RetryableError.error_code,
            retryable=True,
            retry_after=exc.retry_after,
            context=exc.context,
            tb=None,
        )
    return _failure(
        base,
        message=_exception_message(exc),
        error_type=type(exc).__name__,
        error_code=exc.error_code if isinstance(exc, TaskerError) else None,
        retryable=True,
        retry_after=None,
        context={},
        tb="".join(traceback.format_exception(exc)),
    )


def timeout_outcome(
    *,
    step_uuid: str | uuid.UUID,
    attempt: int,
    duration_ms: float,
    timeout_seconds: float,
    worker_id: str | None = None,
) -> Outcome:
    """The outcome for a run the worker abandoned after `timeout_seconds`: a retryable failure."""
    base = _base(step_uuid, attempt, duration_ms, worker_id)
    return _failure(
        base,
        message=(
            f"step handler did not finish within its timeout of {timeout_seconds:g} seconds "
            "and was abandoned; raise timeout_seconds in the template if it needs longer"
        ),
        error_type="timeout",
        error_code="step_timeout",
        retryable=True,
        retry_after=None,
        context={"timeout_seconds": timeout_seconds},
        tb=None,
    )


# --- building blocks -------------------------------------------------------------------------


def _base(
    step_uuid: str | uuid.UUID, attempt: int, duration_ms: float, worker_id: str | None
) -> Outcome:
    """The keys every outcome has; `kind` is filled in by the caller."""
    return {
        "step_uuid": str(step_uuid),
        "attempt": int(attempt),
        "kind": "failure",
        "duration_ms": float(duration_ms),
        "worker_id": worker_id,
    }


def _failure(
    base: Outcome,
    *,
    message: str,
    error_type: str,
    error_code: str | None,
    retryable: bool,
    retry_after: float | None,
    context: Any,
    tb: str | None,
    metadata: Any = None,
) -> Outcome:
    """Fill `base` in as a failure, making every part safe to store."""
    base["kind"] = "failure"
    base["error"] = {
        "message": truncate_head(str(message), MAX_MESSAGE_BYTES),
        "error_type": truncate_head(str(error_type), 200),
        "error_code": None if error_code is None else truncate_head(str(error_code), 200),
        "retryable": retryable,
        "retry_after": _safe_retry_after(retry_after),
        "context": _safe_object(context, MAX_ERROR_CONTEXT_BYTES),
        "traceback": None if tb is None else truncate_tail(tb, MAX_TRACEBACK_BYTES),
    }
    base["metadata"] = _safe_object(metadata, MAX_ERROR_CONTEXT_BYTES)
    return base


def _invalid_result(base: Outcome, message: str) -> Outcome:
    """A permanent failure for a handler that returned something the engine cannot store."""
    return _failure(
        base,
        message=message,
        error_type="invalid_result",
        error_code="invalid_result",
        retryable=False,
        retry_after=None,
        context={},
        tb=None,
    )


def _invalid_return_message(who: str, value: object) -> str:
    """Why a return value that is not a StepHandlerResult was refused, and what to do instead."""
    returned = "None" if value is None else type(value).__name__
    hint = ""
    if _is_awaitable(value):
        hint = " (an awaitable: was an async call() run without being awaited?)"
    return f"{who} returned {returned} instead of a StepHandlerResult{hint}; {_FIX_INVALID_RETURN}"


def _is_awaitable(value: object) -> bool:
    """Whether `value` is something that has to be awaited (a coroutine, task or future)."""
    return hasattr(value, "__await__")


def _not_serialisable(who: str, result: Any, metadata: Any) -> str:
    """The message for a success whose result or metadata cannot be encoded as JSON."""
    problem = _json_problem(result)
    part = "result"
    if problem is None:
        problem = _json_problem(metadata)
        part = "metadata"
    return (
        f"{who} returned a {part} that is not JSON-serialisable: {problem}. Return only "
        "plain JSON data (dict, list, str, int, float, bool, None): convert datetimes with "
        ".isoformat(), Decimals and UUIDs with str(); NaN and Infinity are not allowed."
    )


def _json_problem(value: Any) -> str | None:
    """Why `value` cannot be stored as JSON, or None when it can."""
    try:
        jsonutil.dumps(value)
    except RecursionError:
        return "it is nested too deeply"
    except ValueError as exc:
        text = str(exc)
        if "Out of range float" in text:
            return f"{text} (NaN or Infinity)"
        return text
    except TypeError as exc:
        return str(exc)
    return None


def _exception_message(exc: BaseException) -> str:
    """`str(exc)`, or the class name when the exception has no message."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the failure
        text = ""
    return text or type(exc).__name__


def _safe_retry_after(value: float | None) -> float | None:
    """`retry_after` as a finite non-negative float, or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _safe_object(value: Any, limit: int) -> dict[str, Any]:
    """A JSON object that can always be stored: made JSON-safe, and previewed when too large.

    Error contexts and failure metadata are diagnostics; losing a failure because its context
    held a datetime would be worse than storing the datetime's repr.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        value = {"value": value}
    try:
        text = jsonutil.dumps(value)
        safe: dict[str, Any] = dict(value)
    except _JSON_ERRORS:
        safe = _jsonable(value, depth=0)
        text = jsonutil.dumps(safe)
    if len(text.encode("utf-8")) > limit:
        return {"truncated": True, "preview": truncate_head(text, limit // 2)}
    return safe


def _jsonable(value: Any, depth: int) -> Any:
    """A JSON-safe copy of `value`: unknown objects become their repr, NaN/Infinity strings."""
    if depth > 50:
        return "<nested too deeply>"
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def truncate_head(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, keeping the start and marking the cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f" ... [truncated {len(data)} bytes to {limit}]"
    keep = max(limit - len(marker.encode("utf-8")), 0)
    return data[:keep].decode("utf-8", errors="ignore") + marker


def truncate_tail(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, keeping the end and marking the cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f"[truncated {len(data)} bytes to {limit}, start omitted] ...\n"
    keep = max(limit - len(marker.encode("utf-8")), 0)
    return marker + data[len(data) - keep :].decode("utf-8", errors="ignore")
