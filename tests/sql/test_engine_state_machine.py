"""A rule-based state machine over the SQL API: every engine call in random order.

Hypothesis creates tasks, claims, completes, fails (retryably and for good), checkpoints, loses
leases, cancels, retries and resolves, in any order, with zombie outcomes from lost claims
mixed in. After every rule:

- `tasker.check_invariants()` is empty;
- readiness agrees with the claim: for every waiting step of the machine's tasks,
  `step_readiness` calls it ready exactly when `claim_steps` (run in a transaction that is
  rolled back) would hand it out;
- the model holds: no step completes twice, no step completes before its parents, a
  complete task has every step finished, and an applied outcome came from the current claim.

The engine's rules (what a lost lease or a retry leads to) are not modelled: the checks above
are what must hold whatever they are.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tasker_pg import db
from tests.support import pgserver
from tests.support.engine import (
    NAMESPACE,
    checkpoint,
    diamond,
    failure,
    linear,
    single,
    success,
)

pytestmark = pytest.mark.slow

RETRY = {"max_attempts": 2, "backoff": "none"}
TEMPLATES = {
    "single": single(retry=RETRY),
    "linear": linear(3, retry=RETRY),
    "diamond": diamond(retry=RETRY),
}
# Which steps a step's completion needs, by template.
PARENTS = {
    name: {s["name"]: list(s["dependencies"]) for s in t["steps"]} for name, t in TEMPLATES.items()
}


class EngineMachine(RuleBasedStateMachine):
    """The machine's state lives in the database; `claims` holds what workers still hold."""

    server: pgserver.TestServer  # set by the test

    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dsn = self.loop.run_until_complete(self.server.create_database())
        self.conn = self.loop.run_until_complete(db.connect(self.dsn))
        for tpl in TEMPLATES.values():
            self.run(self.conn.register_template(tpl))
        self.tasks: dict[uuid.UUID, str] = {}  # task -> template name
        self.completions: dict[uuid.UUID, int] = {}  # step -> applied successes
        self.worker = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.conn.close())
            self.run(self.server.drop_database(self.dsn))
        finally:
            self.loop.close()

    # --- rules ------------------------------------------------------------------------------

    @rule(template=st.sampled_from(sorted(TEMPLATES)), priority=st.integers(0, 3))
    def create(self, template: str, priority: int) -> None:
        task = self.run(
            self.conn.create_task(
                NAMESPACE, template, {}, version="1.0.0", options={"priority": priority}
            )
        )
        self.tasks[task] = template

    @rule(target=claims, qty=st.integers(1, 4))
    def claim(self, qty: int) -> Any:
        self.worker += 1
        rows = self.run(self.conn.claim_step_rows(NAMESPACE, f"w{self.worker}", qty, 3600.0))
        return multiple(*rows)

    @rule(held=consumes(claims), result=st.integers(0, 9))
    def succeed(self, held: Any, result: int) -> None:
        self._complete(held, success(held, {"r": result}))

    @rule(held=consumes(claims), retryable=st.booleans())
    def fail(self, held: Any, retryable: bool) -> None:
        self._complete(held, failure(held, retryable=retryable, retry_after=0))

    @rule(held=consumes(claims), cursor=st.integers(0, 5))
    def checkpoint(self, held: Any, cursor: int) -> None:
        self._complete(held, checkpoint(held, cursor=cursor, items_processed=cursor))

    @rule(held=claims)
    def lose_lease(self, held: Any) -> None:
        """The worker stalls past its lease: the claim stays in the bundle as a zombie."""
        self.run(
            self.conn.execute(
                """
                UPDATE tasker.queue_messages m SET vt = clock_timestamp() - interval '1 second'
                  FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
                 WHERE s.step_uuid = $1 AND s.claim_seq = $2 AND s.state = 'in_progress'
                   AND m.queue = t.namespace AND m.msg_id = s.msg_id
                """,
                held["step_uuid"],
                held["claim_seq"],
            )
        )

    @rule(held=consumes(claims))
    def release(self, held: Any) -> None:
        fence = {
            "step_uuid": str(held["step_uuid"]),
            "attempt": held["attempt"],
            "claim_seq": held["claim_seq"],
        }
        self.run(self.conn.release_steps([fence]))

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(list(self.tasks)))
        state = self.run(
            self.conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", task)
        )
        if state not in ("complete", "cancelled", "resolved_manually"):
            self.run(self.conn.cancel_task(task, "machine"))

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        failed = self._steps_in("error")
        if failed:
            self.run(self.conn.retry_step(data.draw(st.sampled_from(failed))))

    @precondition(lambda self: bool(self.tasks))
    @rule(
        data=st.data(),
        state=st.sampled_from(["error", "pending", "enqueued", "in_progress", "waiting_for_retry"]),
    )
    def resolve(self, data: st.DataObject, state: str) -> None:
        steps = self._steps_in(state)
        if steps:
            step = data.draw(st.sampled_from(steps))
            self.run(self.conn.resolve_step(step, {"by": "hand"}))

    # --- checks -----------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        assert [dict(v) for v in self.run(self.conn.check_invariants())] == []

    @invariant()
    def readiness_agrees_with_claim(self) -> None:
        if not self.tasks:
            return
        self.run(self._readiness_agrees_with_claim())

    @invariant()
    def model_holds(self) -> None:
        rows = self.run(
            self.conn.fetch(
                """
                SELECT s.task_uuid, s.name, s.state, t.state AS task_state,
                       (SELECT count(*) FROM tasker.step_transitions tr
                         WHERE tr.step_uuid = s.step_uuid AND tr.to_state = 'complete')
                           AS completions,
                       (SELECT min(tr.transition_id) FROM tasker.step_transitions tr
                         WHERE tr.step_uuid = s.step_uuid
                           AND tr.to_state IN ('complete', 'resolved_manually')) AS finished_at
                  FROM tasker.steps s JOIN tasker.tasks t USING (task_uuid)
                 WHERE s.task_uuid = ANY($1::uuid[])
                """,
                list(self.tasks),
            )
        )
        by_task: dict[uuid.UUID, dict[str, Any]] = {}
        for r in rows:
            by_task.setdefault(r["task_uuid"], {})[r["name"]] = r
            assert r["completions"] <= 1, f"{r['name']} of {r['task_uuid']} completed twice"
        for task, steps in by_task.items():
            parents = PARENTS[self.tasks[task]]
            for name, r in steps.items():
                if r["state"] == "complete":
                    for p in parents[name]:
                        parent = steps[p]
                        assert (
                            parent["finished_at"] is not None
                            and parent["finished_at"] < r["finished_at"]
                        ), f"{name} completed before its parent {p}"
            task_state = next(iter(steps.values()))["task_state"]
            if task_state == "complete":
                assert {r["state"] for r in steps.values()} <= {"complete", "resolved_manually"}

    # --- helpers ----------------------------------------------------------------------------

    def _complete(self, held: Any, outcome: dict[str, Any]) -> None:
        before = self.run(
            self.conn.fetchrow(
                "SELECT state, attempts, claim_seq FROM tasker.steps WHERE step_uuid = $1",
                held["step_uuid"],
            )
        )
        [answer] = self.run(self.conn.complete_steps([outcome]))
        current = (
            before["state"] == "in_progress"
            and before["attempts"] == held["attempt"]
            and before["claim_seq"] == held["claim_seq"]
        )
        # the fence: an outcome is applied exactly when it comes from the current claim
        assert (answer["status"] == "applied") == current, (dict(answer), dict(before), dict(held))

    def _steps_in(self, state: str) -> list[uuid.UUID]:
        """The steps in `state`, in an order that does not depend on the random uuids (task
        creation order, then step name), so that hypothesis replays draw the same step."""
        rows = self.run(
            self.conn.fetch(
                "SELECT s.step_uuid FROM unnest($1::uuid[]) WITH ORDINALITY AS o(task_uuid, n)"
                " JOIN tasker.steps s USING (task_uuid)"
                " WHERE s.state = $2 ORDER BY o.n, s.name",
                list(self.tasks),
                state,
            )
        )
        return [r["step_uuid"] for r in rows]

    async def _readiness_agrees_with_claim(self) -> None:
        """A step waiting for a claim (enqueued, waiting for retry, or a checkpointed
        continuation) is ready exactly when a claim would take it now."""
        conn = self.conn
        waiting = await conn.fetch(
            """
            SELECT s.step_uuid, s.task_uuid FROM tasker.steps s
             WHERE s.task_uuid = ANY($1::uuid[])
               AND (s.state IN ('enqueued', 'waiting_for_retry')
                    OR (s.state = 'in_progress' AND s.continuation))
            """,
            list(self.tasks),
        )
        ready: dict[uuid.UUID, bool] = {}
        for task in {r["task_uuid"] for r in waiting}:
            for r in await conn.step_readiness(task):
                ready[r["step_uuid"]] = r["ready"]
        tx = conn.raw.transaction()
        await tx.start()
        try:
            rows = await conn.claim_step_rows(NAMESPACE, "oracle", 1000, 60.0)
        finally:
            await tx.rollback()
        claimed = {r["step_uuid"] for r in rows}
        for r in waiting:
            step = r["step_uuid"]
            assert ready[step] == (step in claimed), (step, ready[step], step in claimed)


def test_engine_state_machine(pg_server: pgserver.TestServer) -> None:
    EngineMachine.server = pg_server
    run_state_machine_as_test(
        EngineMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
