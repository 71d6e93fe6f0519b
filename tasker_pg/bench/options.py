"""What the benchmark runs: the options, the default sizes, the targets and the run's limits."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tasker_pg.bench_args import SCENARIOS
from tasker_pg.errors import TaskerError

EXIT_OK = 0
EXIT_FAILED = 1

# Scenarios whose result is a ratio to the baseline: they pull the baseline in.
RATIO_SCENARIOS = ("flat", "dag", "fanout", "deep", "backlog", "retention", "limits", "scale")

# Default sizes (multiplied by --n).
BASELINE_MESSAGES = 100_000
BASELINE_CONNECTIONS = 4
BASELINE_BATCH = 50
FLAT_TASKS = 20_000
DAG_TASKS = 2_000
FANOUT_TASKS = 10  # of 1,002 steps each
FANOUT_PROBES = 5  # fan-out transactions timed on their own
RETENTION_HISTORY = 1_000_000  # finished tasks the retention scenario purges
RETENTION_BATCH = 1_000  # tasks per purge_finished call
DEEP_TASKS = 1_000_000  # flat tasks queued at once for the deep scenario
DEEP_POLL = 2.0  # its completion poll counts a large table: seldom (detection only)
SCALE_WORKERS = (1, 2, 4)  # worker processes of the scale scenario's flat drains
SCALE_CONCURRENCY = (16, 32, 64, 128, 256)  # handlers at once, each taking 10 ms
SCALE_SLOW_TASKS = 5_000  # tasks of each 10 ms drain
XMIN_SECONDS = 180.0  # each phase of the held-snapshot scenario (scaled by --n)
XMIN_WINDOW = 10.0  # seconds per reported window (shorter when a phase is short)
XMIN_TICK = 0.1  # seconds between two arrival batches
XMIN_WARMUP = 0.1  # warm-up before each phase, as a share of its length
XMIN_LOAD = 0.25  # arrival rate, as a share of the diamond capacity measured by `dag`
BACKLOG_INVISIBLE = 100_000  # steps of the queue not visible while the backlog drain runs
LIMITS_KEYS = 10  # customers of the limits scenario; key k has (k + 1) shares of the backlog
LIMITS_CONCURRENCY = 100  # its concurrency limit per key: not binding (see `limits`)
LIMITS_RATE = 1_000_000.0  # its rate limit (tokens/s and burst): not binding either
LIMITS_SHARE_WINDOW = 0.8  # shares are read over the first claims while every key has a backlog
LATENCY_TASKS = 200
LATENCY_RATE = 50.0  # tasks created per second
CREATE_SINGLE_TASKS = 2_000
CREATE_BATCHED_TASKS = 20_000
CREATE_BATCH = 1_000
CREATE_WARMUP = 20  # calls before timing starts (plans cached, functions compiled)

# Targets on the 2-core reference machine (fsync and synchronous_commit on). Throughput:
# steps/s over the raw baseline's messages/s of the same run.
TARGET_FLAT_RATIO = 0.40
TARGET_DAG_RATIO = 0.35  # diamond and linear
TARGET_FANOUT_RATIO = 0.15
# drain rate / clean flat drain rate of the same run: with 100,000 invisible steps in the
# queue, with 1,000,000 queued, and while purging a 1,000,000-task history
TARGET_BACKLOG_OF_FLAT = 0.90
TARGET_DEEP_OF_FLAT = 0.90
TARGET_RETENTION_OF_FLAT = 0.80
# the flat drain with fairness lanes, a concurrency limit and a rate limit on every step (none
# binding): the cost of flow control in the claim; and the fairness share of each of 10 keys
# under a skewed backlog: within this fraction of equal
TARGET_LIMITS_OF_FLAT = 0.80
TARGET_LIMITS_SHARE = 0.10
XMIN_TARGET_OF_CLEAN = 0.90  # every held window completes this share of the clean phase's
XMIN_TARGET_LAG_P99_MS = 1_000.0
# Latencies at LATENCY_RATE: (p50, p99) in milliseconds, both must hold.
TARGET_CREATE_START_MS = (1.5, 5.0)
TARGET_HANDOFF_MS = (1.0, 3.0)
TARGET_LINEAR_E2E_MS = (6.0, 15.0)
# Task creation on one connection: one create_task per call against a bare one-row INSERT per
# call of the same run; create_tasks batches of CREATE_BATCH: tasks/s, or that share of the
# bare insert's rows/s (either one meets the target).
TARGET_CREATE_SINGLE_OF_INSERT = 0.6
TARGET_CREATE_BATCHED = 15_000.0
TARGET_CREATE_BATCHED_OF_INSERT = 4.0

# What the reference machine did, for the notes under the table.
REFERENCE_BASELINE = 59_000
DRIFT_WARNING_PCT = 15.0

POLL_INTERVAL = 0.1  # completion polling (detection only, not timing)
STALL_TIMEOUT = 60.0  # fail when no task completes for this long
WORKER_START_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 30.0

__all__ = ["SCENARIOS", "BenchError", "BenchOptions", "options_from_args"]


class BenchError(TaskerError):
    """A scenario could not produce an honest number (tasks unfinished, worker died, ...)."""

    error_code = "bench_failed"


@dataclass(frozen=True)
class BenchOptions:
    """What to run and how (the command-line options)."""

    scenarios: tuple[str, ...] = SCENARIOS
    workers: int = 1
    concurrency: int = 200
    n: float = 1.0
    handler_ms: float = 0.0
    dsn: str | None = None
    # server time per engine function (pg_stat_user_functions) of every scenario database
    function_times: bool = False

    def count(self, default: int) -> int:
        """A default size scaled by `n` (at least 1)."""
        return max(1, round(default * self.n))


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The options parsed by `tasker_pg.bench_args.add_arguments`."""
    return BenchOptions(
        scenarios=tuple(args.scenario) or SCENARIOS,
        workers=args.workers,
        function_times=bool(getattr(args, "function_times", False)),
        concurrency=args.concurrency,
        n=args.n,
        handler_ms=args.handler_ms,
        dsn=args.dsn,
    )
