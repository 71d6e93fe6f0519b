"""Log formats of the `tasker-pg worker` command: text with the step's ids, or one JSON object
per line. Formatters only: the command line installs them (library modules never configure
logging).

A record is about a step when the worker attached the step's fields to it (`extra=claim.log`:
task_uuid, step_uuid, step_name, attempt, namespace, worker_id), or when it was logged while
that step's handler ran (the handler's own `logging.getLogger(__name__)` records: the worker
keeps the running step in a context variable, carried into a sync handler's thread).

- text: `LOG_FORMAT`, plus ` [task=<uuid> step=<uuid> attempt=<n>]` for a record about a step;
- json: `{"timestamp", "level", "logger", "message", ...the step's fields, "exception"}`, one
  object per line (a message's line breaks are escaped); `defaults` fill fields a record lacks
  (the CLI sets the process's `worker_id`).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from tasker_pg.worker.state import CURRENT_STEP

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

STEP_FIELDS = ("task_uuid", "step_uuid", "step_name", "attempt", "namespace", "worker_id")


def step_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The step fields of a record: its own attributes, else those of the step running in this
    context; empty for a record about no step."""
    current = CURRENT_STEP.get()
    fields: dict[str, Any] = {}
    for name in STEP_FIELDS:
        value = getattr(record, name, None)
        if value is None and current is not None:
            value = current.get(name)
        if value is not None and value != "":
            fields[name] = value
    return fields


class TextFormatter(logging.Formatter):
    """`LOG_FORMAT`, with the task, step and attempt of a record about a step at the end."""

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = step_fields(record)
        if "step_uuid" not in fields:
            return text
        ids = [f"task={fields.get('task_uuid', '?')}", f"step={fields['step_uuid']}"]
        if "attempt" in fields:
            ids.append(f"attempt={fields['attempt']}")
        return f"{text} [{' '.join(ids)}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.defaults: dict[str, Any] = dict(defaults or {})

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(step_fields(record))
        for name, value in self.defaults.items():
            out.setdefault(name, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(log_format: str) -> TextFormatter | JsonFormatter:
    """The formatter of `--log-format` (`text` or `json`)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}: expected text or json")
