"""`tasker-pg bench`: every scenario runs at a tiny size and reports honestly (no timing checks)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from tasker_pg import bench_args, embedded
from tasker_pg.bench import cli, handlers, options, report, runner, scenarios

if TYPE_CHECKING:
    from tests.support.pgserver import TestServer


_RAW_PARTS = ("send_to_claim", "send_to_ack", "handoff", "chain_end_to_end")


def _positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and value > 0, f"{where} = {value!r}"


def test_every_scenario_reports_completed_work(
    pg_server: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dsn", pg_server.admin_dsn, "--n", "0.01", "--workers", "2", "--concurrency", "20"]
    code = cli.main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == options.EXIT_OK, captured.err
    report = json.loads(captured.out)

    assert report["ok"] is True and report["failures"] == {}
    assert report["all_completed"] is True
    assert list(report["scenarios"]) == list(options.SCENARIOS)
    for name, result in report["scenarios"].items():
        assert result["ok"] is True and result["all_completed"] is True, name

    machine = report["machine"]
    _positive(machine["cores"], "cores")
    for key in ("postgres_version", "fsync", "synchronous_commit", "shared_buffers"):
        assert machine[key], key
    # the server's value of every setting the embedded cluster tunes, and the header lists them
    assert list(machine["settings"]) == list(embedded.REPORTED_SETTINGS)
    assert all(value for value in machine["settings"].values()), machine["settings"]

    scenarios = report["scenarios"]
    baseline = scenarios["baseline"]
    assert baseline["messages"] == 1_000
    _positive(baseline["messages_per_s"], "baseline messages/s")
    # Measured again at the end of the run (flat and dag took ratios against it).
    _positive(baseline["end_of_run"]["messages_per_s"], "baseline at the end")
    assert isinstance(baseline["drift_pct"], float)
    drains = {"flat": scenarios["flat"], **scenarios["dag"]["shapes"]}
    assert drains["flat"]["tasks"] == drains["flat"]["steps"] == 200
    assert drains["diamond"]["steps"] == drains["linear"]["steps"] == 4 * 20
    for name, drain in drains.items():
        for key in ("steps_per_s", "tasks_per_s", "ratio_to_baseline", "seconds"):
            _positive(drain[key], f"{name}.{key}")
        assert drain["all_completed"] is True
        assert any("claimed=" in line for line in drain["worker_summaries"]), name
    latency = scenarios["latency"]
    raw = latency["raw_loop"]
    for where, summary in [
        *((part, latency[part]) for part in ("create_to_start", "handoff", "linear_end_to_end")),
        ("commit_floor", latency["commit_floor"]),
        *((f"raw_loop.{part}", raw[part]) for part in _RAW_PARTS),
    ]:
        _positive(summary["p50_ms"], f"latency.{where}.p50")
        assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert latency["handoff"]["count"] == 3 * latency["linear_end_to_end"]["count"]
    assert raw["messages"] == latency["commit_floor"]["count"] == 2
    assert raw["send_to_claim"]["count"] == raw["send_to_ack"]["count"] == 2
    assert raw["handoff"]["count"] == latency["handoff"]["count"] == 6
    assert raw["chain_end_to_end"]["count"] == 2
    create = scenarios["create"]
    _positive(create["bare_insert"]["rows_per_s"], "bare insert")
    _positive(create["one_per_call"]["ratio_to_bare_insert"], "create vs bare insert")
    _positive(create["one_per_call"]["tasks_per_s"], "create one per call")
    _positive(create["batched"]["tasks_per_s"], "create batched")

    fanout = scenarios["fanout"]
    assert fanout["steps"] == fanout["tasks"] * (fanout["workers_per_task"] + 2)
    _positive(fanout["steps_per_s"], "fanout steps/s")
    _positive(fanout["fanout_commit_ms"]["p50_ms"], "fanout commit p50")

    deep = scenarios["deep"]
    assert deep["tasks"] == deep["steps"] == 10_000
    _positive(deep["ratio_to_flat"], "deep / flat")
    assert list(deep["tables"]) == ["queued", "drained"]
    [queued] = [t for t in deep["tables"]["queued"] if t["relation"] == "tasks"]
    assert queued["live"] >= 10_000

    kept = scenarios["retention"]
    assert kept["history_tasks"] == 10_000
    assert kept["tasks"] == kept["steps"] == drains["flat"]["tasks"]
    _positive(kept["purge_tasks_per_s"], "purge tasks/s")
    _positive(kept["ratio_to_flat"], "retention / flat")

    backlog = scenarios["backlog"]
    assert backlog["invisible_steps"] == 1_000
    assert backlog["tasks"] == backlog["steps"] == drains["flat"]["tasks"]
    _positive(backlog["ratio_to_flat"], "backlog / flat")

    limited = scenarios["limits"]
    assert list(limited["variants"]) == [
        handlers.LIMITS_FAIR,
        handlers.LIMITS_CONCURRENCY,
        handlers.LIMITS_RATED,
    ]
    for name, drain in limited["variants"].items():
        assert drain["tasks"] == drain["steps"] == drains["flat"]["tasks"], name
        _positive(drain["ratio_to_flat"], f"limits {name} / flat")
    # 200 tasks skewed 1:10 over 10 keys: the smallest key has 3, the window is 80 % of 10 x 3
    assert limited["share_window"] == 24
    assert set(limited["shares"]) == {f"c{k}" for k in range(10)}
    assert abs(sum(limited["shares"].values()) - 1) < 1e-3

    scale = scenarios["scale"]
    assert list(scale["workers"]) == ["1", "2", "4"]
    assert list(scale["handler_10ms_concurrency"]) == ["16", "32", "64", "128", "256"]
    for drain in [*scale["workers"].values(), *scale["handler_10ms_concurrency"].values()]:
        assert drain["all_completed"] is True
        _positive(drain["steps_per_s"], "scale steps/s")
    assert [d["steps"] for d in scale["workers"].values()] == [200, 200, 200]
    assert {d["steps"] for d in scale["handler_10ms_concurrency"].values()} == {50}

    held = scenarios["xmin"]
    for phase in ("clean", "held"):
        windows = held[phase]["windows"]
        assert len(windows) == 6, windows
        assert sum(w["arrived"] for w in windows) > 0
        assert {t["relation"] for t in held[phase]["tables"]} == {
            "tasks",
            "steps",
            "step_edges",
            f"q_{handlers.NAMESPACE}",
        }
    assert isinstance(held["worst_held_lag_p99_ms"], float)

    # Every target is listed with a verdict (no timing assertion: only that it was judged).
    per_scenario: dict[str, int] = {}
    for target in report["targets"]:
        per_scenario[target["scenario"]] = per_scenario.get(target["scenario"], 0) + 1
    assert per_scenario == {
        "flat": 1,
        "dag": 2,
        "fanout": 1,
        "deep": 1,
        "backlog": 1,
        "retention": 1,
        "limits": 4,
        "xmin": 2,
        "latency": 3,
        "create": 2,
    }
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    # The benchmark's databases are gone.
    assert asyncio.run(_leftover_bench_databases(pg_server.admin_dsn)) == []


async def _leftover_bench_databases(admin_dsn: str) -> list[str]:
    admin = await asyncpg.connect(admin_dsn)
    try:
        rows = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"bench\\_%\\_{os.getpid()}"
        )
    finally:
        await admin.close()
    return [r["datname"] for r in rows]


async def test_a_drain_that_does_not_add_up_is_reported_as_failed(pg_server: TestServer) -> None:
    """Never fake a number: the verification counts what the database holds, not what we hoped."""
    run = runner.Bench(options.BenchOptions(scenarios=("flat",), dsn=pg_server.admin_dsn, n=0.001))

    async def flat_expecting_two_steps_per_task(bench: runner.Bench) -> None:
        await scenarios.drain(bench, "flat", handlers.FLAT, 5, steps_per_task=2)

    run.scenarios["flat"] = flat_expecting_two_steps_per_task
    result = await run.run()
    assert result["ok"] is False and result["all_completed"] is False
    assert "5 of 5 steps complete" in result["failures"]["flat"]
    assert "10 expected" in result["failures"]["flat"]
    assert result["scenarios"]["flat"]["ok"] is False
    assert "steps_per_s" not in result["scenarios"]["flat"]
    assert await _leftover_bench_databases(pg_server.admin_dsn) == []


def test_backlog_brings_the_clean_flat_drain_and_the_baseline() -> None:
    run = runner.Bench(options.BenchOptions(scenarios=("backlog",)))
    assert run._selected() == ["baseline", "flat", "backlog", "baseline_again"]
    run = runner.Bench(options.BenchOptions(scenarios=("retention", "xmin")))
    assert run._selected() == ["baseline", "flat", "dag", "retention", "xmin", "baseline_again"]
    run = runner.Bench(options.BenchOptions(scenarios=("latency",)))
    assert run._selected() == ["latency"]


def test_add_parser_wires_the_bench_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="tasker-pg")
    sub = parser.add_subparsers(dest="command", required=True)
    bench_args.add_parser(sub)
    args = parser.parse_args(
        [
            "bench",
            "--scenario",
            "flat",
            "--scenario",
            "latency",
            "--workers",
            "2",
            "--concurrency",
            "50",
            "--n",
            "0.5",
            "--handler-ms",
            "10",
            "--json",
            "--dsn",
            "postgresql://x/y",
        ]
    )
    assert args.func is bench_args.run_command
    parsed = options.options_from_args(args)
    assert parsed == options.BenchOptions(
        scenarios=("flat", "latency"),
        workers=2,
        concurrency=50,
        n=0.5,
        handler_ms=10.0,
        dsn="postgresql://x/y",
    )
    assert parsed.count(options.FLAT_TASKS) == 10_000
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--scenario", "nope"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--n", "0"])


def test_the_header_lists_the_tuned_settings_once() -> None:
    settings = {name: f"v-{name}" for name in embedded.REPORTED_SETTINGS}
    line = report.settings_line({"settings": settings})
    for name, _ in embedded.QUEUE_WORKLOAD_SETTINGS:
        assert f"{name}=v-{name}" in line
    # the first header line already shows these
    for name in ("fsync", "synchronous_commit", "shared_buffers"):
        assert f"{name}=" not in line
    assert report.settings_line({}) == ""


def test_percentile_interpolates_between_ranks() -> None:
    assert report.percentile([3.0], 99) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile(list(map(float, range(101))), 99) == 99.0
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    with pytest.raises(ValueError, match="no values"):
        report.percentile([], 50)


def test_ms_summary_of_known_durations() -> None:
    # Unsorted seconds; ranks 0..4: p90 sits at rank 3.6, p99 at rank 3.96.
    summary = report.ms_summary([0.005, 0.001, 0.003, 0.002, 0.004])
    assert summary == {"count": 5, "p50_ms": 3.0, "p90_ms": 4.6, "p99_ms": 4.96, "max_ms": 5.0}
    # One slow outlier in 200: p50 and p90 do not see it, p99 (rank 197.01) barely, max does.
    tail = report.ms_summary([0.001] * 199 + [0.1])
    assert tail == {"count": 200, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "max_ms": 100.0}
    tail = report.ms_summary([0.001] * 198 + [0.05, 0.1])
    assert tail["p99_ms"] == 1.49  # rank 197.01: 1 ms + 0.01 x (50 - 1) ms
    assert report.ms_text(summary) == "3.00/4.60/4.96/5.00 ms"
    assert report.ms_text(
        {"p50_ms": 9.994, "p90_ms": 12.34, "p99_ms": 99.94, "max_ms": 1234.5}
    ) == ("9.99/12.3/99.9/1,234 ms")


def _ms(p50: float, p99: float) -> dict[str, float]:
    return {"count": 200, "p50_ms": p50, "p90_ms": p50, "p99_ms": p99, "max_ms": p99}


@pytest.mark.parametrize(
    ("target", "p50_limit", "p99_limit"),
    [
        (options.TARGET_CREATE_START_MS, 1.5, 5.0),
        (options.TARGET_HANDOFF_MS, 1.0, 3.0),
        (options.TARGET_LINEAR_E2E_MS, 6.0, 15.0),
    ],
    ids=["create-to-start", "handoff", "linear-end-to-end"],
)
def test_a_latency_is_met_at_or_under_both_its_p50_and_p99_targets(
    target: tuple[float, float], p50_limit: float, p99_limit: float
) -> None:
    raw = _ms(2.0, 4.0)
    cases = [
        (p50_limit, p99_limit, True),  # at both
        (p50_limit - 0.01, p99_limit - 0.01, True),  # under both
        (p50_limit + 0.01, p99_limit, False),  # p50 over
        (p50_limit, p99_limit + 0.01, False),  # p99 over
        (p50_limit / 2, p99_limit * 2, False),  # a fast median does not excuse the tail
    ]
    for p50, p99, met in cases:
        row, raw_row = report.latency_rows("x", _ms(p50, p99), "y", raw, target, True)
        assert (row.met, row.result) == (met, "met" if met else "MISSED"), (p50, p99)
        assert row.target == f"p50<={p50_limit:g} p99<={p99_limit:g} ms"
        assert row.ratio == f"{p50 / 2.0:.2f}x raw"
        assert (raw_row.value, raw_row.target, raw_row.result) == ("2.00/2.00/4.00/4.00 ms", "", "")
    # With --handler-ms the latency targets do not apply.
    [row, _] = report.latency_rows("x", _ms(p50_limit, p99_limit), "y", raw, target, False)
    assert (row.met, row.result) == (None, "n/a")


@pytest.mark.parametrize(
    ("scenario", "target", "limit"),
    [
        ("flat", options.TARGET_FLAT_RATIO, 0.40),
        ("dag", options.TARGET_DAG_RATIO, 0.35),
        ("fanout", options.TARGET_FANOUT_RATIO, 0.15),
    ],
)
def test_a_throughput_is_met_at_or_over_its_ratio(
    scenario: str, target: float, limit: float
) -> None:
    for ratio, met in ((limit, True), (limit + 0.001, True), (limit - 0.0001, False)):
        row = report.throughput_row(scenario, "steps/s", "1", ratio, target, True)
        assert (row.met, row.result) == (met, "met" if met else "MISSED"), ratio
        assert row.target == f">= {limit:.2f}x"
    # No baseline in the run: no ratio, no verdict.
    row = report.throughput_row(scenario, "steps/s", "1", None, target, True)
    assert (row.ratio, row.met, row.result) == ("-", None, "n/a")
    row = report.throughput_row(scenario, "steps/s", "1", limit, target, False)
    assert (row.met, row.result) == (None, "n/a")


def test_task_creation_is_judged_against_the_bare_insert_of_the_same_run() -> None:
    def verdicts(insert: float, single: float, batched: float) -> list[str]:
        rows = report.create_rows(insert, single, batched, 1_000)
        assert rows[0].target == "" and rows[0].ratio == "1.000x"
        return [r.result for r in rows[1:]]

    # one create_task per call: >= 0.6x the bare insert, whatever the absolute rate
    assert verdicts(1_000.0, 600.0, 20_000.0) == ["met", "met"]
    assert verdicts(1_000.0, 599.0, 20_000.0) == ["MISSED", "met"]
    assert verdicts(100.0, 61.0, 20_000.0) == ["met", "met"]
    # batches of 1,000: >= 15,000 tasks/s, or >= 4x the bare insert
    assert verdicts(10_000.0, 6_000.0, 15_000.0) == ["met", "met"]  # 15,000/s at 1.5x
    assert verdicts(10_000.0, 6_000.0, 14_999.0) == ["met", "MISSED"]
    assert verdicts(3_000.0, 1_800.0, 12_000.0) == ["met", "met"]  # 4.0x at 12,000/s
    assert verdicts(3_000.0, 1_800.0, 11_999.0) == ["met", "MISSED"]
    rows = report.create_rows(3_000.0, 1_800.0, 12_000.0, 1_000)
    assert [(r.ratio, r.target) for r in rows[1:]] == [
        ("0.600x", ">= 0.60x insert"),
        ("4.000x", ">=15k/s or 4x"),
    ]


# Runs `tasker-pg` with the given arguments in this interpreter, then prints which modules of
# the benchmark package were imported (as a JSON list) and the exit code.
_WHICH_MODULES = """
import json, sys
import tasker_pg.cli
try:
    code = tasker_pg.cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[:2] == ["tasker_pg", "bench"])
print(json.dumps({"code": code, "loaded": loaded}))
"""


def _bench_modules_after(*argv: str) -> tuple[Any, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _WHICH_MODULES, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return found["code"], found["loaded"]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["bench", "--help"], ["migrate", "--help"], ["db", "url", "--help"]],
    ids=["help", "bench-help", "migrate-help", "db-url-help"],
)
def test_the_command_line_does_not_import_the_benchmark(argv: list[str]) -> None:
    code, loaded = _bench_modules_after(*argv)
    assert code == 0
    assert loaded == []


def test_the_bench_subcommand_imports_the_benchmark_when_it_runs() -> None:
    # Nothing listens on port 1: the run fails at its first connection, after the import.
    code, loaded = _bench_modules_after("bench", "--dsn", "postgresql://bench@127.0.0.1:1/none")
    assert code == 1
    assert "tasker_pg.bench.runner" in loaded and "tasker_pg.bench.scenarios" in loaded


def test_the_installed_script_help_does_not_import_the_benchmark() -> None:
    script = Path(sys.executable).with_name("tasker-pg")
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('tasker_pg.bench' in sys.modules, 'tasker_pg.cli' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: tasker-pg" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False True"


def test_a_skewed_backlog_gives_key_k_k_plus_1_shares_and_every_task_a_key() -> None:
    keys = scenarios.skewed_keys(550, 10)
    assert len(keys) == 550
    assert [keys.count(f"c{k}") for k in range(10)] == [10 * (k + 1) for k in range(10)]
    assert keys[0] == "c9"  # the largest customer's tasks are created first
    odd = scenarios.skewed_keys(101, 3)
    assert len(odd) == 101 and odd.count("c0") == 16 and odd.count("c2") == 52


def test_fair_shares_count_every_key_even_one_never_claimed() -> None:
    shares = scenarios.fair_shares(["c0", "c1", "c1", "c0"], 3)
    assert shares == {"c0": 0.5, "c1": 0.5, "c2": 0.0}
    assert scenarios.fair_shares([], 3) == {}
