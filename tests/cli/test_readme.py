"""The README's SQL examples run as written (through psql, as a DBA would run them)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tasker_pg import HandlerRegistry, Worker
from tasker_pg.template import load_templates

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)


def psql(dsn: str, sql: str) -> str:
    proc = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-At"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def test_from_sql_section_runs(dsn: str) -> None:
    engine = sql_blocks()[0]
    setup, watch = engine.split("-- watch it")
    psql(dsn, "CREATE TABLE orders (id int);\n" + setup)
    task = psql(
        dsn, "SELECT task_uuid FROM tasker.tasks WHERE idempotency_key = 'order-42'"
    ).strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", task), task
    out = psql(dsn, watch.replace("'...'", f"'{task}'"))
    assert "validate_cart|enqueued" in out
    assert "process_payment|pending|f|waiting for validate_cart" in out
    assert "has_ready_steps" in out
    # the same create again returns the same task (idempotency key)
    transaction = setup[setup.index("BEGIN;") : setup.index("COMMIT;") + len("COMMIT;")]
    psql(dsn, transaction)
    assert psql(dsn, "SELECT count(*) FROM tasker.tasks").strip() == "1"


def test_queue_section_runs(dsn: str) -> None:
    queue = sql_blocks()[1]
    out = psql(dsn, queue)
    assert '{"a": 1}' in out
    assert out.splitlines()[-1].startswith("demo|0|0|")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_handler_examples_run() -> None:
    blocks = [b for b in python_blocks() if "TaskerClient" not in b]
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    test = namespace["test_validates_cart"]
    assert callable(test)
    test()


async def test_client_example_runs(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client snippet, against a worker running the checkout example."""
    [snippet] = [b for b in python_blocks() if "TaskerClient" in b]
    monkeypatch.setenv("TASKER_DATABASE_URL", dsn)
    registry = HandlerRegistry()
    registry.register_module("examples.ecommerce.handlers")
    templates = load_templates(ROOT / "examples" / "ecommerce")
    async with Worker(["ecommerce"], registry, dsn=dsn, templates=templates, summary_interval=0):
        # the sync client blocks: run the snippet in a thread so the worker keeps running
        output = await asyncio.to_thread(_run_snippet, snippet)
    assert "complete 100.0" in output
    assert "send_confirmation complete 1" in output


def _run_snippet(snippet: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(snippet, "README.md", "exec"), {})
    return buffer.getvalue()
