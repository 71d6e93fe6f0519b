"""Delivering outcomes through a real worker when the database does not answer yes at once.

- transient errors never change an outcome: a lock timeout, a statement timeout or a cancelled
  query while `complete_steps` waits on a lock is retried with backoff, the lease kept, and the
  handler's success is applied once the lock is gone (the handler ran once);
- past `outcome_retry_cap` the worker gives the outcome up to lease expiry, never turning it
  into a failure;
- an outcome the database cannot store (NUL, lone surrogates) is cleaned and says so, and one
  it still refuses becomes a minimal failure that says why;
- hung handlers are bounded by a max run time per claim (`timeout_seconds`, else the worker's
  `max_runtime`): the step fails retryably as `timeout` and the next attempt completes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tasker_pg import (
    HandlerRegistry,
    StepContext,
    StepHandler,
    StepHandlerResult,
    Worker,
    db,
    worker_cli,
)
from tasker_pg.errors import ConfigurationError, PermanentError, RetryableError
from tasker_pg.template import TaskTemplate
from tests.support.worker import poll, steps_of, wait_final

NS = "delivery"
FAST: dict[str, Any] = {"poll_interval": 0.1, "summary_interval": 0}
QUICK_RETRY = {"max_attempts": 3, "backoff": "fixed", "backoff_base_ms": 50}

# How often each step's handler ran, by (task_uuid, step name).
RUNS: collections.Counter[tuple[str, str]] = collections.Counter()
# Gates a test opens to let a handler finish, by the context's "gate" key.
GATES: dict[str, asyncio.Event] = {}


class ChargeHandler(StepHandler):
    """Counts its runs, waits for its gate (when the task names one), succeeds."""

    handler_name = "delivery.charge"

    async def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        gate = GATES.get(context.get_input_or("gate", ""))
        if gate is not None:
            await gate.wait()
        return self.success({"charged": context.get_input_or("amount", 0)})


class ShipHandler(StepHandler):
    handler_name = "delivery.ship"

    def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        return self.success({"shipped": True})


def charge_ship() -> TaskTemplate:
    return TaskTemplate.from_dict(
        {
            "name": "charge_ship",
            "namespace_name": NS,
            "version": "1.0.0",
            "steps": [
                {
                    "name": "charge",
                    "handler": {"callable": "delivery.charge"},
                    "retry": QUICK_RETRY,
                },
                {
                    "name": "ship",
                    "handler": {"callable": "delivery.ship"},
                    "dependencies": ["charge"],
                },
            ],
        }
    )


def registry(*handlers: type[StepHandler]) -> HandlerRegistry:
    reg = HandlerRegistry()
    for cls in handlers or (ChargeHandler, ShipHandler):
        reg.register(cls)
    return reg


@contextlib.asynccontextmanager
async def row_lock(dsn: str, task: uuid.UUID, step: str) -> AsyncIterator[db.Connection]:
    """Another session holding `SELECT ... FOR UPDATE` on the step's row until the block ends."""
    blocker = await db.connect(dsn)
    try:
        async with blocker.transaction():
            await blocker.fetch(
                "SELECT 1 FROM tasker.steps WHERE task_uuid = $1 AND name = $2 FOR UPDATE",
                task,
                step,
            )
            yield blocker
    finally:
        await blocker.close()


async def transitions(conn: db.Connection, step_uuid: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT event, to_state, attempt, error_summary FROM tasker.step_transitions "
        "WHERE step_uuid = $1 ORDER BY transition_id",
        step_uuid,
    )
    return [dict(r) for r in rows]


async def assert_charged_once_and_completed(conn: db.Connection, task: uuid.UUID) -> None:
    """The reproduction's verdict: charge succeeded once, nothing failed, the task completed."""
    assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
    steps = await steps_of(conn, task)
    assert steps["charge"]["state"] == "complete"
    assert steps["charge"]["attempts"] == 1
    assert steps["charge"]["results"] == {"charged": 10}
    assert RUNS[(str(task), "charge")] == 1
    assert RUNS[(str(task), "ship")] == 1
    history = await transitions(conn, steps["charge"]["step_uuid"])
    assert [t for t in history if t["to_state"] in ("error", "waiting_for_retry")] == []


# --- item 1: transient errors never change an outcome ------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [{"lock_timeout": "300ms"}, {"statement_timeout": "500ms"}],
    ids=["lock_timeout", "statement_timeout"],
)
async def test_a_timeout_while_the_child_row_is_locked_delays_the_success_but_keeps_it(
    dsn: str,
    conn: db.Connection,
    caplog: pytest.LogCaptureFixture,
    setting: dict[str, str],
) -> None:
    caplog.set_level(logging.INFO, logger="tasker_pg")
    gate = GATES[f"timeout-{next(iter(setting))}"] = asyncio.Event()
    lease = 2.0
    async with Worker(
        [NS],
        registry(),
        dsn=dsn,
        templates=[charge_ship()],
        lease_seconds=lease,
        server_settings=setting,
        **FAST,
    ) as worker:
        task = await conn.create_task(NS, "charge_ship", {"amount": 10, "gate": gate_name(gate)})
        await poll(lambda: _ran(task, "charge"), what="charge running")
        async with row_lock(dsn, task, "ship"):
            gate.set()  # charge succeeds now; its complete_steps waits on ship's row
            held_since = time.monotonic()

            async def retried_past_the_lease() -> bool:
                # keep the lock past the first lease, so only heartbeats can keep the claim
                # (or until charge left in_progress: the outcome was turned into a failure)
                return (
                    worker.stats.delivery_retries >= 3
                    and time.monotonic() - held_since > 1.5 * lease
                ) or await _left_in_progress(conn, task, "charge")

            await poll(retried_past_the_lease, timeout=30, what="three re-sent outcomes")
        await assert_charged_once_and_completed(conn, task)
        stats = worker.stats
    assert stats.leases_lost == 0
    assert stats.stale == 0
    assert stats.outcomes_given_up == 0
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "has not acknowledged" in r.getMessage()
    ]
    assert warnings, "no warning after the third try"
    text = warnings[0].getMessage()
    assert "step charge" in text and str(task) in text
    assert "canceling statement due to" in text
    assert getattr(warnings[0], "task_uuid", None) == str(task)


async def test_a_cancelled_complete_steps_is_sent_again(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    gate = GATES["cancel"] = asyncio.Event()
    worker_id = f"w-cancel-{uuid.uuid4().hex[:6]}"
    async with Worker(
        [NS], registry(), dsn=dsn, templates=[charge_ship()], worker_id=worker_id, **FAST
    ) as worker:
        task = await conn.create_task(NS, "charge_ship", {"amount": 10, "gate": "cancel"})
        await poll(lambda: _ran(task, "charge"), what="charge running")
        async with row_lock(dsn, task, "ship"):
            gate.set()

            async def flush_waits_on_the_lock() -> int | None:
                """The flush session's pid while complete_steps waits on the lock (0: charge
                is no longer in progress, the outcome was not kept)."""
                if await _left_in_progress(conn, task, "charge"):
                    return 0
                pid = await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                    "AND wait_event_type = 'Lock' AND query LIKE '%complete_and_claim%'",
                    f"tasker-pg worker {worker_id} flush",
                )
                return int(pid) if pid is not None else None

            for cancels in (1, 2):
                (pid,) = await poll(
                    lambda: _some(flush_waits_on_the_lock), what="complete_steps waiting"
                )
                if pid == 0:
                    break
                assert await conn.fetchval("SELECT pg_cancel_backend($1)", pid) is True

                async def retried(n: int = cancels) -> bool:
                    return worker.stats.delivery_retries >= n or await _left_in_progress(
                        conn, task, "charge"
                    )

                await poll(retried, what=f"the outcome re-sent after cancel {cancels}")
        await assert_charged_once_and_completed(conn, task)
        assert worker.stats.reconnects == 0  # a cancel is not a lost connection


async def test_past_the_retry_cap_the_outcome_is_given_up_to_lease_expiry_not_failed(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasker_pg")
    gate = GATES["cap"] = asyncio.Event()
    async with Worker(
        [NS],
        registry(),
        dsn=dsn,
        templates=[charge_ship()],
        lease_seconds=1.5,
        outcome_retry_cap=1.0,
        server_settings={"lock_timeout": "200ms"},
        **FAST,
    ) as worker:
        task = await conn.create_task(NS, "charge_ship", {"amount": 10, "gate": "cap"})
        await poll(lambda: _ran(task, "charge"), what="charge running")
        async with row_lock(dsn, task, "ship"):
            gate.set()

            async def given_up() -> bool:
                if await _left_in_progress(conn, task, "charge"):
                    return True  # not given up: turned into something else (checked below)
                return worker.stats.outcomes_given_up == 1

            await poll(given_up, timeout=30, what="the outcome given up")
        # The lease expires; the engine retries charge, which succeeds this time.
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
    steps = await steps_of(conn, task)
    assert steps["charge"]["attempts"] == 2
    assert RUNS[(str(task), "charge")] == 2
    history = await transitions(conn, steps["charge"]["step_uuid"])
    assert [t for t in history if t["to_state"] == "error"] == []
    assert all("refused" not in (t["error_summary"] or "") for t in history)
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and "giving it up" in r.getMessage()
    ]
    assert len(errors) == 1
    assert str(task) in errors[0].getMessage()


async def test_a_claim_that_meets_a_lock_timeout_warns_and_claims_again(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A transient error of claim_steps (here a lock timeout: a DBA's ALTER or VACUUM FULL holds
    the queue table) is a WARNING and the claim is tried again; only a refusal would be an
    ERROR."""
    caplog.set_level(logging.INFO, logger="tasker_pg")
    blocker = await db.connect(dsn)
    try:
        async with Worker(
            [NS],
            registry(),
            dsn=dsn,
            templates=[charge_ship()],
            server_settings={"lock_timeout": "200ms"},
            **FAST,
        ):
            tx = blocker.raw.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE tasker.queue_messages IN ACCESS EXCLUSIVE MODE")

            def claim_failures() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "claim_steps" in r.getMessage()]

            async def warned_twice() -> bool:
                return len(claim_failures()) >= 2

            await poll(warned_twice, timeout=30, what="two claims meeting the lock")
            records = claim_failures()
            assert {r.levelno for r in records} == {logging.WARNING}
            assert "failed; trying again" in records[0].getMessage()
            assert "lock timeout" in records[0].getMessage()
            await tx.rollback()  # the table is free again: the same worker claims and runs
            task = await conn.create_task(NS, "charge_ship", {"amount": 10})
            await assert_charged_once_and_completed(conn, task)
    finally:
        await blocker.close()


# --- item 3: an outcome the database cannot store is never dropped ------------------------------


class NulPermanentHandler(StepHandler):
    """Fails for good with a NUL in its message and unstorable text in its error context."""

    handler_name = "delivery.nul_permanent"

    def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        raise PermanentError(
            "card \x00 declined", error_code="declined", context={"raw\x00": "x\udcff"}
        )


class SurrogateHandler(StepHandler):
    """Attempt 1: an exception whose text holds a lone surrogate (a file name decoded with
    surrogateescape). Attempt 2: a result and metadata holding NUL and lone surrogates."""

    handler_name = "delivery.surrogates"

    async def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
        if context.attempt == 1:
            raise OSError(f"cannot open {name}")
        return self.success({"file": name, "notes\x00": ["a\x00b"]}, metadata={"src": name})


class HugeRetryAfterHandler(StepHandler):
    """Attempt 1: a retryable error whose retry_after (two years) the engine refuses."""

    handler_name = "delivery.huge_retry_after"

    def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        if context.attempt == 1:
            raise RetryableError("rate limited", retry_after=2 * 365 * 86400.0)
        return self.success({"attempt": context.attempt})


def one_step(name: str, handler: str) -> TaskTemplate:
    return TaskTemplate.from_dict(
        {
            "name": name,
            "namespace_name": NS,
            "version": "1.0.0",
            "steps": [{"name": name, "handler": {"callable": handler}, "retry": QUICK_RETRY}],
        }
    )


UNSTORABLE = [
    one_step("nul_permanent", "delivery.nul_permanent"),
    one_step("surrogates", "delivery.surrogates"),
    one_step("huge_retry_after", "delivery.huge_retry_after"),
]


@contextlib.asynccontextmanager
async def unstorable_worker(dsn: str) -> AsyncIterator[Worker]:
    reg = registry(NulPermanentHandler, SurrogateHandler, HugeRetryAfterHandler)
    async with Worker([NS], reg, dsn=dsn, templates=UNSTORABLE, lease_seconds=2.0, **FAST) as w:
        yield w


async def test_a_nul_in_a_permanent_error_is_replaced_and_the_failure_stored(
    dsn: str, conn: db.Connection
) -> None:
    async with unstorable_worker(dsn) as worker:
        task = await conn.create_task(NS, "nul_permanent", {})
        assert (await wait_final(conn, [task], timeout=30))[task] == "error"
    # the counters move when the acknowledgement arrives, a moment after the commit
    assert worker.stats.failed == 1
    step = (await steps_of(conn, task))["nul_permanent"]
    assert step["attempts"] == 1
    assert RUNS[(str(task), "nul_permanent")] == 1
    error = step["last_error"]
    assert error["message"] == (
        "card \ufffd declined [tasker: 3 NUL / lone-surrogate characters replaced]"
    )
    assert error["error_code"] == "declined"
    assert error["context"] == {"raw\ufffd": "x\ufffd"}


async def test_lone_surrogates_in_an_error_and_a_result_are_replaced(
    dsn: str, conn: db.Connection
) -> None:
    async with unstorable_worker(dsn) as worker:
        task = await conn.create_task(NS, "surrogates", {})
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
    assert (worker.stats.retried, worker.stats.succeeded) == (1, 1)
    step = (await steps_of(conn, task))["surrogates"]
    assert step["attempts"] == 2
    assert RUNS[(str(task), "surrogates")] == 2  # once per attempt: nothing was re-run
    assert step["results"] == {"file": "report-\ufffd.csv", "notes\ufffd": ["a\ufffdb"]}
    history = await transitions(conn, step["step_uuid"])
    retried = [t for t in history if t["to_state"] == "waiting_for_retry"]
    assert len(retried) == 1 and retried[0]["attempt"] == 1
    assert "cannot open report-\ufffd.csv" in retried[0]["error_summary"]
    # one in the message, one in the traceback that repeats it
    assert "[tasker: 2 NUL / lone-surrogate characters replaced]" in retried[0]["error_summary"]


async def test_a_failure_the_engine_still_refuses_becomes_a_minimal_failure(
    dsn: str, conn: db.Connection
) -> None:
    async with unstorable_worker(dsn) as worker:
        task = await conn.create_task(NS, "huge_retry_after", {})
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
        assert worker.stats.retried == 1
    step = (await steps_of(conn, task))["huge_retry_after"]
    assert step["attempts"] == 2
    assert RUNS[(str(task), "huge_retry_after")] == 2  # once per attempt
    history = await transitions(conn, step["step_uuid"])
    retried = [t for t in history if t["to_state"] == "waiting_for_retry"]
    assert len(retried) == 1 and retried[0]["attempt"] == 1
    summary = retried[0]["error_summary"]
    assert "outcome_refused" in summary or "the engine refused" in summary, summary
    assert "retry_after" in summary and "rate limited" in summary, summary


# --- a refused batch is sent again one outcome at a time ---------------------------------------


class GatedResultHandler(StepHandler):
    """Counts its runs, waits for the "batch" gate, succeeds; the step named `big` with metadata
    over the engine's max_payload_bytes (1 MiB), which complete_steps refuses (TV021)."""

    handler_name = "delivery.gated_result"

    async def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        await GATES["batch"].wait()
        if context.step_name == "big":
            return self.success({"step": "big"}, metadata={"blob": "x" * 1_100_000})
        return self.success({"step": context.step_name})


FOUR_AT_ONCE = TaskTemplate.from_dict(
    {
        "name": "four_at_once",
        "namespace_name": NS,
        "version": "1.0.0",
        "steps": [
            {"name": name, "handler": {"callable": GatedResultHandler.handler_name}}
            for name in ("a", "b", "big", "c")
        ],
    }
)


async def test_a_refused_batch_is_sent_one_by_one_and_only_the_refused_outcome_fails(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Four steps finish together and their outcomes share one complete_steps call; the engine
    refuses the batch for the one oversized metadata. The worker sends the outcomes again one at
    a time: the three good ones are applied with their results, the refused success becomes
    the permanent failure the refusal rules give (invalid_result, naming why), and no handler
    runs again."""
    caplog.set_level(logging.WARNING, logger="tasker_pg.worker.delivery")
    GATES["batch"] = asyncio.Event()
    worker = Worker(
        [NS],
        registry(GatedResultHandler),
        dsn=dsn,
        templates=[FOUR_AT_ONCE],
        concurrency=4,
        flush_delay=30,  # the first outcomes wait for the last: one batch of four
        **FAST,
    )
    try:
        async with worker:
            task = await conn.create_task(NS, "four_at_once", {})

            async def all_running() -> bool:
                return worker.running_steps == 4

            await poll(all_running, what="the four steps running")
            GATES["batch"].set()
            assert (await wait_final(conn, [task], timeout=30))[task] == "error"
    finally:
        GATES.pop("batch", None)
    refused_batches = [
        r.getMessage() for r in caplog.records if "refused a batch of" in r.getMessage()
    ]
    assert len(refused_batches) == 1, refused_batches
    assert "refused a batch of 4" in refused_batches[0], refused_batches
    steps = await steps_of(conn, task)
    assert {name: (s["state"], s["attempts"]) for name, s in steps.items()} == {
        "a": ("complete", 1),
        "b": ("complete", 1),
        "c": ("complete", 1),
        "big": ("error", 1),
    }
    assert {name: steps[name]["results"] for name in ("a", "b", "c")} == {
        name: {"step": name} for name in ("a", "b", "c")
    }
    assert steps["big"]["results"] is None
    error = steps["big"]["last_error"]
    assert (error["error_type"], error["error_code"], error["retryable"]) == (
        "invalid_result",
        "payload_too_large",
        False,
    )
    assert error["message"].startswith("the engine refused the step's success outcome:"), error
    assert "metadata is 1100012 bytes, more than the limit" in error["message"], error
    assert {name: RUNS[(str(task), name)] for name in steps} == {
        "a": 1,
        "b": 1,
        "c": 1,
        "big": 1,
    }
    assert (worker.stats.succeeded, worker.stats.failed) == (3, 1)


# --- item 7: hung handlers are bounded --------------------------------------------------------


class HangOnceAsyncHandler(StepHandler):
    """Attempt 1 hangs (far longer than the test); later attempts are quick."""

    handler_name = "delivery.hang_once_async"

    async def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        if context.attempt == 1:
            await asyncio.sleep(600)
        return self.success({"attempt": context.attempt})


class BlockOnceSyncHandler(StepHandler):
    """Attempt 1 blocks its thread for `block` seconds (bounded); later attempts are quick."""

    handler_name = "delivery.block_once_sync"

    def call(self, context: StepContext) -> StepHandlerResult:
        RUNS[(context.task_uuid, context.step_name)] += 1
        if context.attempt == 1:
            time.sleep(context.get_input_or("block", 3.0))
        return self.success({"attempt": context.attempt})


HUNG = [
    one_step("hang_async", "delivery.hang_once_async"),
    one_step("block_sync", "delivery.block_once_sync"),
]


async def assert_timed_out_once_then_completed(conn: db.Connection, task: uuid.UUID) -> None:
    step = next(iter((await steps_of(conn, task)).values()))
    assert step["state"] == "complete"
    assert step["attempts"] == 2
    assert step["results"] == {"attempt": 2}
    assert RUNS[(str(task), step["name"])] == 2
    history = await transitions(conn, step["step_uuid"])
    retried = [t for t in history if t["to_state"] == "waiting_for_retry"]
    assert len(retried) == 1 and retried[0]["attempt"] == 1
    assert retried[0]["error_summary"].startswith("timeout: "), retried[0]
    assert "max run time of 0.5 seconds" in retried[0]["error_summary"]


async def test_a_hung_async_handler_is_cancelled_at_max_runtime_and_retried(
    dsn: str, conn: db.Connection
) -> None:
    reg = registry(HangOnceAsyncHandler, BlockOnceSyncHandler)
    async with Worker([NS], reg, dsn=dsn, templates=HUNG, max_runtime=0.5, **FAST) as worker:
        task = await conn.create_task(NS, "hang_async", {})
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
        assert worker.stats.timeouts == 1
        assert worker.health.status == "ok"
    await assert_timed_out_once_then_completed(conn, task)
    step = (await steps_of(conn, task))["hang_async"]
    errors = await conn.fetch(
        "SELECT error_summary FROM tasker.step_transitions WHERE step_uuid = $1 "
        "AND to_state = 'waiting_for_retry'",
        step["step_uuid"],
    )
    assert len(errors) == 1


async def test_a_blocked_sync_handler_fails_as_timeout_and_holds_its_slot_until_it_returns(
    dsn: str, conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasker_pg")
    reg = registry(HangOnceAsyncHandler, BlockOnceSyncHandler)
    async with Worker(
        [NS], reg, dsn=dsn, templates=HUNG, max_runtime=0.5, concurrency=1, **FAST
    ) as worker:
        task = await conn.create_task(NS, "block_sync", {"block": 4.0})

        async def stalled() -> bool:
            return worker.health.status == "stalled" and await _left_in_progress(
                conn, task, "block_sync"
            )

        # The thread cannot be stopped: the failure is reported, and the only slot stays
        # taken until the thread returns, so the worker says it is stalled.
        await poll(stalled, timeout=20, what="the worker stalled by its overdue thread")
        health = worker.health
        assert (health.overdue, health.free_slots) == (1, 0)
        step = (await steps_of(conn, task))["block_sync"]
        assert step["state"] == "waiting_for_retry"
        assert step["last_error"]["error_code"] == "timeout"
        assert RUNS[(str(task), "block_sync")] == 1  # not re-run while the thread holds the slot
        assert (await wait_final(conn, [task], timeout=30))[task] == "complete"
        assert worker.health.status == "ok"
        assert worker.stats.timeouts == 1
    await assert_timed_out_once_then_completed(conn, task)
    stalled_logs = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "slot(s) are held by handlers" in r.getMessage()
    ]
    assert len(stalled_logs) == 1  # once per state change
    assert any("is free again" in r.getMessage() for r in caplog.records)


def gate_name(gate: asyncio.Event) -> str:
    return next(name for name, g in GATES.items() if g is gate)


async def _left_in_progress(conn: db.Connection, task: uuid.UUID, step: str) -> bool:
    state = await conn.fetchval(
        "SELECT state FROM tasker.steps WHERE task_uuid = $1 AND name = $2", task, step
    )
    return state != "in_progress"


async def _some(probe: Callable[[], Awaitable[int | None]]) -> tuple[int] | None:
    """`probe()` wrapped so that 0 counts as an answer for `poll`."""
    value = await probe()
    return None if value is None else (value,)


async def _ran(task: uuid.UUID, step: str) -> bool:
    return RUNS[(str(task), step)] > 0


# --- the settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "complaint"),
    [
        ("max_runtime", 0, "max_runtime must be > 0"),
        ("max_runtime", float("inf"), "max_runtime must be > 0 and finite"),
        ("outcome_retry_cap", -1.0, "outcome_retry_cap must be > 0"),
        ("server_settings", {"lock timeout": "1s"}, "is not a PostgreSQL setting name"),
        ("server_settings", {"lock_timeout": 5}, "must be a string"),
    ],
)
def test_bad_bounds_are_refused_naming_the_setting(
    setting: str, value: Any, complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        Worker([NS], registry(), **{setting: value})


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"lock_timeout": "banana"}, "lock_timeout=banana"),
        ({"no_such_setting": "1"}, "no_such_setting=1"),
        ({"server_version": "1"}, "server_version=1"),
    ],
    ids=["bad value", "unknown name", "not settable"],
)
async def test_a_session_setting_the_server_refuses_fails_start_up_naming_it(
    dsn: str, settings: dict[str, str], refusal: str
) -> None:
    worker = Worker([NS], registry(), dsn=dsn, templates=[charge_ship()], server_settings=settings)
    with pytest.raises(ConfigurationError, match="refused a session setting") as refused:
        async with worker:
            pass
    assert refusal in str(refused.value)
    assert "could not connect" not in str(refused.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-runtime", "0"],
        ["--outcome-retry-cap", "-5"],
        ["--max-runtime", "inf"],
        ["--pg-setting", "lock_timeout"],
    ],
)
def test_bad_worker_options_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--namespace", NS, *argv])
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_worker_options_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    argv = ["--namespace", NS, "--max-runtime", "90", "--outcome-retry-cap", "30"]
    argv += ["--pg-setting", "lock_timeout=5s", "--pg-setting", "statement_timeout=1min"]
    args = parser.parse_args(argv)
    worker = Worker(
        [NS],
        registry(),
        max_runtime=args.max_runtime,
        outcome_retry_cap=args.outcome_retry_cap,
        server_settings=dict(args.pg_setting),
    )
    assert worker.config.max_runtime == 90.0
    assert worker.config.outcome_retry_cap == 30.0
    assert worker.config.server_settings == (
        ("lock_timeout", "5s"),
        ("statement_timeout", "1min"),
    )
    defaults = parser.parse_args(["--namespace", NS])
    assert (defaults.max_runtime, defaults.outcome_retry_cap) == (3600.0, 600.0)
