"""The dashboard tests' database: the `shop` workflow run by a real worker, two orders that
complete and one whose `charge` step fails permanently with a hostile error text."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasker_pg import Worker, db
from tasker_pg.template import load_templates
from tests.dashboard import handlers
from tests.support.worker import assert_invariants, registry_of, wait_final

SHOP = Path(__file__).parent / "shop.yaml"
HOSTILE_CONTEXT = '<img src=x onerror="window.__pwned = 2">'
WORKER_ID = "dash-worker-1"


@dataclass(frozen=True)
class Shop:
    dsn: str
    ok: list[uuid.UUID]
    failed: uuid.UUID


async def create_order(conn: db.Connection, *, fail: bool = False) -> uuid.UUID:
    task: uuid.UUID = await conn.fetchval(
        "SELECT tasker.create_task('shop', 'order', $1::jsonb)",
        {"fail": fail, "note": HOSTILE_CONTEXT},
    )
    return task


@pytest.fixture
async def shop(dsn: str, conn: db.Connection) -> AsyncIterator[Shop]:
    async with Worker(
        "shop",
        registry_of(handlers),
        dsn=dsn,
        templates=load_templates(SHOP),
        worker_id=WORKER_ID,
        poll_interval=0.1,
        summary_interval=0,
    ):
        ok = [await create_order(conn), await create_order(conn)]
        failed = await create_order(conn, fail=True)
        states = await wait_final(conn, [*ok, failed])
    assert states == {ok[0]: "complete", ok[1]: "complete", failed: "error"}
    yield Shop(dsn=dsn, ok=ok, failed=failed)
    await assert_invariants(conn)
