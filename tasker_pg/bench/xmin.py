"""The held-snapshot scenario (`xmin`): sustained work while a report holds a snapshot.

A database's oldest snapshot decides what vacuum may remove: while one REPEATABLE READ
transaction stays open, every row version written after it began stays, in the tables and in
their indexes, and the scans of the hot path walk past them. Queues on PostgreSQL have died of
it (the "queue death spiral"). This scenario measures it:

- flat and diamond tasks arrive at a steady rate, a quarter of the capacity the `dag` scenario
  measured in the same run (half the steps in each shape), created every 100 ms;
- each phase first warms up at that rate (a tenth of its length) and takes statistics;
- phase `clean`: for `XMIN_SECONDS` (scaled by --n), nothing else;
- phase `held`: the same, on a fresh database, while another session holds a REPEATABLE READ
  snapshot taken by reading `tasker.tasks`, as a report would, for the whole phase;
- per window (10 s, shorter for short runs): tasks arrived, tasks completed, and the p50 and
  p99 lag from creation to completion of the tasks completed in it; and, at the end of each
  phase (the snapshot still held), the dead tuples and sizes of the hot tables and indexes.

Target: every held window completes at least 90 % of what it would without the snapshot (its
completed / arrived against the clean phase's), and lag p99 stays under 1 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from tasker_pg import db
from tasker_pg.bench import handlers, queries, report
from tasker_pg.bench.handlers import NAMESPACE
from tasker_pg.bench.options import (
    XMIN_LOAD,
    XMIN_SECONDS,
    XMIN_TARGET_LAG_P99_MS,
    XMIN_TARGET_OF_CLEAN,
    XMIN_TICK,
    XMIN_WARMUP,
    XMIN_WINDOW,
    BenchError,
)
from tasker_pg.bench.report import Row

if TYPE_CHECKING:
    from tasker_pg.bench.runner import Bench

DEFAULT_CAPACITY = 4_000.0  # steps/s, when the run has no dag figure to take a quarter of


async def xmin(bench: Bench) -> None:
    """Both phases, the per-window table (as notes) and the two target rows."""
    diamond = bench.results.get("dag", {}).get("shapes", {}).get(handlers.DIAMOND, {})
    capacity = float(diamond.get("steps_per_s") or DEFAULT_CAPACITY)
    steps_per_s = capacity * XMIN_LOAD
    # half the steps as flat tasks (1 step), half as diamonds (4 steps)
    flat_rate, diamond_rate = steps_per_s / 2, steps_per_s / 8
    seconds = max(XMIN_SECONDS * bench.options.n, 2 * XMIN_TICK)
    window = min(XMIN_WINDOW, seconds / 6)
    phases: dict[str, Any] = {}
    for phase in ("clean", "held"):
        phases[phase] = await _phase(
            bench, phase, flat_rate, diamond_rate, seconds, window, hold=phase == "held"
        )
    clean_ratio = _median([w["completed_per_arrived"] for w in phases["clean"]["windows"]])
    held = phases["held"]["windows"]
    worst = min((w["completed_per_arrived"] for w in held), default=0.0)
    of_clean = round(worst / clean_ratio, 3) if clean_ratio else None
    worst_p99 = max((w["lag_p99_ms"] or 0.0 for w in held), default=0.0)
    notes = [
        f"arrivals {flat_rate:,.0f} flat + {diamond_rate:,.0f} diamond tasks/s "
        f"({steps_per_s:,.0f} steps/s, {XMIN_LOAD:.0%} of {capacity:,.0f}); "
        f"{seconds:g}s per phase, {window:g}s windows"
    ]
    for phase, result in phases.items():
        for w in result["windows"]:
            notes.append(
                f"{phase} {w['from_s']:>5.0f}-{w['to_s']:<5.0f}s: {w['arrived']:,} arrived, "
                f"{w['completed']:,} completed ({w['completed_per_arrived']:.0%}), lag p50 "
                f"{_ms(w['lag_p50_ms'])} p99 {_ms(w['lag_p99_ms'])}"
            )
        notes.append(f"{phase} at the end: " + report.describe_tables(result["tables"]))
    bench.results["xmin"] = {
        "ok": True,
        "flat_tasks_per_s": round(flat_rate, 1),
        "diamond_tasks_per_s": round(diamond_rate, 1),
        "seconds": seconds,
        "window_s": window,
        **phases,
        "worst_held_window_of_clean": of_clean,
        "worst_held_lag_p99_ms": worst_p99,
        "all_completed": True,
        "notes": notes,
    }
    bench.emit(
        Row(
            "xmin",
            "worst held window, completed vs clean",
            f"{of_clean:.0%}" if of_clean is not None else "n/a",
            "",
            f">= {XMIN_TARGET_OF_CLEAN:.0%}",
            bench.judge(of_clean >= XMIN_TARGET_OF_CLEAN) if of_clean is not None else None,
        )
    )
    clean_p99 = max((w["lag_p99_ms"] or 0.0 for w in phases["clean"]["windows"]), default=0.0)
    bench.emit(
        Row(
            "xmin",
            "lag p99, worst window: clean / held",
            f"{clean_p99:,.0f} / {worst_p99:,.0f} ms",
            "",
            f"held < {XMIN_TARGET_LAG_P99_MS:,.0f} ms",
            bench.judge(worst_p99 < XMIN_TARGET_LAG_P99_MS),
        )
    )


async def _phase(
    bench: Bench,
    phase: str,
    flat_rate: float,
    diamond_rate: float,
    seconds: float,
    window: float,
    *,
    hold: bool,
) -> dict[str, Any]:
    async with bench.fresh_database(f"xmin_{phase}") as dsn:
        conn = await db.connect(dsn)
        holder = await db.connect(dsn) if hold else None
        processes = bench.workers(f"xmin_{phase}", dsn, bench.options.workers)
        try:
            await bench.register(conn)
            for worker in processes:
                worker.start()
            await asyncio.gather(*(w.wait_ready() for w in processes))
            # warm up at the same rate, then take statistics, as a database in steady state
            # has them (plans made on empty tables are not what this measures)
            await _arrivals(conn, flat_rate, diamond_rate, max(seconds * XMIN_WARMUP, XMIN_TICK))
            await queries.analyze_engine_tables(conn)
            since = await conn.database_now()
            snapshot = None
            if holder is not None:
                snapshot = holder.raw.transaction(isolation="repeatable_read", readonly=True)
                await snapshot.start()
                await queries.report_read(holder)  # the snapshot is taken here
            bench.say(
                f"xmin {phase}: {seconds:g}s of arrivals" + (", snapshot held" if hold else "")
            )
            flat, diamonds = await _arrivals(conn, flat_rate, diamond_rate, seconds)
            tables = await queries.hot_table_stats(conn)
            if snapshot is not None:
                await snapshot.rollback()
            await bench.wait_complete(conn, flat + diamonds, processes, since)
            await bench.verify(conn, flat + diamonds, flat + 4 * diamonds, since)
            windows = await queries.completion_windows(conn, since, window, seconds)
        finally:
            await asyncio.gather(*(w.stop() for w in processes))
            await conn.close()
            if holder is not None:
                await holder.close()
    if not windows:
        raise BenchError(f"xmin {phase}: no window completed anything")
    return {"flat_tasks": flat, "diamond_tasks": diamonds, "windows": windows, "tables": tables}


async def _arrivals(
    conn: db.Connection, flat_rate: float, diamond_rate: float, seconds: float
) -> tuple[int, int]:
    """Create tasks at the two rates for `seconds`, a batch every XMIN_TICK; the counts."""
    flat = diamonds = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due_flat = int(flat_rate * elapsed) - flat
        due_diamonds = int(diamond_rate * elapsed) - diamonds
        if due_flat > 0:
            await conn.create_tasks(NAMESPACE, handlers.FLAT, [{}] * due_flat)
            flat += due_flat
        if due_diamonds > 0:
            await conn.create_tasks(NAMESPACE, handlers.DIAMOND, [{}] * due_diamonds)
            diamonds += due_diamonds
        await asyncio.sleep(XMIN_TICK)  # pacing, not synchronisation
    return flat, diamonds


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
