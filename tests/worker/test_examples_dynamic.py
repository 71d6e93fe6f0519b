"""The conditional and batch examples, end to end through a real worker and PostgreSQL.

- `examples/approval/`: the routing decision creates exactly the approvals an amount needs and
  `finalize` (a deferred convergence) reports them, at the boundaries of the routing rule;
- `examples/csv_batch/`: 1,000 CSV rows fan out into exactly five workers of 200 rows and the
  aggregate's totals are exact; a header-only file completes through one no-op worker; a
  worker that fails once is retried and the totals are still exact.

Tasks are created from SQL (`tasker.create_task`), as a DBA would. The last test runs both
examples through the `tasker-pg worker` command.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from examples.approval import handlers as approval
from examples.csv_batch import handlers as csv_batch
from tasker_pg import AsyncTaskerClient, Worker, db
from tasker_pg.render import render_dag
from tasker_pg.template import load_templates
from tests.support.worker import assert_invariants, poll, registry_of, steps_of, wait_final

REPO = Path(__file__).resolve().parents[2]
APPROVAL = REPO / "examples" / "approval"
CSV_BATCH = REPO / "examples" / "csv_batch"
FAST: dict[str, Any] = {"poll_interval": 0.1, "summary_interval": 0}


@pytest.fixture
async def worker(dsn: str) -> AsyncIterator[Worker]:
    async with Worker(
        ["approval", "csv_batch"],
        registry_of(approval, csv_batch),
        dsn=dsn,
        templates=[*load_templates(APPROVAL), *load_templates(CSV_BATCH)],
        concurrency=8,
        **FAST,
    ) as running:
        yield running


async def create(conn: db.Connection, namespace: str, name: str, context: Any) -> uuid.UUID:
    """A task created the way a DBA creates one: one SQL call."""
    task: uuid.UUID = await conn.fetchval(
        "SELECT tasker.create_task($1, $2, $3::jsonb)", namespace, name, context
    )
    return task


# --- approval -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "approvals"),
    [
        (500, ["auto_approve"]),
        (1000, ["manager_approval"]),
        (2500, ["manager_approval"]),
        (5000, ["manager_approval", "finance_review"]),
        (10000, ["manager_approval", "finance_review"]),
    ],
)
async def test_the_decision_creates_exactly_the_approvals_the_amount_needs(
    worker: Worker, conn: db.Connection, amount: int, approvals: list[str]
) -> None:
    task = await create(
        conn, "approval", "approval_request", {"amount": amount, "requester": "ada"}
    )
    assert (await wait_final(conn, [task]))[task] == "complete"
    steps = await steps_of(conn, task)
    assert sorted(steps) == sorted(["validate_request", "routing_decision", *approvals, "finalize"])
    assert {s["state"] for s in steps.values()} == {"complete"}
    assert steps["routing_decision"]["results"]["decision_point_outcome"] == {
        "type": "create_steps",
        "step_names": approvals,
    }
    assert steps["finalize"]["results"] == {
        "approved": True,
        "approvals": approvals,
        "approvers": [
            {"auto_approve": "policy", "manager_approval": "manager", "finance_review": "finance"}[
                a
            ]
            for a in approvals
        ],
        "amount": str(amount),
        "requester": "ada",
    }
    # finalize ran after every approval the decision chose
    started = steps["finalize"]["started_at"]
    assert all(steps[a]["completed_at"] <= started for a in approvals)
    task_row = await conn.fetchrow(
        "SELECT total_steps, completed_steps FROM tasker.tasks WHERE task_uuid = $1", task
    )
    assert (task_row["total_steps"], task_row["completed_steps"]) == (len(steps), len(steps))
    await assert_invariants(conn)


# --- csv batch ----------------------------------------------------------------------------------


def expected_totals(path: Path) -> tuple[int, Decimal, int]:
    """Rows, inventory value and quantity of a products file, computed here independently."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    value = sum((Decimal(r["price"]) * int(r["quantity"]) for r in rows), Decimal(0))
    return len(rows), value, sum(int(r["quantity"]) for r in rows)


async def test_a_thousand_rows_fan_out_into_five_workers_and_add_up_exactly(
    worker: Worker, conn: db.Connection
) -> None:
    task = await create(conn, "csv_batch", "csv_product_import", {})
    assert (await wait_final(conn, [task], timeout=60))[task] == "complete"
    steps = await steps_of(conn, task)
    workers = sorted(n for n in steps if n.startswith("process_batch_"))
    assert workers == [f"process_batch_{i:03d}" for i in range(1, 6)]
    assert sorted(steps) == sorted(["analyze_csv", *workers, "aggregate"])
    for i, name in enumerate(workers):
        assert steps[name]["inputs"]["cursor"] == {
            "batch_id": f"{i + 1:03d}",
            "start_cursor": 200 * i,
            "end_cursor": 200 * (i + 1),
            "batch_size": 200,
        }
        assert steps[name]["inputs"]["is_no_op"] is False
        assert steps[name]["results"]["items_processed"] == 200
    rows, value, quantity = expected_totals(csv_batch.PRODUCTS_CSV)
    assert rows == 1000
    assert steps["aggregate"]["results"] == {
        "total_processed": 1000,
        "worker_count": 5,
        "inventory_value": str(value),
        "total_quantity": quantity,
    }
    await assert_invariants(conn)


async def test_a_header_only_file_completes_through_one_no_op_worker(
    worker: Worker, conn: db.Connection, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("id,sku,name,category,price,quantity\n")
    task = await create(conn, "csv_batch", "csv_product_import", {"csv_path": str(empty)})
    assert (await wait_final(conn, [task], timeout=60))[task] == "complete"
    steps = await steps_of(conn, task)
    assert sorted(steps) == ["aggregate", "analyze_csv", "process_batch_000"]
    assert steps["process_batch_000"]["inputs"]["is_no_op"] is True
    assert steps["aggregate"]["results"] == {
        "total_processed": 0,
        "worker_count": 1,
        "inventory_value": "0",
        "total_quantity": 0,
    }
    await assert_invariants(conn)


async def test_a_worker_that_fails_once_is_retried_and_the_totals_stay_exact(
    worker: Worker, conn: db.Connection
) -> None:
    task = await create(
        conn, "csv_batch", "csv_product_import", {"fail_batches_once": ["002", "004"]}
    )
    assert (await wait_final(conn, [task], timeout=60))[task] == "complete"
    steps = await steps_of(conn, task)
    attempts = {n: s["attempts"] for n, s in steps.items() if n.startswith("process_batch_")}
    assert attempts == {
        "process_batch_001": 1,
        "process_batch_002": 2,
        "process_batch_003": 1,
        "process_batch_004": 2,
        "process_batch_005": 1,
    }
    _, value, quantity = expected_totals(csv_batch.PRODUCTS_CSV)
    assert steps["aggregate"]["results"]["total_processed"] == 1000
    assert steps["aggregate"]["results"]["inventory_value"] == str(value)
    assert steps["aggregate"]["results"]["total_quantity"] == quantity
    await assert_invariants(conn)


# --- through the command ------------------------------------------------------------------------


def spawn_worker(log_path: Path, dsn: str) -> subprocess.Popen[bytes]:
    """`tasker-pg worker` serving both examples, its output in `log_path`."""
    env = dict(os.environ, TASKER_DATABASE_URL=dsn)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasker_pg.cli",
                "worker",
                "--handlers",
                "examples.approval.handlers",
                "--handlers",
                "examples.csv_batch.handlers",
                "--templates",
                "examples/approval",
                "--templates",
                "examples/csv_batch",
                "--poll-interval",
                "0.2",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_both_examples_run_through_the_worker_command(dsn: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    proc = spawn_worker(log_path, dsn)
    conn = await db.connect(dsn)
    try:

        async def started() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return "started: namespaces" in log_path.read_text()

        await poll(started, timeout=60, what="the worker starting")
        big = await create(
            conn, "approval", "approval_request", {"amount": 7500, "requester": "bo"}
        )
        rows = await create(conn, "csv_batch", "csv_product_import", {})
        states = await wait_final(conn, [big, rows], timeout=60)
        assert states == {big: "complete", rows: "complete"}
        assert (await steps_of(conn, big))["finalize"]["results"]["approvals"] == [
            "manager_approval",
            "finance_review",
        ]
        assert (await steps_of(conn, rows))["aggregate"]["results"]["total_processed"] == 1000
        proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return proc.poll() is not None

        await poll(exited, timeout=60, what="the worker exiting")
        assert proc.returncode == 0, log_path.read_text()
        await assert_invariants(conn)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await conn.close()


# --- what people see -----------------------------------------------------------------------------


async def test_task_show_collapses_the_workers_and_names_the_branches_not_taken(
    worker: Worker, conn: db.Connection, dsn: str
) -> None:
    small = await create(conn, "approval", "approval_request", {"amount": 500, "requester": "a"})
    rows = await create(conn, "csv_batch", "csv_product_import", {})
    assert set((await wait_final(conn, [small, rows], timeout=60)).values()) == {"complete"}
    async with AsyncTaskerClient(dsn) as client:
        not_taken = await client.list_steps_not_created(small)
        drawn = render_dag(await client.list_task_steps(rows))
        templates_only = await client.list_steps_not_created(rows)
    assert [(s.name, s.reason) for s in not_taken] == [
        ("manager_approval", "not created: decision `routing_decision` chose [auto_approve]"),
        ("finance_review", "not created: decision `routing_decision` chose [auto_approve]"),
    ]
    assert "process_batch_001..005" in drawn
    assert "5 workers: 5 complete" in drawn
    assert "process_batch_002" not in drawn
    assert templates_only == []  # the workers stand for their batch_worker template
