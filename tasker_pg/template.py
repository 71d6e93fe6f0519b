"""Task templates: the YAML workflow definitions users write, validated into frozen models.

A template names a workflow (`namespace_name`, `name`, `version`) and declares its steps: which
handler runs each one, which steps it depends on, how it is retried and how long it may run.
This module turns YAML (or any mapping) into a `TaskTemplate`, rejects everything that would
make the workflow ambiguous or impossible to run, and produces the canonical JSON body that
`tasker.register_template(template jsonb)` stores, with every default filled in so SQL never
has to guess.

Every validation failure is a `TemplateValidationError` (a `tasker_pg.errors.ValidationError`)
whose message names the file, the step and the rule broken, and lists every problem found, each
with its location written as a path such as `steps[2] (process_payment).retry.max_attempts`.

Naming rules, and why:

- `namespace_name`: lowercase ASCII letters, digits and `_`, starting with a letter, at most 47
  characters. The namespace becomes a PostgreSQL queue table `tasker.q_<namespace>` (and an
  archive `tasker.a_<namespace>`), so it must be a plain identifier that fits PostgreSQL's 63-byte
  limit with room for prefixes and suffixes.
- template `name`: ASCII letters, digits, `_`, `-` and `.`, starting with a letter, at most 128.
- step `name`: ASCII letters, digits, `_`, `-` and `.`, starting with a letter or `_`, at most
  128; unique within the template.
- `version`: a semantic version `MAJOR.MINOR.PATCH` (decimal numbers without leading zeros, each
  at most 2147483647), with an optional pre-release suffix such as `1.2.0-rc.1` (semver 2.0.0:
  no empty identifier, no leading zero in a numeric one); at most 64 characters. Build metadata
  (`+build`) is not accepted: semver ignores it when ordering, so two versions differing only in
  it could not be told apart when picking the latest one.

Further rules: a template has 1 to 1000 steps; a step may not list
the same dependency twice; `max_attempts`, `backoff_base_ms` and `max_backoff_ms` must fit a
PostgreSQL `integer` (at most 2147483647), `backoff_base_ms` may be 0 (retry at once) and
`max_backoff_ms` may not be below it; numbers must be finite; `timeout_seconds` is at most a
year; integer fields refuse booleans, floats and strings, and string fields refuse numbers
and booleans (no silent coercion of what YAML read); `metadata` and `handler.initialization`
must be plain JSON data (string keys, no dates, no NaN) because they are stored as jsonb; an
empty YAML value (`dependencies:`, `retry:`, `metadata:`, `initialization:`) means "the
default"; YAML duplicate keys are errors (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import copy
import difflib
import heapq
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from tasker_pg.cron import CronError, check_time_zone, parse_cron
from tasker_pg.errors import NotFoundError, ValidationError

__all__ = [
    "MAX_STEPS",
    "MAX_TIMEOUT_SECONDS",
    "STEP_TYPES",
    "BackoffKind",
    "BatchConfig",
    "HandlerSpec",
    "RetryPolicy",
    "ScheduleTemplate",
    "StepTemplate",
    "TaskTemplate",
    "TemplateValidationError",
    "load_template",
    "load_templates",
    "parse_version",
    "version_key",
]

# --- limits and naming rules -----------------------------------------------------------------

MAX_STEPS = 1000
"""Most steps one template may declare."""

PG_INT_MAX = 2_147_483_647
"""Largest PostgreSQL `integer`: attempt counts and backoff milliseconds are stored as one."""

NAMESPACE_MAX_LEN = 47
NAME_MAX_LEN = 128
VERSION_MAX_LEN = 64

_NAMESPACE_RE = re.compile(rf"[a-z][a-z0-9_]{{0,{NAMESPACE_MAX_LEN - 1}}}")
_TEMPLATE_NAME_RE = re.compile(rf"[A-Za-z][A-Za-z0-9_.\-]{{0,{NAME_MAX_LEN - 1}}}")
_STEP_NAME_RE = re.compile(rf"[A-Za-z_][A-Za-z0-9_.\-]{{0,{NAME_MAX_LEN - 1}}}")
_PRE_IDENT = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z\-][0-9A-Za-z\-]*)"
_VERSION_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    rf"(?:-({_PRE_IDENT}(?:\.{_PRE_IDENT})*))?"
)
"""Semver 2.0.0 without build metadata: pre-release identifiers are non-empty, and a numeric one
has no leading zero (the same pattern as tasker._semver_parts in SQL)."""

_NAMESPACE_RULE = (
    "a queue name: lowercase letters, digits and '_', starting with a letter, "
    f"at most {NAMESPACE_MAX_LEN} characters (it becomes the queue table tasker.q_<namespace>)"
)
_TEMPLATE_NAME_RULE = (
    f"letters, digits, '_', '-' and '.', starting with a letter, at most {NAME_MAX_LEN} characters"
)
_STEP_NAME_RULE = (
    "letters, digits, '_', '-' and '.', starting with a letter or '_', "
    f"at most {NAME_MAX_LEN} characters"
)
_VERSION_RULE = (
    "a semantic version MAJOR.MINOR.PATCH such as '1.0.0' (numbers without leading zeros, each "
    f"at most {PG_INT_MAX}), optionally with a pre-release suffix such as '1.2.0-rc.1' "
    "(dot-separated identifiers of letters, digits and '-', none empty, numeric ones without "
    f"leading zeros), at most {VERSION_MAX_LEN} characters"
)

MAX_TIMEOUT_SECONDS = 31_536_000
"""Longest `timeout_seconds` a step may declare: a year (the SQL side refuses more too)."""

BackoffKind = Literal["exponential", "linear", "fixed", "none"]
"""How the retry delay grows: doubling from the base, growing by the base each attempt, always
the base, or no delay at all (the SQL side computes it; the cap and jitter apply to all four)."""

_JSON_MAX_DEPTH = 100

_PgInt = Annotated[int, Strict(), Field(ge=0, le=PG_INT_MAX)]


class TemplateValidationError(ValidationError):
    """A template, a template file or a directory of templates breaks a rule.

    `source` is the file or directory the template came from (None for in-memory data) and
    `problems` lists every problem found, one readable line each; the message contains them all.
    """

    def __init__(
        self, message: str, *, source: str | None = None, problems: Iterable[str] = ()
    ) -> None:
        super().__init__(message)
        self.source = source
        self.problems: list[str] = list(problems)


# --- models ----------------------------------------------------------------------------------


class _Frozen(BaseModel):
    """Common configuration: immutable, unknown keys rejected, fields loadable by name or alias."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class HandlerSpec(_Frozen):
    """Which handler runs a step, and the static configuration handed to it."""

    callable: StrictStr
    """The handler's registered name or dotted import path, e.g. `pkg.handlers.ValidateCart`."""

    initialization: dict[str, Any] = Field(default_factory=dict)
    """Free-form JSON configuration for the handler (stored as the step's `config`)."""

    @field_validator("callable")
    @classmethod
    def _check_callable(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError(
                "empty_callable", "handler.callable must not be empty: name the handler to run"
            )
        if value != value.strip():
            raise PydanticCustomError(
                "callable_whitespace",
                "handler.callable {value} must not start or end with whitespace",
                {"value": repr(value)},
            )
        return value

    @field_validator("initialization", mode="before")
    @classmethod
    def _check_initialization(cls, value: Any) -> Any:
        return _json_mapping(value, "handler.initialization")

    def to_json(self) -> dict[str, Any]:
        """The handler part of the canonical JSON body."""
        return {"callable": self.callable, "initialization": copy.deepcopy(self.initialization)}


class RetryPolicy(_Frozen):
    """When and how a failed step is tried again.

    The first attempt always runs; a later attempt needs `retryable` and fewer than
    `max_attempts` attempts so far. The delay before it is the handler's `retry_after` when
    given, else `backoff` computed from `backoff_base_ms`, capped at `max_backoff_ms`, spread by
    `jitter` (a fraction from 0 to 1 of the delay).
    """

    retryable: StrictBool = True
    max_attempts: Annotated[int, Strict(), Field(ge=1, le=PG_INT_MAX)] = 3
    backoff: BackoffKind = "exponential"
    backoff_base_ms: _PgInt = 1000
    max_backoff_ms: _PgInt = 60000
    jitter: Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0

    @model_validator(mode="after")
    def _check_backoff_range(self) -> Self:
        if self.max_backoff_ms < self.backoff_base_ms:
            raise PydanticCustomError(
                "backoff_range",
                "max_backoff_ms ({max}) must be >= backoff_base_ms ({base}): the cap on the "
                "delay cannot be below the first delay",
                {"max": self.max_backoff_ms, "base": self.backoff_base_ms},
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """The retry part of the canonical JSON body."""
        return {
            "retryable": self.retryable,
            "max_attempts": self.max_attempts,
            "backoff": self.backoff,
            "backoff_base_ms": self.backoff_base_ms,
            "max_backoff_ms": self.max_backoff_ms,
            "jitter": float(self.jitter),
        }


StepType = Literal[
    "standard",
    "decision",
    "batchable",
    "batch_worker",
    "deferred_convergence",
    "wait_for_event",
    "sleep",
]
"""What a step is: `standard` runs its handler; a `decision` chooses which of its children are
created; a `batchable` fans out into `batch_worker` steps; a `deferred_convergence` follows the
listed steps that were created (sql/functions/62_dynamic.sql); a `wait_for_event` step runs no
handler and completes when `tasker.emit_event` names its event and key, a `sleep` step when its
time comes (sql/functions/88_waits.sql)."""

STEP_TYPES: tuple[str, ...] = (
    "standard",
    "decision",
    "batchable",
    "batch_worker",
    "deferred_convergence",
    "wait_for_event",
    "sleep",
)

WAIT_STEP_TYPES: frozenset[str] = frozenset({"wait_for_event", "sleep"})
"""Step types that run no handler: they wait, holding no worker, for an event or a time."""

_EVENT_NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-]{1,200}")
_CONTEXT_PATH_RE = re.compile(r"\$(\.[A-Za-z_][A-Za-z0-9_]*){1,16}")
_WAIT_EVENT_FIELDS = ("event", "key", "on_timeout", "default")
_SLEEP_FIELDS = ("duration_seconds", "until")


class BatchConfig(_Frozen):
    """A batch_worker step's settings, handed to its workers in `inputs.batch_metadata`."""

    batch_size: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] = 1000
    parallelism: Annotated[int, Strict(), Field(ge=1, le=1000)] = 10
    cursor_field: Annotated[StrictStr, Field(min_length=1, max_length=200)] = "id"
    failure_strategy: Literal["continue_on_failure", "fail_fast", "isolate"] = "continue_on_failure"

    def to_json(self) -> dict[str, Any]:
        """The batch_config part of the canonical JSON body (every default filled in)."""
        return {
            "batch_size": self.batch_size,
            "parallelism": self.parallelism,
            "cursor_field": self.cursor_field,
            "failure_strategy": self.failure_strategy,
        }


_RATE_LIMIT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:\-]{0,127}")
MAX_CONCURRENCY_LIMIT = 1_000_000
"""Highest `concurrency.limit` a template may declare."""


def _check_context_path(value: str, what: str, example: str) -> str:
    if not _CONTEXT_PATH_RE.fullmatch(value):
        raise PydanticCustomError(
            "context_path",
            "{what} must be a path into the task context such as {example} (at most 16 names), "
            "got {value}",
            {"what": what, "example": example, "value": repr(value)},
        )
    return value


class ConcurrencySpec(_Frozen):
    """`concurrency: {key, limit}`: at most `limit` steps whose task context holds the same
    value at `key` (a `$.path`) are in progress at once, across all workers, in the namespace.
    Its key is also the fairness key unless `fairness` names another (sql/functions/55_flow.sql)."""

    key: StrictStr
    limit: Annotated[int, Strict(), Field(ge=1, le=MAX_CONCURRENCY_LIMIT)]

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return _check_context_path(value, "concurrency.key", "$.customer_id")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "limit": self.limit}


class FairnessSpec(_Frozen):
    """`fairness: {key}`: claims take turns between the values of `key` (a `$.path` into the task
    context), so one value's backlog does not starve another's."""

    key: StrictStr

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return _check_context_path(value, "fairness.key", "$.tenant")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key}


def _check_rate_limit_name(value: str | None) -> str | None:
    if value is not None and not _RATE_LIMIT_NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "rate_limit_name",
            "rate_limit must be the name of a rate limit (1 to 128 letters, digits, _, ., : and "
            "-, starting with a letter), got {value}",
            {"value": repr(value)},
        )
    return value


class _FlowSettings(_Frozen):
    """Flow control (sql/functions/55_flow.sql), declared by a template for all its steps or by
    a step, whose settings replace the template's one by one."""

    concurrency: ConcurrencySpec | None = None
    """At most `limit` steps per value of `key` in progress, across all workers."""
    fairness: FairnessSpec | None = None
    """Claims take turns between the values of this key (default: the concurrency key)."""
    rate_limit: StrictStr | None = None
    """The rate limit (tasker.rate_limits) each start of a step takes a token from."""

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        return _check_rate_limit_name(value)

    def _flow_json(self) -> dict[str, Any]:
        """The flow control part of a canonical body: only the settings given."""
        out: dict[str, Any] = {}
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency.to_json()
        if self.fairness is not None:
            out["fairness"] = self.fairness.to_json()
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit
        return out


class StepTemplate(_FlowSettings):
    """One step of a workflow: its handler, the steps it waits for, its retry and time limits.

    `dependencies` (also accepted as `depends_on`) lists the steps that must be complete before
    this one runs, in the order the user declared them. Only `type: standard` steps exist so far;
    other step types are rejected rather than run with the wrong semantics.
    """

    name: StrictStr
    description: StrictStr | None = None
    handler: HandlerSpec | None = None
    """Required, except for wait_for_event and sleep steps, which run no handler."""
    dependencies: tuple[StrictStr, ...] = Field(default=(), alias="depends_on")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_seconds: (
        Annotated[float, Strict(), Field(gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)] | None
    ) = None
    """Longest one attempt may run before the worker abandons it (None: no limit; at most a
    year)."""
    type: StepType = "standard"
    batch_config: BatchConfig | None = None
    """batch_worker steps only (defaults filled in for them)."""
    event: StrictStr | None = None
    """wait_for_event: the event name it waits for (1 to 200 letters, digits, _ . : / -). Its
    `timeout_seconds` is the wait's timeout (none when not given)."""
    key: StrictStr | None = None
    """wait_for_event: where the event key is in the task context, e.g. `$.order_id`."""
    on_timeout: Literal["fail", "complete"] | None = None
    """wait_for_event: what a timeout does: `fail` (the default) or `complete` with `default`."""
    default: dict[str, Any] | None = None
    """wait_for_event with `on_timeout: complete`: the result on timeout ({} when not given)."""
    duration_seconds: (
        Annotated[float, Strict(), Field(gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)] | None
    ) = None
    """sleep: how long it sleeps (or `until`)."""
    until: StrictStr | None = None
    """sleep: where its end time is in the task context (an ISO 8601 timestamp with an offset),
    e.g. `$.ship_at` (or `duration_seconds`)."""

    @field_validator("default", mode="before")
    @classmethod
    def _check_default(cls, value: Any) -> Any:
        return None if value is None else _json_mapping(value, "default")

    @model_validator(mode="before")
    @classmethod
    def _check_alias_clash(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "dependencies" in data and "depends_on" in data:
            raise PydanticCustomError(
                "alias_clash",
                "both 'dependencies' and 'depends_on' are given: they are the same setting, "
                "use one of them",
            )
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_pattern(value, _STEP_NAME_RE, "step name", _STEP_NAME_RULE)

    @field_validator("dependencies", mode="before")
    @classmethod
    def _empty_dependencies(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("retry", mode="before")
    @classmethod
    def _empty_retry(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("type", mode="before")
    @classmethod
    def _check_type(cls, value: Any) -> Any:
        if value is None:
            return "standard"
        if not isinstance(value, str) or value not in STEP_TYPES:
            raise PydanticCustomError(
                "invalid_step_type",
                "step type {value} is not valid (valid: {valid})",
                {
                    "value": repr(value) if isinstance(value, str) else _describe(value),
                    "valid": ", ".join(STEP_TYPES),
                },
            )
        return value

    @model_validator(mode="after")
    def _check_batch_config(self) -> Self:
        if self.type == "batch_worker":
            if self.batch_config is None:
                object.__setattr__(self, "batch_config", BatchConfig())
        elif self.batch_config is not None:
            raise PydanticCustomError(
                "batch_config_type",
                "batch_config is only for batch_worker steps (this step is {type})",
                {"type": self.type},
            )
        return self

    @model_validator(mode="after")
    def _check_wait(self) -> Self:
        """The rules of handlers and of wait settings per type (tasker._normalise_wait in SQL)."""
        wait = self.type in WAIT_STEP_TYPES
        if wait and (self.concurrency, self.fairness, self.rate_limit) != (None, None, None):
            raise PydanticCustomError(
                "wait_flow",
                "a {type} step runs no handler: concurrency, fairness and rate_limit do not "
                "apply to it",
                {"type": self.type},
            )
        if wait and self.handler is not None:
            raise PydanticCustomError(
                "wait_handler", "a {type} step runs no handler: remove handler", {"type": self.type}
            )
        if not wait and self.handler is None:
            raise PydanticCustomError(
                "missing_handler",
                "missing required key 'handler' in step {name} (only wait_for_event and sleep "
                "steps run no handler)",
                {"name": repr(self.name)},
            )
        given = {f for f in (*_WAIT_EVENT_FIELDS, *_SLEEP_FIELDS) if getattr(self, f) is not None}
        if not wait:
            for f in (*_WAIT_EVENT_FIELDS, *_SLEEP_FIELDS):
                if f in given:
                    owner = "sleep" if f in _SLEEP_FIELDS else "wait_for_event"
                    raise PydanticCustomError(
                        "wait_field_type",
                        "{field} is only for {owner} steps (this step is {type})",
                        {"field": f, "owner": owner, "type": self.type},
                    )
            return self
        if self.type == "sleep":
            wrong = [f for f in _WAIT_EVENT_FIELDS if f in given]
            if self.timeout_seconds is not None:
                wrong.append("timeout_seconds")
            if wrong:
                raise PydanticCustomError(
                    "wait_field_type",
                    "{field} is only for wait_for_event steps (this step is sleep)",
                    {"field": wrong[0]},
                )
            if (self.duration_seconds is None) == (self.until is None):
                raise PydanticCustomError(
                    "sleep_time", "a sleep step needs exactly one of duration_seconds and until"
                )
            if self.until is not None and not _CONTEXT_PATH_RE.fullmatch(self.until):
                raise PydanticCustomError(
                    "context_path",
                    "until must be a path into the task context such as $.ship_at (at most 16 "
                    "names), got {value}",
                    {"value": repr(self.until)},
                )
            return self
        wrong = [f for f in _SLEEP_FIELDS if f in given]
        if wrong:
            raise PydanticCustomError(
                "wait_field_type",
                "{field} is only for sleep steps (this step is wait_for_event)",
                {"field": wrong[0]},
            )
        if self.event is None or not _EVENT_NAME_RE.fullmatch(self.event):
            raise PydanticCustomError(
                "event_name",
                "event must be the event name the step waits for: 1 to 200 letters, digits, "
                "_, ., :, / and -; got {value}",
                {"value": "nothing" if self.event is None else repr(self.event)},
            )
        if self.key is None or not _CONTEXT_PATH_RE.fullmatch(self.key):
            raise PydanticCustomError(
                "context_path",
                "key must be a path into the task context such as $.order_id (at most 16 "
                "names), got {value}",
                {"value": "nothing" if self.key is None else repr(self.key)},
            )
        if self.default is not None and self.on_timeout != "complete":
            raise PydanticCustomError(
                "wait_default",
                "default is the result of a timeout with on_timeout: complete (this step "
                "fails on timeout)",
            )
        if self.on_timeout == "complete" and self.timeout_seconds is None:
            raise PydanticCustomError("wait_timeout", "on_timeout: complete needs timeout_seconds")
        return self

    def _wait_json(self) -> dict[str, Any]:
        """The wait settings of the canonical body (wait steps only)."""
        if self.type == "sleep":
            return {
                "duration_seconds": (
                    None if self.duration_seconds is None else float(self.duration_seconds)
                ),
                "until": self.until,
            }
        if self.type == "wait_for_event":
            complete = self.on_timeout == "complete"
            return {
                "event": self.event,
                "key": self.key,
                "on_timeout": self.on_timeout or "fail",
                "default": copy.deepcopy(self.default or {}) if complete else None,
            }
        return {}

    def to_json(self) -> dict[str, Any]:
        """The step part of the canonical JSON body."""
        return {
            "name": self.name,
            "description": self.description,
            "handler": None if self.handler is None else self.handler.to_json(),
            "dependencies": list(self.dependencies),
            "retry": self.retry.to_json(),
            "timeout_seconds": self.timeout_seconds,
            "type": self.type,
            # only batch workers carry one (other steps' bodies are unchanged)
            **(
                {"batch_config": self.batch_config.to_json()}
                if self.type == "batch_worker" and self.batch_config is not None
                else {}
            ),
            # only wait steps carry their wait settings
            **self._wait_json(),
            # flow control: only the settings given
            **self._flow_json(),
        }


_SCHEDULE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")
MAX_SCHEDULES = 100
"""Most schedules one template may declare."""


class ScheduleTemplate(_Frozen):
    """A schedule a template declares (`schedules:`): every slot of `cron` in `time_zone`
    creates a task of the declaring version with `context`. `overlap`: skip (no new task while
    the last one is pending or running), allow, or cancel_previous; `catchup_window_seconds`:
    after downtime, missed slots at most this old still fire. A newer version of the template
    that declares a schedule of the same name replaces it (sql/functions/87_schedules.sql)."""

    name: StrictStr
    cron: StrictStr
    time_zone: StrictStr = "UTC"
    context: dict[str, Any] = Field(default_factory=dict)
    overlap: Literal["skip", "allow", "cancel_previous"] = "skip"
    catchup_window_seconds: Annotated[int, Strict(), Field(ge=60, le=31_622_400)] = 3600
    enabled: StrictBool = True

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_pattern(
            value,
            _SCHEDULE_NAME_RE,
            "schedule name",
            "letters, digits, '_', '-' and '.', starting with a letter, at most 128 characters",
        )

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        try:
            parse_cron(value)
        except CronError as exc:
            raise PydanticCustomError("invalid_cron", "{message}", {"message": str(exc)}) from None
        return value.strip()

    @field_validator("time_zone", mode="before")
    @classmethod
    def _check_zone(cls, value: Any) -> Any:
        if value is None:
            return "UTC"
        if isinstance(value, str):
            try:
                check_time_zone(value)
            except CronError as exc:
                raise PydanticCustomError(
                    "invalid_time_zone", "{message}", {"message": str(exc)}
                ) from None
        return value

    @field_validator("context", mode="before")
    @classmethod
    def _check_context(cls, value: Any) -> Any:
        return _json_mapping(value, "context")

    @field_validator("overlap", "catchup_window_seconds", "enabled", mode="before")
    @classmethod
    def _default_when_empty(cls, value: Any, info: Any) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    def to_json(self) -> dict[str, Any]:
        """The schedule part of the canonical JSON body (every default filled in)."""
        return {
            "name": self.name,
            "cron": self.cron,
            "time_zone": self.time_zone,
            "context": copy.deepcopy(self.context),
            "overlap": self.overlap,
            "catchup_window_seconds": self.catchup_window_seconds,
            "enabled": self.enabled,
        }


class TaskTemplate(_FlowSettings):
    """A validated workflow definition: a DAG of steps under (namespace, name, version).

    Build one with `from_dict`, `from_yaml`, `load_template` or `load_templates`: they turn
    every problem into one readable `TemplateValidationError`. (Calling the constructor or
    `model_validate` directly enforces the same rules but raises pydantic's own error.)
    Besides the fields, a template answers graph questions (parents, children, ancestors, a
    topological order) that the client and tests need without a database.
    """

    name: StrictStr
    namespace_name: StrictStr
    version: str
    description: StrictStr | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form JSON data about the workflow (owner, docs link...); not used by the engine."""
    steps: tuple[StepTemplate, ...]
    """The steps in declared order; declared order breaks ties wherever an order is needed."""
    schedules: tuple[ScheduleTemplate, ...] = ()
    """Cron schedules that create tasks of this version (`ScheduleTemplate`)."""
    _index: dict[str, int] = PrivateAttr(default_factory=dict)
    _children: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)
    _order: tuple[str, ...] = PrivateAttr(default=())
    _dynamic: frozenset[str] = PrivateAttr(default=frozenset())

    # -- field rules --

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_pattern(value, _TEMPLATE_NAME_RE, "template name", _TEMPLATE_NAME_RULE)

    @field_validator("namespace_name")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        return _check_pattern(value, _NAMESPACE_RE, "namespace_name", _NAMESPACE_RULE)

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, value: Any) -> Any:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, int | float) and not isinstance(value, bool):
                hint = " (YAML read it as a number: quote it, e.g. version: '1.0.0')"
            raise PydanticCustomError(
                "invalid_version",
                "version must be {rule}; got {got}{hint}",
                {"rule": _VERSION_RULE, "got": _describe(value), "hint": hint},
            )
        if parse_version(value) is None:
            hint = ""
            if "+" in value:
                hint = (
                    "; build metadata (+...) is not accepted: semver ignores it when ordering, "
                    "so the newest version would be ambiguous"
                )
            raise PydanticCustomError(
                "invalid_version",
                "version {value} is not valid: expected {rule}{hint}",
                {"value": _short(repr(value)), "rule": _VERSION_RULE, "hint": hint},
            )
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _check_metadata(cls, value: Any) -> Any:
        return _json_mapping(value, "metadata")

    @field_validator("steps", mode="before")
    @classmethod
    def _check_step_count(cls, value: Any) -> Any:
        if value is None or (isinstance(value, Sequence) and not isinstance(value, str)):
            count = 0 if value is None else len(value)
            if count == 0:
                raise PydanticCustomError(
                    "no_steps", "the template has no steps: declare at least one step"
                )
            if count > MAX_STEPS:
                raise PydanticCustomError(
                    "too_many_steps",
                    "the template has {count} steps; at most {max} are allowed",
                    {"count": count, "max": MAX_STEPS},
                )
        return value

    @field_validator("schedules", mode="before")
    @classmethod
    def _check_schedules(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) > MAX_SCHEDULES:
                raise PydanticCustomError(
                    "too_many_schedules",
                    "the template declares {count} schedules; at most {max} are allowed",
                    {"count": len(value), "max": MAX_SCHEDULES},
                )
            names = [s.get("name") for s in value if isinstance(s, Mapping)]
            dupes = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
            if dupes:
                raise PydanticCustomError(
                    "duplicate_schedule", "duplicate schedule name {name}", {"name": repr(dupes[0])}
                )
        return value

    @model_validator(mode="after")
    def _check_graph(self) -> Self:
        problems = _graph_problems([(step.name, step.dependencies) for step in self.steps])
        if problems:
            raise PydanticCustomError(
                "template_graph",
                "{summary}",
                {
                    "summary": "; ".join(f"{loc}: {msg}" for loc, msg in problems),
                    "problems": problems,
                },
            )
        self._index = {step.name: i for i, step in enumerate(self.steps)}
        children: dict[str, list[str]] = {step.name: [] for step in self.steps}
        for step in self.steps:
            for parent in step.dependencies:
                children[parent].append(step.name)
        self._children = {name: tuple(kids) for name, kids in children.items()}
        self._order = tuple(self.steps[i].name for i in _kahn_order(self.steps, self._index))
        type_problems = _type_problems(self.steps)
        if type_problems:
            raise PydanticCustomError(
                "template_graph",
                "{summary}",
                {
                    "summary": "; ".join(f"{loc}: {msg}" for loc, msg in type_problems),
                    "problems": type_problems,
                },
            )
        self._dynamic = _dynamic_steps(self.steps, self._order)
        return self

    @property
    def dynamic_steps(self) -> frozenset[str]:
        """Steps not created with a task: a decision or batchable step's outcome creates them."""
        return self._dynamic

    @property
    def static_steps(self) -> list[str]:
        """Steps created with every task, in declared order (their count is the task's
        initial total_steps)."""
        return [step.name for step in self.steps if step.name not in self._dynamic]

    # -- construction --

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Self:
        """Validate `data` (parsed YAML or JSON) into a template.

        `source` (a file name) is named in error messages. Raises `TemplateValidationError`
        listing every problem, never a raw pydantic error.
        """
        given: object = data  # callers may pass parsed YAML that is not a mapping
        if not isinstance(given, Mapping):
            problem = (
                "template: expected a mapping with name, namespace_name, version and steps "
                f"at the top level, got {_describe(given)}"
            )
            raise _error(source, None, [problem])
        raw = dict(data)
        try:
            return cls.model_validate(raw)
        except PydanticValidationError as exc:
            problems = _pydantic_problems(exc, raw)
            if not any(err["type"] == "template_graph" for err in exc.errors()):
                # The graph rules run after the field rules pass; check what the raw data
                # allows now so one round of fixes can address everything.
                problems += [f"{loc}: {msg}" for loc, msg in _graph_problems(_raw_graph(raw))]
            name = raw.get("name")
            raise _error(source, name if isinstance(name, str) else None, problems) from None

    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> Self:
        """Parse one YAML document and validate it; YAML syntax errors name the line."""
        data = _parse_yaml(text, source)
        if data is None:
            where = source or "the YAML text"
            problem = (
                f"{where} is empty: a task template needs name, namespace_name, version and steps"
            )
            raise _error(source, None, [problem])
        return cls.from_dict(data, source=source)

    # -- output --

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON body for `tasker.register_template(template jsonb)`.

        Every default is filled in so SQL never has to guess; steps and dependencies keep their
        declared order. `TaskTemplate.from_dict(t.to_json()) == t` always holds.
        """
        return {
            "name": self.name,
            "namespace_name": self.namespace_name,
            "version": self.version,
            "description": self.description,
            "metadata": copy.deepcopy(self.metadata),
            "steps": [step.to_json() for step in self.steps],
            # only templates that declare schedules carry the key (other bodies are unchanged)
            **({"schedules": [s.to_json() for s in self.schedules]} if self.schedules else {}),
            # flow control for every step: only the settings given
            **self._flow_json(),
        }

    # -- graph queries --

    @property
    def key(self) -> tuple[str, str, str]:
        """(namespace, name, version): what identifies a registered template."""
        return (self.namespace_name, self.name, self.version)

    def step(self, name: str) -> StepTemplate:
        """The step called `name`; raises `NotFoundError` (with a suggestion) if there is none."""
        return self.steps[self._position(name)]

    def parents(self, step_name: str) -> list[str]:
        """Names of the steps `step_name` depends on directly, in declared order."""
        return list(self.step(step_name).dependencies)

    def children(self, step_name: str) -> list[str]:
        """Names of the steps that depend directly on `step_name`, in declared step order."""
        self._position(step_name)
        return list(self._children[step_name])

    def ancestors(self, step_name: str) -> set[str]:
        """Names of every step `step_name` depends on, directly or transitively."""
        seen: set[str] = set()
        pending = list(self.step(step_name).dependencies)
        while pending:
            name = pending.pop()
            if name not in seen:
                seen.add(name)
                pending.extend(self.steps[self._index[name]].dependencies)
        return seen

    def root_steps(self) -> list[str]:
        """Names of the steps with no dependencies (enqueued when a task starts), declared order."""
        return [step.name for step in self.steps if not step.dependencies]

    def topological_order(self) -> list[str]:
        """Step names, every step after all its dependencies; ties go to declared order."""
        return list(self._order)

    def _position(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise NotFoundError(
                f"template {self.namespace_name}/{self.name} {self.version} has no step "
                f"{name!r}{_suggest(name, self._index)}"
            ) from None


# --- loading files ---------------------------------------------------------------------------


def load_template(path: str | Path) -> TaskTemplate:
    """Load and validate the one template in the YAML file at `path`."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise _error(source, None, [f"template file {source} does not exist"]) from None
    except IsADirectoryError:
        raise _error(
            source, None, [f"{source} is a directory: use load_templates to load every file in it"]
        ) from None
    except OSError as exc:
        raise _error(source, None, [f"cannot read {source}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise _error(
            source, None, [f"{source} is not UTF-8 text (byte {exc.start}): save it as UTF-8"]
        ) from None
    return TaskTemplate.from_yaml(text, source=source)


def load_templates(path: str | Path) -> list[TaskTemplate]:
    """Load the template file at `path`, or every template in the directory at `path`.

    A directory contributes its `*.yaml` and `*.yml` files (any case of the suffix), sorted by
    name; subdirectories are not searched and hidden files (starting with `.`, such as editor
    lock files) are skipped. Problems in several files are reported together in one error; so
    is one (namespace, name, version) defined by two files, naming both.
    """
    root = Path(path)
    source = str(path)
    if not root.is_dir():
        return [load_template(root)]
    files = sorted(
        entry
        for entry in root.iterdir()
        if entry.suffix.lower() in (".yaml", ".yml")
        and not entry.name.startswith(".")
        and entry.is_file()
    )
    if not files:
        raise _error(
            source, None, [f"directory {source} contains no template files (*.yaml, *.yml)"]
        )
    templates: list[TaskTemplate] = []
    failures: list[TemplateValidationError] = []
    first_file: dict[tuple[str, str, str], Path] = {}
    duplicates: list[str] = []
    for file in files:
        try:
            template = load_template(file)
        except TemplateValidationError as exc:
            failures.append(exc)
            continue
        if template.key in first_file:
            namespace, name, version = template.key
            duplicates.append(
                f"template {namespace}/{name} version {version} is defined twice: in "
                f"{first_file[template.key]} and in {file}"
            )
            continue
        first_file[template.key] = file
        templates.append(template)
    if failures or duplicates:
        problems = [f"{exc.source}: {p}" for exc in failures for p in exc.problems] + duplicates
        sections = [exc.message for exc in failures]
        if duplicates:
            sections.append(
                f"duplicate templates: {_plural(len(duplicates), 'problem')}\n"
                + "\n".join(f"  - {d}" for d in duplicates)
            )
        message = f"invalid task templates in directory {source}:\n" + "\n".join(sections)
        raise TemplateValidationError(message, source=source, problems=problems)
    return templates


# --- YAML ------------------------------------------------------------------------------------

try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]


class _TemplateLoader(_BaseLoader):
    """Safe YAML loader that rejects duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: let the base class report it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first defined on line "
                    f"{first.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str | None) -> Any:
    """Parse one YAML document; a syntax error becomes a ValidationError naming file and line."""
    try:
        # A SafeLoader subclass: builds plain data only, never arbitrary Python objects.
        return yaml.load(text, Loader=_TemplateLoader)
    except yaml.MarkedYAMLError as exc:
        where = source or "YAML text"
        mark = exc.problem_mark or exc.context_mark
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = exc.problem or "syntax error"
        if exc.context:
            detail += f" ({exc.context})"
        problem = f"invalid YAML in {where}{position}: {detail}"
        raise _error(source, None, [problem]) from None
    except yaml.YAMLError as exc:
        where = source or "YAML text"
        raise _error(source, None, [f"invalid YAML in {where}: {exc}"]) from None


# --- graph checks ----------------------------------------------------------------------------


_GraphStep = tuple[str | None, Sequence[str]]
"""A step as the graph rules see it: its name (None if it has no usable one), its dependencies."""


def _raw_graph(raw: Mapping[str, Any]) -> list[_GraphStep]:
    """The steps of unvalidated input as graph rules see them, ignoring malformed parts."""
    steps = raw.get("steps")
    if not isinstance(steps, list | tuple) or len(steps) > MAX_STEPS:
        return []
    graph: list[_GraphStep] = []
    for step in steps:
        name: str | None = None
        deps: list[str] = []
        if isinstance(step, Mapping):
            if isinstance(step.get("name"), str):
                name = step["name"]
            listed = step.get("dependencies", step.get("depends_on"))
            if isinstance(listed, list | tuple):
                deps = [dep for dep in listed if isinstance(dep, str)]
        graph.append((name, deps))
    return graph


def _graph_problems(steps: Sequence[_GraphStep]) -> list[tuple[str, str]]:
    """Every rule about step names and dependencies the steps break, as (location, message)."""
    problems: list[tuple[str, str]] = []
    locs = [
        f"steps[{i}]" + (f" ({name})" if name is not None else "")
        for i, (name, _) in enumerate(steps)
    ]
    index: dict[str, int] = {}
    for i, (name, _deps) in enumerate(steps):
        if name is None:
            continue
        if name in index:
            first = index[name]
            problems.append(
                (
                    f"{locs[i]}.name",
                    f"duplicate step name {name!r}: already used by steps[{first}]; "
                    "step names must be unique within a template",
                )
            )
        else:
            index[name] = i
    for i, (name, deps) in enumerate(steps):
        listed: set[str] = set()
        step = f"step {name!r}" if name is not None else f"step steps[{i}]"
        for k, dep in enumerate(deps):
            loc = f"{locs[i]}.dependencies[{k}]"
            if dep == name:
                problems.append((loc, f"{step} depends on itself"))
            elif dep in listed:
                problems.append((loc, f"{step} lists dependency {dep!r} more than once"))
            elif dep not in index:
                others = [other for other in index if other != name]
                problems.append(
                    (
                        loc,
                        f"unknown dependency {dep!r} in {step}: no step has that "
                        f"name{_suggest(dep, others)}",
                    )
                )
            listed.add(dep)
    names_unique = len(index) == sum(1 for name, _ in steps if name is not None)
    if names_unique:  # with two steps of one name, edges would be ambiguous
        for cycle in _find_cycles(steps, index):
            path = " -> ".join(str(steps[i][0]) for i in cycle)
            problems.append(
                (
                    f"{locs[cycle[0]]}.dependencies",
                    f"dependency cycle {path} (each step depends on the next): "
                    "a workflow must be a DAG",
                )
            )
    return problems


def _type_problems(steps: Sequence[StepTemplate]) -> list[tuple[str, str]]:
    """The rules of step types (the same as tasker._template_dynamic in SQL), as (location,
    message), each naming the step."""
    types = {step.name: step.type for step in steps}
    workers_of: dict[str, int] = {}
    for step in steps:
        if step.type == "batch_worker":
            for dep in step.dependencies:
                workers_of[dep] = workers_of.get(dep, 0) + 1
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(steps):
        deps = step.dependencies
        problem: str | None = None
        if step.type == "decision" and not deps:
            problem = (
                "a decision step needs at least one dependency (the step whose result it "
                "decides on)"
            )
        elif (
            step.type != "deferred_convergence"
            and len(deps) > 1
            and any(types[d] == "decision" for d in deps)
        ):
            problem = (
                "a step that depends on a decision depends on nothing else (join branches "
                "with a deferred_convergence step)"
            )
        elif step.type == "batch_worker" and (len(deps) != 1 or types[deps[0]] != "batchable"):
            problem = (
                "a batch_worker step is not downstream of a batchable step: it needs exactly "
                "one dependency, a batchable step"
            )
        elif step.type == "batchable" and not workers_of.get(step.name):
            problem = "a batchable step needs at least one batch_worker step depending on it"
        elif step.type != "deferred_convergence" and any(types[d] == "batch_worker" for d in deps):
            problem = "only a deferred_convergence step can depend on a batch_worker step"
        elif step.type == "deferred_convergence" and not deps:
            problem = "a deferred_convergence step must list at least one step it may follow"
        if problem is not None:
            problems.append((f"steps[{i}] ({step.name})", f"step {step.name!r}: {problem}"))
    return problems


def _dynamic_steps(steps: Sequence[StepTemplate], order: Sequence[str]) -> frozenset[str]:
    """Steps created at run time: a batch_worker; a step depending on a decision; a
    deferred_convergence all of whose listed steps are dynamic; any other step with a dynamic
    dependency (the same as tasker._template_dynamic in SQL)."""
    by_name = {step.name: step for step in steps}
    dynamic: set[str] = set()
    for name in order:
        step = by_name[name]
        deps = step.dependencies
        if (
            step.type == "batch_worker"
            or any(by_name[d].type == "decision" for d in deps)
            or (step.type == "deferred_convergence" and all(d in dynamic for d in deps))
            or (step.type != "deferred_convergence" and any(d in dynamic for d in deps))
        ):
            dynamic.add(name)
    return frozenset(dynamic)


def _adjacency(steps: Sequence[_GraphStep], index: Mapping[str, int]) -> list[list[int]]:
    """For each step, the positions of its known, distinct, non-self dependencies in order."""
    adjacency: list[list[int]] = []
    for i, (_name, deps) in enumerate(steps):
        targets: list[int] = []
        for dep in deps:
            j = index.get(dep)
            if j is not None and j != i and j not in targets:
                targets.append(j)
        adjacency.append(targets)
    return adjacency


def _find_cycles(steps: Sequence[_GraphStep], index: Mapping[str, int]) -> list[list[int]]:
    """One concrete cycle per strongly connected group of steps, in dependency direction.

    Each cycle starts and ends at the first declared step of its group and is a shortest cycle
    through it (breadth-first, dependencies in declared order), so the report is deterministic.
    Groups are reported in the declared order of their first step. Iterative throughout.
    """
    adjacency = _adjacency(steps, index)
    cycles: list[list[int]] = []
    for component in sorted((c for c in _strongly_connected(adjacency) if len(c) > 1), key=min):
        members = set(component)
        start = min(component)
        previous: dict[int, int] = {}
        queue: deque[int] = deque([start])
        found: int | None = None
        while queue and found is None:
            node = queue.popleft()
            for target in adjacency[node]:
                if target == start:
                    found = node
                    break
                if target in members and target not in previous:
                    previous[target] = node
                    queue.append(target)
        assert found is not None  # a strongly connected group of 2+ steps has a cycle
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        path.reverse()
        cycles.append([*path, start])
    return cycles


def _strongly_connected(adjacency: Sequence[Sequence[int]]) -> list[list[int]]:
    """Tarjan's strongly connected components, iterative so 1000-step chains cannot overflow."""
    count = len(adjacency)
    order = [-1] * count
    low = [0] * count
    on_stack = [False] * count
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in range(count):
        if order[root] != -1:
            continue
        order[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work: list[tuple[int, int]] = [(root, 0)]
        while work:
            node, next_edge = work[-1]
            if next_edge < len(adjacency[node]):
                work[-1] = (node, next_edge + 1)
                target = adjacency[node][next_edge]
                if order[target] == -1:
                    order[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack[target] = True
                    work.append((target, 0))
                elif on_stack[target]:
                    low[node] = min(low[node], order[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == order[node]:
                component: list[int] = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _kahn_order(steps: Sequence[StepTemplate], index: Mapping[str, int]) -> list[int]:
    """Positions of the steps in topological order; among ready steps, declared order first."""
    pending = [len(step.dependencies) for step in steps]
    children: list[list[int]] = [[] for _ in steps]
    for i, step in enumerate(steps):
        for dep in step.dependencies:
            children[index[dep]].append(i)
    ready = [i for i, waiting in enumerate(pending) if waiting == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for child in children[i]:
            pending[child] -= 1
            if pending[child] == 0:
                heapq.heappush(ready, child)
    return order


# --- semantic versions -----------------------------------------------------------------------

_PreKey = tuple[tuple[int, int | str], ...]
VersionKey = tuple[int, int, int, int, _PreKey]
"""Sort key of a version: (major, minor, patch, 1 for a release or 0 for a pre-release, the
pre-release identifiers as (0, number) or (1, text))."""


def parse_version(version: str) -> VersionKey | None:
    """The semver 2.0.0 precedence key of `version`, or None when it is not a valid version.

    Valid: MAJOR.MINOR.PATCH without leading zeros, each at most 2147483647, an optional
    pre-release of non-empty dot-separated identifiers ([0-9A-Za-z-], numeric ones without
    leading zeros), at most 64 characters, no build metadata. Keys order as semver says: a
    pre-release below its release, numeric identifiers by value and below alphanumeric ones,
    alphanumeric ones in ASCII order, more identifiers above fewer when the rest are equal.
    tasker._semver_parts and tasker._semver_pre_key give the same answers in SQL.
    """
    match = _VERSION_RE.fullmatch(version) if len(version) <= VERSION_MAX_LEN else None
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.group(1, 2, 3))
    if max(major, minor, patch) > PG_INT_MAX:
        return None
    pre = match.group(4)
    if pre is None:
        return (major, minor, patch, 1, ())
    idents: _PreKey = tuple(
        (0, int(ident)) if ident.isdigit() else (1, ident) for ident in pre.split(".")
    )
    return (major, minor, patch, 0, idents)


def version_key(version: str) -> VersionKey:
    """`parse_version`, raising ValueError for an invalid version (for sorted(..., key=))."""
    key = parse_version(version)
    if key is None:
        raise ValueError(f"{version!r} is not a valid version: expected {_VERSION_RULE}")
    return key


# --- field helpers ---------------------------------------------------------------------------


def _check_pattern(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    """Return `value` if it matches `pattern`; else raise an error stating the expected form."""
    if pattern.fullmatch(value):
        return value
    hint = ""
    candidate = re.sub(r"[^A-Za-z0-9_]+", "_", value.strip())
    if pattern is _NAMESPACE_RE:
        candidate = candidate.lower()
    candidate = candidate.strip("_") if pattern is not _STEP_NAME_RE else candidate
    if candidate and candidate != value and pattern.fullmatch(candidate):
        hint = f" (for example {candidate!r})"
    raise PydanticCustomError(
        "invalid_name",
        "{what} {value} is not valid: use {rule}{hint}",
        {"what": what, "value": repr(value), "rule": rule, "hint": hint},
    )


def _json_mapping(value: Any, what: str) -> Any:
    """Validate free-form config as plain JSON data and return a private copy of it.

    None means empty. Non-mappings are passed on for pydantic to report as a type error.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return value
    return _plain_json(value, what, 0)


def _plain_json(value: Any, path: str, depth: int) -> Any:
    """A deep copy of `value` as plain JSON (dict, list, str, int, float, bool, None)."""
    if depth > _JSON_MAX_DEPTH:
        raise PydanticCustomError(
            "json_too_deep",
            "{path} is nested more than {max} levels deep",
            {"path": path, "max": _JSON_MAX_DEPTH},
        )
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError(
                "json_value",
                "{path} is {value}: JSON (and jsonb) cannot store NaN or infinity",
                {"path": path, "value": repr(value)},
            )
        return value
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise PydanticCustomError(
                    "json_key",
                    "{path} has the key {key}: JSON keys must be strings (quote it in YAML)",
                    {"path": path, "key": repr(key)},
                )
            result[key] = _plain_json(item, f"{path}.{key}", depth + 1)
        return result
    if isinstance(value, list | tuple):
        return [_plain_json(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise PydanticCustomError(
        "json_value",
        "{path} is a {kind} ({value}), which is not JSON data{hint}",
        {
            "path": path,
            "kind": type(value).__name__,
            "value": _short(repr(value)),
            "hint": " (quote dates and times in YAML)" if hasattr(value, "isoformat") else "",
        },
    )


# --- error formatting ------------------------------------------------------------------------


def _error(source: str | None, name: str | None, problems: list[str]) -> TemplateValidationError:
    """One readable error listing every problem, headed by the template and file it concerns."""
    what = "invalid task template"
    if name:
        what += f" {name!r}"
    if source:
        what += f" in {source}"
    message = f"{what}: {_plural(len(problems), 'problem')}\n" + "\n".join(
        f"  - {problem}" for problem in problems
    )
    return TemplateValidationError(message, source=source, problems=problems)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}

_COMPARISONS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _pydantic_problems(exc: PydanticValidationError, raw: Mapping[str, Any]) -> list[str]:
    """Turn pydantic's error list into one readable line per problem."""
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        kind = err["type"]
        loc = tuple(err["loc"])
        ctx: dict[str, Any] = dict(err.get("ctx") or {})
        value = err.get("input")
        if kind == "template_graph":
            problems.extend(f"{where}: {msg}" for where, msg in ctx["problems"])
        elif kind in ("extra_forbidden", "missing"):
            parent, key = loc[:-1], loc[-1]
            where = _where(parent, raw)
            if kind == "missing":
                message = f"missing required key {key!r}{where}"
            else:
                valid = _valid_keys(parent)
                message = f"unknown key {key!r}{where}{_suggest(str(key), valid, 'valid keys')}"
            problems.append(f"{_format_loc(parent, raw)}: {message}")
        else:
            problems.append(
                f"{_format_loc(loc, raw)}: {_describe_error(kind, err['msg'], ctx, value)}"
            )
    return problems


def _describe_error(kind: str, default: str, ctx: Mapping[str, Any], value: Any) -> str:
    """The readable text of one pydantic error."""
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        return f"must be a finite number (got {_describe(value)}, too large for a float)"
    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_describe(value)}"
        if kind == "string_type" and isinstance(value, bool | int | float):
            message += " (YAML read it as a non-string: quote it)"
        return message
    if kind in _COMPARISONS:
        key, symbol = _COMPARISONS[kind]
        return f"must be {symbol} {ctx.get(key)} (got {_describe(value)})"
    if kind == "finite_number":
        return f"must be a finite number (got {_describe(value)})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_describe(value)})"
    if kind == "value_error":
        return default.removeprefix("Value error, ")
    return default


def _describe(value: Any) -> str:
    """A short, YAML-flavoured description of a value for 'got ...' in messages."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {_short(repr(value))}"
    if isinstance(value, str):
        return f"string {_short(repr(value))}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(word: str, candidates: Iterable[str], label: str = "steps") -> str:
    """' (did you mean X?)' for the closest candidate, else a short list of what exists."""
    options = list(candidates)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if not options:
        return ""
    listed = ", ".join(repr(option) for option in options[:10])
    more = f", ... ({len(options)} in all)" if len(options) > 10 else ""
    return f" ({label}: {listed}{more})"


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class that validates the object at `loc`, if it is one."""
    if not loc:
        return TaskTemplate
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        if len(loc) == 2:
            return StepTemplate
        if len(loc) == 3:
            nested: dict[str, type[BaseModel]] = {"handler": HandlerSpec, "retry": RetryPolicy}
            return nested.get(loc[2])
    return None


def _valid_keys(loc: Sequence[Any]) -> list[str]:
    model = _model_at(loc)
    if model is None:
        return []
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        if field.alias and field.alias != name:
            keys.append(field.alias)
    return keys


def _step_name(raw: Mapping[str, Any], position: int) -> str | None:
    """The name the raw input gives to step `position`, if it gives a string one."""
    steps = raw.get("steps")
    if isinstance(steps, Sequence) and not isinstance(steps, str) and 0 <= position < len(steps):
        step = steps[position]
        if isinstance(step, Mapping) and isinstance(step.get("name"), str):
            return str(step["name"])
    return None


def _where(loc: Sequence[Any], raw: Mapping[str, Any]) -> str:
    """' in step 'x'' and the like: which object a key belongs to, in words."""
    model = _model_at(loc)
    if model is TaskTemplate:
        return " at the top level of the template"
    if model is None or len(loc) < 2:
        return ""
    name = _step_name(raw, loc[1])
    step = f"step {name!r}" if name is not None else f"step steps[{loc[1]}]"
    if model is HandlerSpec:
        return f" in the handler of {step}"
    if model is RetryPolicy:
        return f" in the retry policy of {step}"
    return f" in {step}"


def _format_loc(loc: Sequence[Any], raw: Mapping[str, Any]) -> str:
    """A pydantic location as a path: `steps[2] (process_payment).retry.max_attempts`."""
    if not loc:
        return "template"
    text = ""
    for depth, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if depth == 1 and loc[0] == "steps":
                name = _step_name(raw, part)
                if name is not None:
                    text += f" ({name})"
        elif isinstance(part, str) and text:
            text += f".{part}"
        elif isinstance(part, str):
            text = part
        else:
            text += f"[{part!r}]"
    return text
