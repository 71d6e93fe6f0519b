"""The outcome rules: what a handler returned or raised becomes one typed outcome.

These are pure functions building frozen values: `Success`, `Failure` or `Checkpoint`, each
carrying the `Fence` of the claim it answers (given at construction, never added later). The
worker sends `[o.to_json() for o in outcomes]` to `tasker.complete_steps`, which applies each
outcome only while its claim `(step_uuid, attempt, claim_seq)` is current.

`to_json()` gives `step_uuid`, `attempt`, `kind` ("success" | "failure" | "checkpoint"),
`duration_ms` and `worker_id`, then per kind:

- success: `result` (any JSON value) and `metadata` (a JSON object, `{}` when none);
- failure: `error` = `{message, error_type, error_code, retryable, retry_after, context,
  traceback}` and `metadata`;
- checkpoint: `checkpoint` = `{cursor, items_processed, accumulated_results}`;

and last `claim_seq`.

The rules make sure an outcome is always valid JSON and never huge: a result that cannot be
stored becomes a permanent failure that says why, and error messages, tracebacks and error
contexts are capped. Characters no jsonb value can hold (NUL, and lone surrogates such as a
file name decoded with `surrogateescape`) are replaced by U+FFFD in every string of the outcome,
keys included; a failure's message then says how many were replaced, a success's metadata
carries the count as `tasker_replaced_characters`.
"""

from __future__ import annotations

import json
import math
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from tasker_pg import jsonutil
from tasker_pg.errors import PermanentError, RetryableError, TaskerError
from tasker_pg.result import StepHandlerResult
from tasker_pg.rows import Fence

__all__ = [
    "Checkpoint",
    "Failure",
    "Fence",
    "Outcome",
    "StepError",
    "Success",
    "outcome_from_exception",
    "outcome_from_result",
    "refused_outcome",
    "storable_text",
    "timeout_outcome",
]

MAX_MESSAGE_BYTES = 4 * 1024
"""Error messages longer than this (UTF-8) are cut, keeping the start."""

MAX_TRACEBACK_BYTES = 16 * 1024
"""Tracebacks longer than this (UTF-8) are cut, keeping the end (where the error is)."""

MAX_ERROR_CONTEXT_BYTES = 16 * 1024
"""An error context whose JSON is longer than this is replaced by a truncated preview."""

MAX_ERROR_JSON_BYTES = 60 * 1024
"""The whole error object, as PostgreSQL's JSON text, is kept under this: below the 64 KiB floor
of `max_error_bytes` in `tasker.settings`, so the engine never refuses a failure for its size."""

_JSON_ERRORS = (TypeError, ValueError, RecursionError)

# What jsonb (and UTF-8) cannot hold: NUL, and a surrogate code point on its own (a Python str
# never holds a valid surrogate pair, so any surrogate in it is a lone one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# How NUL looks in JSON text (json.dumps escapes control characters even without ensure_ascii).
_NUL_IN_JSON = "\\u0000"
REPLACEMENT_CHARACTER = "\ufffd"

OUTCOME_REFUSED = "outcome_refused"
"""error_code of the minimal failure sent when the engine refused a failure outcome."""

_FIX_INVALID_RETURN = (
    "call() must return self.success(...), self.failure(...) or "
    "StepHandlerResult.checkpoint(...), e.g. `return self.success({...})`"
)


# --- the values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StepError:
    """Why a run failed, already made safe to store (capped, JSON-safe)."""

    message: str
    error_type: str
    error_code: str | None
    retryable: bool
    retry_after: float | None
    context: dict[str, Any]
    traceback: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "error_type": self.error_type,
            "error_code": self.error_code,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
            "context": self.context,
            "traceback": self.traceback,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class _OutcomeBase:
    """What every outcome has: the claim it answers, how long the run took, who ran it."""

    fence: Fence
    duration_ms: float
    worker_id: str | None = None

    def _head(self, kind: str) -> dict[str, Any]:
        fence = self.fence
        return {
            "step_uuid": fence.step_uuid,
            "attempt": fence.attempt,
            "kind": kind,
            "duration_ms": self.duration_ms,
            "worker_id": self.worker_id,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Success(_OutcomeBase):
    """The handler's result (any JSON value) and metadata (a JSON object)."""

    kind: ClassVar[Literal["success"]] = "success"
    result: Any
    metadata: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The JSON object `tasker.complete_steps` takes for this outcome."""
        out = self._head("success")
        out["result"] = self.result
        out["metadata"] = self.metadata
        out["claim_seq"] = self.fence.claim_seq
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure(_OutcomeBase):
    """A failed run: its error, and metadata the handler attached (a JSON object)."""

    kind: ClassVar[Literal["failure"]] = "failure"
    error: StepError
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The JSON object `tasker.complete_steps` takes for this outcome."""
        out = self._head("failure")
        out["error"] = self.error.to_json()
        out["metadata"] = self.metadata
        out["claim_seq"] = self.fence.claim_seq
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint(_OutcomeBase):
    """Progress of a batch step: where to continue, and what it accumulated so far."""

    kind: ClassVar[Literal["checkpoint"]] = "checkpoint"
    cursor: Any
    items_processed: int
    accumulated_results: Any

    def to_json(self) -> dict[str, Any]:
        """The JSON object `tasker.complete_steps` takes for this outcome."""
        out = self._head("checkpoint")
        out["checkpoint"] = {
            "cursor": self.cursor,
            "items_processed": self.items_processed,
            "accumulated_results": self.accumulated_results,
        }
        out["claim_seq"] = self.fence.claim_seq
        return out


Outcome = Success | Failure | Checkpoint
"""One outcome for `tasker.complete_steps`."""


# --- the rules -------------------------------------------------------------------------------


def outcome_from_result(
    value: object,
    *,
    fence: Fence,
    duration_ms: float,
    worker_id: str | None = None,
    handler_name: str | None = None,
) -> Outcome:
    """The outcome for whatever `call()` returned (awaited already, for async handlers).

    A `StepHandlerResult` maps to its kind. Anything else (None included), and a result,
    metadata or checkpoint that is not JSON-serialisable, is a permanent failure with
    error_type "invalid_result" whose message names the handler (when given) and the fix.
    """
    duration_ms = float(duration_ms)
    who = f"step handler {handler_name!r}" if handler_name else "step handler"

    if not isinstance(value, StepHandlerResult):
        return _invalid_result(fence, duration_ms, worker_id, _invalid_return_message(who, value))

    if value.kind == "success":
        metadata: object = value.metadata  # typed dict, but users may pass anything
        text, problem = _encoded([value.result, metadata])
        if problem is not None:
            return _invalid_result(
                fence, duration_ms, worker_id, _not_serialisable(who, value.result, metadata)
            )
        if not isinstance(metadata, Mapping):
            return _invalid_result(
                fence,
                duration_ms,
                worker_id,
                f"{who} returned success metadata of type {type(metadata).__name__}; "
                "metadata must be a JSON object (a dict) or None",
            )
        result = value.result
        stored: Mapping[str, Any] = metadata
        if _text_may_hold_unstorable(text):
            replaced = [0]
            result = _storable(result, replaced)
            stored = _storable(metadata, replaced)
            if replaced[0]:
                stored = {**stored, "tasker_replaced_characters": replaced[0]}
        return Success(
            fence=fence,
            duration_ms=duration_ms,
            worker_id=worker_id,
            result=result,
            metadata=stored,
        )

    if value.kind == "checkpoint":
        checkpoint = {
            "cursor": value.cursor,
            "items_processed": value.items_processed,
            "accumulated_results": value.accumulated_results,
        }
        text, problem = _encoded(checkpoint)
        if problem is not None:
            return _invalid_result(
                fence,
                duration_ms,
                worker_id,
                f"{who} returned a checkpoint that is not JSON-serialisable: {problem}. "
                "The cursor and accumulated_results must be plain JSON data "
                "(dict, list, str, int, float, bool, None).",
            )
        cursor, accumulated = value.cursor, value.accumulated_results
        if _text_may_hold_unstorable(text):
            cursor = _storable(cursor, [0])
            accumulated = _storable(accumulated, [0])
        return Checkpoint(
            fence=fence,
            duration_ms=duration_ms,
            worker_id=worker_id,
            cursor=cursor,
            items_processed=value.items_processed,
            accumulated_results=accumulated,
        )

    return _failure(
        fence,
        duration_ms,
        worker_id,
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
    fence: Fence,
    duration_ms: float,
    worker_id: str | None = None,
) -> Failure:
    """The outcome for an exception raised by `call()`.

    `PermanentError` is a permanent failure (error_type "PermanentError", its error_code and
    context); `RetryableError` is a retryable one honouring `retry_after` (error_type
    "RetryableError"). Any other exception is a retryable failure whose error_type is the
    exception's class name, with the formatted traceback. The worker should let
    `asyncio.CancelledError`, `KeyboardInterrupt` and `SystemExit` propagate rather than turn
    them into outcomes.
    """
    duration_ms = float(duration_ms)
    if isinstance(exc, PermanentError):
        return _failure(
            fence,
            duration_ms,
            worker_id,
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
            fence,
            duration_ms,
            worker_id,
            message=_exception_message(exc),
            error_type="RetryableError",
            error_code=exc.error_code or RetryableError.error_code,
            retryable=True,
            retry_after=exc.retry_after,
            context=exc.context,
            tb=None,
        )
    return _failure(
        fence,
        duration_ms,
        worker_id,
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
    fence: Fence,
    duration_ms: float,
    timeout_seconds: float,
    worker_id: str | None = None,
    limit: Literal["timeout_seconds", "max_runtime"] = "timeout_seconds",
) -> Failure:
    """The outcome for a run the worker abandoned after its run time was up: a retryable
    failure with error_code "timeout". `limit` says which limit it was: the step's
    `timeout_seconds`, or the worker's `max_runtime` (for steps without one)."""
    if limit == "timeout_seconds":
        fix = "raise timeout_seconds in the template if it needs longer"
        what = "its timeout"
    else:
        fix = (
            "give the step a timeout_seconds in the template, or start the worker with a "
            "larger --max-runtime, if it needs longer"
        )
        what = "the worker's max run time"
    return _failure(
        fence,
        float(duration_ms),
        worker_id,
        message=(
            f"step handler did not finish within {what} of {timeout_seconds:g} seconds "
            f"and was abandoned; {fix}"
        ),
        error_type="timeout",
        error_code="timeout",
        retryable=True,
        retry_after=None,
        context={"timeout_seconds": timeout_seconds},
        tb=None,
    )


def refused_outcome(refused: Outcome, error: TaskerError) -> Failure | None:
    """The failure that replaces an outcome `tasker.complete_steps` refused, None when even
    the minimal failure was refused (nothing smaller can be sent).

    For a success or checkpoint the engine would not store (e.g. an oversized result): a
    permanent failure naming the problem instead of the outcome being lost, error_type
    "invalid_result", error_code the engine's (or "invalid_result"). For a failure: a minimal
    failure (error_code "outcome_refused") that keeps only what is sure to be storable, the
    original error type and code and the start of its message, and says why; retryable as
    the refused one was (after the step's backoff: its retry_after may be what was refused).
    """
    if isinstance(refused, Failure):
        if refused.error.error_code == OUTCOME_REFUSED:
            return None
        original = refused.error
        head = original.message[:200]
        code = f" [{original.error_code}]" if original.error_code else ""
        return _failure(
            refused.fence,
            refused.duration_ms,
            refused.worker_id,
            message=(
                f"the engine refused the step's failure outcome ({error}); the handler's error "
                f"was {original.error_type}{code}: {head}"
            )
            .encode("ascii", "backslashreplace")
            .decode("ascii")
            .replace("\x00", "\\x00"),
            error_type=(
                original.error_type.encode("ascii", "replace").decode("ascii").replace("\x00", "?")
            ),
            error_code=OUTCOME_REFUSED,
            retryable=original.retryable,
            retry_after=None,  # it may be what was refused: the step's backoff applies
            context={},
            tb=None,
        )
    return _failure(
        refused.fence,
        refused.duration_ms,
        refused.worker_id,
        message=f"the engine refused the step's {refused.kind} outcome: {error}",
        error_type="invalid_result",
        error_code=error.error_code or "invalid_result",
        retryable=False,
        retry_after=None,
        context={},
        tb=None,
    )


# --- building blocks -------------------------------------------------------------------------


def _failure(
    fence: Fence,
    duration_ms: float,
    worker_id: str | None,
    *,
    message: str,
    error_type: str,
    error_code: str | None,
    retryable: bool,
    retry_after: float | None,
    context: Any,
    tb: str | None,
    metadata: Any = None,
) -> Failure:
    """A failure whose every part is made safe to store.

    Characters jsonb cannot hold are replaced first (in every part), and the message then
    says how many were.
    """
    replaced = [0]
    text = truncate_head(_storable(str(message), replaced), MAX_MESSAGE_BYTES)
    step_error = StepError(
        message=text,
        error_type=truncate_head(_storable(str(error_type), replaced), 200),
        error_code=(
            None if error_code is None else truncate_head(_storable(str(error_code), replaced), 200)
        ),
        retryable=retryable,
        retry_after=_safe_retry_after(retry_after),
        context=_safe_object(context, MAX_ERROR_CONTEXT_BYTES, replaced),
        traceback=(
            None if tb is None else truncate_tail(_storable(tb, replaced), MAX_TRACEBACK_BYTES)
        ),
    )
    safe_metadata = _safe_object(metadata, MAX_ERROR_CONTEXT_BYTES, replaced)
    if replaced[0]:
        count = replaced[0]
        plural = "" if count == 1 else "s"
        note = f" [tasker: {count} NUL / lone-surrogate character{plural} replaced]"
        step_error = replace(step_error, message=text + note)
    return Failure(
        fence=fence,
        duration_ms=duration_ms,
        worker_id=worker_id,
        error=_truncate_text(step_error),
        metadata=safe_metadata,
    )


def _truncate_text(error: StepError, limit: int = MAX_ERROR_JSON_BYTES) -> StepError:
    """`error` with its texts cut until its JSON (as PostgreSQL writes it) fits in `limit` bytes.

    The per-field caps bound raw UTF-8 bytes; JSON escaping can still multiply them (a control
    character is six bytes as `\\u0001`). Cut the traceback first, then the context, then the
    message, each marked as truncated, so an error from an arbitrary exception always fits the
    engine's `max_error_bytes` and the failure is stored rather than refused.
    """
    for _ in range(12):
        over = _pg_json_bytes(error.to_json()) - limit
        if over <= 0:
            return error
        cut = over + 256  # room for the truncation marker
        if error.traceback:
            size = len(error.traceback.encode("utf-8", "surrogatepass"))
            error = replace(error, traceback=truncate_tail(error.traceback, max(size - cut, 0)))
            if size <= cut:
                error = replace(error, traceback=None)
        elif error.context and not error.context.get("truncated"):
            preview = truncate_head(jsonutil.dumps(error.context), max(limit // 4 - cut, 0))
            error = replace(error, context={"truncated": True, "preview": preview})
        elif error.context and error.context != {"truncated": True}:
            error = replace(error, context={"truncated": True})
        else:
            size = len(error.message.encode("utf-8", "surrogatepass"))
            error = replace(error, message=truncate_head(error.message, max(size - cut, 0)))
    return replace(error, message=truncate_head(error.message, 0), context={}, traceback=None)


def _pg_json_bytes(value: Any) -> int:
    """The length in bytes of `value` as PostgreSQL's jsonb text (", " and ": " separators)."""
    return len(
        json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode(
            "utf-8", "surrogatepass"
        )
    )


def _invalid_result(
    fence: Fence, duration_ms: float, worker_id: str | None, message: str
) -> Failure:
    """A permanent failure for a handler that returned something the engine cannot store."""
    return _failure(
        fence,
        duration_ms,
        worker_id,
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
    return _encoded(value)[1]


def _encoded(value: Any) -> tuple[str, str | None]:
    """`value`'s JSON text and None, or "" and why `value` cannot be stored as JSON."""
    try:
        return jsonutil.dumps(value), None
    except RecursionError:
        return "", "it is nested too deeply"
    except ValueError as exc:
        text = str(exc)
        if "Out of range float" in text:
            return "", f"{text} (NaN or Infinity)"
        return "", text
    except TypeError as exc:
        return "", str(exc)


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


def _safe_object(value: Any, limit: int, replaced: list[int]) -> dict[str, Any]:
    """A JSON object that can always be stored: made JSON-safe, and previewed when too large.

    Error contexts and failure metadata are diagnostics; losing a failure because its context
    held a datetime would be worse than storing the datetime's repr. Characters jsonb cannot
    hold are replaced (counted in `replaced[0]`).
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
    if _text_may_hold_unstorable(text):
        safe = _storable(safe, replaced)
        text = jsonutil.dumps(safe)
    if len(text.encode("utf-8")) > limit:
        return {"truncated": True, "preview": truncate_head(text, limit // 2)}
    return safe


def storable_text(text: str) -> tuple[str, int]:
    """`text` with NUL and lone surrogates replaced by U+FFFD, and how many were."""
    return _UNSTORABLE.subn(REPLACEMENT_CHARACTER, text)


def _storable(value: Any, replaced: list[int]) -> Any:
    """A copy of JSON data whose strings (keys too) jsonb can hold; counts in `replaced[0]`.

    Values that need no change are returned as they are (not copied).
    """
    if isinstance(value, str):
        text, count = _UNSTORABLE.subn(REPLACEMENT_CHARACTER, value)
        replaced[0] += count
        return text
    if isinstance(value, Mapping):
        return {_storable(k, replaced): _storable(v, replaced) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v, replaced) for v in value]
    return value


def _text_may_hold_unstorable(text: str) -> bool:
    """Whether JSON text may hold a character jsonb cannot (cheap: one scan of the text)."""
    # An escaped backslash before "u0000" also matches: harmless, cleaning then finds nothing.
    return _NUL_IN_JSON in text or _UNSTORABLE.search(text) is not None


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
