"""The pgmq-style queue layer: semantics of every function, concurrency, notifications, plans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tasker_pg import db
from tasker_pg.errors import NotFoundError, ValidationError
from tests.support import pgserver, plans, seeded


@pytest.fixture
async def queue(conn: db.Connection) -> AsyncIterator[str]:
    await conn.create_queue("jobs")
    yield "jobs"


async def wait_until_visible(
    conn: db.Connection, queue: str, deadline_s: float = 5.0
) -> list[db.Message]:
    """Poll with a deadline (never a fixed sleep) until a message becomes readable."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        msgs = await conn.read(queue, vt_seconds=30, qty=1)
        if msgs:
            return msgs
        await asyncio.sleep(0.05)
    raise AssertionError(f"no message became visible in {queue} within {deadline_s}s")


async def test_send_read_delete(conn: db.Connection, queue: str) -> None:
    msg_id = await conn.send(queue, {"n": 1})
    [msg] = await conn.read(queue, vt_seconds=30, qty=5)
    assert msg.msg_id == msg_id
    assert msg.message == {"n": 1}
    assert msg.read_ct == 1
    assert await conn.read(queue, vt_seconds=30, qty=5) == []  # hidden while vt runs
    assert await conn.delete(queue, msg_id) is True
    assert await conn.delete(queue, msg_id) is False
    assert (await conn.metrics(queue)).queue_length == 0


async def test_vt_hides_then_reappears_with_read_ct_2(conn: db.Connection, queue: str) -> None:
    msg_id = await conn.send(queue, {"n": 1})
    [first] = await conn.read(queue, vt_seconds=0.3, qty=1)
    assert first.read_ct == 1
    assert await conn.read(queue, vt_seconds=0.3, qty=1) == []
    [again] = await wait_until_visible(conn, queue)
    assert again.msg_id == msg_id
    assert again.read_ct == 2


async def test_delay_makes_message_invisible_until_due(conn: db.Connection, queue: str) -> None:
    sent_at = time.monotonic()
    await conn.send(queue, {"later": True}, delay_seconds=0.4)
    assert await conn.read(queue, vt_seconds=30, qty=1) == []
    [msg] = await wait_until_visible(conn, queue)
    assert time.monotonic() - sent_at >= 0.35
    assert msg.message == {"later": True}
    metrics = await conn.metrics(queue)
    assert metrics.queue_length == 1


async def test_priority_then_age_order(conn: db.Connection, queue: str) -> None:
    low = await conn.send(queue, {"p": 0})
    high = await conn.send(queue, {"p": 5}, priority=5)
    low2 = await conn.send(queue, {"p": 0})
    mid = await conn.send(queue, {"p": 1}, priority=1)
    msgs = await conn.read(queue, vt_seconds=30, qty=10)
    assert [m.msg_id for m in msgs] == [high, mid, low, low2]
    assert [m.priority for m in msgs] == [5, 1, 0, 0]


async def test_read_respects_qty(conn: db.Connection, queue: str) -> None:
    ids = await conn.send_batch(queue, [{"i": i} for i in range(10)])
    assert len(ids) == 10 and ids == sorted(ids)
    first = await conn.read(queue, vt_seconds=30, qty=3)
    assert [m.msg_id for m in first] == ids[:3]
    rest = await conn.read(queue, vt_seconds=30, qty=100)
    assert [m.msg_id for m in rest] == ids[3:]


async def test_send_batch_keeps_order_and_options(conn: db.Connection, queue: str) -> None:
    ids = await conn.send_batch(queue, [{"i": 1}, {"i": 2}], priority=3, delay_seconds=0)
    msgs = await conn.read(queue, vt_seconds=30, qty=10)
    assert [m.msg_id for m in msgs] == ids
    assert [m.message["i"] for m in msgs] == [1, 2]
    assert {m.priority for m in msgs} == {3}
    assert await conn.send_batch(queue, []) == []


async def test_archive_moves_message(conn: db.Connection, queue: str) -> None:
    a = await conn.send(queue, {"a": 1})
    b = await conn.send(queue, {"b": 2})
    c = await conn.send(queue, {"c": 3})
    assert await conn.archive(queue, a) is True
    assert await conn.archive(queue, a) is False
    assert sorted(await conn.archive_batch(queue, [b, c, 999999])) == [b, c]
    assert (await conn.metrics(queue)).queue_length == 0
    rows = await conn.fetch("SELECT msg_id, message, archived_at FROM tasker.a_jobs ORDER BY 1")
    assert [r["msg_id"] for r in rows] == [a, b, c]
    assert rows[0]["message"] == {"a": 1}
    # a archived by one call, b and c by a later one
    archived = [r["archived_at"] for r in rows]
    assert archived[0] < min(archived[1], archived[2])


async def test_pop_removes(conn: db.Connection, queue: str) -> None:
    ids = await conn.send_batch(queue, [{"i": i} for i in range(3)])
    popped = await conn.pop(queue, qty=2)
    assert [m.msg_id for m in popped] == ids[:2]
    assert (await conn.metrics(queue)).queue_length == 1
    assert [m.msg_id for m in await conn.pop(queue)] == ids[2:]
    assert await conn.pop(queue) == []


async def test_set_vt(conn: db.Connection, queue: str) -> None:
    msg_id = await conn.send(queue, {"x": 1})
    await conn.read(queue, vt_seconds=3600, qty=1)
    assert await conn.read(queue, vt_seconds=30, qty=1) == []
    updated = await conn.set_vt(queue, msg_id, 0)
    assert updated is not None and updated.msg_id == msg_id
    [msg] = await conn.read(queue, vt_seconds=30, qty=1)
    assert msg.msg_id == msg_id and msg.read_ct == 2
    assert await conn.set_vt(queue, 424242, 0) is None


async def test_delete_batch(conn: db.Connection, queue: str) -> None:
    ids = await conn.send_batch(queue, [{"i": i} for i in range(4)])
    assert sorted(await conn.delete_batch(queue, [ids[0], ids[2], 777777])) == [ids[0], ids[2]]
    remaining = await conn.read(queue, vt_seconds=30, qty=10)
    assert [m.msg_id for m in remaining] == [ids[1], ids[3]]


async def test_purge_counts(conn: db.Connection, queue: str) -> None:
    await conn.send_batch(queue, [{"i": i} for i in range(7)])
    assert await conn.purge_queue(queue) == 7
    assert await conn.purge_queue(queue) == 0


async def test_metrics(conn: db.Connection, queue: str) -> None:
    empty = await conn.metrics(queue)
    assert (empty.queue_length, empty.queue_visible_length, empty.total_messages) == (0, 0, 0)
    assert empty.oldest_msg_age_sec is None and empty.newest_msg_age_sec is None
    await conn.send_batch(queue, [{"i": i} for i in range(3)])
    await conn.send(queue, {"later": 1}, delay_seconds=60)
    await conn.read(queue, vt_seconds=60, qty=1)
    [deleted] = await conn.pop(queue)
    m = await conn.metrics(queue)
    assert m.queue_name == queue
    assert m.queue_length == 3  # 4 sent, one popped
    assert m.queue_visible_length == 1  # one hidden by read, one delayed
    assert m.total_messages == 4
    assert m.oldest_msg_age_sec is not None and m.newest_msg_age_sec is not None
    assert m.oldest_msg_age_sec >= m.newest_msg_age_sec
    await conn.create_queue("other")
    names = [x.queue_name for x in await conn.metrics_all()]
    assert names == ["jobs", "other"]
    assert deleted.message == {"i": 1}


async def test_create_queue_idempotent_and_drop(conn: db.Connection) -> None:
    await conn.create_queue("twice")
    await conn.send("twice", {"keep": True})
    await conn.create_queue("twice")  # no-op, keeps messages
    assert (await conn.metrics("twice")).queue_length == 1
    assert await conn.fetchval("SELECT to_regclass('tasker.q_twice') IS NOT NULL")
    assert await conn.drop_queue("twice") is True
    assert await conn.drop_queue("twice") is False
    assert await conn.fetchval("SELECT to_regclass('tasker.q_twice') IS NULL")
    assert await conn.fetchval("SELECT to_regclass('tasker.a_twice') IS NULL")


async def test_concurrent_create_queue(dsn: str) -> None:
    conns = [await db.connect(dsn) for _ in range(4)]
    try:
        txs = [c.raw.transaction() for c in conns]
        for tx in txs:
            await tx.start()
        await conns[0].create_queue("race")
        # The others, each in its own open transaction, block on the first one's lock ...
        others = [asyncio.create_task(c.create_queue("race")) for c in conns[1:]]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = await conns[0].fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == 3:
                break
            await asyncio.sleep(0.02)
        assert waiting == 3, "the other creators should wait on the advisory lock"
        # ... and when it commits, each finds the queue and returns without holding the lock
        # for the rest of its transaction (the others' transactions are still open here).
        await txs[0].commit()
        await asyncio.wait_for(asyncio.gather(*others), timeout=30)
        for tx in txs[1:]:
            await tx.commit()
        assert (
            await conns[0].fetchval("SELECT count(*) FROM tasker.queues WHERE queue_name = 'race'")
            == 1
        )
        assert (
            await conns[0].fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            == 0
        )
        await conns[1].send("race", {"ok": 1})
    finally:
        for c in conns:
            await c.close()


@pytest.mark.parametrize(
    "bad", ["x; drop table y", "Upper", "", "a" * 48, "1abc", "with-dash", "spa ce", "_x"]
)
async def test_invalid_queue_names_rejected(conn: db.Connection, bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        await conn.create_queue(bad)
    assert "lowercase letters, digits and _" in str(err.value)
    assert "47" in str(err.value)
    assert err.value.error_code == "invalid_queue_name"
    with pytest.raises(ValidationError):
        await conn.send(bad, {"a": 1})


async def test_longest_valid_name(conn: db.Connection) -> None:
    name = "a" * 47
    await conn.create_queue(name)
    assert await conn.send(name, {"ok": True}) == 1


async def test_unknown_queue_is_named(conn: db.Connection) -> None:
    for call in (
        conn.send("nosuch", {"a": 1}),
        conn.read("nosuch", 30, 1),
        conn.metrics("nosuch"),
        conn.purge_queue("nosuch"),
    ):
        with pytest.raises(NotFoundError) as err:
            await call
        assert "nosuch" in str(err.value)
        assert err.value.error_code == "queue_not_found"


async def test_bad_arguments(conn: db.Connection, queue: str) -> None:
    with pytest.raises(ValidationError, match="delay_seconds"):
        await conn.send(queue, {"a": 1}, delay_seconds=-1)
    with pytest.raises(ValidationError, match="qty"):
        await conn.read(queue, vt_seconds=30, qty=0)
    with pytest.raises(ValidationError, match="vt_seconds"):
        await conn.read(queue, vt_seconds=-5, qty=1)
    assert (await conn.metrics(queue)).total_messages == 0


# --- notifications ---------------------------------------------------------------------------


async def test_notify_after_commit_only(dsn: str, conn: db.Connection, queue: str) -> None:
    listener = await db.connect(dsn)
    received: list[tuple[str, str]] = []
    got = asyncio.Event()

    def on_notify(channel: str, payload: str) -> None:
        received.append((channel, payload))
        got.set()

    try:
        await listener.listen("tasker_jobs", on_notify)
        # A rolled-back send notifies nobody.
        tx = conn.raw.transaction()
        await tx.start()
        await conn.send(queue, {"rolled": "back"})
        await tx.rollback()
        # A committed batch notifies exactly once, whatever its size.
        await conn.send_batch(queue, [{"i": i} for i in range(5)])
        await asyncio.wait_for(got.wait(), timeout=5)
        # Let any further (wrong) notifications arrive: a round trip on the listener flushes.
        await listener.execute("SELECT 1")
        assert received == [("tasker_jobs", "")]
    finally:
        await listener.close()


# --- concurrency -----------------------------------------------------------------------------


async def test_open_transactions_never_share_a_message(dsn: str, conn: db.Connection) -> None:
    await conn.create_queue("shared")
    await conn.send_batch("shared", [{"i": i} for i in range(20)])
    readers = [await db.connect(dsn) for _ in range(4)]
    txs = [r.raw.transaction() for r in readers]
    try:
        for tx in txs:
            await tx.start()
        got: list[list[int]] = []
        for r in readers:  # each reads while the previous ones still hold their rows
            got.append([m.msg_id for m in await r.read("shared", vt_seconds=30, qty=5)])
        flat = [i for ids in got for i in ids]
        assert all(len(ids) == 5 for ids in got)
        assert len(flat) == len(set(flat)) == 20
    finally:
        for tx in txs:
            await tx.rollback()
        for r in readers:
            await r.close()


async def test_concurrent_drain_reads_each_message_once(dsn: str, conn: db.Connection) -> None:
    total = 10_000
    await conn.create_queue("drain")
    for start in range(0, total, 2_000):
        await conn.send_batch("drain", [{"i": i} for i in range(start, start + 2_000)])

    async def reader() -> list[int]:
        c = await db.connect(dsn)
        seen: list[int] = []
        try:
            while True:
                msgs = await c.read("drain", vt_seconds=300, qty=50)
                if not msgs:
                    return seen
                seen.extend(m.message["i"] for m in msgs)
                await c.delete_batch("drain", [m.msg_id for m in msgs])
        finally:
            await c.close()

    results = await asyncio.gather(*(reader() for _ in range(4)))
    everything = [i for r in results for i in r]
    assert len(everything) == total
    assert sorted(everything) == list(range(total))
    assert all(len(r) > 0 for r in results), "every reader should have taken part"
    assert (await conn.metrics("drain")).queue_length == 0


# --- plans -----------------------------------------------------------------------------------

BIG_QUEUE = "big"
BIG_MESSAGES = 100_000


async def seed_big_queue(conn: db.Connection) -> None:
    """A queue of 100,000 visible messages (msg_ids 1 to 100,000), analyzed."""
    await conn.create_queue(BIG_QUEUE)
    await conn.execute(
        """
        INSERT INTO tasker.queue_messages (queue, msg_id, vt, priority, message)
        SELECT $1, g, now(), 0, jsonb_build_object('i', g) FROM generate_series(1, $2) g
        """,
        BIG_QUEUE,
        BIG_MESSAGES,
    )
    await conn.execute(f"ANALYZE tasker.q_{BIG_QUEUE}")
    assert await conn.fetchval(f"SELECT count(*) FROM tasker.q_{BIG_QUEUE}") == BIG_MESSAGES


@pytest.fixture(scope="session")
async def big_queue_template(pg_server: pgserver.TestServer) -> AsyncIterator[str]:
    """The database seed_big_queue filled, seeded once per session (skipped at once on a
    server without auto_explain)."""
    probe = await db.connect(pg_server.admin_dsn, check_schema=False)
    try:
        await plans.require_auto_explain(probe)
    finally:
        await probe.close()
    name = await seeded.seed_template(pg_server, BIG_QUEUE, seed_big_queue)
    yield name
    await pg_server.drop(name)


@pytest.fixture
async def big_conn(
    pg_server: pgserver.TestServer, big_queue_template: str
) -> AsyncIterator[db.Connection]:
    """A connection to this test's own clone of the seeded big-queue database."""
    async with seeded.clone_connection(pg_server, big_queue_template) as conn:
        yield conn


async def big_queue_statements(conn: db.Connection) -> dict[str, plans.Expected]:
    """The statements read() and pop() run to take messages from the big queue, each with the
    indexes its plan must scan: the claim index to pick and lock the candidates, the primary
    key to update or delete them."""
    partition = f"tasker.q_{BIG_QUEUE}"
    claim_idx = await plans.partition_index(conn, "tasker.queue_messages_claim_idx", partition)
    pkey = await plans.partition_index(conn, "tasker.queue_messages_pkey", partition)
    return {
        "top_priority": plans.Expected.of(
            "WHERE m.queue = p_queue AND m.lane IS NULL ORDER BY m.priority DESC", claim_idx
        ),
        "visible": plans.Expected.of("m.priority = v_prio AND m.vt <= p_now", claim_idx),
        "read": plans.Expected.of("claimed AS (", pkey),
        "pop": plans.Expected.of("popped AS (", pkey),
    }


async def take_plan_problems(
    conn: db.Connection, expected: dict[str, plans.Expected], mode: str
) -> tuple[list[str], list[int]]:
    """One read() and one pop() of 10 messages under plan_cache_mode `mode` (neither function
    pins it): what is wrong with the plans they ran (each call checked on its own, as both run
    _lock_visible's statements), and the msg_ids they took."""
    await conn.execute(f"SET plan_cache_mode = {mode}")
    taken: list[int] = []
    problems: list[str] = []
    for call, other in (("read", "pop"), ("pop", "read")):
        async with plans.collect_plans(conn) as log:
            if call == "read":
                taken += [m.msg_id for m in await conn.read(BIG_QUEUE, vt_seconds=30, qty=10)]
            else:
                taken += [m.msg_id for m in await conn.pop(BIG_QUEUE, qty=10)]
        problems += [
            f"{call}: {p}"
            for p in plans.problems(
                log,
                {k: v for k, v in expected.items() if k != other},
                big_tables={"queue_messages"},
                big_prefixes=("q_",),
                generic=mode == "force_generic_plan",
            )
        ]
    await conn.execute("RESET plan_cache_mode")
    return problems, taken


@pytest.mark.plans
async def test_read_and_pop_use_the_claim_index_with_100k_messages(big_conn: db.Connection) -> None:
    """The plans read() and pop() really run, custom (a session's first calls) and generic
    (what plan_cache_mode auto may switch to after five calls): index scans only."""
    conn = big_conn
    expected = await big_queue_statements(conn)
    first = 1
    for mode in ("force_custom_plan", "force_generic_plan"):
        problems, taken = await take_plan_problems(conn, expected, mode)
        assert problems == [], "\n".join(problems)
        assert taken == list(range(first, first + 20))
        first += 20


@pytest.mark.plans
async def test_plan_check_notices_a_missing_claim_index(big_conn: db.Connection) -> None:
    """The check above can fail: without the claim index, read() and pop() pick their
    candidates some other way (_lock_visible runs with enable_seqscan off, so by walking the
    primary key), and the check names both statements of each call."""
    conn = big_conn
    expected = await big_queue_statements(conn)
    claim_idx = await plans.partition_index(
        conn, "tasker.queue_messages_claim_idx", f"tasker.q_{BIG_QUEUE}"
    )
    await conn.execute("DROP INDEX tasker.queue_messages_claim_idx")
    problems, taken = await take_plan_problems(conn, expected, "force_generic_plan")
    missing = {p.split(": no scan of")[0] for p in problems if f"no scan of {[claim_idx]}" in p}
    assert missing == {
        "read: top_priority",
        "read: visible",
        "pop: top_priority",
        "pop: visible",
    }, problems
    assert taken == list(range(1, 21))
