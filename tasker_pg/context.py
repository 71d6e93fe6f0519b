"""What a step handler sees of its step: task input, upstream results, config, attempt, checkpoint.

A `StepContext` is built by the worker from one typed row of `tasker.claim_steps` (see
`from_claimed`; `from_claim` takes a plain mapping) and handed to `StepHandler.call`. Handlers
read everything through it; nothing they do to it is written back to the database. The only way
to change what is stored is the `StepHandlerResult` the handler returns (or the error it raises).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tasker_pg.rows import ClaimedStep

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
        "_dependency_results",
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
    def from_claimed(cls, step: ClaimedStep, *, worker_id: str | None = None) -> StepContext:
        """Build the context for a step the worker claimed (a typed `tasker.claim_steps` row)."""
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
        """Every ancestor step's result keyed by step name."""
        return self._dependency_results

    def get_dependency_result(self, step_name: str) -> Any:
        """The result of ancestor step `step_name`, or None when there is no such ancestor."""
        return self._dependency_results.get(step_name)

    def get_dependency_field(self, step_name: str, *path: str | int) -> Any:
        """A value nested inside an ancestor's result, or None when any part of the path is absent.

        Each path element is a key of an object or an index into a list: ints index lists (negative
        ones count from the end), and so do strings of digits such as "0". An int also finds the
        object key of the same text, since JSON object keys are always strings. A missing key, an
        index out of range or stepping into a scalar returns None; this never raises.
        """
        current: Any = self._dependency_results.get(step_name)
        for part in path:
            if current is None:
                return None
            current = _step_into(current, part)
        return current

    def get_all_dependency_results(self, prefix: str = "") -> dict[str, Any]:
        """The results of every ancestor whose step name starts with `prefix` (a new dict)."""
        return {
            name: value
            for name, value in self._dependency_results.items()
            if name.startswith(prefix)
        }

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
