"""The worker command's log formats: the step's ids in text, one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys

from tasker_pg.logformat import JsonFormatter, TextFormatter
from tasker_pg.worker.state import CURRENT_STEP

STEP = {
    "task_uuid": "t-1",
    "step_uuid": "s-1",
    "step_name": "charge",
    "attempt": 2,
    "namespace": "shop",
    "worker_id": "w-1",
}


def record(
    message: str, *, extra: dict[str, object] | None = None, exc: bool = False
) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("card declined")
        except ValueError:
            info = sys.exc_info()
    rec = logging.LogRecord("shop.handlers", logging.WARNING, __file__, 1, message, (), info)
    rec.created = 1_700_000_000.25
    for key, value in (extra or {}).items():
        setattr(rec, key, value)
    return rec


def test_text_shows_the_ids_of_a_record_about_a_step() -> None:
    text = TextFormatter().format(record("retrying", extra=STEP))
    assert text.endswith(" WARNING shop.handlers: retrying [task=t-1 step=s-1 attempt=2]")
    assert TextFormatter().format(record("started")).endswith("shop.handlers: started")


def test_a_record_logged_while_a_step_runs_carries_its_ids() -> None:
    token = CURRENT_STEP.set(STEP)
    try:
        line = JsonFormatter().format(record("from the handler"))
        text = TextFormatter().format(record("from the handler"))
    finally:
        CURRENT_STEP.reset(token)
    assert json.loads(line) == {
        "timestamp": "2023-11-14T22:13:20.250Z",
        "level": "WARNING",
        "logger": "shop.handlers",
        "message": "from the handler",
        **STEP,
    }
    assert text.endswith("from the handler [task=t-1 step=s-1 attempt=2]")


def test_json_is_one_line_with_the_exception_and_defaults() -> None:
    formatter = JsonFormatter({"worker_id": "w-9"})
    line = formatter.format(record("two\nlines", exc=True))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "two\nlines"
    assert data["worker_id"] == "w-9"
    assert data["exception"].splitlines()[-1] == "ValueError: card declined"
    assert "step_uuid" not in data
    # a record's own worker_id wins over the default
    assert json.loads(formatter.format(record("x", extra=STEP)))["worker_id"] == "w-1"
