"""tasker.create_tasks: many tasks of one template in one set-based call."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tasker_pg import db
from tasker_pg.errors import NotFoundError, ValidationError
from tests.support.engine import NAMESPACE, assert_healthy, diamond, drive, task_row


async def test_creates_runnable_tasks_in_input_order(conn: db.Connection) -> None:
    await conn.register_template(diamond())
    contexts = [{"i": i} for i in range(50)]
    uuids = await conn.create_tasks(NAMESPACE, "diamond", contexts, options={"priority": 3})
    assert len(uuids) == len(set(uuids)) == 50
    for i, task in enumerate(uuids):
        row = await task_row(conn, task)
        assert row["context"] == {"i": i}
        assert row["priority"] == 3 and row["state"] == "pending" and row["total_steps"] == 4
    assert await conn.fetchval("SELECT count(*) FROM tasker.steps") == 200
    assert await conn.fetchval("SELECT count(*) FROM tasker.step_edges") == 200
    assert await conn.fetchval("SELECT count(*) FROM tasker.q_flows") == 50  # the roots
    log = await drive(conn, NAMESPACE, lambda row: {"from": row["step_name"]})
    assert len(log.claims) == 200
    states = await conn.fetch("SELECT DISTINCT state FROM tasker.tasks")
    assert [r["state"] for r in states] == ["complete"]
    await assert_healthy(conn)


async def test_per_task_options_and_idempotency(conn: db.Connection) -> None:
    await conn.register_template(diamond())
    first = await conn.create_tasks(
        NAMESPACE,
        "diamond",
        [{"n": 1}, {"n": 2}, {"n": 3}],
        options=[{"idempotency_key": "k1"}, {"idempotency_key": "k2"}, {"idempotency_key": "k1"}],
    )
    assert first[0] == first[2] != first[1]  # a key repeated in one batch: one task
    again = await conn.create_tasks(
        NAMESPACE,
        "diamond",
        [{"n": 9}, {"n": 4}],
        options=[{"idempotency_key": "k2"}, {"idempotency_key": "k4"}],
    )
    assert again[0] == first[1]
    assert again[1] not in first
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 3
    assert (await task_row(conn, first[1]))["context"] == {"n": 2}  # the original kept
    single = await conn.create_task(NAMESPACE, "diamond", {}, options={"idempotency_key": "k4"})
    assert single == again[1]  # create_task and create_tasks share the keys
    await assert_healthy(conn)


async def test_bad_input_names_the_entry_and_changes_nothing(conn: db.Connection) -> None:
    await conn.register_template(diamond())
    with pytest.raises(ValidationError, match=r"task context #2 must be a JSON object"):
        await conn.create_tasks(NAMESPACE, "diamond", [{"ok": 1}, [1, 2]])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match=r"options #2: unknown option 'colour'"):
        await conn.create_tasks(NAMESPACE, "diamond", [{}, {}], options=[{}, {"colour": "red"}])
    with pytest.raises(ValidationError, match=r"one object per context \(2 contexts, 1 options\)"):
        await conn.create_tasks(NAMESPACE, "diamond", [{}, {}], options=[{}])
    await conn.execute("UPDATE tasker.settings SET value = 1024 WHERE name = 'max_payload_bytes'")
    with pytest.raises(ValidationError, match=r"task context is \d+ bytes, more than the limit"):
        await conn.create_tasks(NAMESPACE, "diamond", [{"big": "x" * 2000}])
    with pytest.raises(NotFoundError, match=r"registered versions: 1\.0\.0"):
        await conn.create_tasks(NAMESPACE, "diamond", [{}], version="9.9.9")
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0
    assert await conn.create_tasks(NAMESPACE, "diamond", []) == []


async def test_rolled_back_batch_leaves_nothing(conn: db.Connection) -> None:
    await conn.register_template(diamond())
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await conn.create_tasks(NAMESPACE, "diamond", [{"i": i} for i in range(10)])
            raise RuntimeError("roll back")
    for table in ("tasks", "steps", "step_edges", "queue_messages", "step_transitions"):
        assert await conn.fetchval(f"SELECT count(*) FROM tasker.{table}") == 0, table


async def test_task_and_step_ids_are_time_ordered_version_7_uuids(conn: db.Connection) -> None:
    """Tasks and steps get version 7 UUIDs (Unix milliseconds first): ids made later sort
    later, so the primary keys grow at their right edge, whatever creates them (create_tasks,
    create_task)."""
    await conn.register_template(diamond())
    first = await conn.create_tasks(NAMESPACE, "diamond", [{}, {}])
    await asyncio.sleep(0.01)
    second = await conn.create_task(NAMESPACE, "diamond", {})
    before = int(await conn.fetchval("SELECT (extract(epoch FROM now()) * 1000)::bigint"))
    tasks = [*first, second]
    rows = await conn.fetch(
        "SELECT task_uuid, step_uuid FROM tasker.steps WHERE task_uuid = ANY ($1::uuid[])",
        tasks,
    )
    ids = [uuid.UUID(str(t)) for t in tasks] + [uuid.UUID(str(r["step_uuid"])) for r in rows]
    assert len(ids) == 15
    assert {i.version for i in ids} == {7}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    millis = [i.int >> 80 for i in ids]
    assert all(abs(m - before) < 60_000 for m in millis), (millis, before)
    assert uuid.UUID(str(second)).int >> 80 > max(uuid.UUID(str(t)).int >> 80 for t in first)
    await assert_healthy(conn)
