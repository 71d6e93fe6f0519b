"""The engine's scenarios: flat, dag and fan-out throughput, latency, task creation.

Each is an async function of the running `Bench` (fresh databases, worker processes, the
completion poll and the verification come from there); each records its figures in
`bench.results` and emits its table rows. `RUNNERS` maps every scenario name (and the
end-of-run baseline) to its function.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasker_pg import db
from tasker_pg.bench import baseline, handlers, queries, report, xmin
from tasker_pg.bench.handlers import NAMESPACE
from tasker_pg.bench.machine import CpuMeter, cpu_per_step
from tasker_pg.bench.options import (
    BACKLOG_INVISIBLE,
    CREATE_BATCH,
    CREATE_BATCHED_TASKS,
    CREATE_SINGLE_TASKS,
    CREATE_WARMUP,
    DAG_TASKS,
    DEEP_POLL,
    DEEP_TASKS,
    FANOUT_PROBES,
    FANOUT_TASKS,
    FLAT_TASKS,
    LATENCY_RATE,
    LATENCY_TASKS,
    LIMITS_CONCURRENCY,
    LIMITS_KEYS,
    LIMITS_RATE,
    LIMITS_SHARE_WINDOW,
    POLL_INTERVAL,
    RETENTION_BATCH,
    RETENTION_HISTORY,
    SCALE_CONCURRENCY,
    SCALE_SLOW_TASKS,
    SCALE_WORKERS,
    TARGET_BACKLOG_OF_FLAT,
    TARGET_CREATE_START_MS,
    TARGET_DAG_RATIO,
    TARGET_DEEP_OF_FLAT,
    TARGET_FANOUT_RATIO,
    TARGET_FLAT_RATIO,
    TARGET_HANDOFF_MS,
    TARGET_LIMITS_OF_FLAT,
    TARGET_LIMITS_SHARE,
    TARGET_LINEAR_E2E_MS,
    TARGET_RETENTION_OF_FLAT,
    BenchError,
)
from tasker_pg.bench.report import Row, ms_summary, percentile
from tasker_pg.errors import RetryableError
from tasker_pg.outcome import outcome_from_exception, outcome_from_result
from tasker_pg.worker.maintenance import RETENTION_PAUSE

if TYPE_CHECKING:
    from tasker_pg.bench.runner import Bench

Scenario = Callable[["Bench"], Awaitable[None]]

LINEAR_STEPS = 4  # steps of the latency scenario's linear template, hops of the raw chains


@dataclass
class Drain:
    """What one drain (flat, or one dag shape) measured."""

    tasks: int
    steps: int
    seconds: float
    claim_batches: int
    flush_batches: int
    worker_cpu_s: float | None
    server_cpu_s: float | None
    worker_summaries: list[str] = field(default_factory=list)

    def as_dict(self, baseline_rate: float | None) -> dict[str, Any]:
        steps_per_s = self.steps / self.seconds
        return {
            "tasks": self.tasks,
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
            "steps_per_s": round(steps_per_s, 1),
            "tasks_per_s": round(self.tasks / self.seconds, 1),
            "ratio_to_baseline": round(steps_per_s / baseline_rate, 4) if baseline_rate else None,
            "claim_batches": self.claim_batches,
            "avg_claim_batch": round(self.steps / self.claim_batches, 1),
            "flush_batches": self.flush_batches,
            "avg_flush_batch": round(self.steps / self.flush_batches, 1),
            "worker_cpu_us_per_step": cpu_per_step(self.worker_cpu_s, self.steps),
            "server_cpu_us_per_step": cpu_per_step(self.server_cpu_s, self.steps),
            "all_completed": True,
            "worker_summaries": self.worker_summaries,
        }


# --- flat and dag ---------------------------------------------------------------------------------


async def drain(
    bench: Bench,
    label: str,
    template: str,
    tasks: int,
    steps_per_task: int,
    after: Callable[[db.Connection], Awaitable[None]] | None = None,
    before: Callable[[db.Connection], Awaitable[None]] | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    poll: float = POLL_INTERVAL,
    measured: Callable[[db.Connection], Awaitable[None]] | None = None,
    alongside: Callable[[str], Coroutine[Any, Any, None]] | None = None,
    contexts: Callable[[int], dict[str, Any]] | None = None,
) -> Drain:
    """Create `tasks` tasks in one transaction with idle workers waiting, time the drain;
    then run `after` on the same database (the workers stopped). `before` runs first, before
    the workers start: the tasks it creates are left out of the counts, the timing and the
    verification (only the tasks created after it are the drain's). `measured` runs just
    after the tasks are committed, while the workers drain; `alongside` is started then too,
    with the database's DSN, and awaited once the workers stopped (before `after`). Task i's
    context is `contexts(i)` (default `{"i": i}`)."""
    steps = tasks * steps_per_task
    context_of = contexts or (lambda i: {"i": i})
    since: dt.datetime | None = None
    side: asyncio.Task[None] | None = None
    async with bench.fresh_database(label) as dsn:
        conn = await db.connect(dsn)
        processes = bench.workers(label, dsn, workers or bench.options.workers, concurrency)
        try:
            await bench.register(conn)
            if before is not None:
                await before(conn)
                since = await conn.database_now()
            for worker in processes:
                worker.start()
            await asyncio.gather(*(w.wait_ready() for w in processes))
            bench.say(f"{label}: creating {tasks:,} {template} tasks in one transaction")
            async with conn.transaction():
                for first in range(0, tasks, CREATE_BATCH):
                    batch = [context_of(i) for i in range(first, min(first + CREATE_BATCH, tasks))]
                    await conn.create_tasks(NAMESPACE, template, batch)
                await queries.analyze_engine_tables(conn)
                await queries.flush_statistics(conn)
                pids = await queries.worker_backend_pids(conn) if bench.server_local else []
                worker_meter = CpuMeter([w.pid for w in processes])
                server_meter = CpuMeter(pids)
                worker_meter.start()
                server_meter.start()
            bench.say(f"{label}: committed; {len(processes)} worker(s) draining")
            if alongside is not None:
                side = asyncio.create_task(alongside(dsn))
            if measured is not None:
                await measured(conn)
            await bench.wait_complete(conn, tasks, processes, since, poll)
            worker_cpu = worker_meter.stop()
            server_cpu = server_meter.stop() if bench.server_local else None
            await bench.verify(conn, tasks, steps, since)
            seconds, claim_batches, flush_batches = await queries.drain_timing(conn, since)
            if not seconds > 0:
                raise BenchError(f"{label}: no time elapsed between first claim and last task")
        finally:
            await asyncio.gather(*(w.stop() for w in processes))
            if side is not None:
                if sys.exc_info()[0] is not None:  # the drain failed: stop what ran alongside
                    side.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await side
            if after is None:
                await conn.close()
        if after is not None:
            try:
                await after(conn)
            finally:
                await conn.close()
    summaries = [
        f"{w.worker_id}: {w.final_summary() or '(no final stats line)'}" for w in processes
    ]
    return Drain(
        tasks=tasks,
        steps=steps,
        seconds=seconds,
        claim_batches=claim_batches,
        flush_batches=flush_batches,
        worker_cpu_s=worker_cpu,
        server_cpu_s=server_cpu,
        worker_summaries=summaries,
    )


def _settings(bench: Bench) -> dict[str, Any]:
    return {
        "workers": bench.options.workers,
        "concurrency": bench.options.concurrency,
        "handler_ms": bench.options.handler_ms,
    }


async def flat(bench: Bench) -> None:
    """Single-step tasks drained by the worker processes: steps/s and the ratio."""
    result = (
        await drain(bench, "flat", handlers.FLAT, bench.options.count(FLAT_TASKS), 1)
    ).as_dict(bench.baseline_rate)
    bench.results["flat"] = {"ok": True, **_settings(bench), **result}
    bench.emit(
        report.throughput_row(
            "flat",
            f"steps/s ({bench.options.workers} worker x {bench.options.concurrency})",
            f"{result['steps_per_s']:,.0f}",
            result["ratio_to_baseline"],
            TARGET_FLAT_RATIO,
            bench.targets_apply,
        )
    )


async def dag(bench: Bench) -> None:
    """Four-step diamonds, then four-step chains, each drained on a fresh database."""
    shapes: dict[str, Any] = {}
    for shape in (handlers.DIAMOND, handlers.LINEAR):
        result = (
            await drain(bench, f"dag_{shape}", shape, bench.options.count(DAG_TASKS), 4)
        ).as_dict(bench.baseline_rate)
        shapes[shape] = result
        bench.emit(
            report.throughput_row(
                "dag",
                f"{shape} steps/s (tasks/s)",
                f"{result['steps_per_s']:,.0f} ({result['tasks_per_s']:,.0f})",
                result["ratio_to_baseline"],
                TARGET_DAG_RATIO,
                bench.targets_apply,
            )
        )
    bench.results["dag"] = {
        "ok": True,
        **_settings(bench),
        "shapes": shapes,
        "all_completed": all(s["all_completed"] for s in shapes.values()),
    }


def _against_flat(
    bench: Bench, scenario: str, measure: str, result: dict[str, Any], target: float
) -> float | None:
    """Emit the row of a drain judged against the clean flat drain of the same run (its
    steps/s, that share, the ratio to the baseline); the share (None without a flat drain)."""
    rate = result["steps_per_s"]
    clean = bench.results.get("flat", {}).get("steps_per_s")
    of_flat = round(rate / clean, 3) if clean else None
    bench.emit(
        Row(
            scenario,
            measure,
            f"{rate:,.0f} ({of_flat:.2f}x of flat)" if of_flat else f"{rate:,.0f}",
            bench.ratio(rate),
            f">= {target:.2f}x of flat",
            bench.judge(of_flat >= target) if of_flat is not None else None,
        )
    )
    return of_flat


# --- deep ----------------------------------------------------------------------------------------


async def deep(bench: Bench) -> None:
    """The flat drain from a deep queue: DEEP_TASKS ready steps queued at once (created in one
    transaction, then analyzed), against the clean flat drain of the same run (its
    FLAT_TASKS); the sizes and dead tuples of the hot tables before and after."""
    tasks = bench.options.count(DEEP_TASKS)
    sizes: dict[str, list[dict[str, Any]]] = {}

    async def queued(conn: db.Connection) -> None:
        sizes["queued"] = await queries.hot_table_stats(conn)

    async def drained(conn: db.Connection) -> None:
        sizes["drained"] = await queries.hot_table_stats(conn)

    result = (
        await drain(
            bench, "deep", handlers.FLAT, tasks, 1, after=drained, measured=queued, poll=DEEP_POLL
        )
    ).as_dict(bench.baseline_rate)
    of_flat = _against_flat(
        bench, "deep", f"flat steps/s, {tasks:,} queued", result, TARGET_DEEP_OF_FLAT
    )
    bench.results["deep"] = {
        "ok": True,
        **_settings(bench),
        **result,
        "ratio_to_flat": of_flat,
        "tables": sizes,
        "notes": [f"{when}: {report.describe_tables(t)}" for when, t in sizes.items()],
    }


# --- retention -----------------------------------------------------------------------------------


async def retention(bench: Bench) -> None:
    """The flat drain while `tasker.purge_finished` deletes a history of RETENTION_HISTORY
    finished tasks (seeded set-based: created through create_tasks, then made complete two
    days ago in SQL) under a one-day policy, batch after batch from another session, paced as
    a worker paces it (after each batch, a pause RETENTION_PAUSE times as long as the batch
    took). The drain's rate
    against the clean flat drain of the same run (target >= 0.80), and the purge rate (tasks/s
    over the whole purge, pauses included, most of it after the drain)."""
    history = bench.options.count(RETENTION_HISTORY)
    purged: list[tuple[float, int]] = []  # (seconds since the purge began, tasks so far)
    during: list[int] = []

    async def seed(conn: db.Connection) -> None:
        bench.say(f"retention: seeding {history:,} finished tasks two days old")
        await queries.keep_finished_a_day(conn)
        for first in range(0, history, CREATE_BATCH):
            count = min(CREATE_BATCH, history - first)
            tasks = await conn.create_tasks(NAMESPACE, handlers.FLAT, [{}] * count)
            await queries.finish_as_history(conn, tasks)
        await queries.analyze_engine_tables(conn)

    async def purge(dsn: str) -> None:
        conn = await db.connect(dsn)
        try:
            started, total = time.perf_counter(), 0
            while True:
                batch_started = time.perf_counter()
                counts = await conn.purge_finished(RETENTION_BATCH)
                took = time.perf_counter() - batch_started
                total += counts.tasks
                purged.append((time.perf_counter() - started, total))
                if not counts.more and counts.tasks == 0:
                    break
                # paced as a worker's maintenance loop paces a purge that has more to do
                await asyncio.sleep(RETENTION_PAUSE * took)
        finally:
            await conn.close()

    async def drained(conn: db.Connection) -> None:
        during.append(purged[-1][1] if purged else 0)

    tasks = bench.options.count(FLAT_TASKS)
    result = (
        await drain(
            bench,
            "retention",
            handlers.FLAT,
            tasks,
            1,
            before=seed,
            alongside=purge,
            after=drained,
        )
    ).as_dict(bench.baseline_rate)
    total_s, total = purged[-1] if purged else (0.0, 0)
    if total != history:
        raise BenchError(f"retention: the purge deleted {total:,} of {history:,} history tasks")
    purge_rate = total / total_s if total_s > 0 else 0.0
    bench.results["retention"] = {
        "ok": True,
        **_settings(bench),
        **result,
        "history_tasks": history,
        "purge_batch": RETENTION_BATCH,
        "purge_seconds": round(total_s, 2),
        "purge_tasks_per_s": round(purge_rate, 1),
        "purged_by_the_drain_end": during[0] if during else None,
        "ratio_to_flat": _against_flat(
            bench,
            "retention",
            f"flat steps/s while purging {history:,}",
            result,
            TARGET_RETENTION_OF_FLAT,
        ),
    }
    bench.emit(
        Row(
            "retention",
            f"purge_finished({RETENTION_BATCH:,}) tasks/s",
            f"{purge_rate:,.0f} ({total_s:.1f}s)",
        )
    )


# --- scale ---------------------------------------------------------------------------------------


async def scale(bench: Bench) -> None:
    """Throughput as workers and concurrency grow: the flat drain with 1, 2 and 4 worker
    processes (no-op handlers); then one worker running 16 to 256 handlers at once that each
    take 10 ms. No target: the table shows where the database saturates."""
    tasks = bench.options.count(FLAT_TASKS)
    by_workers: dict[str, Any] = {}
    for count in SCALE_WORKERS:
        result = await drain(bench, f"scale_w{count}", handlers.FLAT, tasks, 1, workers=count)
        by_workers[str(count)] = result.as_dict(bench.baseline_rate)
    slow_tasks = bench.options.count(SCALE_SLOW_TASKS)
    by_concurrency: dict[str, Any] = {}
    for conc in SCALE_CONCURRENCY:
        result = await drain(
            bench, f"scale_c{conc}", handlers.FLAT_10MS, slow_tasks, 1, workers=1, concurrency=conc
        )
        by_concurrency[str(conc)] = result.as_dict(bench.baseline_rate)
    bench.results["scale"] = {
        "ok": True,
        **_settings(bench),
        "workers": by_workers,
        "handler_10ms_concurrency": by_concurrency,
        "all_completed": True,
    }
    one = by_workers[str(SCALE_WORKERS[0])]["steps_per_s"]
    for label, result in by_workers.items():
        rate = result["steps_per_s"]
        bench.emit(
            Row(
                "scale",
                f"flat steps/s, {label} worker(s) x {bench.options.concurrency}",
                f"{rate:,.0f} ({rate / one:.2f}x of 1)",
                bench.ratio(rate),
            )
        )
    for label, result in by_concurrency.items():
        rate = result["steps_per_s"]
        ideal = int(label) * 100  # handlers of 10 ms
        bench.emit(
            Row(
                "scale",
                f"10 ms handlers, 1 worker x {label}",
                f"{rate:,.0f} ({rate / ideal:.0%} of {ideal:,}/s)",
                bench.ratio(rate),
            )
        )


# --- backlog -------------------------------------------------------------------------------------


async def backlog(bench: Bench) -> None:
    """The flat drain again, while BACKLOG_INVISIBLE other steps of the same queue are not
    visible: a third leased (in flight for a day), a third waiting a day for a retry, a third
    delayed from an hour up to a year. Its rate against the clean flat drain of the same run
    (`backlog` brings `flat` along): a claim must not pay for what it cannot hand out."""
    invisible = bench.options.count(BACKLOG_INVISIBLE)

    async def seed(conn: db.Connection) -> None:
        bench.say(f"backlog: {invisible:,} steps not visible (leased, retrying, delayed)")
        await _seed_backlog(conn, invisible)
        await queries.analyze_engine_tables(conn)

    tasks = bench.options.count(FLAT_TASKS)
    result = (await drain(bench, "backlog", handlers.FLAT, tasks, 1, before=seed)).as_dict(
        bench.baseline_rate
    )
    of_flat = _against_flat(
        bench, "backlog", f"flat steps/s, {invisible:,} not visible", result, TARGET_BACKLOG_OF_FLAT
    )
    bench.results["backlog"] = {
        "ok": True,
        **_settings(bench),
        "invisible_steps": invisible,
        **result,
        "ratio_to_flat": of_flat,
    }


# --- limits --------------------------------------------------------------------------------------


def skewed_keys(tasks: int, keys: int) -> list[str]:
    """The customer of each task of a skewed backlog: key k gets k + 1 shares (1 : keys between
    the smallest and the largest), the largest keys first in creation order."""
    weights = list(range(keys, 0, -1))
    total = sum(weights)
    out: list[str] = []
    for w in weights:
        out += [f"c{w - 1}"] * (tasks * w // total)
    out += [f"c{keys - 1}"] * (tasks - len(out))
    return out


def _customer_context(customer: Callable[[int], str], i: int) -> dict[str, Any]:
    return {"i": i, "customer": customer(i)}


def fair_shares(lanes: list[str], keys: int) -> dict[str, float]:
    """Each key's share of `lanes` (the claims in the order they were made)."""
    counts = {f"c{k}": 0 for k in range(keys)}
    for lane in lanes:
        counts[lane] = counts.get(lane, 0) + 1
    return {k: n / len(lanes) for k, n in counts.items()} if lanes else {}


async def limits(bench: Bench) -> None:
    """The flat drain with flow control on every step, against the clean flat drain of the same
    run (the cost of flow control in the claim; server CPU per step in the notes): fairness lanes
    by customer under a skewed backlog (10 customers, customer k with k + 1 shares), then a
    concurrency limit per customer (LIMITS_CONCURRENCY), then that and a rate limit
    (LIMITS_RATE tokens/s), both over an even backlog so that neither limit binds: 10 x 100
    places for the 200 slots. (A step is in progress until its outcome commits, and a worker
    frees a slot when the handler returns, before its outcome is flushed: with no-op handlers a
    key can have three claims' worth of steps in progress, so a limit of 50 already held steps
    back here.) A skewed backlog would leave the largest customer alone at the end, held to
    its limit. And the share of the claims each customer got in the fairness drain while every
    customer still had a backlog (the first LIMITS_SHARE_WINDOW of 10 x the smallest backlog,
    in audit order) against equal."""
    tasks = bench.options.count(FLAT_TASKS)
    skewed = skewed_keys(tasks, LIMITS_KEYS)
    window = int(
        LIMITS_SHARE_WINDOW * LIMITS_KEYS * min(skewed.count(f"c{k}") for k in range(LIMITS_KEYS))
    )
    variants: dict[str, Any] = {}
    shares: dict[str, float] = {}

    async def read_shares(conn: db.Connection) -> None:
        shares.update(fair_shares(await queries.claimed_lanes(conn, window), LIMITS_KEYS))

    for template, what, customer in (
        (handlers.LIMITS_FAIR, "fairness lanes, 10 keys skewed", lambda i: skewed[i]),
        (
            handlers.LIMITS_CONCURRENCY,
            f"+ concurrency {LIMITS_CONCURRENCY}/key, even",
            lambda i: f"c{i % LIMITS_KEYS}",
        ),
        (handlers.LIMITS_RATED, "+ rate limit, even", lambda i: f"c{i % LIMITS_KEYS}"),
    ):
        result = (
            await drain(
                bench,
                template,
                template,
                tasks,
                1,
                after=read_shares if template == handlers.LIMITS_FAIR else None,
                contexts=functools.partial(_customer_context, customer),
            )
        ).as_dict(bench.baseline_rate)
        of_flat = _against_flat(bench, "limits", f"{what} steps/s", result, TARGET_LIMITS_OF_FLAT)
        variants[template] = {**result, "ratio_to_flat": of_flat}
    worst = max(abs(s * LIMITS_KEYS - 1) for s in shares.values()) if shares else None
    bench.emit(
        Row(
            "limits",
            f"share of each of 10 keys, skewed 1:{LIMITS_KEYS} (first {window:,} claims)",
            f"{min(shares.values()):.1%} .. {max(shares.values()):.1%}" if shares else "-",
            "",
            f"within {TARGET_LIMITS_SHARE:.0%} of {1 / LIMITS_KEYS:.0%}",
            bench.judge(worst <= TARGET_LIMITS_SHARE) if worst is not None else None,
        )
    )
    flat_cpu = bench.results.get("flat", {}).get("server_cpu_us_per_step")
    notes = [
        f"{name}: server CPU per step {v['server_cpu_us_per_step']} us"
        + (f" (flat {flat_cpu} us)" if flat_cpu is not None else "")
        + f", claims of {v['avg_claim_batch']} steps on average"
        for name, v in variants.items()
        if v.get("server_cpu_us_per_step") is not None
    ]
    bench.results["limits"] = {
        "ok": True,
        **_settings(bench),
        "keys": LIMITS_KEYS,
        "concurrency_limit": LIMITS_CONCURRENCY,
        "rate_limit_per_s": LIMITS_RATE,
        "share_window": window,
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "worst_share_deviation": None if worst is None else round(worst, 4),
        "variants": variants,
        "all_completed": all(v["all_completed"] for v in variants.values()),
        "notes": notes,
    }


async def _seed_backlog(conn: db.Connection, invisible: int) -> None:
    """`invisible` backlog tasks whose steps stay not visible for the whole run, created and
    claimed through the engine's own calls, CREATE_BATCH at a time."""
    third = max(invisible // 3, 1)
    year, hour = 31_536_000, 3_600
    for first in range(0, third, CREATE_BATCH):
        count = min(CREATE_BATCH, third - first)
        delays = [{"delay_seconds": hour + (i * 7_919) % (year - hour)} for i in range(count)]
        await conn.create_tasks(NAMESPACE, handlers.BACKLOG, [{}] * count, options=delays)
    for first in range(0, invisible - third, CREATE_BATCH):
        count = min(CREATE_BATCH, invisible - third - first)
        await conn.create_tasks(NAMESPACE, handlers.BACKLOG, [{}] * count)
        claims = await conn.claim_steps(NAMESPACE, "bench-backlog", count, 86_400.0)
        if len(claims) != count:
            raise BenchError(f"backlog: claimed {len(claims)} of {count} new steps")
        # every other one fails and waits a day for its retry; the rest stay leased
        retry = RetryableError("bench backlog: retry in a day", retry_after=86_400.0)
        outcomes = [
            outcome_from_exception(
                retry, fence=c.fence, duration_ms=0.0, worker_id="bench-backlog"
            ).to_json()
            for c in claims[::2]
        ]
        answers = await conn.complete_steps(outcomes)
        if any(a["status"] != "applied" for a in answers):
            raise BenchError(f"backlog: a retry was not applied: {answers!r}")


# --- fan-out --------------------------------------------------------------------------------------


async def fanout(bench: Bench) -> None:
    """Fan-out tasks (one analyzer, 1,000 batch workers, one aggregator each) drained by the
    worker processes: steps/s and the ratio; then the fan-out transaction on its own: the
    `complete_steps` call (autocommit, so with its commit) of an analyzer's outcome that
    creates the 1,000 workers, sent by the benchmark itself, timed `FANOUT_PROBES` times."""
    workers = handlers.FANOUT_WORKERS
    probes: list[float] = []

    async def time_fanouts(conn: db.Connection) -> None:
        probes.extend(await _timed_fanouts(conn, workers, FANOUT_PROBES))

    tasks = bench.options.count(FANOUT_TASKS)
    result = (
        await drain(bench, "fanout", handlers.FANOUT, tasks, workers + 2, after=time_fanouts)
    ).as_dict(bench.baseline_rate)
    commit = ms_summary(probes)
    bench.results["fanout"] = {
        "ok": True,
        **_settings(bench),
        "workers_per_task": workers,
        **result,
        "fanout_commit_ms": commit,
    }
    bench.emit(
        report.throughput_row(
            "fanout",
            f"steps/s (1 + {workers:,} + 1 per task)",
            f"{result['steps_per_s']:,.0f} ({result['tasks_per_s']:,.1f} tasks/s)",
            result["ratio_to_baseline"],
            TARGET_FANOUT_RATIO,
            bench.targets_apply,
        )
    )
    bench.emit(
        Row(
            "fanout",
            f"fan-out commit, {workers:,} workers p50/max",
            f"{commit['p50_ms']:.1f} / {commit['max_ms']:.1f} ms",
        )
    )


async def _timed_fanouts(conn: db.Connection, workers: int, rounds: int) -> list[float]:
    """Seconds each of `rounds` analyzer outcomes took to commit with their fan-out (the
    benchmark claims the analyzer and sends the outcome a worker would; the tasks are
    cancelled afterwards). Runs after the drain, when nothing else is ready."""
    seconds: list[float] = []
    for i in range(rounds):
        task = await conn.create_task(NAMESPACE, handlers.FANOUT, {"probe": i})
        claims = await conn.claim_steps(NAMESPACE, "bench-fanout-probe", 1, 60.0)
        if len(claims) != 1 or claims[0].step_name != "analyze":
            raise BenchError(f"fan-out probe: expected to claim one analyzer, got {claims!r}")
        outcome = outcome_from_result(
            handlers.analyzer_result(workers),
            fence=claims[0].fence,
            duration_ms=0.0,
            worker_id="bench-fanout-probe",
        ).to_json()
        started = time.perf_counter()
        [answer] = await conn.complete_steps([outcome])
        seconds.append(time.perf_counter() - started)
        created = await queries.task_step_count(conn, task)
        if answer["status"] != "applied" or created != workers + 2:
            raise BenchError(
                f"fan-out probe: outcome {answer['status']} ({answer['detail']}), "
                f"{created} steps (expected {workers + 2})"
            )
        await conn.cancel_task(task, "bench: fan-out timing probe")
    return seconds


# --- latency --------------------------------------------------------------------------------------


async def _paced_create(conn: db.Connection, template: str, count: int) -> list[float]:
    """Create `count` tasks one call at a time at LATENCY_RATE per second; call durations."""
    durations: list[float] = []
    started = time.monotonic()
    for i in range(count):
        delay = started + i / LATENCY_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        t0 = time.perf_counter()
        await conn.create_task(NAMESPACE, template, {"i": i})
        durations.append(time.perf_counter() - t0)
    return durations


async def latency(bench: Bench) -> None:
    """One idle worker; tasks created one at a time: create-to-start, handoff, end to end; then
    the raw loop's comparable latencies and the idle server's commit round trip, measured by
    `baseline.latency_probe` at the same rate in the same run."""
    count = bench.options.count(LATENCY_TASKS)
    async with bench.fresh_database("latency") as dsn:
        conn = await db.connect(dsn)
        workers = bench.workers("latency", dsn, 1)
        try:
            await bench.register(conn)
            workers[0].start()
            await workers[0].wait_ready()
            bench.say(f"latency: {count} single-step tasks at {LATENCY_RATE:g}/s")
            single_calls = await _paced_create(conn, handlers.LATENCY_SINGLE, count)
            await bench.wait_complete(conn, count, workers)
            bench.say(f"latency: {count} four-step linear tasks at {LATENCY_RATE:g}/s")
            linear_calls = await _paced_create(conn, handlers.LATENCY_LINEAR, count)
            await bench.wait_complete(conn, 2 * count, workers)
            checks = await bench.verify(conn, 2 * count, count + 4 * count)
            single = await queries.latency_single(conn, handlers.LATENCY_SINGLE)
            handoff = await queries.latency_handoff(conn, handlers.LATENCY_LINEAR)
            e2e = await queries.latency_end_to_end(conn, handlers.LATENCY_LINEAR)
        finally:
            await workers[0].stop()
            await conn.close()
    if len(single) != count or len(handoff) != 3 * count or len(e2e) != count:
        raise BenchError(
            f"latency: expected {count} starts, {3 * count} handoffs and {count} tasks, "
            f"found {len(single)}, {len(handoff)}, {len(e2e)}"
        )
    bench.say(f"latency: the raw loop at {LATENCY_RATE:g}/s")
    raw = await baseline.latency_probe(bench, count, LINEAR_STEPS, LATENCY_RATE)
    floor = raw.pop("commit_floor")
    start = ms_summary([r["to_start"] for r in single])
    hand = ms_summary([r["to_start"] for r in handoff])
    end_to_end = ms_summary([r["seconds"] for r in e2e])
    bench.results["latency"] = {
        "ok": True,
        "concurrency": bench.options.concurrency,
        "handler_ms": bench.options.handler_ms,
        "rate_per_s": LATENCY_RATE,
        "create_to_start": {
            **start,
            "to_claim_p50_ms": round(percentile([r["to_claim"] for r in single], 50) * 1e3, 3),
            "create_call_p50_ms": round(percentile(single_calls, 50) * 1e3, 3),
        },
        "handoff": {
            **hand,
            "to_claim_p50_ms": round(percentile([r["to_claim"] for r in handoff], 50) * 1e3, 3),
            "from_parent_outcome": ms_summary([r["from_parent_outcome"] for r in handoff]),
        },
        "linear_end_to_end": {
            **end_to_end,
            "create_call_p50_ms": round(percentile(linear_calls, 50) * 1e3, 3),
        },
        "raw_loop": raw,
        "commit_floor": floor,
        **checks,
        "worker_summaries": [f"{workers[0].worker_id}: {workers[0].final_summary()}"],
    }
    applies = bench.targets_apply
    for row in (
        *report.latency_rows(
            "create-to-start",
            start,
            "send to claim",
            raw["send_to_claim"],
            TARGET_CREATE_START_MS,
            applies,
        ),
        *report.latency_rows(
            "step handoff",
            hand,
            "ack+send to next claim",
            raw["handoff"],
            TARGET_HANDOFF_MS,
            applies,
        ),
        *report.latency_rows(
            "4-step linear end to end",
            end_to_end,
            f"{LINEAR_STEPS} hops, send to last ack",
            raw["chain_end_to_end"],
            TARGET_LINEAR_E2E_MS,
            applies,
        ),
        Row("latency", "raw loop: send to acknowledged commit", report.ms_text(raw["send_to_ack"])),
        Row(
            "latency",
            "idle commit: 1-row INSERT round trip",
            report.ms_text(floor),
        ),
    ):
        bench.emit(row)


# --- create ---------------------------------------------------------------------------------------


async def create(bench: Bench) -> None:
    """Four-step tasks per second on one connection, next to a bare INSERT per call."""
    single_n = bench.options.count(CREATE_SINGLE_TASKS)
    batched_n = bench.options.count(CREATE_BATCHED_TASKS)
    batch = min(CREATE_BATCH, batched_n)
    template = handlers.DIAMOND
    async with bench.fresh_database("create") as dsn:
        conn = await db.connect(dsn)
        try:
            await bench.register(conn)
            await baseline.create_insert_table(conn)
            for i in range(CREATE_WARMUP):
                await baseline.insert_row(conn, {"warmup": i})
                await conn.create_task(NAMESPACE, template, {"warmup": i})
            await conn.create_tasks(
                NAMESPACE, template, [{"warmup": i} for i in range(CREATE_WARMUP)]
            )
            # The reference: what one commit per call costs here, with nothing else to do.
            bench.say(f"create: {single_n:,} bare one-row inserts, one per call")
            started = time.perf_counter()
            for i in range(single_n):
                await baseline.insert_row(conn, {"i": i})
            insert_s = time.perf_counter() - started
            bench.say(f"create: {single_n:,} tasks, one create_task call each")
            started = time.perf_counter()
            for i in range(single_n):
                await conn.create_task(NAMESPACE, template, {"i": i})
            single_s = time.perf_counter() - started
            bench.say(f"create: {batched_n:,} tasks through create_tasks, {batch:,} per call")
            started = time.perf_counter()
            for first in range(0, batched_n, batch):
                contexts = [{"i": i} for i in range(first, min(first + batch, batched_n))]
                await conn.create_tasks(NAMESPACE, template, contexts)
            batched_s = time.perf_counter() - started
            total = 2 * CREATE_WARMUP + single_n + batched_n
            found = await queries.created_totals(conn)
            expected = {
                "tasks": total,
                "steps": 4 * total,
                "edges": 4 * total,
                "messages": total,
                "inserted": CREATE_WARMUP + single_n,
            }
            if found != expected:
                raise BenchError(f"create: expected {expected}, found {found}")
        finally:
            await conn.close()
    insert_rate = single_n / insert_s
    single_rate = single_n / single_s
    batched_rate = batched_n / batched_s
    bench.results["create"] = {
        "ok": True,
        "template": "diamond (4 steps)",
        "bare_insert": {
            "rows": single_n,
            "seconds": round(insert_s, 4),
            "rows_per_s": round(insert_rate, 1),
        },
        "one_per_call": {
            "tasks": single_n,
            "seconds": round(single_s, 4),
            "tasks_per_s": round(single_rate, 1),
            "ratio_to_bare_insert": round(single_rate / insert_rate, 4),
        },
        "batched": {
            "tasks": batched_n,
            "batch": batch,
            "seconds": round(batched_s, 4),
            "tasks_per_s": round(batched_rate, 1),
        },
        "all_completed": True,  # every task, step, edge and root message was created
    }
    for row in report.create_rows(insert_rate, single_rate, batched_rate, batch):
        bench.emit(row)


RUNNERS: dict[str, Scenario] = {
    "baseline": baseline.baseline,
    "flat": flat,
    "dag": dag,
    "fanout": fanout,
    "deep": deep,
    "backlog": backlog,
    "retention": retention,
    "limits": limits,
    "scale": scale,
    "xmin": xmin.xmin,
    "latency": latency,
    "create": create,
    "baseline_again": baseline.baseline_again,
}
