"""The benchmark's report: the table rows and their verdicts, percentiles, the header and the
notes under the table.

The rows with a target are built here from the measured values (`throughput_row`,
`latency_rows`, `create_rows`), so that the judgement of each against its target lives in one
place the tests reach without running a scenario.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from tasker_pg import __version__
from tasker_pg.bench.options import (
    DRIFT_WARNING_PCT,
    REFERENCE_BASELINE,
    TARGET_CREATE_BATCHED,
    TARGET_CREATE_BATCHED_OF_INSERT,
    TARGET_CREATE_SINGLE_OF_INSERT,
    BenchOptions,
)


@dataclass
class Row:
    """One line of the report table; `met` is None where there is no target to meet."""

    scenario: str
    measure: str
    value: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def result(self) -> str:
        if not self.target:
            return ""
        if self.met is None:
            return "n/a"
        return "met" if self.met else "MISSED"

    def cells(self) -> list[str]:
        return [self.scenario, self.measure, self.value, self.ratio, self.target, self.result]


COLUMNS = (
    ("scenario", 9),
    ("measure", 38),
    ("value", 24),
    ("ratio", 11),
    ("target", 18),
    ("result", 6),
)


def format_row(cells: Sequence[str]) -> str:
    """A table line with the report's fixed column widths (rows print as scenarios finish)."""
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of a list of durations in seconds, in milliseconds."""
    return {
        "count": len(seconds),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p90_ms": round(percentile(seconds, 90) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3),
    }


# --- rows judged against a target ----------------------------------------------------------------


def verdict(ok: bool, applies: bool = True) -> bool | None:
    """A row's `met`: None where the target does not apply (the targets hold for the default
    no-op handlers, not with --handler-ms)."""
    return ok if applies else None


def throughput_row(
    scenario: str, measure: str, value: str, ratio: float | None, target: float, applies: bool
) -> Row:
    """A drain's row: its ratio to the baseline of the same run against `target` (met at or
    over it; no verdict without a baseline)."""
    return Row(
        scenario,
        measure,
        value,
        "-" if ratio is None else f"{ratio:.3f}x",
        f">= {target:.2f}x",
        None if ratio is None else verdict(ratio >= target, applies),
    )


def ms_number(ms: float) -> str:
    """Milliseconds to three significant figures or more (two decimals under 10 ms)."""
    if ms < 10:
        return f"{ms:.2f}"
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def ms_text(summary: Mapping[str, float]) -> str:
    """p50/p90/p99/max of an `ms_summary`, in milliseconds."""
    return "/".join(ms_number(summary[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")) + " ms"


def latency_met(summary: Mapping[str, float], target: tuple[float, float]) -> bool:
    """Whether both the p50 and the p99 are at or under the target's (p50, p99) milliseconds."""
    p50, p99 = target
    return summary["p50_ms"] <= p50 and summary["p99_ms"] <= p99


def latency_rows(
    measure: str,
    summary: Mapping[str, float],
    raw_measure: str,
    raw: Mapping[str, float],
    target: tuple[float, float],
    applies: bool,
) -> list[Row]:
    """A latency's row (p50/p90/p99/max, its p50 over the raw loop's p50, judged against the
    (p50, p99) target), then the raw loop's comparable latency of the same run under it."""
    p50, p99 = target
    return [
        Row(
            "latency",
            f"{measure} p50/90/99/max",
            ms_text(summary),
            f"{summary['p50_ms'] / raw['p50_ms']:.2f}x raw" if raw["p50_ms"] > 0 else "",
            f"p50<={p50:g} p99<={p99:g} ms",
            verdict(latency_met(summary, target), applies),
        ),
        Row("latency", f"  raw loop: {raw_measure}", ms_text(raw)),
    ]


def create_rows(
    insert_rate: float, single_rate: float, batched_rate: float, batch: int
) -> list[Row]:
    """The create scenario's rows: the bare one-row INSERT per call (the reference), one
    create_task per call (met at or over TARGET_CREATE_SINGLE_OF_INSERT of the reference), and
    create_tasks batches (met at or over TARGET_CREATE_BATCHED tasks/s, or at or over
    TARGET_CREATE_BATCHED_OF_INSERT of the reference)."""
    single = single_rate / insert_rate
    batched = batched_rate / insert_rate
    return [
        Row("create", "bare one-row INSERT/s (reference)", f"{insert_rate:,.0f}", "1.000x"),
        Row(
            "create",
            "4-step tasks/s, one create_task/call",
            f"{single_rate:,.0f}",
            f"{single:.3f}x",
            f">= {TARGET_CREATE_SINGLE_OF_INSERT:.2f}x insert",
            single >= TARGET_CREATE_SINGLE_OF_INSERT,
        ),
        Row(
            "create",
            f"4-step tasks/s, create_tasks x {batch:,}",
            f"{batched_rate:,.0f}",
            f"{batched:.3f}x",
            f">={TARGET_CREATE_BATCHED / 1000:g}k/s or {TARGET_CREATE_BATCHED_OF_INSERT:g}x",
            batched_rate >= TARGET_CREATE_BATCHED or batched >= TARGET_CREATE_BATCHED_OF_INSERT,
        ),
    ]


# --- printing ------------------------------------------------------------------------------------


def settings_line(machine: dict[str, Any]) -> str:
    """The server's other reported settings (the embedded cluster's tuning), one line, or
    nothing when the report has none (a report written before they were listed)."""
    shown = {"fsync", "synchronous_commit", "shared_buffers"}
    pairs = [
        f"{name}={value}"
        for name, value in machine.get("settings", {}).items()
        if name not in shown and value is not None
    ]
    return "settings: " + ", ".join(pairs) + "\n" if pairs else ""


def print_header(out: TextIO, options: BenchOptions, machine: dict[str, Any]) -> None:
    """The machine, the server's settings and the options, then the table's column heads."""
    o = options
    print(
        f"tasker-pg bench {__version__}: {machine['cores']} cores ({machine['cpu_model']}), "
        f"load {' '.join(str(x) for x in machine['load_average'])}\n"
        f"PostgreSQL {machine['postgres_version']}, fsync={machine['fsync']}, "
        f"synchronous_commit={machine['synchronous_commit']}, "
        f"shared_buffers={machine['shared_buffers']}; {machine['server']}\n"
        + settings_line(machine)
        + f"workers={o.workers} concurrency={o.concurrency} n={o.n:g} "
        f"handler_ms={o.handler_ms:g}\n",
        file=out,
    )
    print(format_row([name for name, _ in COLUMNS]), file=out)
    print(format_row(["-" * w for _, w in COLUMNS]), file=out, flush=True)


def print_footer(out: TextIO, report: dict[str, Any]) -> None:
    """The verdict line, then per scenario its CPU and batching figures and context notes,
    then the failures in full."""
    judged = [t for t in report["targets"] if t["met"] is not None]
    met = sum(1 for t in judged if t["met"])
    print(file=out)
    print(
        f"targets: {met} met, {len(judged) - met} missed"
        + (
            f", {len(report['targets']) - len(judged)} not applicable (--handler-ms)"
            if len(judged) < len(report["targets"])
            else ""
        )
        + f"; all tasks completed: {'yes' if report['all_completed'] else 'NO'}"
        + f"; {report['duration_s']:g}s",
        file=out,
    )
    for name, result in report["scenarios"].items():
        details = []
        for key, value in cpu_details(result):
            details.append(f"{key}: {value}")
        for line in result.get("worker_summaries", []):
            details.append(f"worker {line}")
        for shape, sub in result.get("shapes", {}).items():
            details.extend(f"{shape}: {key}: {value}" for key, value in cpu_details(sub))
            details.extend(f"{shape}: worker {line}" for line in sub["worker_summaries"])
        details.extend(context_notes(name, result))
        for line in details:
            print(f"  {name}: {line}", file=out)
    for name, error in report["failures"].items():
        print(f"\n{name} FAILED:\n{error}", file=out)


def context_notes(name: str, result: dict[str, Any]) -> list[str]:
    """How this machine compares with the one the targets were set on."""
    notes = []
    if name == "baseline" and result.get("ok"):
        notes.append(
            f"the targets' reference machine did about {REFERENCE_BASELINE:,} messages/s; "
            f"this one {result['messages_per_s']:,.0f}"
        )
        drift = result.get("drift_pct")
        if drift is not None and abs(drift) > DRIFT_WARNING_PCT:
            notes.append(
                f"WARNING: the baseline drifted {drift:+.0f}% during the run; the machine was "
                "not steady and the ratios are uncertain by about as much"
            )
    notes.extend(result.get("notes", []))
    return notes


def cpu_details(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The per-step CPU and batching figures of one result, for the notes under the table."""
    parts = []
    if "avg_claim_batch" in result:
        parts.append(
            (
                "batches",
                f"{result['claim_batches']} claims (avg {result['avg_claim_batch']}), "
                f"{result['flush_batches']} flushes (avg {result['avg_flush_batch']}), "
                f"{result['seconds']:.2f}s",
            )
        )
    cpu = [
        f"{label} {result[key]} us"
        for key, label in (
            ("server_cpu_us_per_step", "server"),
            ("worker_cpu_us_per_step", "worker"),
            ("server_cpu_us_per_msg", "server"),
            ("client_cpu_us_per_msg", "client"),
        )
        if result.get(key) is not None
    ]
    if cpu:
        per = "message" if "messages" in result else "step"
        parts.append((f"CPU per {per}", ", ".join(cpu)))
    return parts


def describe_tables(tables: list[dict[str, Any]]) -> str:
    """The hot tables' live and dead tuples and sizes (queries.hot_table_stats), one line."""
    return ", ".join(
        f"{t['relation']} {t['live']:,} live / {t['dead']:,} dead, "
        f"{t['table_kb']:,} kB + {t['index_kb']:,} kB idx"
        for t in tables
    )
