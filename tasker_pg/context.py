"""What a step handler sees of its step: task input, upstream results, config, attempt, checkpoint.

A `StepContext` is built by the worker from one typed row of `tasker.claim_steps` (see
`from_claimed`; `from_claim` takes a plain mapping) and handed to `StepHandler.call`. Handlers
read everything through it; nothing they do to it is written back to the database. The only way
to change what is stored is the `StepHandlerResult` the handler returns (or the error it raises).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from tasker_pg.rows import ClaimedStep

T = TypeVar("T")

DEPENDENCY_PAGE_SIZE = 100
"""Results fetched per round trip when a claim left some out (`iter_dependency_results`)."""


class BlockingFetchError(RuntimeError):
    """A blocking accessor of a partial claim's dependency results was called on the event loop
    (from an async handler), where waiting for the fetch would stop the loop it runs on."""


class DependencyFetcher(Protocol):
    """Where a context fetches the dependency results its claim row left out.

    The worker provides one that pages through `tasker.dependency_results` on a connection
    pool of its own; `tasker_pg.testing.build_test_context` one that serves them from memory.
    `loop` is the event loop `fetch_page` must run on (None: any, a fresh one for a blocking
    call).
    """

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    async def fetch_page(
        self, step_uuid: str, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        """Up to `limit` `(name, result)` pairs of the step's finished ancestors whose name
        starts with `prefix` and sorts after `after`, in name order (Python's `str` order)."""
        ...


# A list index given as text, e.g. the "0" in get_dependency_field("fetch", "items", "0", "id").
_INDEX_TEXT = re.compile(r"-?[0-9]+")


class StepContext:
    """Read-only view of one step run, handed to `StepHandler.call`.

    Accessors return the stored objects themselves, not copies (copying every dependency result
    for every step would cost time on the hot path for nothing). A handler may therefore mutate
    what it gets back, for example the `accumulated_results` dict of a checkpoint, but such
    mutation is local to this run: it never reaches the database and is not seen by other steps
    or by a later attempt. The context itself has no setters. Persist data by returning it in a
    `StepHandlerResult`.
    """

    __slots__ = (
        "_attempt",
        "_checkpoint",
        "_dependency_fetcher",
        "_dependency_results",
        "_dependency_results_partial",
        "_handler_name",
        "_max_attempts",
        "_namespace",
        "_step_config",
        "_step_inputs",
        "_step_name",
        "_step_uuid",
        "_task_context",
        "_task_name",
        "_task_uuid",
        "_timeout_seconds",
        "_traceparent",
        "_worker_id",
    )

    def __init__(
        self,
        *,
        task_uuid: str,
        step_uuid: str,
        step_name: str,
        handler_name: str,
        task_context: dict[str, Any],
        dependency_results: dict[str, Any],
        step_config: dict[str, Any],
        attempt: int,
        max_attempts: int,
        checkpoint: dict[str, Any] | None = None,
        step_inputs: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
        worker_id: str | None = None,
        namespace: str | None = None,
        task_name: str | None = None,
        dependency_results_partial: bool = False,
        dependency_fetcher: DependencyFetcher | None = None,
        traceparent: str | None = None,
    ) -> None:
        if attempt < 1:
            raise ValueError(f"attempt is 1-based and must be >= 1, got {attempt!r}")
        self._task_uuid = str(task_uuid)
        self._step_uuid = str(step_uuid)
        self._step_name = step_name
        self._handler_name = handler_name
        self._task_context = task_context
        self._dependency_results = dependency_results
        self._step_config = step_config
        self._attempt = attempt
        self._max_attempts = max_attempts
        # An empty checkpoint object carries no cursor: treat it as "no checkpoint".
        self._checkpoint = checkpoint or None
        self._step_inputs = step_inputs
        self._timeout_seconds = timeout_seconds
        self._worker_id = worker_id
        self._namespace = namespace
        self._task_name = task_name
        self._dependency_results_partial = bool(dependency_results_partial)
        self._dependency_fetcher = dependency_fetcher
        self._traceparent = traceparent

    @classmethod
    def from_claim(cls, row: Mapping[str, Any]) -> StepContext:
        """Build the context from one row returned by `tasker.claim_steps`.

        `task_uuid`, `step_uuid`, `step_name` and `handler` are required; every other key may be
        missing or NULL and then takes its `ClaimedStep` default (empty objects, attempt 1, 3 max
        attempts). UUIDs may be `uuid.UUID`; JSON columns may arrive decoded or as JSON text. A
        `worker_id` key, when present, names the worker running the step.
        """
        worker_id = row.get("worker_id")
        return cls.from_claimed(
            ClaimedStep.from_row(row), worker_id=None if worker_id is None else str(worker_id)
        )

    @classmethod
    def from_claimed(
        cls,
        step: ClaimedStep,
        *,
        worker_id: str | None = None,
        dependency_fetcher: DependencyFetcher | None = None,
    ) -> StepContext:
        """Build the context for a step the worker claimed (a typed `tasker.claim_steps` row).

        `dependency_fetcher` fetches what a partial claim row left out of the dependency
        results (the worker passes its own).
        """
        return cls(
            task_uuid=step.task_uuid,
            step_uuid=step.step_uuid,
            step_name=step.step_name,
            handler_name=step.handler,
            task_context=step.task_context or {},
            dependency_results=step.dependency_results or {},
            step_config=step.config or {},
            attempt=step.attempt,
            max_attempts=step.max_attempts,
            checkpoint=step.checkpoint,
            step_inputs=step.inputs,
            timeout_seconds=step.timeout_seconds,
            worker_id=worker_id,
            namespace=step.namespace,
            task_name=step.task_name,
            dependency_results_partial=step.dependency_results_partial,
            dependency_fetcher=dependency_fetcher,
            traceparent=step.traceparent,
        )

    def __repr__(self) -> str:
        return (
            f"StepContext(task_uuid={self._task_uuid!r}, step_uuid={self._step_uuid!r}, "
            f"step_name={self._step_name!r}, handler={self._handler_name!r}, "
            f"attempt={self._attempt}/{self._max_attempts})"
        )

    # --- identity ------------------------------------------------------------------------------

    @property
    def task_uuid(self) -> str:
        """The task this step belongs to (text form of the UUID)."""
        return self._task_uuid

    @property
    def step_uuid(self) -> str:
        """This step (text form of the UUID)."""
        return self._step_uuid

    @property
    def step_name(self) -> str:
        """The step's name in the template, unique within the task."""
        return self._step_name

    @property
    def handler_name(self) -> str:
        """The template's `handler.callable` this step was dispatched to."""
        return self._handler_name

    @property
    def namespace(self) -> str | None:
        """The task's namespace, when the claim carried it."""
        return self._namespace

    @property
    def task_name(self) -> str | None:
        """The task template's name, when the claim carried it."""
        return self._task_name

    @property
    def worker_id(self) -> str | None:
        """The worker running this step, when known (None in unit tests)."""
        return self._worker_id

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context (`traceparent`) the task was created under, or None.

        With tracing on, the worker's span of this step is a child of it, and it is the current
        span while the handler runs; a handler that calls other services can pass it on.
        """
        return self._traceparent

    @property
    def timeout_seconds(self) -> float | None:
        """How long the worker lets this run take before abandoning it; None means no limit."""
        return self._timeout_seconds

    # --- task input ----------------------------------------------------------------------------

    @property
    def task_context(self) -> dict[str, Any]:
        """The whole task input (the context given to `create_task`)."""
        return self._task_context

    def get_input(self, key: str) -> Any:
        """One top-level value of the task input, or None when it is missing."""
        return self._task_context.get(key)

    def get_input_or(self, key: str, default: Any) -> Any:
        """One top-level value of the task input, or `default` when the key is missing.

        A key that is present with the value null returns None, not `default`.
        """
        return self._task_context.get(key, default)

    @property
    def step_inputs(self) -> dict[str, Any] | None:
        """Per-step inputs attached to this step, if any (None when there are none)."""
        return self._step_inputs

    # --- upstream results ----------------------------------------------------------------------

    @property
    def dependency_results(self) -> dict[str, Any]:
        """Every ancestor step's result keyed by step name, as the claim row carried them.

        When `dependency_results_partial` is true (a convergence step after a large batch
        fan-out), some batch workers' results are not in it: use `get_all_dependency_results`,
        `get_dependency_result` or `iter_dependency_results`, which fetch the rest.
        """
        return self._dependency_results

    @property
    def dependency_results_partial(self) -> bool:
        """Whether the claim row left some dependency results out (they are fetched on demand)."""
        return self._dependency_results_partial

    def get_dependency_result(self, step_name: str) -> Any:
        """The result of ancestor step `step_name`, or None when there is no such ancestor.

        When the claim left results out, a name not in it is fetched from the database: from a
        sync handler this blocks its thread; from an async handler it raises
        `BlockingFetchError` (use `await context.get_dependency_result_async(name)` there).
        """
        if step_name in self._dependency_results or not self._lazy():
            return self._dependency_results.get(step_name)
        return self._run_blocking(self.get_dependency_result_async(step_name))

    async def get_dependency_result_async(self, step_name: str) -> Any:
        """`get_dependency_result` for async handlers: fetches without blocking the loop."""
        if step_name in self._dependency_results or not self._lazy():
            return self._dependency_results.get(step_name)
        # The smallest name starting with step_name is step_name itself.
        page = await self._fetch_page(step_name, None, 1)
        if page and page[0][0] == step_name:
            return page[0][1]
        return None

    def get_dependency_field(self, step_name: str, *path: str | int) -> Any:
        """A value nested inside an ancestor's result, or None when any part of the path is absent.

        Each path element is a key of an object or an index into a list: ints index lists (negative
        ones count from the end), and so do strings of digits such as "0". An int also finds the
        object key of the same text, since JSON object keys are always strings. A missing key, an
        index out of range or stepping into a scalar returns None; this never raises (but see
        `get_dependency_result` for a claim that left results out).
        """
        current: Any = self.get_dependency_result(step_name)
        for part in path:
            if current is None:
                return None
            current = _step_into(current, part)
        return current

    def get_all_dependency_results(self, prefix: str = "") -> dict[str, Any]:
        """The results of every ancestor whose step name starts with `prefix` (a new dict, in
        name order), e.g. `context.get_all_dependency_results("process_batch_")` in the
        aggregator of a batch fan-out.

        When the claim left results out, they are all fetched from the database: from a sync
        handler this blocks its thread; from an async handler it raises `BlockingFetchError`
        (use `await context.get_all_dependency_results_async(prefix)` or `async for name,
        result in context.iter_dependency_results(prefix)` there).
        """
        if not self._lazy():
            return self._from_claim(prefix)
        return self._run_blocking(self.get_all_dependency_results_async(prefix))

    async def get_all_dependency_results_async(self, prefix: str = "") -> dict[str, Any]:
        """`get_all_dependency_results` for async handlers: fetches without blocking the loop."""
        return {name: value async for name, value in self.iter_dependency_results(prefix)}

    async def iter_dependency_results(self, prefix: str = "") -> AsyncIterator[tuple[str, Any]]:
        """`(name, result)` of every ancestor whose name starts with `prefix`, in name order.

        Works in every handler and for every claim: when the claim left results out they are
        fetched in pages of 100 as the loop goes on, so a thousand workers' results never have
        to be in memory at once:

        ```python
        async for name, result in context.iter_dependency_results("process_batch_"):
            total += result["items_processed"]
        ```
        """
        if not self._lazy():
            for item in self._from_claim(prefix).items():
                yield item
            return
        after: str | None = None
        while True:
            page = await self._fetch_page(prefix, after, DEPENDENCY_PAGE_SIZE)
            for item in page:
                yield item
            if len(page) < DEPENDENCY_PAGE_SIZE:
                return
            after = page[-1][0]

    def _from_claim(self, prefix: str) -> dict[str, Any]:
        results = self._dependency_results
        return {name: results[name] for name in sorted(results) if name.startswith(prefix)}

    def _lazy(self) -> bool:
        """Whether results missing from the claim must be fetched (refuses a partial claim
        that has nowhere to fetch from, rather than answering from part of the results)."""
        if not self._dependency_results_partial:
            return False
        if self._dependency_fetcher is None:
            raise RuntimeError(
                f"the claim of step {self._step_name!r} left some dependency results out "
                "(dependency_results_partial) and this context has no fetcher to get them: "
                "build it with StepContext.from_claimed(..., dependency_fetcher=...)"
            )
        return True

    async def _fetch_page(
        self, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        assert self._dependency_fetcher is not None
        return await self._dependency_fetcher.fetch_page(self._step_uuid, prefix, after, limit)

    def _run_blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a fetch from blocking code: on the fetcher's loop when called from another thread
        (a sync handler's), refused on that loop's own thread (it would wait for itself)."""
        assert self._dependency_fetcher is not None
        loop = self._dependency_fetcher.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and (loop is None or running is loop):
            coro.close()
            raise BlockingFetchError(
                f"step {self._step_name!r}: its claim left some dependency results out, and "
                "fetching them would block the event loop. In an async handler use "
                "`async for name, result in context.iter_dependency_results(prefix)`, "
                "`await context.get_all_dependency_results_async(prefix)` or "
                "`await context.get_dependency_result_async(name)`"
            )
        if loop is None:
            return asyncio.run(coro)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    # --- configuration -------------------------------------------------------------------------

    @property
    def step_config(self) -> dict[str, Any]:
        """The template's `handler.initialization` for this step."""
        return self._step_config

    def get_config(self, key: str, default: Any = None) -> Any:
        """One value of the step's `handler.initialization`, or `default` when it is missing."""
        return self._step_config.get(key, default)

    # --- attempts ------------------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        """The 1-based attempt number of this run (continuing from a checkpoint keeps it)."""
        return self._attempt

    @property
    def max_attempts(self) -> int:
        """How many attempts the step may use in total."""
        return self._max_attempts

    @property
    def retry_count(self) -> int:
        """How many earlier attempts failed or were lost (0 on the first attempt)."""
        return self._attempt - 1

    def is_retry(self) -> bool:
        """Whether an earlier attempt of this step already ran."""
        return self._attempt > 1

    def is_last_retry(self) -> bool:
        """Whether a retryable failure now would still put the step in error (no attempts left)."""
        return self._attempt >= self._max_attempts

    # --- checkpoint ----------------------------------------------------------------------------

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """The raw checkpoint `{"cursor", "items_processed", "accumulated_results"}`, or None."""
        return self._checkpoint

    def has_checkpoint(self) -> bool:
        """Whether an earlier run of this step yielded a checkpoint to resume from."""
        return self._checkpoint is not None

    @property
    def checkpoint_cursor(self) -> Any:
        """Where the last checkpoint said to continue, or None without a checkpoint."""
        return self._checkpoint.get("cursor") if self._checkpoint is not None else None

    @property
    def checkpoint_items_processed(self) -> int:
        """Items processed up to the last checkpoint (0 without a checkpoint)."""
        if self._checkpoint is None:
            return 0
        value = self._checkpoint.get("items_processed")
        return int(value) if isinstance(value, int | float) else 0

    @property
    def accumulated_results(self) -> Any:
        """The partial results saved with the last checkpoint, or None without a checkpoint."""
        if self._checkpoint is None:
            return None
        return self._checkpoint.get("accumulated_results")


def _step_into(container: Any, part: str | int) -> Any:
    """One step of `get_dependency_field`: index or key lookup, None when it does not apply."""
    if isinstance(part, bool):
        return None
    if isinstance(container, Mapping):
        if part in container:
            return container[part]
        if isinstance(part, int):
            return container.get(str(part))
        return None
    if isinstance(container, Sequence) and not isinstance(container, str | bytes | bytearray):
        if isinstance(part, int):
            index = part
        elif isinstance(part, str) and _INDEX_TEXT.fullmatch(part):
            index = int(part)
        else:
            return None
        if -len(container) <= index < len(container):
            return container[index]
        return None
    return None
