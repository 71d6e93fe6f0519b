"""`create_tasks` on both clients: one set-based call, uuids in the order of the contexts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tasker_pg import AsyncTaskerClient, TaskerClient, db
from tasker_pg.errors import NotFoundError, ValidationError
from tests.support.engine import NAMESPACE, diamond, task_row

pytestmark = pytest.mark.timeout(60)


async def test_async_create_tasks_in_order_with_options(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(diamond())
    async with AsyncTaskerClient(dsn, initiator="batch-test") as client:
        uuids = await client.create_tasks(
            "diamond",
            namespace=NAMESPACE,
            contexts=[{"i": i} for i in range(25)],
            reason="nightly import",
            priority=4,
            tags=["batch"],
        )
        assert len(uuids) == len(set(uuids)) == 25
        assert all(isinstance(u, str) for u in uuids)
        for i, task in enumerate(uuids):
            row = await task_row(conn, task)
            assert row["context"] == {"i": i}
            assert (row["priority"], row["reason"], row["initiator"]) == (
                4,
                "nightly import",
                "batch-test",
            )
            assert list(row["tags"]) == ["batch"]
        got = await client.get_task(uuids[0])
        assert got.total_steps == 4 and got.status == "pending"
        assert await client.create_tasks("diamond", namespace=NAMESPACE, contexts=[]) == []


async def test_sync_create_tasks_and_its_errors(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(diamond())

    def run() -> list[Any]:
        with TaskerClient(dsn) as client:
            uuids = client.create_tasks(
                "diamond", namespace=NAMESPACE, contexts=[{"n": 1}, None, {"n": 3}], version="1.0.0"
            )
            errors: list[Any] = []
            for kwargs in (
                {"contexts": {"n": 1}},  # one context, not a list of them
                {"contexts": [[1, 2]]},
                {"contexts": [{}], "colour": "red"},
            ):
                with pytest.raises(ValidationError) as info:
                    client.create_tasks("diamond", namespace=NAMESPACE, **kwargs)
                errors.append(info.value.error_code)
            with pytest.raises(NotFoundError) as missing:
                client.create_tasks("nope", namespace=NAMESPACE, contexts=[{}])
            errors.append(missing.value.error_code)
            return [uuids, errors]

    uuids, errors = await asyncio.to_thread(run)
    assert [dict((await task_row(conn, u))["context"]) for u in uuids] == [
        {"n": 1},
        {},
        {"n": 3},
    ]
    assert errors == ["invalid_context", "invalid_context", "invalid_option", "template_not_found"]
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 3  # errors created none
