"""Payload limits that hold (issue 10, item 4): every value a caller sends is measured by the
length of its text form (not its stored, compressed size), against limits kept in
tasker.settings (a session SET cannot raise them), and refused with TV021 naming the value."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tests.support.engine import (
    NAMESPACE,
    assert_healthy,
    claim,
    complete,
    failure,
    single,
    start,
    step,
    step_row,
    success,
    template,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
CREATE = "SELECT tasker.create_task($1, $2, $3::jsonb, NULL, $4::jsonb)"


async def set_limit(conn: db.Connection, name: str, value: int) -> None:
    """Change a limit the only way there is: the settings table (the test database is owned)."""
    await conn.execute("UPDATE tasker.settings SET value = $2 WHERE name = $1", name, value)


async def compressible_row(conn: db.Connection, megabytes: int) -> None:
    """A table row holding a highly compressible context of `megabytes` MB (stored compressed)."""
    await conn.execute(
        "CREATE TEMP TABLE big AS SELECT jsonb_build_object('blob', repeat('x', $1)) AS ctx",
        megabytes * 1_000_000,
    )
    stored = await conn.fetchval("SELECT pg_column_size(ctx) FROM big")
    assert stored < MIB  # what the old check measured: it let this through


def too_large(exc: pytest.ExceptionInfo[ValidationError], *fragments: str) -> None:
    assert exc.value.error_code == "payload_too_large", str(exc.value)
    for fragment in fragments:
        assert fragment in str(exc.value), str(exc.value)


async def test_a_compressible_20mb_context_from_a_table_row_is_refused(conn: db.Connection) -> None:
    await conn.register_template(single())
    await compressible_row(conn, 20)
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(
            f"SELECT tasker.create_task('{NAMESPACE}', 'single', (SELECT ctx FROM big))"
        )
    too_large(exc, "task context is 20000012 bytes", "limit of 1048576 bytes", "max_payload_bytes")
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(
            f"SELECT * FROM tasker.create_tasks('{NAMESPACE}', 'single', "
            "(SELECT jsonb_build_array('{}'::jsonb, ctx) FROM big))"
        )
    too_large(exc, "task context #2 is 20000012 bytes")
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_a_session_setting_does_not_raise_the_limit(conn: db.Connection) -> None:
    await conn.register_template(single())
    await conn.execute("SET tasker.max_payload_bytes = 100000000")
    blob = {"blob": os.urandom(MIB).hex()}  # 2 MiB of JSON text, not compressible
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(CREATE, NAMESPACE, "single", blob, {})
    too_large(exc, "limit of 1048576 bytes")
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_limits_are_read_from_the_settings_table(conn: db.Connection) -> None:
    await conn.register_template(single())
    context = {"blob": "x" * 3000}
    await set_limit(conn, "max_payload_bytes", 2048)
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(CREATE, NAMESPACE, "single", context, {})
    too_large(exc, "task context is 3012 bytes", "limit of 2048 bytes")
    await set_limit(conn, "max_payload_bytes", 4096)
    created = await conn.fetchval(CREATE, NAMESPACE, "single", context, {})
    assert (
        await conn.fetchval("SELECT context FROM tasker.tasks WHERE task_uuid = $1", created)
        == context
    )
    # the table refuses nonsense limits
    with pytest.raises(Exception, match="settings_sane_value"):
        await set_limit(conn, "max_payload_bytes", 10)
    with pytest.raises(Exception, match="settings_sane_value"):
        await set_limit(conn, "max_error_bytes", 1000)
    await assert_healthy(conn)


async def test_a_context_of_exactly_the_limit_is_accepted(conn: db.Connection) -> None:
    await conn.register_template(single())
    overhead = len(json.dumps({"b": ""}))  # PostgreSQL writes {"b": "..."}
    exact = {"b": "x" * (MIB - overhead)}
    created = await conn.fetchval(CREATE, NAMESPACE, "single", exact, {})
    assert (
        await conn.fetchval("SELECT context FROM tasker.tasks WHERE task_uuid = $1", created)
        == exact
    )
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(CREATE, NAMESPACE, "single", {"b": "x" * (MIB - overhead + 1)}, {})
    too_large(exc, f"task context is {MIB + 1} bytes")
    await assert_healthy(conn)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"idempotency_key": "k" * 2000}, "option idempotency_key is 2000 bytes"),
        ({"correlation_id": "c" * 2000}, "option correlation_id is 2000 bytes"),
        ({"initiator": "i" * 2000}, "option initiator is 2000 bytes"),
        ({"reason": "r" * 100_000}, "option reason is 100000 bytes"),
        ({"tags": ["t" * 1000] * 100}, "option tags is"),
    ],
    ids=["idempotency_key", "correlation_id", "initiator", "reason", "tags"],
)
async def test_oversized_options_are_refused(
    conn: db.Connection, options: dict[str, Any], fragment: str
) -> None:
    await conn.register_template(single())
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(CREATE, NAMESPACE, "single", {}, options)
    too_large(exc, fragment)
    with pytest.raises(ValidationError) as exc:
        await conn.create_tasks(NAMESPACE, "single", [{}, {}], options=[{}, options])
    too_large(exc, "options #2: " + fragment)
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_a_20mb_error_message_is_refused(conn: db.Connection) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    with pytest.raises(ValidationError) as exc:
        await complete(conn, failure(row, "e" * 20_000_000))
    too_large(exc, "outcome #1: error is", "limit of 65536 bytes", "max_error_bytes")
    s = await step_row(conn, task, "only")
    assert s["state"] == "in_progress" and s["last_error"] is None
    await complete(conn, success(row))
    await assert_healthy(conn)


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ("error_type", "error.error_type is 5000 bytes"),
        ("context", "error is"),
        ("worker_id", "worker_id is 5000 bytes"),
        ("metadata", "metadata is"),
    ],
)
async def test_oversized_outcome_parts_are_refused(
    conn: db.Connection, part: str, fragment: str
) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    if part == "error_type":
        outcome = failure(row, error_type="T" * 5000)
    elif part == "context":
        outcome = failure(row, context={"blob": "c" * 100_000})
    elif part == "worker_id":
        outcome = success(row, worker="w" * 5000)
    else:
        outcome = success(row, metadata={"blob": os.urandom(MIB).hex()})
    with pytest.raises(ValidationError) as exc:
        await complete(conn, outcome)
    too_large(exc, "outcome #1: " + fragment)
    assert (await step_row(conn, task, "only"))["state"] == "in_progress"
    await complete(conn, success(row))
    await assert_healthy(conn)


async def test_a_compressible_result_is_measured_uncompressed(conn: db.Connection) -> None:
    task = await start(conn, single())
    [row] = await claim(conn)
    await compressible_row(conn, 20)
    answer = await conn.fetch(
        "SELECT * FROM tasker.complete_steps(jsonb_build_array($1::jsonb || "
        "jsonb_build_object('result', (SELECT ctx FROM big))))",
        {k: v for k, v in success(row).items() if k != "result"},
    )
    assert [(a["status"], a["detail"]) for a in answer] == [("applied", "error")]
    s = await step_row(conn, task, "only")
    assert s["results"] is None and s["last_error"]["error_type"] == "result_too_large"
    assert "the step's result is 20000012 bytes" in s["last_error"]["message"]
    await assert_healthy(conn)


async def test_a_compressible_resolve_step_result_is_refused(conn: db.Connection) -> None:
    task = await start(conn, single())
    only = await step_row(conn, task, "only")
    await compressible_row(conn, 20)
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(
            "SELECT tasker.resolve_step($1, (SELECT ctx FROM big))", only["step_uuid"]
        )
    too_large(exc, "result is 20000012 bytes")
    assert (await step_row(conn, task, "only"))["state"] == "enqueued"
    with pytest.raises(ValidationError) as exc:
        await conn.cancel_task(task, "r" * 100_000)
    too_large(exc, "reason is 100000 bytes", "max_text_bytes")
    await assert_healthy(conn)


async def test_a_5mb_handler_initialization_is_refused(conn: db.Connection) -> None:
    tpl = template("init", [step("a"), step("b", "a")])
    tpl["steps"][1]["handler"]["initialization"] = {"blob": "i" * 5_000_000}
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval("SELECT tasker.register_template($1::jsonb)", tpl)
    too_large(
        exc,
        "template init, step 'b': handler.initialization is 5000012 bytes",
        "limit of 65536 bytes",
        "max_initialization_bytes",
    )
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_tasks") == 0


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("callable", "handler.callable is 2000 bytes"),
        ("step_description", "step 'a': description is 100000 bytes"),
        ("description", "template big: description is 100000 bytes"),
        ("body", "template big is"),
    ],
)
async def test_oversized_template_parts_are_refused(
    conn: db.Connection, where: str, fragment: str
) -> None:
    tpl = template("big", [step("a")])
    if where == "callable":
        tpl["steps"][0]["handler"]["callable"] = "h" * 2000
    elif where == "step_description":
        tpl["steps"][0]["description"] = "d" * 100_000
    elif where == "description":
        tpl["description"] = "d" * 100_000
    else:  # many steps, each under its own limits, 1.5 MiB together
        tpl["steps"] = [
            {"name": f"s{i}", "handler": {"callable": "h", "initialization": {"x": "i" * 60_000}}}
            for i in range(26)
        ]
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval("SELECT tasker.register_template($1::jsonb)", tpl)
    too_large(exc, fragment)
    assert await conn.fetchval("SELECT count(*) FROM tasker.named_tasks") == 0


async def test_oversized_worker_id_and_queue_message_are_refused(conn: db.Connection) -> None:
    await start(conn, single())
    with pytest.raises(ValidationError) as exc:
        await claim(conn, worker="w" * 5000)
    too_large(exc, "worker_id is 5000 bytes", "max_name_bytes")
    await conn.fetchval("SELECT tasker.create_queue('plain')")
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval("SELECT tasker.send('plain', $1::jsonb)", {"b": "x" * (2 * MIB)})
    too_large(exc, "message is")
    with pytest.raises(ValidationError) as exc:
        await conn.fetchval(
            "SELECT tasker.send_batch('plain', ARRAY['{}'::jsonb, $1::jsonb])",
            {"b": "x" * (2 * MIB)},
        )
    too_large(exc, "message #2 is")
    [row] = await claim(conn)
    await complete(conn, success(row))
    await assert_healthy(conn)
