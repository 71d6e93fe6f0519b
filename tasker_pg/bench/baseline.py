"""The points of comparison: a raw SQL claim/acknowledge loop, and a bare one-row INSERT.

This is the only module of the benchmark that writes its own SQL against its own tables, and it
does so on purpose: a baseline is the ceiling of doing the same work by hand, so it must not go
through the engine (nor through `db.Connection`'s engine methods) it is compared with. It still
runs on `db.Connection`, for the same codecs and error translation.

The baseline scenario: 4 connections, each claiming 50 messages per statement of one plain
table with pgmq semantics (`FOR UPDATE SKIP LOCKED`, vt pushed, read_ct + 1) and acknowledging
them with one batched DELETE, until every pre-filled message is gone. It runs before the ratio
scenarios and once more at the end of the run; the drift between the two says how steady the
machine was.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from tasker_pg import db
from tasker_pg.bench import queries
from tasker_pg.bench.machine import CpuMeter, cpu_per_step
from tasker_pg.bench.options import (
    BASELINE_BATCH,
    BASELINE_CONNECTIONS,
    BASELINE_MESSAGES,
    BenchError,
)
from tasker_pg.bench.report import Row

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
