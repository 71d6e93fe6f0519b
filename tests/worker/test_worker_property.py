"""Property test: random DAGs with randomly (but reproducibly) failing steps, run by 2 workers.

For every DAG hypothesis draws (up to 12 steps): every task completes, every step's result is
committed exactly once and is the value the DAG implies (so no stale or duplicate outcome won),
every step saw exactly its ancestors' results, and tasker.check_invariants() holds.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasker_pg import Worker, db
from tasker_pg.template import TaskTemplate
from tests.support.worker import (
    assert_each_completed_once,
    assert_invariants,
    registry_of,
    steps_of,
    wait_final,
)
from tests.support.workflows import prop_handlers
from tests.support.workflows.prop_handlers import MAX_FAILURES

if TYPE_CHECKING:
    from tests.support.pgserver import TestServer

pytestmark = pytest.mark.slow

TASKS_PER_DAG = 3


@dataclass(frozen=True)
class Dag:
    parents: tuple[tuple[int, ...], ...]  # parents[i]: indexes < i
    handlers: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.parents)

    def ancestors(self, i: int) -> set[int]:
        seen: set[int] = set()
        pending = list(self.parents[i])
        while pending:
            j = pending.pop()
            if j not in seen:
                seen.add(j)
                pending.extend(self.parents[j])
        return seen

    def values(self) -> list[int]:
        values: list[int] = []
        for i in range(self.size):
            values.append(1 + sum(values[p] for p in self.parents[i]))
        return values

    def template(self, name: str) -> TaskTemplate:
        return TaskTemplate.from_dict(
            {
                "name": name,
                "namespace_name": "prop",
                "version": "1.0.0",
                "steps": [
                    {
                        "name": f"s{i}",
                        "handler": {
                            "callable": self.handlers[i],
                            "initialization": {"parents": [f"s{p}" for p in self.parents[i]]},
                        },
                        "dependencies": [f"s{p}" for p in self.parents[i]],
                        "retry": {
                            "max_attempts": MAX_FAILURES + 1,
                            "backoff": "fixed",
                            "backoff_base_ms": 10,
                        },
                    }
                    for i in range(self.size)
                ],
            }
        )


@st.composite
def dags(draw: st.DrawFn) -> Dag:
    size = draw(st.integers(min_value=1, max_value=12))
    parents: list[tuple[int, ...]] = []
    for i in range(size):
        chosen = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=min(i, 3))) if i else []
        parents.append(tuple(sorted(chosen)))
    handlers = draw(
        st.lists(st.sampled_from(["prop.sync", "prop.async"]), min_size=size, max_size=size)
    )
    return Dag(tuple(parents), tuple(handlers))


async def run_dag(server: TestServer, dag: Dag, seeds: list[int]) -> None:
    dsn = await server.create_database()
    try:
        conn = await db.connect(dsn)
        try:
            await check_dag(dsn, conn, dag, seeds)
        finally:
            await conn.close()
    finally:
        await server.drop_database(dsn)


async def check_dag(dsn: str, conn: db.Connection, dag: Dag, seeds: list[int]) -> None:
    template = dag.template("random_dag")
    registry = registry_of(prop_handlers)
    options: dict[str, Any] = {
        "dsn": dsn,
        "concurrency": 3,
        "poll_interval": 0.05,
        "summary_interval": 0,
    }
    first = Worker(["prop"], registry, templates=[template], worker_id="p1", **options)
    second = Worker(["prop"], registry, worker_id="p2", **options)
    async with first, second:
        async with conn.transaction():
            tasks: list[uuid.UUID] = [
                await conn.create_task("prop", "random_dag", {"seed": seed}) for seed in seeds
            ]
        states = await wait_final(conn, tasks, timeout=40)
    assert set(states.values()) == {"complete"}, states

    expected = dag.values()
    for seed, task in zip(seeds, tasks, strict=True):
        steps = await steps_of(conn, task)
        for i in range(dag.size):
            step = steps[f"s{i}"]
            failures = prop_handlers.planned_failures(seed, f"s{i}")
            assert step["results"]["value"] == expected[i]
            assert step["results"]["saw"] == sorted(f"s{a}" for a in dag.ancestors(i))
            # The planned failures, then one success (a crash could add lost-lease attempts,
            # but nothing here crashes).
            assert step["attempts"] == failures + 1
            assert step["results"]["attempt"] == failures + 1
    await assert_each_completed_once(conn, tasks)
    await assert_invariants(conn)
    assert first.stats.stale + second.stats.stale == 0


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    dag=dags(),
    seeds=st.lists(st.integers(0, 2**31), min_size=TASKS_PER_DAG, max_size=TASKS_PER_DAG),
)
def test_random_dags_complete_once_under_two_workers(
    pg_server: TestServer, dag: Dag, seeds: list[int]
) -> None:
    asyncio.run(run_dag(pg_server, dag, seeds))
