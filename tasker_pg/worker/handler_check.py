"""At start: warn about template steps whose handler this worker cannot run.

A step whose `handler.callable` the registry cannot resolve fails permanently when it is
claimed; saying so at start, naming the template and step, turns a typo into a log line instead
of a failed task. A callable is known when it is a registered `handler_name` or a dotted path
the registry can import (as it would when the step runs).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tasker_pg.errors import PermanentError
from tasker_pg.registry import HandlerRegistry
from tasker_pg.template import TaskTemplate

logger = logging.getLogger(__name__)

# How many registered handler names a warning lists.
_MAX_LISTED = 10


@dataclass(frozen=True, slots=True)
class StepHandlerUse:
    """One template step naming a handler."""

    namespace: str
    template: str
    version: str
    step: str
    handler: str


def uses_of_templates(templates: Iterable[TaskTemplate]) -> list[StepHandlerUse]:
    """The handler of every step of `templates` (wait steps run none)."""
    return [
        StepHandlerUse(t.namespace_name, t.name, t.version, s.name, s.handler.callable)
        for t in templates
        for s in t.steps
        if s.handler is not None
    ]


def uses_of_rows(rows: Iterable[Mapping[str, Any]]) -> list[StepHandlerUse]:
    """The handler of every step of registered templates (rows of `latest_templates`)."""
    uses: list[StepHandlerUse] = []
    for row in rows:
        body = row["template"]
        steps = body.get("steps") if isinstance(body, Mapping) else None
        for step in steps or ():
            handler = step.get("handler") if isinstance(step, Mapping) else None
            callable_name = handler.get("callable") if isinstance(handler, Mapping) else None
            if isinstance(callable_name, str):
                uses.append(
                    StepHandlerUse(
                        row["namespace"], row["name"], row["version"], step["name"], callable_name
                    )
                )
    return uses


def warn_unknown_handlers(
    worker_id: str, registry: HandlerRegistry, uses: Iterable[StepHandlerUse]
) -> list[str]:
    """Log one WARNING per handler that `registry` cannot resolve; returns those handlers."""
    by_handler: dict[str, list[StepHandlerUse]] = {}
    for use in uses:
        by_handler.setdefault(use.handler, [])
        if use not in by_handler[use.handler]:
            by_handler[use.handler].append(use)
    unknown: list[str] = []
    for handler, steps in by_handler.items():
        try:
            registry.handler_class(handler)
        except PermanentError as exc:
            unknown.append(handler)
            first = steps[0]
            more = f" (and {len(steps) - 1} more step(s))" if len(steps) > 1 else ""
            if exc.error_code == "handler_not_found":
                problem = "which this worker does not know"
                hint = _did_you_mean(registry, handler)
            else:
                problem = f"which cannot be loaded ({exc})"
                hint = ""
            logger.warning(
                "worker %s: template %s/%s %s step %s%s names handler %s, %s: steps using it "
                "will fail%s",
                worker_id,
                first.namespace,
                first.template,
                first.version,
                first.step,
                more,
                handler,
                problem,
                hint,
            )
    return unknown


def _did_you_mean(registry: HandlerRegistry, handler: str) -> str:
    """` (did you mean X?)` for the closest registered name or class path, then what is known."""
    candidates: list[str] = []
    for name in registry.names():
        candidates.append(name)
        cls = registry.get(name)
        if cls is not None:
            candidates.append(f"{cls.__module__}.{cls.__qualname__}")
    close = difflib.get_close_matches(handler, candidates, n=1, cutoff=0.85)
    names = registry.names()
    listed = ", ".join(names[:_MAX_LISTED]) + (" ..." if len(names) > _MAX_LISTED else "")
    guess = f"; did you mean {close[0]}?" if close else ""
    return f"{guess} (registered handlers: {listed or 'none'})"
