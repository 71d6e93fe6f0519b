"""The points of comparison: a raw SQL claim/acknowledge loop (its throughput and its latency
at a trickle), the idle server's commit round trip, and a bare one-row INSERT.

This is the only module of the benchmark that writes its own SQL against its own tables, and it
does so on purpose: a baseline is the ceiling of doing the same work by hand, so it must not go
through the engine (nor through `db.Connection`'s engine methods) it is compared with. It still
runs on `db.Connection`, for the same codecs and error translation.

The baseline scenario: 4 connections, each claiming 50 messages per statement of one plain
table with pgmq semantics (`FOR UPDATE SKIP LOCKED`, vt pushed, read_ct + 1) and acknowledging
them with one batched DELETE, until every pre-filled message is gone. It runs before the ratio
scenarios and once more at the end of the run; the drift between the two says how steady the
machine was.

The latency probe (run by the latency scenario, next to the engine's latencies): the same loop
with one consumer connection woken by NOTIFY, fed one message at a time at the scenario's rate;
and, first, the commit round trip of a one-row INSERT on the idle server, the floor under every
latency with fsync on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasker_pg import db
from tasker_pg.bench import queries
from tasker_pg.bench.machine import CpuMeter, cpu_per_step
from tasker_pg.bench.options import (
    BASELINE_BATCH,
    BASELINE_CONNECTIONS,
    BASELINE_MESSAGES,
    STALL_TIMEOUT,
    BenchError,
)
from tasker_pg.bench.report import Row, ms_summary

if TYPE_CHECKING:
    from tasker_pg.bench.runner import Bench

# pgmq's queue table, minus its vt index (an index on vt would make every claim a non-HOT
# update and lower the ceiling; the engine's own queue has no such index either).
_QUEUE_TABLE = """
CREATE TABLE bench_queue (
    msg_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    read_ct     integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    vt          timestamptz NOT NULL DEFAULT clock_timestamp(),
    message     jsonb NOT NULL
)
"""
# Messages as big as the engine's: two uuids.
_FILL = """
INSERT INTO bench_queue (message)
SELECT jsonb_build_object('step_uuid', gen_random_uuid(), 'task_uuid', gen_random_uuid())
  FROM generate_series(1, $1)
"""
_VACUUM_ANALYZE = "VACUUM ANALYZE bench_queue"
# pgmq's read(): the lock sits in a MATERIALIZED CTE with ORDER BY ... LIMIT, so the UPDATE
# touches exactly the rows locked (a bare subquery could be re-evaluated and update more).
_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT msg_id
      FROM bench_queue
     WHERE vt <= clock_timestamp()
     ORDER BY msg_id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE bench_queue m
   SET vt = clock_timestamp() + interval '30 seconds',
       read_ct = m.read_ct + 1
  FROM picked
 WHERE m.msg_id = picked.msg_id
RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message
"""
_ACK = "DELETE FROM bench_queue WHERE msg_id = ANY($1::bigint[])"
_LEFT = "SELECT count(*) FROM bench_queue"

# The create scenario's reference: one commit per call of the smallest useful write.
_INSERT_TABLE = """
CREATE TABLE bench_insert (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload jsonb NOT NULL
)
"""
_INSERT_ROW = "INSERT INTO bench_insert (payload) VALUES ($1::jsonb)"


async def create_insert_table(conn: db.Connection) -> None:
    """The table of the bare-insert reference (`bench_insert`, counted by the create check)."""
    await conn.execute(_INSERT_TABLE)


async def insert_row(conn: db.Connection, payload: Any) -> None:
    """One bare one-row INSERT, committed on its own."""
    await conn.execute(_INSERT_ROW, payload)


async def _claim_ack_loop(conn: db.Connection) -> tuple[list[int], list[int]]:
    """Claim up to BASELINE_BATCH messages, delete them in one statement, until none is left.

    On the asyncpg connection underneath, as a hand-written consumer would; returns the
    acknowledged msg_ids and the read counts they were claimed with.
    """
    raw = conn.raw
    ids: list[int] = []
    reads: list[int] = []
    while True:
        rows = await raw.fetch(_CLAIM, BASELINE_BATCH)
        if not rows:
            return ids, reads
        batch = [r["msg_id"] for r in rows]
        await raw.execute(_ACK, batch)
        ids.extend(batch)
        reads.extend(r["read_ct"] for r in rows)


async def measure(bench: Bench, label: str) -> dict[str, Any]:
    """Pre-fill the plain table, drain it with the raw loops; the figures of one drain."""
    messages = bench.options.count(BASELINE_MESSAGES)
    async with bench.fresh_database(label) as dsn:
        setup = await db.connect(dsn)
        conns: list[db.Connection] = []
        try:
            await setup.execute(_QUEUE_TABLE)
            bench.say(f"{label}: pre-filling {messages:,} messages")
            await setup.execute(_FILL, messages)
            await setup.execute(_VACUUM_ANALYZE)
            await queries.checkpoint(setup)
            for _ in range(BASELINE_CONNECTIONS):
                conns.append(await db.connect(dsn))
            meter = CpuMeter([c.backend_pid for c in conns])
            bench.say(f"{label}: draining with {BASELINE_CONNECTIONS} connections")
            client_before = time.process_time()
            meter.start()
            started = time.perf_counter()
            per_conn = await asyncio.gather(*(_claim_ack_loop(c) for c in conns))
            elapsed = time.perf_counter() - started
            server_cpu = meter.stop() if bench.server_local else None
            client_cpu = time.process_time() - client_before
            ids = [i for batch in per_conn for i in batch[0]]
            reads = [r for batch in per_conn for r in batch[1]]
            left = int(await setup.fetchval(_LEFT))
            if len(ids) != messages or len(set(ids)) != messages or left:
                raise BenchError(
                    f"{label}: {len(set(ids))} distinct of {messages} messages "
                    f"acknowledged ({len(ids)} claims, {left} left in the table)"
                )
            if any(r != 1 for r in reads):
                raise BenchError(f"{label}: a message was delivered more than once")
        finally:
            for c in conns:
                await c.close()
            await setup.close()
    return {
        "messages": messages,
        "seconds": round(elapsed, 4),
        "messages_per_s": round(messages / elapsed, 1),
        "client_cpu_us_per_msg": cpu_per_step(client_cpu, messages),
        "server_cpu_us_per_msg": cpu_per_step(server_cpu, messages),
    }


async def baseline(bench: Bench) -> None:
    """The baseline scenario: messages per second, the denominator of every ratio."""
    result = await measure(bench, "baseline")
    rate = result["messages_per_s"]
    bench.baseline_rate = rate
    bench.results["baseline"] = {
        "ok": True,
        "connections": BASELINE_CONNECTIONS,
        "batch": BASELINE_BATCH,
        **result,
        "all_completed": True,
    }
    bench.emit(
        Row(
            "baseline",
            f"messages/s ({BASELINE_CONNECTIONS} conns x {BASELINE_BATCH}/claim)",
            f"{rate:,.0f}",
            "1.000x",
        )
    )


async def baseline_again(bench: Bench) -> None:
    """The baseline once more after the other scenarios: how steady was the machine?"""
    result = await measure(bench, "baseline_end")
    first = bench.results["baseline"]
    drift = (result["messages_per_s"] / first["messages_per_s"] - 1) * 100
    first["end_of_run"] = result
    first["drift_pct"] = round(drift, 1)
    bench.emit(
        Row(
            "baseline",
            "messages/s, again at the end",
            f"{result['messages_per_s']:,.0f}",
            f"{drift:+.0f}%",
        )
    )


# --- the raw loop's latency ----------------------------------------------------------------------

# The latency probe's queue: the baseline's table, plus the chain and hop a message stands for.
_LATENCY_QUEUE = """
CREATE TABLE bench_latency_queue (
    msg_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    read_ct     integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    vt          timestamptz NOT NULL DEFAULT clock_timestamp(),
    chain       integer NOT NULL,
    hop         integer NOT NULL,
    message     jsonb NOT NULL
                DEFAULT jsonb_build_object('step_uuid', gen_random_uuid(),
                                           'task_uuid', gen_random_uuid())
)
"""
_LATENCY_CHANNEL = "bench_latency_queue"
# One message sent and announced in one autocommit statement, as create_task announces its
# ready step.
_LATENCY_SEND = """
WITH sent AS (INSERT INTO bench_latency_queue (chain, hop) VALUES ($1, 0) RETURNING 1)
SELECT pg_notify('bench_latency_queue', '') FROM sent
"""
_LATENCY_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT msg_id
      FROM bench_latency_queue
     WHERE vt <= clock_timestamp()
     ORDER BY msg_id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE bench_latency_queue m
   SET vt = clock_timestamp() + interval '30 seconds',
       read_ct = m.read_ct + 1
  FROM picked
 WHERE m.msg_id = picked.msg_id
RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.chain, m.hop
"""
_LATENCY_ACK = "DELETE FROM bench_latency_queue WHERE msg_id = ANY($1::bigint[])"
# The acknowledgement of a hop that has a next one sends it in the same transaction (as
# complete_steps enqueues the ready children of the step it completes), and announces it.
_LATENCY_ACK_AND_SEND = """
WITH acked AS (DELETE FROM bench_latency_queue WHERE msg_id = ANY($1::bigint[])),
     sent AS (INSERT INTO bench_latency_queue (chain, hop)
              SELECT * FROM unnest($2::integer[], $3::integer[]))
SELECT pg_notify('bench_latency_queue', '')
"""
_LATENCY_LEFT = "SELECT count(*) FROM bench_latency_queue"
# The floor: one row inserted and committed per round trip.
_COMMIT_TABLE = """
CREATE TABLE bench_commit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
_COMMIT_ROW = "INSERT INTO bench_commit DEFAULT VALUES"
_WAKE_TIMEOUT = 1.0  # the consumer claims at least this often without a notification


@dataclass
class _Delivery:
    """One message of the probe: when it was sent (its enqueued_at, the database's clock),
    claimed and acknowledged (the consumer's clock, when each statement returned)."""

    chain: int
    hop: int
    read_ct: int
    sent: float
    claimed: float
    acked: float = 0.0


async def _paced(count: int, rate: float, send: Callable[[int], Awaitable[Any]]) -> None:
    """`send(i)` for i in range(count), started `rate` times per second."""
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        await send(i)


async def _commit_floor(conn: db.Connection, count: int, rate: float) -> list[float]:
    """Seconds each of `count` one-row INSERTs took to return committed (autocommit), paced at
    `rate` per second on an otherwise idle server."""
    raw = conn.raw
    seconds: list[float] = []

    async def commit(_: int) -> None:
        t0 = time.perf_counter()
        await raw.execute(_COMMIT_ROW)
        seconds.append(time.perf_counter() - t0)

    await _paced(count, rate, commit)
    return seconds


async def _consume(conn: db.Connection, hops: int, expected: int) -> list[_Delivery]:
    """Claim and acknowledge (each in its own transaction) until `expected` messages are
    acknowledged: claim up to BASELINE_BATCH visible messages until none is left, then sleep
    until a notification; the acknowledgement of a hop before the last sends the next hop."""
    raw = conn.raw
    woken = asyncio.Event()

    def wake(*_: Any) -> None:
        woken.set()

    seen: list[_Delivery] = []
    await raw.add_listener(_LATENCY_CHANNEL, wake)
    try:
        last_progress = time.monotonic()
        while len(seen) < expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), _WAKE_TIMEOUT)
            woken.clear()
            while rows := await raw.fetch(_LATENCY_CLAIM, BASELINE_BATCH):
                claimed = time.time()
                batch = [
                    _Delivery(
                        r["chain"], r["hop"], r["read_ct"], r["enqueued_at"].timestamp(), claimed
                    )
                    for r in rows
                ]
                ids = [r["msg_id"] for r in rows]
                following = [d for d in batch if d.hop + 1 < hops]
                if following:
                    await raw.execute(
                        _LATENCY_ACK_AND_SEND,
                        ids,
                        [d.chain for d in following],
                        [d.hop + 1 for d in following],
                    )
                else:
                    await raw.execute(_LATENCY_ACK, ids)
                acked = time.time()
                for d in batch:
                    d.acked = acked
                seen.extend(batch)
                last_progress = time.monotonic()
            if time.monotonic() - last_progress > STALL_TIMEOUT:
                raise BenchError(
                    f"latency raw loop: {len(seen)} of {expected} messages acknowledged, "
                    f"none for {STALL_TIMEOUT:g}s"
                )
    finally:
        await raw.remove_listener(_LATENCY_CHANNEL, wake)
    return seen


async def _trickle(
    sender: db.Connection, consumer: db.Connection, count: int, hops: int, rate: float
) -> list[_Delivery]:
    """`count` chains of `hops` messages, the first of each sent at `rate` per second, through
    the raw loop; every delivery."""
    raw = sender.raw

    async def send(i: int) -> None:
        await raw.execute(_LATENCY_SEND, i)

    consuming = asyncio.create_task(_consume(consumer, hops, count * hops))
    try:
        await _paced(count, rate, send)
        seen = await consuming
    finally:
        if not consuming.done():
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
    expected = {(c, h) for c in range(count) for h in range(hops)}
    got = [(d.chain, d.hop) for d in seen]
    if len(got) != len(expected) or set(got) != expected:
        raise BenchError(
            f"latency raw loop: {len(set(got) & expected)} of {len(expected)} messages "
            f"acknowledged ({len(got)} deliveries)"
        )
    if any(d.read_ct != 1 for d in seen):
        raise BenchError("latency raw loop: a message was delivered more than once")
    return seen


async def latency_probe(bench: Bench, count: int, hops: int, rate: float) -> dict[str, Any]:
    """The raw loop's latencies at a trickle, on a fresh database with one sender and one
    consumer connection (the consumer woken by NOTIFY, in this process): first the idle
    server's commit round trip (`count` one-row INSERTs at `rate`/s), then `count` single
    messages at `rate`/s (send to claim, send to acknowledged commit), then `count` chains of
    `hops` messages at `rate`/s (hop: the next message's enqueued_at, written by the previous
    hop's acknowledgement before it commits, to its claim; end to end: the first hop's
    enqueued_at to the last hop's acknowledged commit). Summaries in milliseconds."""
    async with bench.fresh_database("latency_raw") as dsn:
        sender = await db.connect(dsn)
        consumer = await db.connect(dsn)
        try:
            await sender.execute(_LATENCY_QUEUE)
            await sender.execute(_COMMIT_TABLE)
            bench.say(f"latency raw loop: {count} one-row commits at {rate:g}/s (idle server)")
            floor = await _commit_floor(sender, count, rate)
            bench.say(f"latency raw loop: {count} messages at {rate:g}/s")
            singles = await _trickle(sender, consumer, count, 1, rate)
            bench.say(f"latency raw loop: {count} chains of {hops} messages at {rate:g}/s")
            chains = await _trickle(sender, consumer, count, hops, rate)
            left = int(await sender.fetchval(_LATENCY_LEFT))
        finally:
            await consumer.close()
            await sender.close()
    if left:
        raise BenchError(f"latency raw loop: {left} message(s) left in the queue")
    first = {d.chain: d.sent for d in chains if d.hop == 0}
    last = {d.chain: d.acked for d in chains if d.hop == hops - 1}
    return {
        "rate_per_s": rate,
        "messages": count,
        "chain_hops": hops,
        "commit_floor": ms_summary(floor),
        "send_to_claim": ms_summary([d.claimed - d.sent for d in singles]),
        "send_to_ack": ms_summary([d.acked - d.sent for d in singles]),
        "handoff": ms_summary([d.claimed - d.sent for d in chains if d.hop > 0]),
        "chain_end_to_end": ms_summary([last[c] - first[c] for c in first]),
    }
