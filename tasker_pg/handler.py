"""The base class users subclass to write step handlers."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, ClassVar

from tasker_pg.context import StepContext
from tasker_pg.result import StepHandlerResult


class StepHandler(ABC):
    """Base class of step handlers: subclass it, set `handler_name`, implement `call`.

    `handler_name` is the name a template's `handler.callable` refers to. A subclass that does
    not set it in its own body gets `"<module>.<QualifiedClassName>"` (a subclass never inherits
    its parent's name, so two classes never claim the same name by accident).

    `call` may be a plain method (the worker runs it in a thread pool) or `async def` (run on the
    worker's event loop); `is_async` tells which.

    A worker creates one instance of each handler class (no constructor arguments) and reuses it
    for every step it runs, possibly for several steps at once. Handler instances must therefore
    not keep per-step state in attributes: everything about a step comes from the `StepContext`,
    and everything that must be kept goes into the returned `StepHandlerResult`. Shared,
    thread-safe resources (a client, a connection pool) are fine.
    """

    handler_name: ClassVar[str] = "tasker_pg.handler.StepHandler"
    handler_version: ClassVar[str] = "1.0.0"
    is_async: ClassVar[bool] = False
    """Whether `call` is a coroutine function (set automatically for every subclass)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "handler_name" not in cls.__dict__:
            cls.handler_name = f"{cls.__module__}.{cls.__qualname__}"
        cls.is_async = inspect.iscoroutinefunction(cls.call)

    @abstractmethod
    def call(self, context: StepContext) -> StepHandlerResult | Awaitable[StepHandlerResult]:
        """Do the step's work and say how it went (`self.success(...)`, `self.failure(...)`).

        Raise `PermanentError` for failures no retry can fix and `RetryableError` for transient
        ones; any other exception counts as a retryable failure.
        """

    def success(self, result: Any, metadata: dict[str, Any] | None = None) -> StepHandlerResult:
        """Shorthand for `StepHandlerResult.success`."""
        return StepHandlerResult.success(result, metadata=metadata)

    def failure(
        self,
        message: str,
        error_type: str = "unexpected_error",
        retryable: bool = True,
        error_code: str | None = None,
        metadata: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> StepHandlerResult:
        """Shorthand for `StepHandlerResult.failure`."""
        return StepHandlerResult.failure(
            message,
            error_type=error_type,
            retryable=retryable,
            error_code=error_code,
            metadata=metadata,
            context=context,
            retry_after=retry_after,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} handler_name={self.handler_name!r}>"
