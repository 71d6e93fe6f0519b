"""`tasker-pg maintenance`: tasker.purge_finished() in batches until nothing is left."""

from __future__ import annotations

import json

import pytest

from tasker_pg import db
from tests.cli.test_cli import UNREACHABLE, cli
from tests.support.engine import NAMESPACE, drive, single, start

pytestmark = pytest.mark.timeout(120)


async def _old_finished_tasks(conn: db.Connection, n: int) -> None:
    tpl = single()
    for i in range(n):
        await start(conn, tpl, {"i": i}, idempotency_key=f"k{i}")
    await drive(conn, NAMESPACE, lambda row: None)
    await conn.execute("UPDATE tasker.tasks SET completed_at = completed_at - interval '40 days'")


async def test_maintenance_purges_in_batches_and_prints_the_counts(
    dsn: str, conn: db.Connection
) -> None:
    await _old_finished_tasks(conn, 5)
    nothing = cli(dsn, "maintenance", "--json")  # no policy: every task is kept
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads(nothing.stdout)["tasks"] == 0
    await conn.execute("SELECT tasker.set_retention_policy($1, interval '30 days')", NAMESPACE)

    first = cli(dsn, "maintenance", "--json", "--batch", "2", "--max-batches", "2")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "tasks": 4,
        "steps": 4,
        "step_edges": 0,
        "step_transitions": 12,
        "task_transitions": 8,
        "archived_messages": 0,
        "idempotency_keys_kept": 4,
        "idempotency_keys_expired": 0,
        "more": True,
        "batches": 2,
    }
    rest = cli(dsn, "maintenance", "--batch", "2")
    assert rest.returncode == 0, rest.stderr
    assert rest.stdout.strip() == (
        "deleted 1 task(s) with 1 step(s), 0 edge(s), 3 step and 2 task transition(s); "
        "0 archived message(s); idempotency keys: 1 kept, 0 expired (1 batch(es))"
    )
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0
    assert await conn.fetchval("SELECT count(*) FROM tasker.idempotency_keys") == 5
    assert await conn.check_invariants() == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["maintenance", "--batch", "0"], "must be > 0"),
        (["maintenance", "--max-batches", "-1"], "must be"),
    ],
)
def test_maintenance_usage_errors_exit_2(args: list[str], needle: str) -> None:
    result = cli(UNREACHABLE, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr


async def test_a_batch_over_the_bound_is_refused_by_the_database(dsn: str) -> None:
    result = cli(dsn, "maintenance", "--batch", "100001")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "error [invalid_argument]: batch must be an integer from 1 to 100000" in result.stderr
