"""The task page's DAG for dynamic workflows run by a real worker: a decision's branch not
taken is drawn dashed and apart, steps created at run time are marked, and five batch workers
are drawn as one box between their fan-out step and their aggregate."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from examples.approval import handlers as approval
from examples.csv_batch import handlers as csv_batch
from tasker_pg import Worker, db
from tasker_pg.dashboard.app import create_app
from tasker_pg.template import load_templates
from tests.support.worker import assert_invariants, registry_of, wait_final

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODE = re.compile(r'<g class="node ([a-z_]+)( dynamic)?" data-step="([^"]+)" data-state="[a-z_]+">')


@pytest.fixture
async def ran(dsn: str, conn: db.Connection) -> AsyncIterator[dict[str, uuid.UUID]]:
    async with Worker(
        ["approval", "csv_batch"],
        registry_of(approval, csv_batch),
        dsn=dsn,
        templates=[*load_templates(EXAMPLES / "approval"), *load_templates(EXAMPLES / "csv_batch")],
        poll_interval=0.1,
        summary_interval=0,
    ):
        tasks = {
            "approval": await conn.fetchval(
                "SELECT tasker.create_task('approval', 'approval_request', $1::jsonb)",
                {"amount": 5000, "requester": "ada"},
            ),
            "csv": await conn.fetchval(
                "SELECT tasker.create_task('csv_batch', 'csv_product_import', '{}'::jsonb)"
            ),
        }
        states = await wait_final(conn, tasks.values(), timeout=60)
    assert set(states.values()) == {"complete"}
    yield tasks
    await assert_invariants(conn)


def nodes(page: str) -> dict[str, tuple[str, bool]]:
    """step name -> (state, created at run time) of the DAG's boxes."""
    return {name: (state, bool(dynamic)) for state, dynamic, name in NODE.findall(page)}


async def test_decision_and_batch_dags(dsn: str, ran: dict[str, uuid.UUID]) -> None:
    with TestClient(create_app(dsn=dsn)) as c:
        decided = c.get(f"/tasks/{ran['approval']}").text
        batch = c.get(f"/tasks/{ran['csv']}").text
    assert nodes(decided) == {
        "validate_request": ("complete", False),
        "routing_decision": ("complete", False),
        "manager_approval": ("complete", True),
        "finance_review": ("complete", True),
        "finalize": ("complete", True),
        "auto_approve": ("not_created", True),
    }
    assert "not created: decision `routing_decision` chose" in decided
    # the branch not taken hangs off the decision by a dashed edge
    assert decided.count('class="dashed"') == 1
    assert nodes(batch) == {
        "analyze_csv": ("complete", False),
        "process_batch_001..005": ("complete", True),
        "aggregate": ("complete", True),
    }
    assert "5 workers: 5 complete" in batch
    assert batch.count("<path d=") == 2  # analyze -> workers -> aggregate
