"""Conditional and batch workflows in the SQL engine (issue 11): decision points, batch
fan-out and deferred convergence, applied by complete_steps in the transaction that commits the
deciding step. Driven through asyncpg without a worker; every test ends with
`tasker.check_invariants()` empty."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tasker_pg.template import TaskTemplate, TemplateValidationError
from tests.support.engine import (
    NAMESPACE,
    Row,
    assert_healthy,
    claim,
    complete,
    drive,
    failure,
    start,
    step,
    step_states,
    success,
    task_row,
    template,
)

pytestmark = pytest.mark.timeout(90)


def decide(*names: str) -> dict[str, Any]:
    if not names:
        return {"decision_point_outcome": {"type": "no_branches"}, "reason": "nothing"}
    return {"decision_point_outcome": {"type": "create_steps", "step_names": list(names)}}


def batches(worker: str, *ids: str, **extra: Any) -> dict[str, Any]:
    configs = [
        {"batch_id": b, "start_cursor": i * 10, "end_cursor": (i + 1) * 10, "batch_size": 10}
        for i, b in enumerate(ids)
    ]
    out = {
        "type": "create_batches",
        "worker_template_name": worker,
        "cursor_configs": configs,
        "total_items": 10 * len(ids),
    }
    out.update(extra)
    return {"batch_processing_outcome": out}


def approval(name: str = "approval") -> dict[str, Any]:
    return template(
        name,
        [
            step("validate_request"),
            step("routing_decision", "validate_request", type="decision"),
            step("auto_approve", "routing_decision"),
            step("manager_approval", "routing_decision"),
            step("finance_review", "routing_decision"),
            step(
                "finalize",
                "auto_approve",
                "manager_approval",
                "finance_review",
                type="deferred_convergence",
            ),
        ],
    )


def route(amount: int) -> list[str]:
    if amount < 1000:
        return ["auto_approve"]
    if amount < 5000:
        return ["manager_approval"]
    return ["manager_approval", "finance_review"]


async def fetch_one(conn: db.Connection, sql: str, *args: Any) -> Row:
    row = await conn.fetchrow(sql, *args)
    assert row is not None
    return row


async def names_of(conn: db.Connection, task: uuid.UUID) -> set[str]:
    return set((await step_states(conn, task)).keys())


async def counters_ok(conn: db.Connection, task: uuid.UUID) -> None:
    t = await task_row(conn, task)
    n = await conn.fetchval("SELECT count(*) FROM tasker.steps WHERE task_uuid = $1", task)
    assert t["total_steps"] == n


# --- validation -------------------------------------------------------------------------------


def raw(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "dyn", "namespace_name": NAMESPACE, "version": "1.0.0", "steps": list(steps)}


BAD_TEMPLATES = [
    ("decision_without_dependency", raw(step("d", type="decision"), step("a", "d")), "'d'"),
    (
        "decision_child_with_other_parent",
        raw(step("s"), step("d", "s", type="decision"), step("a", "d", "s")),
        "'a'",
    ),
    (
        "worker_not_after_batchable",
        raw(step("s"), step("w", "s", type="batch_worker")),
        "'w'",
    ),
    (
        "worker_two_parents",
        raw(
            step("b", type="batchable"),
            step("s"),
            step("w", "b", "s", type="batch_worker"),
        ),
        "'w'",
    ),
    ("batchable_without_worker", raw(step("b", type="batchable"), step("s", "b")), "'b'"),
    (
        "standard_after_worker",
        raw(
            step("b", type="batchable"),
            step("w", "b", type="batch_worker"),
            step("agg", "w"),
        ),
        "'agg'",
    ),
    ("convergence_lists_nothing", raw(step("c", type="deferred_convergence")), "'c'"),
    (
        "batch_config_on_standard",
        raw(step("s", batch_config={"batch_size": 5})),
        "batch_config",
    ),
    (
        "bad_batch_size",
        raw(
            step("b", type="batchable"),
            step("w", "b", type="batch_worker", batch_config={"batch_size": 0}),
            step("agg", "w", type="deferred_convergence"),
        ),
        "batch_size",
    ),
    (
        "unknown_batch_key",
        raw(
            step("b", type="batchable"),
            step("w", "b", type="batch_worker", batch_config={"size": 5}),
            step("agg", "w", type="deferred_convergence"),
        ),
        "size",
    ),
    (
        "bad_failure_strategy",
        raw(
            step("b", type="batchable"),
            step("w", "b", type="batch_worker", batch_config={"failure_strategy": "x"}),
            step("agg", "w", type="deferred_convergence"),
        ),
        "failure_strategy",
    ),
    (
        "cycle_through_dynamic_edge",
        raw(
            step("s", "c"),
            step("d", "s", type="decision"),
            step("a", "d"),
            step("c", "a", type="deferred_convergence"),
        ),
        "cycle",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "needle"), BAD_TEMPLATES, ids=[c[0] for c in BAD_TEMPLATES]
)
async def test_bad_dynamic_templates_are_refused_by_python_and_sql(
    conn: db.Connection, case: str, body: dict[str, Any], needle: str
) -> None:
    with pytest.raises(TemplateValidationError) as py:
        TaskTemplate.from_dict(body)
    assert needle in str(py.value)
    with pytest.raises(ValidationError) as sql:
        await conn.fetchval("SELECT tasker.register_template($1::jsonb)", body)
    assert sql.value.sqlstate == "TV010"
    assert needle in str(sql.value)


GOOD_TEMPLATES = [
    raw(step("s"), step("d", "s", type="decision"), step("a", "d"), step("b", "d")),
    raw(
        step("b", type="batchable"),
        step("w", "b", type="batch_worker"),
        step("agg", "w", type="deferred_convergence"),
        step("after", "agg"),
    ),
    raw(
        step("s"),
        step("d", "s", type="decision"),
        step("a", "d"),
        step("c", "s", "a", type="deferred_convergence"),
    ),
]


@pytest.mark.parametrize("body", GOOD_TEMPLATES)
async def test_python_and_sql_normalise_dynamic_templates_alike(
    conn: db.Connection, body: dict[str, Any]
) -> None:
    tpl = TaskTemplate.from_dict(body)
    tid = await conn.fetchval("SELECT tasker.register_template($1::jsonb)", body)
    stored = json.loads(
        await conn.fetchval(
            "SELECT template::text FROM tasker.named_tasks WHERE named_task_id = $1", tid
        )
    )
    assert stored == tpl.to_json()
    count = await conn.fetchval(
        "SELECT step_count FROM tasker.named_tasks WHERE named_task_id = $1", tid
    )
    assert count == len(tpl.static_steps)
    dyn = await conn.fetch(
        "SELECT name FROM tasker.named_steps WHERE named_task_id = $1 AND is_dynamic", tid
    )
    assert {r["name"] for r in dyn} == set(tpl.dynamic_steps)


def test_batch_config_defaults_are_filled_in() -> None:
    tpl = TaskTemplate.from_dict(GOOD_TEMPLATES[1])
    assert tpl.to_json()["steps"][1]["batch_config"] == {
        "batch_size": 1000,
        "parallelism": 10,
        "cursor_field": "id",
        "failure_strategy": "continue_on_failure",
    }
    assert "batch_config" not in tpl.to_json()["steps"][0]


# --- decisions --------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [500, 1000, 2500, 5000, 10000])
async def test_approval_creates_exactly_the_chosen_branches(
    conn: db.Connection, amount: int
) -> None:
    tpl = approval()
    task = await start(conn, tpl, {"amount": amount})
    assert await names_of(conn, task) == {"validate_request", "routing_decision"}
    assert (await task_row(conn, task))["total_steps"] == 2
    order: list[str] = []

    def handler(row: Row) -> Any:
        order.append(row["step_name"])
        if row["step_name"] == "routing_decision":
            return decide(*route(row["task_context"]["amount"]))
        if row["step_name"] == "finalize":
            return {"approved_by": sorted(row["dependency_results"])}
        return None

    await drive(conn, NAMESPACE, handler)
    chosen = route(amount)
    assert await names_of(conn, task) == {
        "validate_request",
        "routing_decision",
        "finalize",
        *chosen,
    }
    t = await task_row(conn, task)
    assert t["state"] == "complete"
    assert t["total_steps"] == 3 + len(chosen)
    # finalize ran after every chosen branch
    assert order[-1] == "finalize"
    assert set(order[2:-1]) == set(chosen)
    fin = await conn.fetchval(
        "SELECT results FROM tasker.steps WHERE task_uuid = $1 AND name = 'finalize'", task
    )
    fin = json.loads(fin) if isinstance(fin, str) else fin
    assert set(chosen) <= set(fin["approved_by"])
    audit = await fetch_one(
        conn,
        "SELECT metadata FROM tasker.task_transitions"
        " WHERE task_uuid = $1 AND event = 'decision_applied'",
        task,
    )
    meta = (
        json.loads(audit["metadata"]) if isinstance(audit["metadata"], str) else audit["metadata"]
    )
    assert meta["chosen"] == sorted(chosen)
    await assert_healthy(conn)


async def test_finalize_waits_for_every_chosen_branch(conn: db.Connection) -> None:
    task = await start(conn, approval(), {"amount": 5000})
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    await complete(conn, success(d, decide("manager_approval", "finance_review")))
    rows = {r["step_name"]: r for r in await claim(conn)}
    assert set(rows) == {"manager_approval", "finance_review"}
    states = await step_states(conn, task)
    assert states["finalize"] == "pending"
    await complete(conn, success(rows["manager_approval"]))
    assert (await step_states(conn, task))["finalize"] == "pending"
    assert await claim(conn) == []
    await complete(conn, success(rows["finance_review"]))
    [f] = await claim(conn)
    assert f["step_name"] == "finalize"
    await complete(conn, success(f))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_no_branches_skips_to_a_static_convergence(conn: db.Connection) -> None:
    tpl = template(
        "nobranch",
        [
            step("s"),
            step("d", "s", type="decision"),
            step("a", "d"),
            step("c", "s", "a", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    assert await names_of(conn, task) == {"s", "d", "c"}
    log = await drive(conn, NAMESPACE, lambda r: decide() if r["step_name"] == "d" else None)
    assert await names_of(conn, task) == {"s", "d", "c"}
    assert (await task_row(conn, task))["state"] == "complete"
    assert log  # ran
    await assert_healthy(conn)


@pytest.mark.parametrize("chosen", [[], ["a"]], ids=["no_branches", "create_steps"])
async def test_a_convergence_listing_the_decision_runs_whatever_it_chose(
    conn: db.Connection, chosen: list[str]
) -> None:
    """`c` lists the decision itself: it is dynamic (it depends on a decision) and is created
    when the decision applies its outcome, also when that outcome creates nothing."""
    tpl = template(
        "conv_on_decision",
        [
            step("s"),
            step("d", "s", type="decision"),
            step("a", "d"),
            step("c", "d", "a", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    assert await names_of(conn, task) == {"s", "d"}
    log = await drive(conn, NAMESPACE, lambda r: decide(*chosen) if r["step_name"] == "d" else None)
    assert await names_of(conn, task) == {"s", "d", "c", *chosen}
    assert log.names[-1] == ["c"]
    assert (await task_row(conn, task))["state"] == "complete"
    await counters_ok(conn, task)
    await assert_healthy(conn)


async def test_a_decision_that_creates_steps_does_not_let_its_task_complete(
    conn: db.Connection,
) -> None:
    tpl = template("lastdecision", [step("s"), step("d", "s", type="decision"), step("a", "d")])
    task = await start(conn, tpl)
    [s] = await claim(conn)
    await complete(conn, success(s))
    [d] = await claim(conn)
    await complete(conn, success(d, decide("a")))
    t = await task_row(conn, task)
    assert t["state"] == "steps_in_process"
    assert t["total_steps"] == 3
    [a] = await claim(conn)
    await complete(conn, success(a))
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_nested_decisions_and_downstream_steps(conn: db.Connection) -> None:
    tpl = template(
        "nested",
        [
            step("s"),
            step("d1", "s", type="decision"),
            step("x", "d1"),
            step("d2", "x", type="decision"),
            step("y", "d1"),
            step("p", "d2"),
            step("q", "d2"),
            step("p_after", "p"),
            step("end", "y", "p_after", "q", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)

    def handler(row: Row) -> Any:
        if row["step_name"] == "d1":
            return decide("x")
        if row["step_name"] == "d2":
            return decide("p")
        return None

    await drive(conn, NAMESPACE, handler)
    assert await names_of(conn, task) == {"s", "d1", "x", "d2", "p", "p_after", "end"}
    assert (await task_row(conn, task))["state"] == "complete"
    await counters_ok(conn, task)
    await assert_healthy(conn)


async def test_unknown_name_fails_the_decision_permanently_and_retry_recovers(
    conn: db.Connection,
) -> None:
    task = await start(conn, approval("approval_bad"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    answer = await complete(conn, success(d, decide("auto_approve", "validate_request")))
    assert answer[str(d["step_uuid"])]["status"] == "applied"
    assert answer[str(d["step_uuid"])]["detail"] == "error"
    row = await fetch_one(
        conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", d["step_uuid"]
    )
    err = json.loads(row["last_error"]) if isinstance(row["last_error"], str) else row["last_error"]
    assert err["error_type"] == "invalid_decision_outcome"
    assert "'validate_request'" in err["message"]
    assert await names_of(conn, task) == {"validate_request", "routing_decision"}
    assert (await task_row(conn, task))["state"] == "error"
    await assert_healthy(conn)
    # a success without decision_point_outcome is refused the same way
    await conn.retry_step(d["step_uuid"])
    [d] = await claim(conn)
    await complete(conn, success(d, {"chosen": "auto_approve"}))
    row = await fetch_one(
        conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", d["step_uuid"]
    )
    assert row["state"] == "error"
    assert "decision_point_outcome" in json.dumps(row["last_error"])
    await conn.retry_step(d["step_uuid"])
    await drive(
        conn,
        NAMESPACE,
        lambda r: decide("auto_approve") if r["step_name"] == "routing_decision" else None,
    )
    assert await names_of(conn, task) == {
        "validate_request",
        "routing_decision",
        "auto_approve",
        "finalize",
    }
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_an_empty_create_steps_fails_the_decision_saying_no_branches(
    conn: db.Connection,
) -> None:
    task = await start(conn, approval("approval_empty"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    outcome = {"decision_point_outcome": {"type": "create_steps", "step_names": []}}
    answer = await complete(conn, success(d, outcome))
    assert answer[str(d["step_uuid"])]["detail"] == "error"
    row = await fetch_one(
        conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", d["step_uuid"]
    )
    assert row["state"] == "error"
    assert row["last_error"]["error_type"] == "invalid_decision_outcome"
    assert row["last_error"]["retryable"] is False
    assert row["last_error"]["message"] == (
        "step routing_decision: decision_point_outcome.step_names is empty: a decision that"
        ' takes no branch returns {"type": "no_branches"} instead'
        " (decision_no_branches(reason) in Python)"
    )
    assert await names_of(conn, task) == {"validate_request", "routing_decision"}
    assert (await task_row(conn, task))["state"] == "error"
    await assert_healthy(conn)
    # resolved by hand with the same result, it counts as no_branches: nothing is created
    await conn.resolve_step(d["step_uuid"], outcome)
    assert await names_of(conn, task) == {"validate_request", "routing_decision"}
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_steps_per_decision_limit(conn: db.Connection) -> None:
    await conn.execute("UPDATE tasker.settings SET value = 1 WHERE name = 'max_steps_per_decision'")
    try:
        task = await start(conn, approval("approval_limit"), {"amount": 1})
        [v] = await claim(conn)
        await complete(conn, success(v))
        [d] = await claim(conn)
        await complete(conn, success(d, decide("manager_approval", "finance_review")))
        row = await fetch_one(
            conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", d["step_uuid"]
        )
        assert row["state"] == "error"
        assert "max_steps_per_decision" in json.dumps(row["last_error"])
        await conn.retry_step(d["step_uuid"])
        [d] = await claim(conn)
        await complete(conn, success(d, decide("manager_approval")))
        assert "manager_approval" in await names_of(conn, task)
    finally:
        await conn.execute(
            "UPDATE tasker.settings SET value = 100 WHERE name = 'max_steps_per_decision'"
        )
    await drive(conn, NAMESPACE, lambda r: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_a_resent_outcome_creates_nothing_twice(conn: db.Connection) -> None:
    task = await start(conn, approval("approval_twice"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    out = success(d, decide("auto_approve"))
    first = await complete(conn, out)
    again = await complete(conn, out)
    assert first[str(d["step_uuid"])]["status"] == "applied"
    assert again[str(d["step_uuid"])]["status"] == "stale"
    assert await names_of(conn, task) == {
        "validate_request",
        "routing_decision",
        "auto_approve",
        "finalize",
    }
    await counters_ok(conn, task)
    await assert_healthy(conn)


async def test_raced_outcomes_create_nothing_twice(conn: db.Connection, sessions: Any) -> None:
    task = await start(conn, approval("approval_race"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    others = await sessions(4)
    outs = [success(d, decide("auto_approve")) for _ in others]
    answers = await asyncio.gather(*(complete(c, o) for c, o in zip(others, outs, strict=True)))
    statuses = sorted(a[str(d["step_uuid"])]["status"] for a in answers)
    assert statuses == ["applied", "stale", "stale", "stale"]
    assert await names_of(conn, task) == {
        "validate_request",
        "routing_decision",
        "auto_approve",
        "finalize",
    }
    await counters_ok(conn, task)
    await assert_healthy(conn)


async def test_resolving_a_decision_applies_its_outcome_or_no_branches(conn: db.Connection) -> None:
    task = await start(conn, approval("approval_resolve"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    d = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 'routing_decision'",
        task,
    )
    await conn.resolve_step(d, decide("finance_review"))
    assert await names_of(conn, task) == {
        "validate_request",
        "routing_decision",
        "finance_review",
        "finalize",
    }
    await drive(conn, NAMESPACE, lambda r: None)
    assert (await task_row(conn, task))["state"] == "complete"
    task2 = await start(conn, approval("approval_resolve"), {"amount": 1})
    [v] = await claim(conn)
    await complete(conn, success(v))
    d2 = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 'routing_decision'",
        task2,
    )
    await conn.resolve_step(d2, {"whatever": 1})
    assert await names_of(conn, task2) == {"validate_request", "routing_decision"}
    assert (await task_row(conn, task2))["state"] == "complete"
    await assert_healthy(conn)


# --- batches ----------------------------------------------------------------------------------


def pipeline(name: str = "batch") -> dict[str, Any]:
    return template(
        name,
        [
            step("analyze", type="batchable"),
            step("process_batch", "analyze", type="batch_worker", batch_config={"batch_size": 10}),
            step("aggregate", "process_batch", type="deferred_convergence"),
        ],
    )


async def test_fan_out_creates_workers_and_the_aggregate_waits_for_all(conn: db.Connection) -> None:
    task = await start(conn, pipeline())
    assert await names_of(conn, task) == {"analyze"}
    [a] = await claim(conn)
    await complete(
        conn, success(a, batches("process_batch", "001", "002", "003", batch_metadata={"k": 1}))
    )
    workers = {r["step_name"]: r for r in await claim(conn)}
    assert set(workers) == {"process_batch_001", "process_batch_002", "process_batch_003"}
    w = workers["process_batch_002"]
    inputs = w["inputs"]
    assert inputs["is_no_op"] is False
    assert inputs["cursor"]["batch_id"] == "002"
    assert inputs["batch_metadata"]["batch_size"] == 10 and inputs["batch_metadata"]["k"] == 1
    assert w["config"] == {"step": "process_batch"}
    # the analyzer's result reaches its workers without the cursor configs (each worker has
    # its own in its inputs; all N in each of N claims would be quadratic), the rest intact
    assert w["dependency_results"]["analyze"] == {
        "batch_processing_outcome": {
            "type": "create_batches",
            "worker_template_name": "process_batch",
            "total_items": 30,
            "batch_metadata": {"k": 1},
        }
    }
    stored = await conn.fetchval(
        "SELECT results FROM tasker.steps WHERE task_uuid = $1 AND name = 'analyze'", task
    )
    assert len(stored["batch_processing_outcome"]["cursor_configs"]) == 3  # kept in the row
    assert (await task_row(conn, task))["total_steps"] == 5
    # a worker can checkpoint
    from tests.support.engine import checkpoint

    await complete(conn, checkpoint(w, 5))
    [w2] = await claim(conn)
    assert w2["checkpoint"]["cursor"] == 5
    await complete(conn, success(w2, {"n": 2}))
    await complete(conn, success(workers["process_batch_001"], {"n": 1}))
    assert await claim(conn) == []
    await complete(conn, success(workers["process_batch_003"], {"n": 3}))
    [agg] = await claim(conn)
    assert agg["step_name"] == "aggregate"
    assert sorted(agg["dependency_results"]) == [
        "analyze",
        "process_batch_001",
        "process_batch_002",
        "process_batch_003",
    ]
    assert "cursor_configs" not in agg["dependency_results"]["analyze"]["batch_processing_outcome"]
    await complete(conn, success(agg))
    assert (await task_row(conn, task))["state"] == "complete"
    meta = await conn.fetchval(
        "SELECT metadata FROM tasker.task_transitions"
        " WHERE task_uuid = $1 AND event = 'batches_created'",
        task,
    )
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["workers"] == 3
    await assert_healthy(conn)


async def test_no_batches_runs_one_no_op_worker(conn: db.Connection) -> None:
    task = await start(conn, pipeline("batch_none"))
    [a] = await claim(conn)
    await complete(
        conn, success(a, {"batch_processing_outcome": {"type": "no_batches", "reason": "empty"}})
    )
    [w] = await claim(conn)
    assert w["step_name"] == "process_batch_000"
    assert w["inputs"]["is_no_op"] is True
    assert w["inputs"]["cursor"] == {
        "batch_id": "000",
        "start_cursor": 0,
        "end_cursor": 0,
        "batch_size": 0,
    }
    await complete(conn, success(w, {"items_processed": 0}))
    await drive(conn, NAMESPACE, lambda r: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


@pytest.mark.parametrize(
    ("outcome", "needle"),
    [
        (batches("nope", "001"), "nope"),
        (batches("process_batch", "001", "001"), "used twice"),
        (batches("process_batch", "bad id"), "batch_id"),
        (
            {
                "batch_processing_outcome": {
                    "type": "create_batches",
                    "worker_template_name": "process_batch",
                    "cursor_configs": [{"batch_id": 7}],
                }
            },
            "batch_id",
        ),
        (
            {
                "batch_processing_outcome": {
                    "type": "create_batches",
                    "worker_template_name": "process_batch",
                    "cursor_configs": [{"batch_id": "x" * 65}],
                }
            },
            "batch_id",
        ),
        ({"result": 1}, "batch_processing_outcome"),
    ],
)
async def test_invalid_batch_outcomes_fail_the_step(
    conn: db.Connection, outcome: Any, needle: str
) -> None:
    task = await start(conn, pipeline("batch_bad"))
    [a] = await claim(conn)
    await complete(conn, success(a, outcome))
    row = await fetch_one(
        conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", a["step_uuid"]
    )
    assert row["state"] == "error"
    assert needle in json.dumps(row["last_error"]) and "invalid_batch_outcome" in json.dumps(
        row["last_error"]
    )
    assert await names_of(conn, task) == {"analyze"}
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_worker_limit(conn: db.Connection) -> None:
    await conn.execute("UPDATE tasker.settings SET value = 2 WHERE name = 'max_batch_workers'")
    try:
        task = await start(conn, pipeline("batch_limit"))
        [a] = await claim(conn)
        await complete(conn, success(a, batches("process_batch", "1", "2", "3")))
        row = await fetch_one(
            conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", a["step_uuid"]
        )
        assert row["state"] == "error"
        assert "max_batch_workers" in json.dumps(row["last_error"])
    finally:
        await conn.execute(
            "UPDATE tasker.settings SET value = 1000 WHERE name = 'max_batch_workers'"
        )
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_a_failing_worker_blocks_the_aggregate_and_retry_recovers(
    conn: db.Connection,
) -> None:
    task = await start(conn, pipeline("batch_fail"))
    [a] = await claim(conn)
    await complete(conn, success(a, batches("process_batch", "001", "002")))
    workers = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, success(workers["process_batch_001"]))
    await complete(conn, failure(workers["process_batch_002"], retryable=False))
    assert (await task_row(conn, task))["state"] == "error"
    assert (await step_states(conn, task))["aggregate"] == "pending"
    assert await claim(conn) == []
    await assert_healthy(conn)
    await conn.retry_step(workers["process_batch_002"]["step_uuid"])
    await drive(conn, NAMESPACE, lambda r: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


def taken_names(name: str) -> dict[str, Any]:
    """Two analyzers whose worker names can meet (`w` + `x_1` and `w_x` + `1` are both
    `w_x_1`), and a static step named like a worker of `w`."""
    return template(
        name,
        [
            step("b1", type="batchable"),
            step("w", "b1", type="batch_worker"),
            step("b2", type="batchable"),
            step("w_x", "b2", type="batch_worker"),
            step("w_7"),
            step("agg", "w", "w_x", type="deferred_convergence"),
        ],
    )


async def analyzer_error(conn: db.Connection, row: Row) -> dict[str, Any]:
    got = await fetch_one(
        conn, "SELECT state, last_error FROM tasker.steps WHERE step_uuid = $1", row["step_uuid"]
    )
    assert got["state"] == "error"
    assert got["last_error"]["error_type"] == "invalid_batch_outcome"
    assert got["last_error"]["retryable"] is False
    return dict(got["last_error"])


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (
            batches("w", "1", "7"),
            "step b1: batch_processing_outcome.cursor_configs[1]: the worker would be named"
            " 'w_7' (worker_template_name + '_' + batch_id), the name of step 'w_7' already in"
            " this template; choose batch_ids that make new names",
        ),
        (
            batches("w", "x_1"),
            "step b1: batch_processing_outcome.cursor_configs[0]: the worker would be named"
            " 'w_x_1' (worker_template_name + '_' + batch_id), the name of step 'w_x_1' already"
            " in this template; choose batch_ids that make new names",
        ),
    ],
)
async def test_a_worker_name_taken_by_a_template_step_fails_the_analyzer(
    conn: db.Connection, outcome: dict[str, Any], message: str
) -> None:
    tpl = template(
        "taken_tpl",
        [
            step("b1", type="batchable"),
            step("w", "b1", type="batch_worker"),
            step("w_7"),
            step("d", "w_7", type="decision"),
            step("w_x_1", "d"),
            step("agg", "w", "w_x_1", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, success(rows["b1"], outcome))
    assert (await analyzer_error(conn, rows["b1"]))["message"] == message
    assert await names_of(conn, task) == {"b1", "w_7", "d"}
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_a_no_op_worker_name_taken_fails_the_analyzer(conn: db.Connection) -> None:
    tpl = template(
        "taken_noop",
        [
            step("b", type="batchable"),
            step("w", "b", type="batch_worker"),
            step("w_000", "b"),
            step("agg", "w", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    [b] = await claim(conn)
    await complete(conn, success(b, {"batch_processing_outcome": {"type": "no_batches"}}))
    assert (await analyzer_error(conn, b))["message"] == (
        "step b: the no-op worker of no_batches would be named 'w_000', the name of step"
        " 'w_000' already in this template"
    )
    assert await names_of(conn, task) == {"b", "w_000"}
    await conn.cancel_task(task)
    await assert_healthy(conn)


async def test_a_worker_name_taken_by_another_fan_out_fails_the_analyzer(
    conn: db.Connection,
) -> None:
    task = await start(conn, taken_names("taken_task"))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, success(rows["w_7"]))
    await complete(conn, success(rows["b1"], batches("w", "x_1", "x_2")))
    await complete(conn, success(rows["b2"], batches("w_x", "3", "2")))
    assert (await analyzer_error(conn, rows["b2"]))["message"] == (
        "step b2: batch_processing_outcome.cursor_configs[1]: the worker would be named"
        " 'w_x_2' (worker_template_name + '_' + batch_id), the name of step 'w_x_2' already in"
        " this task; choose batch_ids that make new names"
    )
    assert await names_of(conn, task) == {"b1", "b2", "w_7", "w_x_1", "w_x_2", "agg"}
    assert (await task_row(conn, task))["state"] == "error"
    await counters_ok(conn, task)
    await assert_healthy(conn)
    # retried, the analyzer chooses other batch ids and the task completes
    await conn.retry_step(rows["b2"]["step_uuid"])
    await drive(conn, NAMESPACE, lambda r: batches("w_x", "9") if r["step_name"] == "b2" else None)
    assert await names_of(conn, task) == {
        "b1",
        "b2",
        "w_7",
        "w_x_1",
        "w_x_2",
        "w_x_9",
        "agg",
    }
    assert (await task_row(conn, task))["state"] == "complete"
    await counters_ok(conn, task)
    await assert_healthy(conn)


async def test_worker_names_meeting_in_one_batch_refuse_the_batch(conn: db.Connection) -> None:
    """Both outcomes pass the check (neither worker exists yet); applying the second finds the
    name taken by the first: the batch is refused (nothing applied), and each outcome sent
    alone, as the worker's delivery does after a refusal, gives the clean failure."""
    task = await start(conn, taken_names("taken_batch"))
    rows = {r["step_name"]: r for r in await claim(conn)}
    await complete(conn, success(rows["w_7"]))
    first = success(rows["b1"], batches("w", "x_1"))
    second = success(rows["b2"], batches("w_x", "1"))
    with pytest.raises(ValidationError) as refused:
        await complete(conn, first, second)
    assert refused.value.sqlstate == "TV030"
    assert "can no longer be applied" in str(refused.value)
    assert "'w_x_1'" in str(refused.value)
    assert await names_of(conn, task) == {"b1", "b2", "w_7"}
    await assert_healthy(conn)
    answer = await complete(conn, first)
    assert answer[str(rows["b1"]["step_uuid"])]["detail"] == "complete"
    answer = await complete(conn, second)
    assert answer[str(rows["b2"]["step_uuid"])]["detail"] == "error"
    assert "'w_x_1' already in this task" in (await analyzer_error(conn, rows["b2"]))["message"]
    assert await names_of(conn, task) == {"b1", "b2", "w_7", "w_x_1", "agg"}
    await counters_ok(conn, task)
    await assert_healthy(conn)


def two_pipelines(name: str) -> dict[str, Any]:
    return template(
        name,
        [
            step("start"),
            step("route", "start", type="decision"),
            step("left", "route", type="batchable"),
            step("left_w", "left", type="batch_worker"),
            step("left_agg", "left_w", type="deferred_convergence"),
            step("right", "route", type="batchable"),
            step("right_w", "right", type="batch_worker"),
            step("right_agg", "right_w", type="deferred_convergence"),
            step("done", "left_agg", "right_agg", type="deferred_convergence"),
        ],
    )


@pytest.mark.parametrize("order", ["left_first", "right_first", "interleaved"])
async def test_convergence_after_two_batch_pipelines_waits_for_both(
    conn: db.Connection, order: str
) -> None:
    task = await start(conn, two_pipelines(f"two_{order}"))
    [s] = await claim(conn)
    await complete(conn, success(s))
    [r] = await claim(conn)
    await complete(conn, success(r, decide("left", "right")))
    analyzers = {x["step_name"]: x for x in await claim(conn)}
    assert set(analyzers) == {"left", "right"}
    first, second = ("left", "right") if order != "right_first" else ("right", "left")
    await complete(conn, success(analyzers[first], batches(f"{first}_w", "1", "2")))
    fw = await claim(conn)
    if order == "interleaved":
        await complete(conn, success(fw[0]))
    for w in fw[1 if order == "interleaved" else 0 :]:
        await complete(conn, success(w))
    [agg] = await claim(conn)
    assert agg["step_name"] == f"{first}_agg"
    await complete(conn, success(agg))
    # the first aggregate is done; `done` still waits for the second pipeline
    assert (await step_states(conn, task))["done"] == "pending"
    assert await claim(conn) == []
    await complete(conn, success(analyzers[second], batches(f"{second}_w", "1")))
    await drive(conn, NAMESPACE, lambda x: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await counters_ok(conn, task)
    await assert_healthy(conn)


# --- races ------------------------------------------------------------------------------------


async def _run_while_other_holds(
    conn: db.Connection, holder: db.Connection, other: db.Connection, outcome: dict[str, Any]
) -> None:
    """`holder` has applied an outcome in an open transaction; apply `outcome` on `other`,
    wait until it has finished or waits for a lock, then commit `holder` and let it finish."""
    pid = await other.fetchval("SELECT pg_backend_pid()")
    job = asyncio.ensure_future(complete(other, outcome))
    for _ in range(500):
        if job.done():
            break
        waiting = await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            break
        await asyncio.sleep(0.01)
    await holder.execute("COMMIT")
    await job


async def test_two_decisions_racing_for_one_convergence(conn: db.Connection, sessions: Any) -> None:
    """The second decision's recompute must see the first one's convergence and choice: it
    waits for the task's dynamic lock (without it, `c` would keep counting `b` forever)."""
    tpl = template(
        "race_decisions",
        [
            step("s"),
            step("d1", "s", type="decision"),
            step("d2", "s", type="decision"),
            step("a", "d1"),
            step("b", "d2"),
            step("c", "a", "b", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    [s] = await claim(conn)
    await complete(conn, success(s))
    rows = {r["step_name"]: r for r in await claim(conn)}
    one, two = await sessions(2)
    await one.execute("BEGIN")
    await complete(one, success(rows["d1"], decide("a")))
    await _run_while_other_holds(conn, one, two, success(rows["d2"], decide()))
    await drive(conn, NAMESPACE, lambda r: None)
    assert await names_of(conn, task) == {"s", "d1", "d2", "a", "c"}
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_decision_recompute_waits_for_a_parent_completing_concurrently(
    conn: db.Connection, sessions: Any
) -> None:
    """A parent of the convergence completes in an open transaction (it holds the convergence
    row); the decision's recompute must run after it commits, in a fresh statement (computed
    in the statement that waited for the row, the parent would count as pending forever)."""
    tpl = template(
        "race_parent",
        [
            step("s"),
            step("s2", "s"),
            step("d", "s", type="decision"),
            step("a", "d"),
            step("c", "s2", "a", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)
    [s] = await claim(conn)
    await complete(conn, success(s))
    rows = {r["step_name"]: r for r in await claim(conn)}
    one, two = await sessions(2)
    await one.execute("BEGIN")
    await complete(one, success(rows["s2"]))
    await _run_while_other_holds(conn, one, two, success(rows["d"], decide()))
    await drive(conn, NAMESPACE, lambda r: None)
    assert await names_of(conn, task) == {"s", "s2", "d", "c"}
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_readiness_tells_created_steps_from_branches_not_taken(conn: db.Connection) -> None:
    task = await start(conn, approval("approval_explain"), {"amount": 1})
    r = {x["name"]: x for x in await conn.step_readiness(task)}
    assert r["auto_approve"]["state"] == "not_created"
    assert r["auto_approve"]["step_uuid"] is None
    assert r["auto_approve"]["reason"] == "not created yet: waits for decision `routing_decision`"
    assert r["finalize"]["reason"] == "not created yet: created once a step it lists is created"
    ctx = await conn.task_execution_context(task)
    assert ctx is not None and ctx["total_steps"] == 2
    [v] = await claim(conn)
    await complete(conn, success(v))
    [d] = await claim(conn)
    await complete(conn, success(d, decide("auto_approve")))
    r = {x["name"]: x for x in await conn.step_readiness(task)}
    assert r["manager_approval"]["reason"] == (
        "not created: decision `routing_decision` chose [auto_approve]"
    )
    assert r["auto_approve"]["state"] == "enqueued"
    assert r["finalize"]["state"] == "pending"
    assert r["finalize"]["reason"] == "waiting for auto_approve"
    await drive(conn, NAMESPACE, lambda x: None)
    await assert_healthy(conn)


async def test_readiness_of_steps_that_can_no_longer_be_created(conn: db.Connection) -> None:
    tpl = template(
        "gone",
        [
            step("s"),
            step("d1", "s", type="decision"),
            step("d2", "d1", type="decision"),
            step("x", "d2"),
            step("b", "s", type="batchable"),
            step("w1", "b", type="batch_worker"),
            step("w2", "b", type="batch_worker"),
            step("agg", "w1", "w2", type="deferred_convergence"),
        ],
    )
    task = await start(conn, tpl)

    def handler(row: Row) -> Any:
        if row["step_name"] == "d1":
            return decide()
        if row["step_name"] == "b":
            return batches("w2", "1")
        return None

    await drive(conn, NAMESPACE, handler)
    assert (await task_row(conn, task))["state"] == "complete"
    reasons = {
        r["name"]: r["reason"]
        for r in await conn.step_readiness(task)
        if r["state"] == "not_created"
    }
    assert reasons == {
        "d2": "not created: decision `d1` chose []",
        "x": "not created: a step it depends on was not created (branch not taken)",
        "w1": "not created: batchable step `b` created workers of `w2`",
    }
    await assert_healthy(conn)


async def test_readiness_of_a_convergence_waiting_for_a_fan_out(conn: db.Connection) -> None:
    task = await start(conn, two_pipelines("two_explain"))
    [s] = await claim(conn)
    await complete(conn, success(s))
    [d] = await claim(conn)
    await complete(conn, success(d, decide("left", "right")))
    [left, right] = sorted(await claim(conn), key=lambda x: x["step_name"])
    await complete(conn, success(left, batches("left_w", "1", "2")))
    r = {x["name"]: x for x in await conn.step_readiness(task)}
    assert r["right_w"]["reason"] == "not created yet: waits for batchable step `right`"
    assert r["left_agg"]["reason"] == "waiting for left_w_1, left_w_2"
    assert r["done"]["reason"].startswith("waiting for left_agg and 1 listed step(s) not created")
    await complete(conn, success(right, batches("right_w", "1")))
    await drive(conn, NAMESPACE, lambda x: None)
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_thousand_workers_and_a_bounded_claim_row(conn: db.Connection) -> None:
    """1000 workers (the default limit) from one outcome; the aggregate's claim row carries the
    workers' results only up to max_claim_dependency_bytes and says it is partial."""
    task = await start(conn, pipeline("batch_1000"))
    [a] = await claim(conn)
    ids = [f"{i:04d}" for i in range(1, 1001)]
    started = time.perf_counter()
    answer = await complete(conn, success(a, batches("process_batch", *ids)))
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"fan-out of 1000 workers: complete_steps took {elapsed_ms:.1f} ms")
    assert answer[str(a["step_uuid"])]["detail"] == "complete"
    assert (await task_row(conn, task))["total_steps"] == 1002
    await conn.execute(
        "UPDATE tasker.settings SET value = 2048 WHERE name = 'max_claim_dependency_bytes'"
    )
    try:
        seen: dict[str, Any] = {}

        def handler(row: Row) -> Any:
            if row["step_name"] == "aggregate":
                seen.update(row)
                return {"total": 1000}
            return {"n": 1}

        await drive(conn, NAMESPACE, handler, qty=500)
    finally:
        await conn.execute(
            "UPDATE tasker.settings SET value = 262144 WHERE name = 'max_claim_dependency_bytes'"
        )
    workers = [k for k in seen["dependency_results"] if k.startswith("process_batch_")]
    assert 0 < len(workers) < 1000
    assert workers == sorted(workers)[: len(workers)]
    assert sorted(workers) == [f"process_batch_{i}" for i in ids[: len(workers)]]
    assert seen["dependency_results_partial"] is True
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)


async def test_a_small_fan_out_claim_row_is_complete(conn: db.Connection) -> None:
    task = await start(conn, pipeline("batch_small_claim"))
    seen: dict[str, Any] = {}

    def handler(row: Row) -> Any:
        if row["step_name"] == "analyze":
            return batches("process_batch", "1", "2")
        if row["step_name"] == "aggregate":
            seen.update(row)
        return None

    await drive(conn, NAMESPACE, handler)
    assert set(seen["dependency_results"]) == {"analyze", "process_batch_1", "process_batch_2"}
    assert seen["dependency_results_partial"] is False
    assert (await task_row(conn, task))["state"] == "complete"
    await assert_healthy(conn)
