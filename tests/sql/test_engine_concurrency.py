"""Concurrency and query-plan tests of the SQL engine (claim_steps, complete_steps, cancel_task).

Every simulated worker is its own connection (its own backend); interleavings are explicit:
transactions are opened by hand, calls are released together by an `asyncio.Barrier`, and a
session that must be blocked is observed blocked in `pg_stat_activity` / `pg_locks` (polled
with a deadline, never a fixed sleep) before the session it waits for commits. Each test runs
on a fresh database and has its own timeout; the invariants (docs/architecture.md) are checked
at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg
import pytest

from tasker_pg import db
from tasker_pg.errors import DatabaseError
from tests.sql.conftest import Opener
from tests.support import pgserver, plans, seeded

T = TypeVar("T")
Row = db.Row

NS = "conc"
LONG_LEASE = 300.0
DEADLOCK_DETECTED = "40P01"


# --- builders ------------------------------------------------------------------------------


def template(name: str, deps: dict[str, list[str]], namespace: str = NS) -> dict[str, Any]:
    """A template body: one step per key of `deps` (in order), each depending on its list."""
    return {
        "name": name,
        "namespace_name": namespace,
        "version": "1.0.0",
        "steps": [
            {"name": step, "handler": {"callable": f"h.{step}"}, "dependencies": parents}
            for step, parents in deps.items()
        ],
    }


Deps = dict[str, list[str]]
SINGLE: Deps = {"only": []}
LINEAR3: Deps = {"s1": [], "s2": ["s1"], "s3": ["s2"]}
FAN_IN: Deps = {"a": [], "b": [], "c": ["a", "b"]}
# Two fan-ins in one task: x1, y1 -> X and x2, y2 -> Y.
TWIN: Deps = {"x1": [], "y1": [], "x2": [], "y2": [], "X": ["x1", "y1"], "Y": ["x2", "y2"]}


async def register(conn: db.Connection, name: str, deps: dict[str, list[str]]) -> None:
    await conn.register_template(template(name, deps))


async def create_tasks(
    conn: db.Connection, name: str, count: int, *, options: dict[str, Any] | None = None
) -> list[uuid.UUID]:
    """`count` tasks from one set-based statement (one create_task call per row, in order)."""
    rows = await conn.fetch(
        """
        SELECT tasker.create_task($1, $2, jsonb_build_object('n', g), NULL, $4::jsonb) AS task
          FROM generate_series(1, $3) g
         ORDER BY g
        """,
        NS,
        name,
        count,
        options or {},
    )
    return [r["task"] for r in rows]


async def step_ids(
    conn: db.Connection, tasks: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, uuid.UUID]]:
    """task -> {step name -> step uuid}."""
    rows = await conn.fetch(
        "SELECT task_uuid, name, step_uuid FROM tasker.steps WHERE task_uuid = ANY($1::uuid[])",
        list(tasks),
    )
    out: dict[uuid.UUID, dict[str, uuid.UUID]] = {t: {} for t in tasks}
    for r in rows:
        out[r["task_uuid"]][r["name"]] = r["step_uuid"]
    return out


def success(row: Row, result: Any = None) -> dict[str, Any]:
    """A success outcome for a claim row, fenced by its attempt and claim token."""
    return {
        "step_uuid": str(row["step_uuid"]),
        "attempt": row["attempt"],
        "claim_seq": row["claim_seq"],
        "kind": "success",
        "result": {"step": row["step_name"]} if result is None else result,
    }


async def claim_all(
    conn: db.Connection, worker: str, expected: int, *, lease: float = LONG_LEASE
) -> list[Row]:
    """Claim until `expected` steps are held (polls with a deadline: they may not be due yet)."""
    got: list[Row] = []
    deadline = time.monotonic() + 10
    while len(got) < expected:
        got.extend(await conn.claim_step_rows(NS, worker, expected - len(got), lease))
        if len(got) < expected:
            assert time.monotonic() < deadline, f"claimed {len(got)} of {expected} steps"
            await asyncio.sleep(0.01)
    return got


def statuses(rows: Iterable[Row]) -> list[str]:
    return [r["status"] for r in rows]


async def assert_no_violations(conn: db.Connection) -> None:
    violations = await conn.check_invariants()
    assert violations == [], [dict(v) for v in violations]


async def live_messages(conn: db.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM tasker.queue_messages"))


def is_deadlock(exc: BaseException) -> bool:
    """asyncpg's DeadlockDetectedError, as the seam translates it (DatabaseError, 40P01)."""
    return (
        isinstance(exc, DatabaseError | asyncpg.PostgresError)
        and getattr(exc, "sqlstate", None) == DEADLOCK_DETECTED
    )


Call = Callable[[db.Connection], Awaitable[Any]]


def completing(outcomes: Sequence[dict[str, Any]]) -> Call:
    return lambda c: c.complete_steps(outcomes)


def claiming(worker: str, qty: int) -> Call:
    return lambda c: c.claim_step_rows(NS, worker, qty, LONG_LEASE)


def cancelling(task: uuid.UUID) -> Call:
    return lambda c: c.cancel_task(task, "race")


def settled(results: Sequence[Any | BaseException]) -> list[Any]:
    """The sides' results, after checking that none of them raised."""
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors
    return list(results)


# --- sessions and interleavings ------------------------------------------------------------


class Observer:
    """A separate session that watches the others' lock waits (queries serialised)."""

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn
        self._lock = asyncio.Lock()

    async def lock_wait(self, pid: int) -> Row | None:
        """The session's lock wait (wait event, blocking pids), or None when it is not waiting."""
        async with self._lock:
            return await self.conn.fetchrow(
                """
                SELECT a.wait_event_type, a.wait_event, pg_blocking_pids(a.pid) AS blockers
                  FROM pg_stat_activity a
                 WHERE a.pid = $1 AND a.wait_event_type = 'Lock'
                   AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)
                """,
                pid,
            )

    async def until_blocked(self, pid: int, *, by: int | None = None, within: float = 10) -> Row:
        """Poll until session `pid` waits for a lock (held by `by`, when given)."""
        deadline = time.monotonic() + within
        while True:
            row = await self.lock_wait(pid)
            if row is not None and (by is None or by in row["blockers"]):
                return row
            assert time.monotonic() < deadline, f"session {pid} never blocked on a lock"
            await asyncio.sleep(0.005)

    async def until_blocked_or_done(
        self, pid: int, done: asyncio.Event, *, within: float = 10
    ) -> bool:
        """Poll until session `pid` waits for a lock (True) or its call returned (False)."""
        deadline = time.monotonic() + within
        while not done.is_set():
            if await self.lock_wait(pid) is not None:
                return True
            assert time.monotonic() < deadline, f"session {pid} neither blocked nor returned"
            await asyncio.sleep(0.002)
        return False


async def overlapped(
    observer: Observer,
    sides: Sequence[tuple[db.Connection, Callable[[db.Connection], Awaitable[T]]]],
    *,
    within: float = 20,
) -> tuple[list[T | BaseException], int]:
    """Run each call in an explicit transaction on its own connection, released together.

    A side whose call returns keeps its transaction (and its locks) open until every other
    side has either returned or is seen waiting for a lock, then commits. So the calls really
    overlap: one of them runs into the other's uncommitted row locks. Returns each side's
    result or exception (rolled back), and how many times a side was observed blocked.
    """
    barrier = asyncio.Barrier(len(sides))
    returned = [asyncio.Event() for _ in sides]
    blocked = 0

    async def run(i: int) -> T:
        nonlocal blocked
        conn, call = sides[i]
        tx = conn.raw.transaction()
        await tx.start()
        try:
            await barrier.wait()
            result = await call(conn)
            returned[i].set()
            for j, (other, _) in enumerate(sides):
                if j != i and await observer.until_blocked_or_done(other.backend_pid, returned[j]):
                    blocked += 1
            await tx.commit()
            return result
        except BaseException:
            returned[i].set()
            await tx.rollback()
            raise

    results = await asyncio.wait_for(
        asyncio.gather(*(run(i) for i in range(len(sides))), return_exceptions=True), within
    )
    return list(results), blocked


async def together(
    sides: Sequence[tuple[db.Connection, Callable[[db.Connection], Awaitable[T]]]],
    *,
    within: float = 20,
) -> list[T]:
    """Run each call on its own connection (autocommit), released together by a barrier."""
    barrier = asyncio.Barrier(len(sides))

    async def run(conn: db.Connection, call: Callable[[db.Connection], Awaitable[T]]) -> T:
        await barrier.wait()
        return await call(conn)

    return list(await asyncio.wait_for(asyncio.gather(*(run(c, f) for c, f in sides)), within))


async def fan_in_children(
    conn: db.Connection, tasks: Sequence[uuid.UUID], children: Sequence[str]
) -> list[Row]:
    """Per fan-in child: state, counter, live messages, and how often dependencies enqueued it."""
    return await conn.fetch(
        """
        SELECT s.task_uuid, s.name, s.step_uuid, s.state, s.pending_parents,
               (SELECT count(*) FROM tasker.queue_messages m
                 WHERE m.message->>'step_uuid' = s.step_uuid::text) AS messages,
               (SELECT count(*) FROM tasker.step_transitions tr
                 WHERE tr.step_uuid = s.step_uuid AND tr.to_state = 'enqueued'
                   AND tr.event = 'dependencies_satisfied') AS enqueues
          FROM tasker.steps s
         WHERE s.task_uuid = ANY($1::uuid[]) AND s.name = ANY($2::text[])
        """,
        list(tasks),
        list(children),
    )


def assert_enqueued_once(children: Sequence[Row], expected: int) -> None:
    assert len(children) == expected
    bad = [
        dict(c)
        for c in children
        if (c["state"], c["pending_parents"], c["messages"], c["enqueues"]) != ("enqueued", 0, 1, 1)
    ]
    assert bad == [], f"{len(bad)} fan-in children not enqueued exactly once: {bad[:5]}"


async def drain(conn: db.Connection, worker: str = "drainer") -> int:
    """Claim and complete everything until the queue is empty; returns the steps completed."""
    done = 0
    while rows := await conn.claim_step_rows(NS, worker, 200, LONG_LEASE):
        result = await conn.complete_steps([success(r) for r in rows])
        assert set(statuses(result)) == {"applied"}
        done += len(rows)
    return done


# --- fan-in race -----------------------------------------------------------------------------

FAN_IN_ROUNDS = 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["transactions", "autocommit"])
async def test_fan_in_race_enqueues_child_exactly_once(
    conn: db.Connection, sessions: Opener, mode: str
) -> None:
    """Two sessions complete the two parents of one child at the same moment, 200 times."""
    await register(conn, "fanin", FAN_IN)
    tasks = await create_tasks(conn, "fanin", FAN_IN_ROUNDS)
    claims = await claim_all(conn, "claimer", 2 * FAN_IN_ROUNDS)
    parent: dict[tuple[uuid.UUID, str], Row] = {(r["task_uuid"], r["step_name"]): r for r in claims}
    first, second, watcher = await sessions(3)
    observer = Observer(watcher)

    blocked = 0
    for i, task in enumerate(tasks):
        # alternate which session gets which parent, so both sessions win races
        left, right = (first, second) if i % 2 == 0 else (second, first)
        a, b = parent[(task, "a")], parent[(task, "b")]

        sides = [(left, completing([success(a)])), (right, completing([success(b)]))]
        if mode == "transactions":
            outcomes, waits = await overlapped(observer, sides)
            blocked += waits
            results = settled(outcomes)
        else:
            results = await together(sides)
        assert [statuses(r) for r in results] == [["applied"], ["applied"]], f"round {i}"

    if mode == "transactions":
        # Both completions lock the child row: in every round one of them waited for the other.
        assert blocked == FAN_IN_ROUNDS
    assert_enqueued_once(await fan_in_children(conn, tasks, ["c"]), FAN_IN_ROUNDS)
    assert await live_messages(conn) == FAN_IN_ROUNDS
    await assert_no_violations(conn)

    assert await drain(conn) == FAN_IN_ROUNDS
    states = await conn.fetch(
        "SELECT state, count(*) AS n FROM tasker.tasks WHERE task_uuid = ANY($1) GROUP BY state",
        tasks,
    )
    assert {r["state"]: r["n"] for r in states} == {"complete": FAN_IN_ROUNDS}
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)


@pytest.mark.timeout(30)
async def test_fan_in_blocked_completion_enqueues_child_after_commit(
    conn: db.Connection, sessions: Opener
) -> None:
    """A completes parent a and holds its transaction; B's completion of b waits on the child's
    row lock; A commits; B returns and is the session that enqueues c."""
    await register(conn, "fanin", FAN_IN)
    [task] = await create_tasks(conn, "fanin", 1)
    claims = {r["step_name"]: r for r in await claim_all(conn, "claimer", 2)}
    steps = (await step_ids(conn, [task]))[task]
    session_a, session_b, watcher = await sessions(3)
    observer = Observer(watcher)

    tx_a = session_a.raw.transaction()
    await tx_a.start()
    assert statuses(await session_a.complete_steps([success(claims["a"])])) == ["applied"]
    # inside A's transaction the child is one parent short and still pending
    assert (
        await session_a.fetchval(
            "SELECT pending_parents FROM tasker.steps WHERE step_uuid = $1", steps["c"]
        )
        == 1
    )

    tx_b = session_b.raw.transaction()
    await tx_b.start()
    xid_b = await session_b.fetchval("SELECT (txid_current() % 4294967296)::bigint")
    pending_b = asyncio.create_task(session_b.complete_steps([success(claims["b"])]))
    wait = await observer.until_blocked(session_b.backend_pid, by=session_a.backend_pid)
    assert wait["wait_event_type"] == "Lock"
    assert not pending_b.done()
    # nobody else sees A's uncommitted work
    child = await watcher.fetchrow(
        "SELECT state, pending_parents FROM tasker.steps WHERE step_uuid = $1", steps["c"]
    )
    assert child is not None
    assert (child["state"], child["pending_parents"]) == ("pending", 2)

    await tx_a.commit()
    assert statuses(await asyncio.wait_for(pending_b, 10)) == ["applied"]
    await tx_b.commit()

    [row] = await fan_in_children(conn, [task], ["c"])
    assert (row["state"], row["pending_parents"], row["messages"], row["enqueues"]) == (
        "enqueued",
        0,
        1,
        1,
    )
    # B's transaction wrote the enqueue transition and the child's message
    writers = await conn.fetch(
        """
        SELECT xmin::text::bigint AS xid FROM tasker.step_transitions
         WHERE step_uuid = $1::uuid AND event = 'dependencies_satisfied'
        UNION ALL
        SELECT xmin::text::bigint FROM tasker.queue_messages m
         WHERE m.message->>'step_uuid' = $1::uuid::text
        """,
        steps["c"],
    )
    assert [r["xid"] for r in writers] == [xid_b, xid_b]
    await assert_no_violations(conn)


# --- concurrent workers ----------------------------------------------------------------------


async def run_workers(
    conns: Sequence[db.Connection], total_steps: int, *, within: float = 60
) -> list[list[Row]]:
    """Each connection loops claim_steps(20) -> complete_steps(success) until every step is
    complete; returns what each one claimed. An empty claim while others still hold steps
    (whose completions enqueue children) polls again with a deadline."""
    done = 0
    deadline = time.monotonic() + within

    async def worker(conn: db.Connection, name: str) -> list[Row]:
        nonlocal done
        claimed: list[Row] = []
        while done < total_steps:
            rows = await conn.claim_step_rows(NS, name, 20, LONG_LEASE)
            if not rows:
                assert time.monotonic() < deadline, f"stuck at {done} of {total_steps} steps"
                await asyncio.sleep(0.002)
                continue
            claimed.extend(rows)
            result = await conn.complete_steps([success(r, {"by": name}) for r in rows])
            assert set(statuses(result)) == {"applied"}, [dict(r) for r in result]
            done += len(rows)
        return claimed

    return list(
        await asyncio.wait_for(
            asyncio.gather(*(worker(c, f"w{i}") for i, c in enumerate(conns))), within + 5
        )
    )


async def assert_all_committed_once(
    conn: db.Connection, tasks: Sequence[uuid.UUID], per_task: int
) -> None:
    summary = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE t.state = 'complete') AS complete_tasks,
               (SELECT count(*) FROM tasker.steps s WHERE s.task_uuid = ANY($1)) AS steps,
               (SELECT count(*) FROM tasker.steps s WHERE s.task_uuid = ANY($1)
                  AND s.state = 'complete' AND s.attempts = 1) AS complete_steps,
               (SELECT count(*) FROM tasker.steps s WHERE s.task_uuid = ANY($1)
                  AND (SELECT count(*) FROM tasker.step_transitions tr
                        WHERE tr.step_uuid = s.step_uuid AND tr.event = 'succeeded') <> 1)
                   AS not_committed_once
          FROM tasker.tasks t
         WHERE t.task_uuid = ANY($1)
        """,
        list(tasks),
    )
    n = len(tasks)
    assert summary is not None
    assert dict(summary) == {
        "complete_tasks": n,
        "steps": n * per_task,
        "complete_steps": n * per_task,
        "not_committed_once": 0,
    }
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("shape", "count"), [("single", 2000), ("linear3", 500)], ids=["single_x2000", "linear3_x500"]
)
async def test_four_workers_commit_every_step_once(
    conn: db.Connection, sessions: Opener, shape: str, count: int
) -> None:
    deps = SINGLE if shape == "single" else LINEAR3
    await register(conn, shape, deps)
    tasks = await create_tasks(conn, shape, count)
    total = count * len(deps)
    claimed = await run_workers(await sessions(4), total)

    flat = [r["step_uuid"] for rows in claimed for r in rows]
    assert len(flat) == len(set(flat)) == total, "a step was claimed twice"
    assert all(rows for rows in claimed), [len(rows) for rows in claimed]
    assert {r["attempt"] for rows in claimed for r in rows} == {1}
    await assert_all_committed_once(conn, tasks, len(deps))
    # the results stored are the ones the claiming worker sent
    by_worker = {r["step_uuid"]: f"w{i}" for i, rows in enumerate(claimed) for r in rows}
    stored = await conn.fetch(
        "SELECT step_uuid, results->>'by' AS by FROM tasker.steps WHERE task_uuid = ANY($1)", tasks
    )
    assert {r["step_uuid"]: r["by"] for r in stored} == by_worker


# --- lock order ------------------------------------------------------------------------------

LOCK_ORDER_ROUNDS = 40
PAIRS_PER_ROUND = 8


@pytest.mark.timeout(60)
async def test_sibling_batches_in_opposite_orders_never_deadlock(
    conn: db.Connection, sessions: Opener
) -> None:
    """Session A completes one parent of each fan-in in one order, session B the sibling
    parents in the opposite order, both in open transactions released by a barrier. Locking
    children (and tasks) in batch order would deadlock every round; the engine's order
    (messages, own steps, children by step_uuid, tasks by task_uuid) must never."""
    await register(conn, "fanin", FAN_IN)
    await register(conn, "twin", TWIN)
    pair_tasks = await create_tasks(conn, "fanin", LOCK_ORDER_ROUNDS * PAIRS_PER_ROUND)
    twin_tasks = await create_tasks(conn, "twin", LOCK_ORDER_ROUNDS)
    roots = len(pair_tasks) * 2 + len(twin_tasks) * 4
    claims = await claim_all(conn, "claimer", roots)
    held = {(r["task_uuid"], r["step_name"]): r for r in claims}
    session_a, session_b, watcher = await sessions(3)
    observer = Observer(watcher)

    deadlocks: list[str] = []
    blocked = 0
    for rnd in range(LOCK_ORDER_ROUNDS):
        group = pair_tasks[rnd * PAIRS_PER_ROUND : (rnd + 1) * PAIRS_PER_ROUND]
        twin = twin_tasks[rnd]
        # A: a of tasks 0..7 (children c0..c7, tasks T0..T7), then x1 (-> X), x2 (-> Y)
        batch_a = [success(held[(t, "a")]) for t in group]
        batch_a += [success(held[(twin, "x1")]), success(held[(twin, "x2")])]
        # B: y2 (-> Y), y1 (-> X), then b of tasks 7..0 (children c7..c0, tasks T7..T0)
        batch_b = [success(held[(twin, "y2")]), success(held[(twin, "y1")])]
        batch_b += [success(held[(t, "b")]) for t in reversed(group)]
        results, waits = await overlapped(
            observer,
            [
                (session_a, completing(batch_a)),
                (session_b, completing(batch_b)),
            ],
        )
        blocked += waits
        for r in results:
            if isinstance(r, BaseException):
                if is_deadlock(r):
                    deadlocks.append(f"round {rnd}: {r}")
                    continue
                raise r
            assert set(statuses(r)) == {"applied"}
    assert deadlocks == []
    assert blocked == LOCK_ORDER_ROUNDS  # the batches really contended every round

    assert_enqueued_once(await fan_in_children(conn, pair_tasks, ["c"]), len(pair_tasks))
    assert_enqueued_once(await fan_in_children(conn, twin_tasks, ["X", "Y"]), 2 * len(twin_tasks))
    await assert_no_violations(conn)


# --- claim vs cancel, claim vs complete ------------------------------------------------------


async def make_visible(conn: db.Connection, task: uuid.UUID) -> None:
    """Make the (delayed) messages of one task visible now."""
    await conn.execute(
        "UPDATE tasker.queue_messages SET vt = clock_timestamp() WHERE message->>'task_uuid' = $1",
        str(task),
    )


@pytest.mark.timeout(30)
async def test_claim_then_cancel_in_open_transactions(
    conn: db.Connection, sessions: Opener
) -> None:
    """Claimer holds an uncommitted claim; cancel_task waits for it, then cancels the running
    step; the claimer's late success is stale."""
    await register(conn, "fanin", FAN_IN)
    [task] = await create_tasks(conn, "fanin", 1)
    claimer, canceller, watcher = await sessions(3)
    observer = Observer(watcher)

    tx = claimer.raw.transaction()
    await tx.start()
    claims = await claimer.claim_step_rows(NS, "claimer", 10, LONG_LEASE)
    assert sorted(r["step_name"] for r in claims) == ["a", "b"]
    cancel = asyncio.create_task(canceller.cancel_task(task, "race"))
    await observer.until_blocked(canceller.backend_pid, by=claimer.backend_pid)
    assert not cancel.done()
    await tx.commit()
    summary = await asyncio.wait_for(cancel, 10)
    assert summary["cancelled_steps"] == 3

    late = await claimer.complete_steps([success(r) for r in claims])
    assert statuses(late) == ["stale", "stale"]
    states = await conn.fetch("SELECT state FROM tasker.steps WHERE task_uuid = $1", task)
    assert {r["state"] for r in states} == {"cancelled"}
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)


@pytest.mark.timeout(30)
async def test_cancel_then_claim_in_open_transactions(
    conn: db.Connection, sessions: Opener
) -> None:
    """An uncommitted cancel holds the task's messages: a claim passes over them without
    waiting (SKIP LOCKED) and takes other work; after the commit nothing is left to claim."""
    await register(conn, "fanin", FAN_IN)
    doomed, other = await create_tasks(conn, "fanin", 2)
    claimer, canceller = await sessions(2)

    tx = canceller.raw.transaction()
    await tx.start()
    await canceller.cancel_task(doomed, "race")
    tx_claim = claimer.raw.transaction()
    await tx_claim.start()
    claims = await asyncio.wait_for(claimer.claim_step_rows(NS, "claimer", 10, LONG_LEASE), 5)
    assert {r["task_uuid"] for r in claims} == {other}
    await tx.commit()
    await tx_claim.commit()

    assert await claimer.claim_step_rows(NS, "claimer", 10, LONG_LEASE) == []
    states = await conn.fetch("SELECT state FROM tasker.steps WHERE task_uuid = $1", doomed)
    assert {r["state"] for r in states} == {"cancelled"}
    await assert_no_violations(conn)


CANCEL_ROUNDS = 60
# A race whose named outcomes have not all occurred after CANCEL_ROUNDS goes on, a batch of
# CANCEL_ROUNDS tasks at a time, up to this many rounds: then the test fails (it did not race).
CANCEL_MAX_ROUNDS = 10 * CANCEL_ROUNDS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["transactions", "autocommit"])
async def test_claim_cancel_race(conn: db.Connection, sessions: Opener, mode: str) -> None:
    """claim_steps and cancel_task of the same task released together, many times: never a
    deadlock or an error; a step the claim got is cancelled under it and its success is stale.
    Both outcomes (the claim got the steps, the cancel came first) occur, and with open
    transactions a side was seen waiting for the other's locks."""
    await register(conn, "fanin", FAN_IN)
    claimer, canceller, watcher = await sessions(3)
    observer = Observer(watcher)

    tasks: list[uuid.UUID] = []
    claimed_rounds = blocked = 0
    while len(tasks) < CANCEL_ROUNDS or claimed_rounds in (0, len(tasks)):
        assert len(tasks) < CANCEL_MAX_ROUNDS, (
            f"after {len(tasks)} rounds the claim won {claimed_rounds}: the calls never raced"
        )
        # every message starts hidden; each round makes only its own task's messages visible
        batch = await create_tasks(conn, "fanin", CANCEL_ROUNDS, options={"delay_seconds": 3600})
        for task in batch:
            i = len(tasks)
            tasks.append(task)
            await make_visible(conn, task)
            # alternate which call is sent first after the barrier
            sides = [(claimer, claiming("claimer", 2)), (canceller, cancelling(task))]
            if i % 2:
                sides.reverse()
            if mode == "transactions":
                raw, waits = await overlapped(observer, sides)
                results = settled(raw)
                blocked += waits
            else:
                results = await together(sides)
            claims: list[Row] = results[0] if i % 2 == 0 else results[1]
            assert all(r["task_uuid"] == task for r in claims)
            if claims:
                claimed_rounds += 1
                answers = await claimer.complete_steps([success(r) for r in claims])
                assert set(statuses(answers)) == {"stale"}
    if mode == "transactions":
        assert blocked > 0, "no side ever waited for the other's locks"

    # After the race settles: one more claim pass, which deletes the message of any step that
    # was finished (cancelled) while a claim held it; then the invariants must hold.
    for task in tasks:
        await make_visible(conn, task)
    assert await conn.claim_step_rows(NS, "sweeper", 10000, LONG_LEASE) == []
    states = await conn.fetch(
        "SELECT DISTINCT state FROM tasker.steps WHERE task_uuid = ANY($1)", tasks
    )
    assert [r["state"] for r in states] == ["cancelled"]
    task_states = await conn.fetch(
        "SELECT DISTINCT state FROM tasker.tasks WHERE task_uuid = ANY($1)", tasks
    )
    assert [r["state"] for r in task_states] == ["cancelled"]
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)
    print(f"claim won the race in {claimed_rounds} of {len(tasks)} rounds, {blocked} waits")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["transactions", "autocommit"])
async def test_completion_cancel_race(conn: db.Connection, sessions: Opener, mode: str) -> None:
    """A worker completes both parents of a fan-in (which enqueues the child) while an operator
    cancels the task, released together: never a deadlock; either the successes are applied
    and the cancel then takes the child and its fresh message too, or they are stale. Both
    outcomes occur, and with open transactions a side was seen waiting for the other's locks."""
    await register(conn, "fanin", FAN_IN)
    worker, operator, watcher = await sessions(3)
    observer = Observer(watcher)

    tasks: list[uuid.UUID] = []
    applied_rounds = blocked = 0
    while len(tasks) < CANCEL_ROUNDS or applied_rounds in (0, len(tasks)):
        assert len(tasks) < CANCEL_MAX_ROUNDS, (
            f"after {len(tasks)} rounds the successes won {applied_rounds}: the calls never raced"
        )
        batch = await create_tasks(conn, "fanin", CANCEL_ROUNDS)
        held = await claim_all(conn, "claimer", 2 * CANCEL_ROUNDS)
        by_task: dict[uuid.UUID, list[Row]] = {t: [] for t in batch}
        for r in held:
            by_task[r["task_uuid"]].append(r)
        for task in batch:
            i = len(tasks)
            tasks.append(task)
            sides = [
                (worker, completing([success(r) for r in by_task[task]])),
                (operator, cancelling(task)),
            ]
            if i % 2:
                sides.reverse()
            if mode == "transactions":
                raw, waits = await overlapped(observer, sides)
                results = settled(raw)
                blocked += waits
            else:
                results = await together(sides)
            answers = statuses(results[0] if i % 2 == 0 else results[1])
            assert set(answers) in ({"applied"}, {"stale"}), answers
            applied_rounds += answers[0] == "applied"
    if mode == "transactions":
        assert blocked > 0, "no side ever waited for the other's locks"

    rows = await conn.fetch(
        """
        SELECT s.name, s.state, count(*) AS n FROM tasker.steps s
         WHERE s.task_uuid = ANY($1) GROUP BY 1, 2
        """,
        tasks,
    )
    by_state = {(r["name"], r["state"]): r["n"] for r in rows}
    assert by_state.get(("c", "cancelled")) == len(tasks)
    assert by_state.get(("a", "complete"), 0) == applied_rounds
    task_states = await conn.fetch(
        "SELECT DISTINCT state FROM tasker.tasks WHERE task_uuid = ANY($1)", tasks
    )
    assert [r["state"] for r in task_states] == ["cancelled"]
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)
    print(f"the successes won the race in {applied_rounds} of {len(tasks)} rounds, {blocked} waits")


async def expire_and_wait(conn: db.Connection, count: int) -> None:
    """Poll (deadline) until `count` messages are visible again: their leases ran out."""
    deadline = time.monotonic() + 10
    while (
        await conn.fetchval(
            "SELECT count(*) FROM tasker.queue_messages WHERE vt <= clock_timestamp()"
        )
        < count
    ):
        assert time.monotonic() < deadline, "leases never expired"
        await asyncio.sleep(0.02)


CLAIM_COMPLETE_STEPS = 100


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["transactions", "autocommit"])
async def test_reclaim_races_late_completion(
    conn: db.Connection, sessions: Opener, mode: str
) -> None:
    """Worker 1's leases ran out; its batch of successes races worker 2's claim meeting the same
    messages. Per step exactly one side wins: either worker 1's success is applied, or the claim
    records the lost lease (the step waits for its backoff) and worker 1's success is stale. The
    claim hands out none of them."""
    await register(conn, "single", SINGLE)
    tasks = await create_tasks(conn, "single", CLAIM_COMPLETE_STEPS)
    late, reclaimer, watcher = await sessions(3)
    observer = Observer(watcher)
    first = await claim_all(late, "late", CLAIM_COMPLETE_STEPS, lease=0.2)
    await expire_and_wait(conn, CLAIM_COMPLETE_STEPS)

    sides = [
        (late, completing([success(r) for r in reversed(first)])),
        (reclaimer, claiming("reclaimer", CLAIM_COMPLETE_STEPS)),
    ]
    if mode == "transactions":
        results = settled((await overlapped(observer, sides))[0])
    else:
        results = await together(sides)
    completed: list[Row] = results[0]
    assert results[1] == []  # a lost lease is never handed out at once
    applied = {r["step_uuid"] for r in completed if r["status"] == "applied"}
    stale = {r["step_uuid"] for r in completed if r["status"] == "stale"}
    recorded = {
        r["step_uuid"]
        for r in await conn.fetch(
            "SELECT step_uuid FROM tasker.steps WHERE state = 'waiting_for_retry' "
            "AND last_error->>'error_code' = 'lease_expired' AND last_error->>'worker_id' = 'late'"
        )
    }
    assert applied | stale == {r["step_uuid"] for r in first}
    assert stale == recorded, "a step both stale for worker 1 and not recorded lost (or vice versa)"
    print(f"worker 1 kept {len(applied)}, worker 2 recorded {len(recorded)} lost leases")

    if recorded:
        # after their backoff (claim_all polls) the recorded steps run as attempt 2
        retried = await claim_all(reclaimer, "reclaimer", len(recorded))
        assert {r["step_uuid"] for r in retried} == recorded
        assert {(r["attempt"], r["claim_event"]) for r in retried} == {(2, "claimed")}
        result = await reclaimer.complete_steps([success(r, {"by": "reclaimer"}) for r in retried])
        assert set(statuses(result)) == {"applied"}
    await assert_all_committed_once_any_attempt(conn, tasks)
    stored = await conn.fetch(
        "SELECT step_uuid, results->>'by' AS by FROM tasker.steps WHERE task_uuid = ANY($1)", tasks
    )
    assert {r["step_uuid"] for r in stored if r["by"] == "reclaimer"} == recorded


async def assert_all_committed_once_any_attempt(
    conn: db.Connection, tasks: Sequence[uuid.UUID]
) -> None:
    bad = await conn.fetchval(
        """
        SELECT count(*) FROM tasker.steps s
         WHERE s.task_uuid = ANY($1)
           AND (s.state <> 'complete'
                OR (SELECT count(*) FROM tasker.step_transitions tr
                     WHERE tr.step_uuid = s.step_uuid AND tr.event = 'succeeded') <> 1)
        """,
        list(tasks),
    )
    assert bad == 0
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tasker.tasks WHERE task_uuid = ANY($1) AND state <> 'complete'",
            list(tasks),
        )
        == 0
    )
    assert await live_messages(conn) == 0
    await assert_no_violations(conn)


@pytest.mark.timeout(30)
async def test_late_completion_waits_for_uncommitted_reclaim_and_is_stale(
    conn: db.Connection, sessions: Opener
) -> None:
    """Deterministic order: the claim recording the lost lease is uncommitted; worker 1's
    success for attempt 1 blocks on the message, and once the claim commits it is stale. The
    step then runs as attempt 2 after its backoff."""
    await register(conn, "single", SINGLE)
    [task] = await create_tasks(conn, "single", 1)
    late, reclaimer, watcher = await sessions(3)
    observer = Observer(watcher)
    [first] = await claim_all(late, "late", 1, lease=0.2)
    await expire_and_wait(conn, 1)

    tx = reclaimer.raw.transaction()
    await tx.start()
    assert await reclaimer.claim_step_rows(NS, "reclaimer", 1, LONG_LEASE) == []  # records it
    pending = asyncio.create_task(late.complete_steps([success(first, {"by": "late"})]))
    await observer.until_blocked(late.backend_pid, by=reclaimer.backend_pid)
    await tx.commit()
    [answer] = await asyncio.wait_for(pending, 10)
    assert answer["status"] == "stale"
    assert answer["detail"] == "step is waiting_for_retry at attempt 1, claim 1"

    [second] = await claim_all(reclaimer, "reclaimer", 1)
    assert (second["step_uuid"], second["attempt"]) == (first["step_uuid"], 2)
    [ok] = await reclaimer.complete_steps([success(second, {"by": "reclaimer"})])
    assert ok["status"] == "applied"
    assert (
        await conn.fetchval("SELECT results->>'by' FROM tasker.steps WHERE task_uuid = $1", task)
        == "reclaimer"
    )
    await assert_all_committed_once_any_attempt(conn, [task])


@pytest.mark.timeout(30)
async def test_completion_first_then_claim_skips_without_waiting(
    conn: db.Connection, sessions: Opener
) -> None:
    """Deterministic order: worker 1's success (lease expired, not yet reclaimed) is uncommitted;
    a claim passes over the locked message at once; after the commit there is nothing to claim."""
    await register(conn, "single", SINGLE)
    [task] = await create_tasks(conn, "single", 1)
    late, claimer = await sessions(2)
    [first] = await claim_all(late, "late", 1, lease=0.2)
    await expire_and_wait(conn, 1)

    tx = late.raw.transaction()
    await tx.start()
    assert statuses(await late.complete_steps([success(first)])) == ["applied"]
    assert await asyncio.wait_for(claimer.claim_step_rows(NS, "claimer", 5, LONG_LEASE), 5) == []
    await tx.commit()
    assert await claimer.claim_step_rows(NS, "claimer", 5, LONG_LEASE) == []
    await assert_all_committed_once_any_attempt(conn, [task])


# --- stale zombie ----------------------------------------------------------------------------

ZOMBIE_STEPS = 10


@pytest.mark.timeout(30)
async def test_zombie_success_is_stale_when_completing_concurrently(
    conn: db.Connection, sessions: Opener
) -> None:
    """Worker A's leases (0.3 s) run out, worker B claims every step as attempt 2 (after the
    lost leases were recorded and their backoff passed); A and B
    then complete at the same moment in open transactions: A is stale, only B's results stay."""
    await register(conn, "single", SINGLE)
    tasks = await create_tasks(conn, "single", ZOMBIE_STEPS)
    zombie, worker_b, watcher = await sessions(3)
    observer = Observer(watcher)
    held_a = await claim_all(zombie, "A", ZOMBIE_STEPS, lease=0.3)
    held_b = await claim_all(worker_b, "B", ZOMBIE_STEPS)  # polls until the leases ran out
    assert {r["step_uuid"] for r in held_b} == {r["step_uuid"] for r in held_a}
    assert {(r["attempt"], r["claim_event"]) for r in held_b} == {(2, "claimed")}

    outcomes_a = [success(r, {"by": "A"}) for r in held_a]
    outcomes_b = [success(r, {"by": "B"}) for r in reversed(held_b)]
    results, _ = await overlapped(
        observer, [(zombie, completing(outcomes_a)), (worker_b, completing(outcomes_b))]
    )
    answers_a, answers_b = settled(results)
    assert set(statuses(answers_a)) == {"stale"}
    assert set(statuses(answers_b)) == {"applied"}

    rows = await conn.fetch(
        """
        SELECT s.results->>'by' AS by, s.attempts,
               array(SELECT tr.attempt FROM tasker.step_transitions tr
                      WHERE tr.step_uuid = s.step_uuid AND tr.event = 'succeeded') AS succeeded
          FROM tasker.steps s WHERE s.task_uuid = ANY($1)
        """,
        tasks,
    )
    assert {(r["by"], r["attempts"], tuple(r["succeeded"])) for r in rows} == {("B", 2, (2,))}
    await assert_all_committed_once_any_attempt(conn, tasks)


# --- claimers in open transactions -----------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["one_after_another", "all_at_once"])
async def test_claimers_in_open_transactions_never_share_a_step(
    conn: db.Connection, sessions: Opener, mode: str
) -> None:
    await register(conn, "single", SINGLE)
    await create_tasks(conn, "single", 40)
    claimers = await sessions(4)
    txs = [c.raw.transaction() for c in claimers]
    for tx in txs:
        await tx.start()
    try:
        if mode == "one_after_another":
            # each claims while the previous ones still hold their uncommitted claims
            got = [
                await c.claim_step_rows(NS, f"c{i}", 10, LONG_LEASE) for i, c in enumerate(claimers)
            ]
        else:
            got = await together([(c, claiming(f"c{i}", 10)) for i, c in enumerate(claimers)])
        for tx in txs:
            await tx.commit()
    except BaseException:
        for tx in txs:
            await tx.rollback()
        raise
    ids = [r["step_uuid"] for rows in got for r in rows]
    assert len(ids) == len(set(ids)) == 40, [len(rows) for rows in got]
    if mode == "one_after_another":
        assert [len(rows) for rows in got] == [10, 10, 10, 10]
    transitions = await conn.fetchval(
        "SELECT count(*) FROM tasker.step_transitions WHERE event = 'claimed'"
    )
    assert transitions == 40
    await assert_no_violations(conn)


# --- query plans -----------------------------------------------------------------------------

PLAN_NS = "plan"
PLAN_TASKS = 25_000
PLAN_BATCH = 5_000
PLAN_ROUNDS = 7
PLAN_QTY = 10
# Tables no hot statement may read with a sequential scan, and the queue partitions (q_<name>).
BIG_TABLES = {"steps", "tasks", "step_edges", "queue_messages"}
QUEUE_PARTITIONS = ("q_",)


async def seed_plan_data(conn: db.Connection) -> None:
    """25,000 four-step linear tasks (100,000 steps, 75,000 edges, 25,000 visible root
    messages), created by tasker.create_tasks, then analyzed."""
    await conn.register_template(
        template("plan4", {"s1": [], "s2": ["s1"], "s3": ["s2"], "s4": ["s3"]}, PLAN_NS)
    )
    for first in range(1, PLAN_TASKS + 1, PLAN_BATCH):
        created = await conn.fetchval(
            """
            SELECT count(*)
              FROM tasker.create_tasks($1, 'plan4',
                       (SELECT jsonb_agg(jsonb_build_object('order', g, 'customer', 'c' || g % 977)
                                         ORDER BY g)
                          FROM generate_series($2::integer, $3::integer) g))
            """,
            PLAN_NS,
            first,
            first + PLAN_BATCH - 1,
        )
        assert created == PLAN_BATCH
    await conn.execute(
        "ANALYZE tasker.steps, tasker.tasks, tasker.step_edges, tasker.queue_messages,"
        f" tasker.q_{PLAN_NS}, tasker.step_transitions, tasker.task_transitions"
    )
    counts = await conn.fetchrow(
        f"""SELECT (SELECT count(*) FROM tasker.steps) AS steps,
                   (SELECT count(*) FROM tasker.step_edges) AS edges,
                   (SELECT count(*) FROM tasker.q_{PLAN_NS}) AS messages"""
    )
    assert counts is not None
    assert (counts["steps"], counts["edges"], counts["messages"]) == (
        4 * PLAN_TASKS,
        3 * PLAN_TASKS,
        PLAN_TASKS,
    )


@pytest.fixture(scope="session")
async def plan_template(pg_server: pgserver.TestServer) -> AsyncIterator[str]:
    """The database seed_plan_data filled, seeded once per session (skipped at once on a
    server without auto_explain)."""
    probe = await db.connect(pg_server.admin_dsn, check_schema=False)
    try:
        await plans.require_auto_explain(probe)
    finally:
        await probe.close()
    name = await seeded.seed_template(pg_server, PLAN_NS, seed_plan_data)
    yield name
    await pg_server.drop(name)


@pytest.fixture
async def plan_conn(
    pg_server: pgserver.TestServer, plan_template: str
) -> AsyncIterator[db.Connection]:
    """A connection to this test's own clone of the seeded plan database."""
    async with seeded.clone_connection(pg_server, plan_template) as conn:
        yield conn


async def hot_statements(conn: db.Connection) -> dict[str, plans.Expected]:
    """The statements claim_steps and complete_steps (with the helpers complete_steps calls)
    run on every call, each named by a fragment of its text and the indexes its plan must scan.
    """
    claim_idx = await plans.partition_index(
        conn, "tasker.queue_messages_claim_idx", f"tasker.q_{PLAN_NS}"
    )
    msg_pkey = await plans.partition_index(
        conn, "tasker.queue_messages_pkey", f"tasker.q_{PLAN_NS}"
    )
    expect = plans.Expected.of
    return {
        # _lock_visible (claim_steps' pick): the highest priority present, then the range of
        # visible messages at it
        "claim_top_priority": expect(
            "WHERE m.queue = p_queue AND m.lane IS NULL ORDER BY m.priority DESC", claim_idx
        ),
        "claim_visible": expect("m.priority = v_prio AND m.vt <= p_now", claim_idx),
        # claim_steps: lock the picked messages' steps (task state per step)
        "claim_pick": expect("locked_steps AS MATERIALIZED", "steps_pkey", "tasks_pkey"),
        # claim_steps: take the steps, lease the messages, hydrate (ancestors' results by name)
        "claim_run": expect(
            "SET vt = v_lease, read_ct = m.read_ct + 1",
            "steps_pkey",
            "tasks_pkey",
            "steps_task_name_idx",
            msg_pkey,
        ),
        # _lock_step_messages (complete_steps' first lock): the steps' messages by queue,
        # then each queue's lock
        "lock_step_messages": expect(
            "WHERE s.state = 'in_progress' AND s.attempts = c.attempt AND s.msg_id IS NOT NULL",
            "steps_pkey",
            "tasks_pkey",
        ),
        "lock_queue_messages": expect(
            "WHERE m.queue = v_queue AND m.msg_id = ANY (v_ids)", msg_pkey
        ),
        # complete_steps: apply the fenced outcomes, drop or move the messages
        "complete_apply": expect("move_msgs AS (", "steps_pkey", "tasks_pkey", msg_pkey),
        # complete_steps: the answer, with the state of a stale outcome's step
        "complete_answer": expect("ELSE 'stale' END", "steps_pkey"),
        # _release_children: lock the children, then count down their pending parents
        "children_lock": expect(
            "WHERE s.step_uuid IN (SELECT e.child_uuid FROM tasker.step_edges e",
            "steps_pkey",
            "step_edges_pkey",
        ),
        "children_release": expect(
            "SET pending_parents = s.pending_parents - d.n", "steps_pkey", "step_edges_pkey"
        ),
        # _apply_task_deltas: one counter update per task
        "task_deltas": expect(
            "SET completed_steps = t.completed_steps + d.completed", "tasks_pkey"
        ),
        # _enqueue_ready: the children that became ready
        "enqueue_ready": expect(
            "SET state = 'enqueued', msg_id = r.msg_id", "steps_pkey", "tasks_pkey"
        ),
    }


async def seq_scans(conn: db.Connection) -> dict[str, int]:
    """This backend's not yet flushed sequential-scan counts of the big tables (PG15 shows
    earlier unflushed transactions too: compare two readings inside one transaction)."""
    rows = await conn.fetch(
        """
        SELECT relname, seq_scan FROM pg_stat_xact_user_tables
         WHERE schemaname = 'tasker' AND (relname = ANY($1::text[]) OR relname LIKE 'q\\_%')
        """,
        sorted(BIG_TABLES),
    )
    return {r["relname"]: r["seq_scan"] for r in rows}


@pytest.mark.plans
@pytest.mark.timeout(90)
async def test_hot_statements_use_indexes_with_100k_steps(plan_conn: db.Connection) -> None:
    """claim_steps + complete_steps round trips on 100,000 steps, with the plan of every
    statement the functions run logged by auto_explain: each hot statement scans its indexes
    with the generic plan the functions are pinned to (whatever the session's plan_cache_mode,
    and the same plan on every call), no statement reads a big table sequentially, and no
    round's transaction counts a sequential scan of one."""
    conn = plan_conn
    expected = await hot_statements(conn)
    problems: set[str] = set()
    modes = ["auto", "force_custom_plan"]
    for mode in modes:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        async with plans.collect_plans(conn) as log:
            for _ in range(PLAN_ROUNDS):
                async with conn.transaction():
                    before = await seq_scans(conn)
                    claims = await conn.claim_step_rows(PLAN_NS, "w", PLAN_QTY, 30)
                    assert len(claims) == PLAN_QTY
                    done = await conn.complete_steps([success(r) for r in claims])
                    assert set(statuses(done)) == {"applied"}
                    after = await seq_scans(conn)
                problems.update(
                    f"{mode}: a round made a Seq Scan on {rel}"
                    for rel, n in after.items()
                    if n > before.get(rel, 0)
                )
        problems.update(
            f"{mode}: {p}"
            for p in plans.problems(
                log, expected, big_tables=BIG_TABLES, big_prefixes=QUEUE_PARTITIONS, generic=True
            )
        )
    await conn.execute("RESET plan_cache_mode")
    assert sorted(problems) == [], "\n".join(sorted(problems))
    # every round enqueued the children of the steps it completed
    assert await conn.fetchval(
        "SELECT count(*) FROM tasker.steps WHERE name = 's2' AND state = 'enqueued'"
    ) == PLAN_QTY * PLAN_ROUNDS * len(modes)


@pytest.mark.plans
@pytest.mark.timeout(90)
async def test_lease_statements_use_indexes_with_100k_steps(plan_conn: db.Connection) -> None:
    """extend_leases (the heartbeat) and release_steps on 100,000 steps: every statement they
    run scans indexes, with the generic plan the functions are pinned to. (Their claims come
    from tasker._parse_claims(); without its ROWS estimate the planner assumed 1000 rows and
    hash-joined a Seq Scan of tasker.steps on every heartbeat.)"""
    conn = plan_conn
    msg_pkey = await plans.partition_index(
        conn, "tasker.queue_messages_pkey", f"tasker.q_{PLAN_NS}"
    )
    keys = ("steps_pkey", "tasks_pkey", msg_pkey)
    expected = {
        # _lock_claim_messages: lock the claims' messages
        "lock_step_messages": plans.Expected.of(
            "WHERE s.state = 'in_progress' AND s.attempts = c.attempt AND s.msg_id IS NOT NULL",
            "steps_pkey",
            "tasks_pkey",
        ),
        "lock_queue_messages": plans.Expected.of(
            "WHERE m.queue = v_queue AND m.msg_id = ANY (v_ids)", msg_pkey
        ),
        "extend_leases": plans.Expected.of("current_claims AS MATERIALIZED (", *keys),
        "release_steps": plans.Expected.of(
            "SET attempts = s.attempts - CASE WHEN s.claim_spent_attempt", *keys
        ),
    }
    async with plans.collect_plans(conn) as log:
        claims = await conn.claim_step_rows(PLAN_NS, "w", PLAN_QTY, 30)
        fences = [
            {"step_uuid": str(r["step_uuid"]), "attempt": r["attempt"], "claim_seq": r["claim_seq"]}
            for r in claims
        ]
        extended = await conn.extend_leases(fences, 60)
        released = await conn.release_steps(fences)
    assert [r["extended"] for r in extended] == [True] * PLAN_QTY
    assert [r["released"] for r in released] == [True] * PLAN_QTY
    problems = plans.problems(
        log, expected, big_tables=BIG_TABLES, big_prefixes=QUEUE_PARTITIONS, generic=True
    )
    assert problems == [], "\n".join(problems)


# --- HOT updates -----------------------------------------------------------------------------

HOT_TASKS = 1000


@pytest.mark.timeout(90)
async def test_hot_path_updates_are_heap_only(conn: db.Connection, sessions: Opener) -> None:
    """No index on a column the hot path changes, fillfactor 70: the claim and completion
    updates of steps and tasks are mostly HOT (measured 76-83 %; an index on a column these
    updates change, such as state, drops a table's ratio to about 0). One update per task is
    not HOT on purpose: the last one sets completed_at, which the partial index of live tasks
    (tasks_live_idx, read by repair_messages) depends on. A queue message's lease update is
    never HOT, on purpose: vt is in the claim index, so a claim reads only visible messages
    (tests/sql/test_claim_cost.py)."""
    await register(conn, "linear3", LINEAR3)
    tasks = await create_tasks(conn, "linear3", HOT_TASKS)
    steps = 3 * HOT_TASKS
    workers = await sessions(2)
    await run_workers(workers, steps)
    await assert_all_committed_once(conn, tasks, 3)
    if int(await conn.fetchval("SHOW server_version_num")) >= 150000:
        for w in workers:
            # PG15+: flush this backend's pending statistics as soon as it is idle
            await w.execute("SELECT pg_stat_force_next_flush()")

    # steps: claim + completion per step; tasks: a counter update per completion batch, the
    # last one per task not HOT; queue partition: one lease update per claim
    expected = {"steps": 2 * steps, "tasks": HOT_TASKS + 1, f"q_{NS}": steps}
    deadline = time.monotonic() + 15
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = await conn.fetch(
                """
                SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                 WHERE schemaname = 'tasker' AND relname = ANY($1::text[])
                """,
                list(expected),
            )
        stats = {r["relname"]: (r["n_tup_upd"], r["n_tup_hot_upd"]) for r in rows}
        if all(stats.get(rel, (0, 0))[0] >= n for rel, n in expected.items()):
            break
        assert time.monotonic() < deadline, f"statistics never arrived: {stats}"
        await asyncio.sleep(0.05)
    upd, hot = stats["tasks"]
    stats["tasks (before the last update)"] = (upd - HOT_TASKS, hot)
    del stats["tasks"]
    assert stats.pop(f"q_{NS}") == (steps, 0)
    ratios = {rel: hot / upd for rel, (upd, hot) in stats.items()}
    report = ", ".join(
        f"{rel}: {hot}/{upd} HOT ({ratios[rel]:.0%})" for rel, (upd, hot) in sorted(stats.items())
    )
    print(report)
    low = {rel: r for rel, r in ratios.items() if r < 0.3}
    assert low == {}, f"few HOT updates: {report}"
