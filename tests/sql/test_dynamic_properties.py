"""Conditional and batch workflows, drawn by hypothesis and driven from SQL.

Each example draws a valid template mixing standard steps, decisions (nested ones inside the
branches they create), batchable analyzers with one or two batch_worker templates, and
deferred_convergence steps; registers it with `tasker.register_template` (the Python loader
must give the same verdict and the same normalised body); creates a task and drives it with
`claim_steps` / `complete_steps`, deciding at random which branches each decision creates (any
subset, none is no_branches), how many workers each analyzer creates (none is no_batches),
which steps fail for good (a failure, or a decision or fan-out outcome the engine refuses), and
how the outcomes of a round are split into `complete_steps` calls. Then the failed steps are
retried or resolved by hand, and the task is driven to its end.

What must hold:

- `tasker.check_invariants()` is empty after every call that changes the task;
- each outcome gets the state its kind says (a refused decision or fan-out outcome: error);
- the task ends `complete`, or `error` exactly when a created step failed for good; in error
  nothing holds a message or runs, and once the failed steps are retried or resolved the task
  completes: every created step ran (or was resolved);
- the steps that exist are exactly those the decisions and fan-outs chose (a model computes
  them from the recorded choices), and step_readiness lists every other template step as not
  created (for good, once the task is complete);
- the task's counters equal its steps in `tasker.v_steps`;
- no step ran before every created step it depends on (a convergence: every listed step that
  ever exists) was complete.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tasker_pg import db
from tasker_pg.template import TaskTemplate
from tests.support.engine import (
    Row,
    assert_healthy,
    claim,
    failure,
    message_count,
    step,
    success,
    template,
)

if TYPE_CHECKING:
    from tests.support.pgserver import TestServer

T = TypeVar("T")

pytestmark = pytest.mark.timeout(900)  # a failure's shrinking replays many examples

NS = "dynprop"
MAX_STEPS = 16
"""Templates stop growing at about this many steps."""
BATCH_IDS = [f"b{i}" for i in range(6)]

EXAMPLES = 50


# --- templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A drawn template: each step's type and dependencies, in declared order."""

    types: dict[str, str]
    deps: dict[str, list[str]]
    order: list[str]

    def children(self, decision: str) -> list[str]:
        """The steps `decision` can create (its children that are not convergences)."""
        return [
            n
            for n in self.order
            if decision in self.deps[n] and self.types[n] != "deferred_convergence"
        ]

    def workers(self, batchable: str) -> list[str]:
        """The batch_worker templates of `batchable`, in declared order."""
        return [
            n for n in self.order if self.types[n] == "batch_worker" and self.deps[n] == [batchable]
        ]

    @functools.cached_property
    def dynamic(self) -> frozenset[str]:
        """The steps not created with a task (as the Python loader classifies them)."""
        return TaskTemplate.from_dict(self.body("shape")).dynamic_steps

    def body(self, name: str) -> dict[str, Any]:
        steps = []
        for n in self.order:
            extra: dict[str, Any] = {}
            if self.types[n] != "standard":
                extra["type"] = self.types[n]
            steps.append(step(n, *self.deps[n], **extra))
        return template(name, steps, namespace=NS)


_PREFIX = {
    "standard": "s",
    "decision": "d",
    "batchable": "a",
    "batch_worker": "w",
    "deferred_convergence": "c",
}


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    types: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    counter = itertools.count()

    def new(kind: str, parents: list[str]) -> str:
        name = f"{_PREFIX[kind]}{next(counter)}"
        types[name] = kind
        deps[name] = parents
        return name

    def room() -> bool:
        return len(types) < MAX_STEPS

    def plain(min_size: int) -> list[str]:
        """Dependencies of a standard, decision or batchable step: one or two steps that are
        neither a decision (its children depend on nothing else) nor a batch worker."""
        pool = [n for n, t in types.items() if t not in ("decision", "batch_worker")]
        return draw(st.lists(st.sampled_from(pool), min_size=min_size, max_size=2, unique=True))

    def decision(parents: list[str], depth: int) -> None:
        d = new("decision", parents)
        for _ in range(draw(st.integers(1, 3))):
            kind = (
                draw(st.sampled_from(["standard", "decision", "batch"]))
                if depth < 2
                else "standard"
            )
            if kind == "decision" and room():
                decision([d], depth + 1)
            elif kind == "batch" and room():
                batch([d])
            else:
                child = new("standard", [d])
                if draw(st.integers(0, 2)) == 0:
                    new("standard", [child])  # downstream of a branch

    def batch(parents: list[str]) -> None:
        a = new("batchable", parents)
        workers = [new("batch_worker", [a]) for _ in range(draw(st.integers(1, 2)))]
        if draw(st.integers(0, 3)) > 0:
            agg = new("deferred_convergence", workers)
            if draw(st.booleans()):
                new("standard", [agg])

    new("standard", [])
    if draw(st.booleans()):
        new("standard", [])
    for index in range(draw(st.integers(1, 4))):
        if not room():
            break
        kinds = ["decision", "batch"] + (["standard", "convergence"] if index else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "standard":
            new("standard", plain(1))  # may join branches of different decisions
        elif kind == "decision":
            decision(plain(1), 0)
        elif kind == "batch":
            batch(plain(0))
        else:
            listed = draw(
                st.lists(st.sampled_from(sorted(types)), min_size=1, max_size=3, unique=True)
            )
            new("deferred_convergence", listed)
    order = draw(st.permutations(list(types)))
    return Shape(types=types, deps=deps, order=list(order))


# --- the model --------------------------------------------------------------------------------


@dataclass
class Choices:
    """What the applied outcomes chose."""

    decided: dict[str, list[str]] = field(default_factory=dict)
    """decision -> the children it created"""
    fanned: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """batchable -> (worker template, batch ids); no_batches: ids ["000"]"""


def expected_steps(shape: Shape, choices: Choices) -> dict[str, str]:
    """{step name: template step name} of the steps a task has after these choices: every
    step with no decision parent whose dependencies all exist, the children each decision
    chose, the workers of each fan-out, and every convergence listing a step that exists
    (a convergence listing a decision is dynamic: created by a listed step created at run
    time, or once a listed decision or batchable step has applied its outcome)."""
    dynamic = shape.dynamic
    applied = set(choices.decided) | set(choices.fanned)
    made: dict[str, str] = {}
    created: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name in shape.order:
            if name in created:
                continue
            kind, deps = shape.types[name], shape.deps[name]
            names = [name]
            if kind == "batch_worker":
                fan = choices.fanned.get(deps[0])
                ok = fan is not None and fan[0] == name
                names = [f"{name}_{i}" for i in fan[1]] if fan is not None and ok else []
            elif kind == "deferred_convergence" and name in dynamic:
                ok = any(d in created and (d in dynamic or d in applied) for d in deps)
            elif kind == "deferred_convergence":
                ok = True
            elif deps and shape.types[deps[0]] == "decision":
                ok = name in choices.decided.get(deps[0], [])
            else:
                ok = all(d in created for d in deps)
            if ok:
                created.add(name)
                made.update(dict.fromkeys(names, name))
                changed = True
    return made


# --- the database -----------------------------------------------------------------------------


class Env:
    """One database for the whole property, on a loop of its own (hypothesis calls the test
    synchronously). Every example registers its own template and ends with its task finished
    or cancelled, so the namespace's queue is empty between examples."""

    def __init__(self, server: TestServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.dsn = self.run(server.create_database())
        self.conn: db.Connection = self.run(db.connect(self.dsn))
        self.examples = itertools.count()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.conn.close())
        self.run(self.server.drop_database(self.dsn))
        self.loop.close()


@pytest.fixture(scope="module")
def env(pg_server: TestServer) -> Iterator[Env]:
    environment = Env(pg_server)
    try:
        yield environment
    finally:
        environment.close()


def decide(names: list[str]) -> dict[str, Any]:
    if not names:
        return {"decision_point_outcome": {"type": "no_branches"}, "reason": "none"}
    return {"decision_point_outcome": {"type": "create_steps", "step_names": names}}


def fan_out(worker: str, ids: list[str]) -> dict[str, Any]:
    configs = [
        {"batch_id": b, "start_cursor": 10 * i, "end_cursor": 10 * i + 10, "batch_size": 10}
        for i, b in enumerate(ids)
    ]
    return {
        "batch_processing_outcome": {
            "type": "create_batches",
            "worker_template_name": worker,
            "cursor_configs": configs,
            "total_items": 10 * len(ids),
        }
    }


class Run:
    """One task of one example: draws the outcomes, keeps what they chose, checks as it goes."""

    def __init__(self, env: Env, shape: Shape, data: st.DataObject) -> None:
        self.env = env
        self.conn = env.conn
        self.shape = shape
        self.data = data
        self.choices = Choices()
        self.failed: dict[str, Any] = {}  # step name -> step uuid, failed for good
        # each claim: (step, its template step, every step's state at the claim)
        self.claims: list[tuple[str, str, dict[str, str]]] = []
        self.task: Any = None

    def draw(self, strategy: st.SearchStrategy[T]) -> T:
        return self.data.draw(strategy)

    # -- outcomes --

    def result(self, tpl: str) -> tuple[Any, tuple[str, Any] | None]:
        """A valid success result for template step `tpl`, and what it chooses."""
        kind = self.shape.types[tpl]
        if kind == "decision":
            children = self.shape.children(tpl)
            chosen = []
            if self.draw(st.integers(0, 3)) > 0:
                chosen = self.draw(st.lists(st.sampled_from(children), min_size=1, unique=True))
            return decide(chosen), ("decided", chosen)
        if kind == "batchable":
            workers = self.shape.workers(tpl)
            count = self.draw(st.integers(0, 3))
            if count == 0:
                out: dict[str, Any] = {"type": "no_batches", "reason": "empty"}
                worker = workers[0]  # the first in declared order, unless one is named
                if self.draw(st.booleans()):
                    worker = self.draw(st.sampled_from(workers))
                    out["worker_template_name"] = worker
                return {"batch_processing_outcome": out}, ("fanned", (worker, ["000"]))
            worker = self.draw(st.sampled_from(workers))
            ids = self.draw(
                st.lists(st.sampled_from(BATCH_IDS), min_size=count, max_size=count, unique=True)
            )
            return fan_out(worker, ids), ("fanned", (worker, ids))
        return {"step": tpl}, None

    def outcome(
        self, row: Row, allow_failure: bool
    ) -> tuple[dict[str, Any], str, tuple[str, Any] | None]:
        """(the outcome for claim `row`, the state it must lead to, what it chooses)."""
        tpl = row["config"]["step"]
        kind = self.shape.types[tpl]
        if allow_failure and self.draw(st.integers(0, 11)) == 0:
            how = self.draw(st.sampled_from(["failure", "refused"]))
            if how == "refused" and kind == "decision":
                bad = {"decision_point_outcome": {"type": "create_steps", "step_names": []}}
                return success(row, bad), "error", None
            if how == "refused" and kind == "batchable":
                return success(row, fan_out("no_such_worker", ["b0"])), "error", None
            return failure(row, "drawn to fail", retryable=False), "error", None
        result, chosen = self.result(tpl)
        return success(row, result), "complete", chosen

    def record(self, name: str, chosen: tuple[str, Any] | None) -> None:
        if chosen is None:
            return
        what, value = chosen
        if what == "decided":
            self.choices.decided[name] = value
            event("decision: " + ("no_branches" if not value else "create_steps"))
        else:
            self.choices.fanned[name] = value
            event("fan-out: " + ("no_batches" if value[1] == ["000"] else "create_batches"))

    # -- driving --

    async def states(self) -> dict[str, str]:
        rows = await self.conn.fetch(
            "SELECT name, state FROM tasker.steps WHERE task_uuid = $1", self.task
        )
        return {r["name"]: r["state"] for r in rows}

    async def drive(self, allow_failure: bool) -> None:
        """Claim everything ready, answer it in randomly split complete_steps calls, repeat
        until nothing is claimable."""
        for _ in range(200):
            # by name: the claim order follows step uuids, which differ from run to run, and
            # hypothesis must draw the same choices for the same steps when it replays
            rows = sorted(
                await claim(self.conn, NS, qty=500, worker="prop"), key=lambda r: r["step_name"]
            )
            if not rows:
                return
            assert {str(r["task_uuid"]) for r in rows} == {str(self.task)}
            states = await self.states()
            planned = []
            for row in rows:
                self.claims.append((row["step_name"], row["config"]["step"], states))
                planned.append((row, *self.outcome(row, allow_failure)))
            while planned:
                size = self.draw(st.integers(1, len(planned)))
                chunk, planned = planned[:size], planned[size:]
                answer = await self.conn.complete_steps([c[1] for c in chunk])
                await assert_healthy(self.conn)
                for (row, _, state, chosen), got in zip(chunk, answer, strict=True):
                    assert (got["status"], got["detail"]) == ("applied", state), (
                        row["step_name"],
                        dict(got),
                    )
                    if state == "complete":
                        self.record(row["step_name"], chosen)
                    else:
                        self.failed[row["step_name"]] = row["step_uuid"]
        raise AssertionError("still claiming after 200 rounds")

    async def recover(self) -> None:
        """Retry or resolve (with a drawn result) every step that failed for good."""
        for name, step_uuid in sorted(self.failed.items()):
            # a step is named as its template step, a worker {template step}_{batch id}
            tpl = name if name in self.shape.types else name.rsplit("_", 1)[0]
            if self.draw(st.booleans()):
                await self.conn.retry_step(step_uuid)
            else:
                result, chosen = self.result(tpl)
                await self.conn.resolve_step(step_uuid, result)
                self.record(name, chosen)
            await assert_healthy(self.conn)
        self.failed.clear()

    # -- checks --

    async def check_steps(self, finished: bool) -> dict[str, str]:
        """The steps that exist are the model's; the counters are the steps'; what was not
        created is listed as such. Returns {step: state}."""
        made = expected_steps(self.shape, self.choices)
        states = await self.states()
        assert set(states) == set(made), (sorted(states), sorted(made), self.choices)
        task = await self.conn.fetchrow(
            "SELECT state, total_steps, completed_steps, error_steps FROM tasker.v_tasks"
            " WHERE task_uuid = $1",
            self.task,
        )
        assert task is not None
        counts = await self.conn.fetchrow(
            "SELECT count(*) AS total,"
            " count(*) FILTER (WHERE state IN ('complete', 'resolved_manually')) AS done,"
            " count(*) FILTER (WHERE state = 'error') AS error"
            " FROM tasker.v_steps WHERE task_uuid = $1",
            self.task,
        )
        assert counts is not None
        assert (task["total_steps"], task["completed_steps"], task["error_steps"]) == (
            counts["total"],
            counts["done"],
            counts["error"],
        )
        readiness = await self.conn.step_readiness(self.task)
        not_created = {r["name"]: r["reason"] for r in readiness if r["state"] == "not_created"}
        assert set(not_created) == set(self.shape.types) - set(made.values())
        assert {r["name"] for r in readiness if r["state"] != "not_created"} == set(states)
        if finished:
            for name, reason in not_created.items():
                assert reason.startswith("not created: "), (name, reason)
        return states

    def check_claim_order(self) -> None:
        """No step was claimed before every step it depends on that exists at the end was
        complete (a convergence: every listed step that was ever created)."""
        made = expected_steps(self.shape, self.choices)
        for name, tpl, states in self.claims:
            for parent in self.shape.deps[tpl]:
                for instance in (n for n, t in made.items() if t == parent):
                    assert states.get(instance) in ("complete", "resolved_manually"), (
                        f"{name} claimed while {instance} was {states.get(instance)}"
                    )


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(shape=shapes(), data=st.data())
def test_random_dynamic_workflows_end_as_their_choices_say(
    env: Env, shape: Shape, data: st.DataObject
) -> None:
    env.run(_example(env, shape, data))


async def _example(env: Env, shape: Shape, data: st.DataObject) -> None:
    conn = env.conn
    name = f"p{next(env.examples)}"
    body = shape.body(name)
    model = TaskTemplate.from_dict(body)
    # the loader and SQL agree: the same normalised body, the same dynamic steps
    tid = await conn.fetchval("SELECT tasker.register_template($1::jsonb)", body)
    stored = await conn.fetchrow(
        "SELECT template::text AS body, step_count FROM tasker.named_tasks"
        " WHERE named_task_id = $1",
        tid,
    )
    assert stored is not None
    assert json.loads(stored["body"]) == model.to_json()
    assert stored["step_count"] == len(model.static_steps)
    dynamic = await conn.fetch(
        "SELECT name FROM tasker.named_steps WHERE named_task_id = $1 AND is_dynamic", tid
    )
    assert {r["name"] for r in dynamic} == set(model.dynamic_steps)

    run = Run(env, shape, data)
    run.task = await conn.create_task(NS, name, {}, version="1.0.0")
    try:
        assert set(await run.states()) == set(model.static_steps)
        await assert_healthy(conn)
        await run.drive(allow_failure=True)
        state = await conn.fetchrow("SELECT state FROM tasker.tasks WHERE task_uuid = $1", run.task)
        assert state is not None
        # (pytest --hypothesis-show-statistics counts these)
        event(f"task after the first drive: {state['state']}")
        nested = any(shape.types[n] == "decision" for n in model.dynamic_steps)
        event(f"template with a decision inside a branch: {nested}")
        if run.failed:
            assert state["state"] == "error"
            states = await run.check_steps(finished=False)
            assert {n for n, s in states.items() if s == "error"} == set(run.failed)
            # parked: nothing runs, nothing holds a message
            assert not {s for s in states.values()} & {"in_progress", "waiting_for_retry"}
            assert await message_count(conn, run.task) == 0
            await run.recover()
            await run.drive(allow_failure=False)
            state = await conn.fetchrow(
                "SELECT state FROM tasker.tasks WHERE task_uuid = $1", run.task
            )
            assert state is not None
        assert state["state"] == "complete"
        states = await run.check_steps(finished=True)
        assert set(states.values()) <= {"complete", "resolved_manually"}, states
        run.check_claim_order()
        await assert_healthy(conn)
    finally:
        row = await conn.fetchrow("SELECT state FROM tasker.tasks WHERE task_uuid = $1", run.task)
        if row is not None and row["state"] not in ("complete", "cancelled"):
            await conn.cancel_task(run.task)
