"""The hand-off through a real worker: the children a flush's successes make ready come back in
the same `complete_and_claim` call and start at once; what the worker has no slot for reaches
other workers by NOTIFY.
"""

from __future__ import annotations

import asyncio
import uuid

from tasker_pg import HandlerRegistry, StepContext, StepHandler, StepHandlerResult, Worker, db
from tests.support.worker import poll, registry_of, templates, wait_final
from tests.support.workflows import math_handlers

QUIET = {"summary_interval": 0}
# A minute: a step another worker gets before then got there by NOTIFY, not by polling.
SLOW_POLL = {"poll_interval": 60.0, "summary_interval": 0}
# How long the diamond's steps run: the worker that completes diamond_start is busy with the
# branch it was handed for this long, so the other branch can only go to the second worker.
BUSY = 3.0


async def _claims(conn: db.Connection, task: uuid.UUID) -> dict[str, tuple[str, bool]]:
    """Step name -> (worker, handed off) of each step's claim."""
    rows = await conn.fetch(
        "SELECT s.name, tr.worker_id, coalesce(tr.metadata @> '{\"handoff\": true}', false) AS h"
        " FROM tasker.step_transitions tr JOIN tasker.steps s USING (step_uuid)"
        " WHERE tr.task_uuid = $1 AND tr.event = 'claimed'",
        task,
    )
    return {r["name"]: (r["worker_id"], r["h"]) for r in rows}


async def test_a_chain_runs_on_hand_offs_after_its_first_claim(
    conn: db.Connection, dsn: str
) -> None:
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("linear"),
        worker_id="chain",
        **QUIET,
    ) as worker:
        task = await conn.create_task("math", "linear_workflow", {"even_number": 6})
        assert (await wait_final(conn, [task]))[task] == "complete"
        assert worker.stats.handed_off == 3
    assert await _claims(conn, task) == {
        "linear_step_1": ("chain", False),
        "linear_step_2": ("chain", True),
        "linear_step_3": ("chain", True),
        "linear_step_4": ("chain", True),
    }


async def test_without_hand_off_every_step_is_claimed(conn: db.Connection, dsn: str) -> None:
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("linear"),
        worker_id="plain",
        handoff=False,
        **QUIET,
    ) as worker:
        task = await conn.create_task("math", "linear_workflow", {"even_number": 6})
        assert (await wait_final(conn, [task]))[task] == "complete"
        assert worker.stats.handed_off == 0
    assert {h for _, h in (await _claims(conn, task)).values()} == {False}


def _slow_diamond() -> HandlerRegistry:
    """The diamond's handlers, each taking BUSY seconds."""

    class Start(StepHandler):
        handler_name = "diamond_start"

        async def call(self, context: StepContext) -> StepHandlerResult:
            await asyncio.sleep(BUSY)
            return self.success({"result": 1})

    class B(StepHandler):
        handler_name = "diamond_branch_b"

        async def call(self, context: StepContext) -> StepHandlerResult:
            await asyncio.sleep(BUSY)
            return self.success({"result": 2})

    class C(StepHandler):
        handler_name = "diamond_branch_c"

        async def call(self, context: StepContext) -> StepHandlerResult:
            await asyncio.sleep(BUSY)
            return self.success({"result": 3})

    class End(StepHandler):
        handler_name = "diamond_end"

        async def call(self, context: StepContext) -> StepHandlerResult:
            return self.success({"result": 4})

    registry = HandlerRegistry()
    for cls in (Start, B, C, End):
        registry.register(cls)
    return registry


async def test_what_the_completing_worker_has_no_slot_for_goes_to_another_by_notify(
    conn: db.Connection, dsn: str
) -> None:
    """One slot each: the worker that completes diamond_start is handed one branch; the other
    is notified, and the second worker (which polls once a minute) takes it at once."""
    registry = _slow_diamond()
    async with Worker(
        ["math"],
        registry,
        dsn=dsn,
        templates=templates("diamond"),
        worker_id="first",
        concurrency=1,
        **SLOW_POLL,
    ) as first:
        task = await conn.create_task("math", "diamond_workflow", {"even_number": 2})
        await poll(
            lambda: conn.fetchval(
                "SELECT state = 'in_progress' FROM tasker.steps"
                " WHERE task_uuid = $1 AND name = 'diamond_start'",
                task,
            ),
            what="diamond_start claimed by the first worker",
        )
        async with Worker(
            ["math"], registry, dsn=dsn, worker_id="second", concurrency=1, **SLOW_POLL
        ) as second:
            # well under the poll interval: only NOTIFY can bring the second branch in time
            assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
            assert first.stats.handed_off + second.stats.handed_off >= 2
    claims = await _claims(conn, task)
    assert claims["diamond_start"] == ("first", False)
    branches = sorted(claims[n] for n in ("diamond_branch_b", "diamond_branch_c"))
    assert branches == [("first", True), ("second", False)]
    # the end is handed to whichever worker completed the last branch
    assert claims["diamond_end"][1] is True


async def test_slots_kept_for_children_that_did_not_become_ready_are_claimed_with_at_once(
    conn: db.Connection, dsn: str
) -> None:
    """One slot, polling once a minute: diamond_start's worker is handed one branch, the other
    waits in the queue; the handed branch's success keeps the slot for diamond_end, which is not
    ready yet, so nothing is handed and the slot goes back to the claim loop, which must take the
    waiting branch now, not at its next poll."""
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=dsn,
        templates=templates("diamond"),
        worker_id="alone",
        concurrency=1,
        **SLOW_POLL,
    ) as worker:
        task = await conn.create_task("math", "diamond_workflow", {"even_number": 2})
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
        assert worker.stats.handed_off == 2  # one branch and the end
    claims = await _claims(conn, task)
    assert sorted(h for _, h in claims.values()) == [False, False, True, True]


GATE = asyncio.Event()


class GatedWait(StepHandler):
    handler_name = "gated.wait"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await GATE.wait()
        return self.success({"waited": True})


async def test_a_busy_worker_leaves_the_children_to_its_claim_loop(
    conn: db.Connection, dsn: str
) -> None:
    """While another handler runs, a success keeps no slot and its flush asks for no child: the
    claim loop takes them (in batches, on its own session, in parallel with the flushes)."""
    GATE.clear()
    registry = registry_of(math_handlers)
    registry.register(GatedWait)
    async with Worker(
        ["math", "gated"],
        registry,
        dsn=dsn,
        templates=templates("linear", "gated"),
        worker_id="busy",
        **QUIET,
    ) as worker:
        gated = await conn.create_task("gated", "gated", {})
        await poll(
            lambda: conn.fetchval(
                "SELECT state = 'in_progress' FROM tasker.steps WHERE task_uuid = $1", gated
            ),
            what="the gated step running",
        )
        task = await conn.create_task("math", "linear_workflow", {"even_number": 6})
        assert (await wait_final(conn, [task]))[task] == "complete"
        assert worker.stats.handed_off == 0
        GATE.set()
        assert (await wait_final(conn, [gated]))[gated] == "complete"
    assert {h for _, h in (await _claims(conn, task)).values()} == {False}
