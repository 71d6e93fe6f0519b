"""What a step handler returns: a success, a failure, or a checkpoint to continue from.

`StepHandlerResult` only records what the handler decided; `tasker_pg.outcome` turns it into the
outcome the engine commits (and checks there that everything in it is JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ResultKind = Literal["success", "failure", "checkpoint"]
"""The three things a step run can end in."""

_KINDS: frozenset[str] = frozenset({"success", "failure", "checkpoint"})


@dataclass(frozen=True, slots=True)
class StepHandlerResult:
    """The immutable answer of one handler run; build it with `success`, `failure` or `checkpoint`.

    Only the fields of its kind are meaningful: `result`/`metadata` for a success, the `error_*`
    fields plus `retryable`/`retry_after`/`metadata` for a failure, and `cursor`,
    `items_processed`, `accumulated_results` for a checkpoint. The others keep their defaults.
    """

    kind: ResultKind
    result: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error_message: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    error_context: dict[str, Any] = field(default_factory=dict)
    cursor: Any = None
    items_processed: int = 0
    accumulated_results: Any = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"StepHandlerResult kind must be one of {sorted(_KINDS)}, got {self.kind!r}"
            )

    @classmethod
    def success(cls, result: Any, metadata: dict[str, Any] | None = None) -> StepHandlerResult:
        """The step did its work; `result` (any JSON value, None included) is stored as-is.

        Dependent steps read `result` through `get_dependency_result`. `metadata` is for
        observability (operation names, counters) and is stored next to the result.
        """
        return cls(kind="success", result=result, metadata=metadata if metadata is not None else {})

    @classmethod
    def failure(
        cls,
        message: str,
        error_type: str = "unexpected_error",
        retryable: bool = True,
        error_code: str | None = None,
        metadata: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> StepHandlerResult:
        """The step failed; with `retryable=False` it goes to error without further attempts.

        A retryable failure is retried while attempts remain, after `retry_after` seconds when
        given, else after the template's backoff. `context` is structured detail about the error
        (stored with it); `metadata` is the same observability data a success carries.
        """
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        return cls(
            kind="failure",
            metadata=metadata if metadata is not None else {},
            error_message=message,
            error_type=error_type,
            error_code=error_code,
            retryable=retryable,
            retry_after=retry_after,
            error_context=context if context is not None else {},
        )

    @classmethod
    def checkpoint(
        cls,
        cursor: Any,
        items_processed: int = 0,
        accumulated_results: Any = None,
    ) -> StepHandlerResult:
        """Part of the work is done: save progress and run the step again from `cursor`.

        The step stays in progress in the same attempt (no attempt is spent); the next run sees
        these values through `context.checkpoint_cursor`, `checkpoint_items_processed` and
        `accumulated_results`.
        """
        if isinstance(items_processed, bool) or not isinstance(items_processed, int):
            raise TypeError(f"items_processed must be an int, got {type(items_processed).__name__}")
        if items_processed < 0:
            raise ValueError(f"items_processed must be >= 0, got {items_processed}")
        return cls(
            kind="checkpoint",
            cursor=cursor,
            items_processed=items_processed,
            accumulated_results=accumulated_results,
        )

    @property
    def is_success(self) -> bool:
        """Whether the handler finished the step successfully."""
        return self.kind == "success"

    @property
    def is_failure(self) -> bool:
        """Whether the handler reported a failure."""
        return self.kind == "failure"

    @property
    def is_checkpoint(self) -> bool:
        """Whether the handler saved progress and wants to continue."""
        return self.kind == "checkpoint"
