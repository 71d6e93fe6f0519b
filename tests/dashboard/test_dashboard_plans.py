"""Every dashboard query has a plan that reads no whole table: with sequential scans priced
out (`enable_seqscan = off`), no plan node is a Seq Scan of an engine table. (On a small test
database the planner rightly prefers sequential scans; this checks that an index path exists
for every read, the one it takes once the tables are large.)"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tasker_pg import db
from tasker_pg.dashboard import queries
from tests.dashboard.conftest import Shop

# Tables small by nature (one row per template version, per worker, per step edge of one task
# through its primary key) may be scanned; every other table must be read through an index.
SMALL = {"named_tasks", "named_steps", "workers"}


def seq_scans(plan: dict[str, Any]) -> list[str]:
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") not in SMALL:
        found.append(str(plan.get("Relation Name")))
    for child in plan.get("Plans", []):
        found += seq_scans(child)
    return found


async def plan_of(conn: db.Connection, sql: str, *args: Any) -> dict[str, Any]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


async def test_no_dashboard_query_scans_an_engine_table(shop: Shop, conn: db.Connection) -> None:
    task = str(shop.failed)
    statements: dict[str, tuple[str, tuple[Any, ...]]] = {
        "NAMESPACES": (queries.NAMESPACES, ()),
        "NAMESPACE_NAMES": (queries.NAMESPACE_NAMES, ()),
        "TASK_PAGE": (
            queries.TASK_PAGE,
            (None, None, None, "shop", "error", 50, queries.SCAN_BUDGET),
        ),
        "TASK_PAGE from a cursor": (
            queries.TASK_PAGE,
            (
                await conn.fetchval("SELECT now()"),
                str(uuid.uuid4()),
                await conn.fetchval("SELECT now() - interval '1 hour'"),
                None,
                None,
                50,
                queries.SCAN_BUDGET,
            ),
        ),
        "TEMPLATE_STEPS": (queries.TEMPLATE_STEPS, (task,)),
        "STEP_EDGES": (queries.STEP_EDGES, (task,)),
        "AUDIT": (queries.AUDIT, (task, 300)),
        "WORKERS": (queries.WORKERS, ()),
        "STEP_TASK": (queries.STEP_TASK, (str(uuid.uuid4()),)),
    }
    # the check sees sequential scans: on this small database the planner picks some
    preferred = [
        table
        for sql, args in statements.values()
        for table in seq_scans(await plan_of(conn, sql, *args))
    ]
    assert "tasks" in preferred
    await conn.execute("SET enable_seqscan = off")
    try:
        scans = {
            name: seq_scans(await plan_of(conn, sql, *args))
            for name, (sql, args) in statements.items()
        }
    finally:
        await conn.execute("RESET enable_seqscan")
    assert scans == {name: [] for name in statements}
