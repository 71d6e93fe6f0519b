"""`tasker-pg bench`: throughput and latency, measured against a raw SQL baseline in the same run.

```
tasker-pg bench                       # every scenario, embedded database, default sizes
tasker-pg bench --scenario flat --workers 2 --handler-ms 10 --json
python -m tasker_pg.bench --dsn postgresql://user@host/db --n 0.1
```

Absolute numbers drift on shared machines; ratios to a baseline measured in the same run hold.
Every scenario runs on a fresh database (`bench_<scenario>_<pid>`, created on the server of the
DSN, migrated, dropped afterwards: the DSN's user needs CREATEDB). The server is the embedded
cluster (started if needed) unless `--dsn` is given.

Scenarios (default sizes; `--n` scales every count):

- baseline: a raw asyncpg loop with pgmq semantics over one plain table: 4 connections, each
  claiming 50 messages per statement (`FOR UPDATE SKIP LOCKED`, vt pushed, read_ct + 1) and
  acknowledging them with one batched DELETE, until 100,000 pre-filled messages are gone.
  Messages/s: the ceiling for at-least-once claim-and-acknowledge on this machine. It runs
  whenever flat or dag run, whose ratios need it, and then once more at the end of the run: the
  drift between the two says how steady the machine was (a warning above 15 %).
- flat: 20,000 single-step tasks, drained by `--workers` worker processes (`python -m
  tasker_pg.worker_cli`, `--concurrency` each) running a no-op async handler. Steps/s and the
  ratio to the baseline.
- dag: 2,000 four-step diamonds, then 2,000 four-step linear chains (each on its own fresh
  database), drained the same way: steps/s, tasks/s, ratio.
- latency: one idle worker; 200 single-step tasks created one at a time at 50/s
  (create-to-handler-start), then 200 four-step linear tasks at 50/s (step handoff: parent's
  outcome committed to child's handler start; and end to end).
- create: four-step tasks per second on one connection: one `tasker.create_task` per call
  (autocommit, as a client would), then `tasker.create_tasks` batches of 1,000; next to a bare
  one-row INSERT per call on the same connection, the machine's own price of a commit.

Tasks carry a small context (`{"i": n}`); every handler is a no-op (or sleeps `--handler-ms`).
How the throughput scenarios measure: the workers start first and sit idle (listening); all the
tasks are then created in ONE transaction (not timed), so they become visible at once when it
commits and the NOTIFY wakes every worker together. The same transaction ANALYZEs the tables, as
a database in steady state would have statistics (fresh tables without them get plans that
drain DAGs about three times slower). The measured interval runs from the first claim to the
last task's completion, both read from the database's own timestamps (the first `claimed` step
transition, `max(tasks.completed_at)`). The benchmark notices the end by polling `count(*)` of
complete tasks every 100 ms (cheaper for 20,000 tasks than one notification per task on
`tasker_task_events`); the poll only detects the end, it does not time it.

Latency uses the database clock for what the database decides and `time.time()` recorded by the
handler at its start; both clocks are this machine's. Create-to-start runs from the task's
`created_at` (taken when `create_task` begins, so it includes the create call and its commit, a
WAL flush with fsync on). The handoff runs from the child step's `enqueued_at` (written at the
end of the parent's `complete_steps`, just before it commits) to the child's handler start; the
JSON also gives it from the start of the parent's `complete_steps` call. End to end runs from
`created_at` to the task's `completed_at`.

Nothing is reported that did not happen: before a scenario's numbers are printed, every task
must be complete, every step complete exactly once, no message left and
`tasker.check_invariants()` empty; otherwise the scenario fails loudly and the command exits 1.
When the server runs on this machine, the CPU time of the worker processes and of their server
backends is reported per step (from /proc): the split between Python and SQL.

`add_parser(subparsers)` adds the subcommand to the main `tasker-pg` parser; this module also
runs on its own: `python -m tasker_pg.bench ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tasker_pg import __version__, argtypes, bench_handlers, db, migrations
from tasker_pg.bench_handlers import NAMESPACE
from tasker_pg.errors import DatabaseError, TaskerError

EXIT_OK = 0
EXIT_FAILED = 1

SCENARIOS = ("baseline", "flat", "dag", "latency", "create")
# Scenarios whose result is a ratio to the baseline: they pull the baseline in.
RATIO_SCENARIOS = ("flat", "dag")

# Default sizes (multiplied by --n).
BASELINE_MESSAGES = 100_000
BASELINE_CONNECTIONS = 4
BASELINE_BATCH = 50
FLAT_TASKS = 20_000
DAG_TASKS = 2_000
LATENCY_TASKS = 200
LATENCY_RATE = 50.0  # tasks created per second
CREATE_SINGLE_TASKS = 2_000
CREATE_BATCHED_TASKS = 20_000
CREATE_BATCH = 1_000
CREATE_WARMUP = 20  # calls before timing starts (plans cached, functions compiled)

# Targets on the 2-core reference machine (issue 6).
TARGET_FLAT_RATIO = 0.18
TARGET_DAG_RATIO = 0.15
TARGET_CREATE_START_P50_MS = 3.0
TARGET_CREATE_START_P99_MS = 10.0
TARGET_HANDOFF_P50_MS = 2.0
TARGET_LINEAR_E2E_P50_MS = 10.0
TARGET_CREATE_SINGLE = 1_500.0
TARGET_CREATE_BATCHED = 8_000.0

# What the reference machine did (issue 6), for the notes under the table.
REFERENCE_BASELINE = 59_000
REFERENCE_BARE_INSERT = 3_300
DRIFT_WARNING_PCT = 15.0

POLL_INTERVAL = 0.1  # completion polling (detection only, not timing)
STALL_TIMEOUT = 60.0  # fail when no task completes for this long
WORKER_START_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 30.0


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

    def count(self, default: int) -> int:
        """A default size scaled by `n` (at least 1)."""
        return max(1, round(default * self.n))


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


_COLUMNS = (
    ("scenario", 9),
    ("measure", 36),
    ("value", 24),
    ("ratio", 11),
    ("target", 18),
    ("result", 6),
)


def format_row(cells: Sequence[str]) -> str:
    """A table line with the report's fixed column widths (rows print as scenarios finish)."""
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)).rstrip()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of a list of durations in seconds, in milliseconds."""
    return {
        "count": len(seconds),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p90_ms": round(percentile(seconds, 90) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3),
    }


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


# --- CPU accounting (local server only) ----------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_text(path: str) -> str | None:
    """A small file's text (from /proc), None when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where that is unavailable)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class _CpuMeter:
    """CPU seconds spent by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._before: dict[int, float] = {}
        self.seconds: float | None = None

    def start(self) -> None:
        self._before = {}
        for pid in self.pids:
            value = proc_cpu_seconds(pid)
            if value is not None:
                self._before[pid] = value

    def stop(self) -> float | None:
        if not self._before:
            return None
        total = 0.0
        for pid, before in self._before.items():
            after = proc_cpu_seconds(pid)
            if after is None:
                return None  # the process went away: no honest number
            total += after - before
        self.seconds = total
        return total


def _cpu_per_step(seconds: float | None, steps: int) -> float | None:
    return None if seconds is None or steps <= 0 else round(seconds / steps * 1e6, 1)


# --- worker processes -----------------------------------------------------------------------------


class _WorkerProcess:
    """One `python -m tasker_pg.worker_cli` process serving the bench namespace."""

    def __init__(self, worker_id: str, dsn: str, concurrency: int, log_path: Path) -> None:
        self.worker_id = worker_id
        self.dsn = dsn
        self.concurrency = concurrency
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "tasker_pg.worker_cli",
            "--namespace",
            NAMESPACE,
            "--handlers",
            "tasker_pg.bench_handlers",
            "--concurrency",
            str(self.concurrency),
            "--dsn",
            self.dsn,
            "--worker-id",
            self.worker_id,
            "--summary-interval",
            "0",
            "--grace",
            "10",
            "--log-level",
            "info",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join("    " + line for line in tail) or "    (no output)"

    def final_summary(self) -> str | None:
        """The worker's own closing stats line (`worker <id> final: claimed=... steps/s=...`)."""
        found = re.findall(rf"worker {re.escape(self.worker_id)} final: (.*)", self.log_text())
        return found[-1].strip() if found else None

    async def wait_ready(self, timeout: float = WORKER_START_TIMEOUT) -> None:
        """Until the worker logged `started` (connected, listening, claim loop running)."""
        marker = f"worker {self.worker_id} started:"
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            code = self.exit_code()
            if code is not None:
                raise BenchError(
                    f"worker {self.worker_id} exited with code {code} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"worker {self.worker_id} not ready after {timeout:g}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful stop), then SIGKILL after `timeout`; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
            return proc.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


# --- the run --------------------------------------------------------------------------------------


@dataclass
class _Drain:
    """What one drain (flat, or one dag shape) measured."""

    tasks: int
    steps: int
    seconds: float
    claim_batches: int
    flush_batches: int
    worker_cpu_s: float | None
    server_cpu_s: float | None
    worker_summaries: list[str] = field(default_factory=list)

    def as_dict(self, baseline: float | None) -> dict[str, Any]:
        steps_per_s = self.steps / self.seconds
        return {
            "tasks": self.tasks,
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
            "steps_per_s": round(steps_per_s, 1),
            "tasks_per_s": round(self.tasks / self.seconds, 1),
            "ratio_to_baseline": round(steps_per_s / baseline, 4) if baseline else None,
            "claim_batches": self.claim_batches,
            "avg_claim_batch": round(self.steps / self.claim_batches, 1),
            "flush_batches": self.flush_batches,
            "avg_flush_batch": round(self.steps / self.flush_batches, 1),
            "worker_cpu_us_per_step": _cpu_per_step(self.worker_cpu_s, self.steps),
            "server_cpu_us_per_step": _cpu_per_step(self.server_cpu_s, self.steps),
            "all_completed": True,
            "worker_summaries": self.worker_summaries,
        }


class Bench:
    """Runs the selected scenarios against one server and builds the report."""

    def __init__(
        self, options: BenchOptions, *, out: TextIO | None = None, progress: TextIO | None = None
    ) -> None:
        self.options = options
        self.out = out  # the table (None: print nothing, e.g. --json)
        self.progress = progress
        self.admin: db.Connection | None = None
        self.admin_dsn = ""
        self.dsn_source = ""
        self.server_version_num = 0
        self.server_local = False
        self.baseline_rate: float | None = None
        self.rows: list[Row] = []
        self.results: dict[str, dict[str, Any]] = {}
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    # --- plumbing ----------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.progress is not None:
            print(f"# {message}", file=self.progress, flush=True)

    def _emit(self, row: Row) -> None:
        self.rows.append(row)
        if self.out is not None:
            print(
                format_row(
                    [row.scenario, row.measure, row.value, row.ratio, row.target, row.result]
                ),
                file=self.out,
                flush=True,
            )

    def _ratio(self, rate: float) -> str:
        return f"{rate / self.baseline_rate:.3f}x" if self.baseline_rate else "-"

    def _judge(self, ok: bool) -> bool | None:
        """Targets hold for the default no-op handlers; with --handler-ms they do not apply."""
        return None if self.options.handler_ms else ok

    @contextlib.asynccontextmanager
    async def fresh_database(self, label: str) -> AsyncIterator[str]:
        """A new, migrated database on the server (dropped afterwards); yields its DSN."""
        assert self.admin is not None
        name = f"bench_{label}_{os.getpid()}"
        force = " WITH (FORCE)" if self.server_version_num >= 130000 else ""
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')
        await self.admin.execute(f'CREATE DATABASE "{name}"')
        try:
            dsn = with_database(self.admin_dsn, name)
            conn = await db.connect(dsn, check_schema=False)
            try:
                await migrations.migrate(conn)
                await self._checkpoint(conn)
            finally:
                await conn.close()
            yield dsn
        finally:
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')

    async def _checkpoint(self, conn: db.Connection) -> None:
        """Start each scenario right after a checkpoint, so a timed one never lands mid-run."""
        with contextlib.suppress(DatabaseError):  # needs superuser or pg_checkpoint
            await conn.execute("CHECKPOINT")

    async def _machine(self) -> dict[str, Any]:
        assert self.admin is not None
        row = await self.admin.fetchrow(
            """
            SELECT current_setting('server_version') AS server_version,
                   current_setting('server_version_num')::int AS server_version_num,
                   current_setting('fsync') AS fsync,
                   current_setting('synchronous_commit') AS synchronous_commit,
                   current_setting('shared_buffers') AS shared_buffers,
                   current_setting('full_page_writes') AS full_page_writes,
                   current_setting('max_connections') AS max_connections,
                   inet_server_addr()::text AS server_addr,
                   pg_backend_pid() AS backend_pid
            """
        )
        assert row is not None
        self.server_version_num = int(row["server_version_num"])
        addr = row["server_addr"]
        local_addr = addr is None or addr.split("/")[0] in ("127.0.0.1", "::1")
        comm = (_read_text(f"/proc/{row['backend_pid']}/comm") or "").strip()
        self.server_local = local_addr and comm == "postgres"
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 0
        cpu_model = ""
        for line in (_read_text("/proc/cpuinfo") or "").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        return {
            "cores": cores,
            "cpu_model": cpu_model or platform.processor(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "postgres_version": row["server_version"],
            "fsync": row["fsync"],
            "synchronous_commit": row["synchronous_commit"],
            "shared_buffers": row["shared_buffers"],
            "full_page_writes": row["full_page_writes"],
            "max_connections": row["max_connections"],
            "server": self.dsn_source,
            "server_local": self.server_local,
        }

    async def _register(self, conn: db.Connection) -> None:
        for template in bench_handlers.templates(self.options.handler_ms).values():
            await conn.register_template(template.to_json())

    def _workers(self, label: str, dsn: str, count: int) -> list[_WorkerProcess]:
        assert self._logdir is not None
        return [
            _WorkerProcess(
                f"bench-{label}-{i}",
                dsn,
                self.options.concurrency,
                Path(self._logdir.name) / f"{label}-{i}.log",
            )
            for i in range(count)
        ]

    async def _backend_pids(self, conn: db.Connection) -> list[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'tasker-pg worker bench-%'"
        )
        return [int(r["pid"]) for r in rows]

    async def _wait_complete(
        self, conn: db.Connection, expected: int, workers: Sequence[_WorkerProcess]
    ) -> None:
        """Poll until `expected` tasks are complete; fail on errors, dead workers or a stall."""
        last = -1
        last_change = time.monotonic()
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'complete') AS complete, "
                "count(*) FILTER (WHERE state IN ('error', 'cancelled', 'resolved_manually')) "
                "AS failed FROM tasker.tasks"
            )
            assert row is not None
            complete, failed = int(row["complete"]), int(row["failed"])
            if failed:
                example = await conn.fetchval(
                    "SELECT last_error::text FROM tasker.steps WHERE last_error IS NOT NULL LIMIT 1"
                )
                raise BenchError(f"{failed} task(s) did not complete; a step error: {example}")
            if complete >= expected:
                return
            for worker in workers:
                code = worker.exit_code()
                if code is not None:
                    raise BenchError(
                        f"worker {worker.worker_id} exited with code {code} with "
                        f"{expected - complete} task(s) unfinished:\n{worker.log_tail()}"
                    )
            now = time.monotonic()
            if complete != last:
                last, last_change = complete, now
            elif now - last_change > STALL_TIMEOUT:
                tails = "\n".join(w.log_tail() for w in workers)
                raise BenchError(
                    f"no task completed for {STALL_TIMEOUT:g}s ({complete}/{expected} "
                    f"complete):\n{tails}"
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def _verify(self, conn: db.Connection, tasks: int, steps: int) -> dict[str, Any]:
        """Fail loudly unless every task and step really completed, once, leaving nothing."""
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM tasker.tasks) AS tasks,
                   (SELECT count(*) FROM tasker.tasks WHERE state = 'complete') AS tasks_complete,
                   (SELECT count(*) FROM tasker.steps) AS steps,
                   (SELECT count(*) FROM tasker.steps WHERE state = 'complete') AS steps_complete,
                   (SELECT coalesce(sum(attempts), 0) FROM tasker.steps) AS attempts,
                   (SELECT count(*) FROM tasker.step_transitions
                     WHERE to_state = 'complete') AS completions,
                   (SELECT count(*) FROM tasker.queue_messages) AS messages_left
            """
        )
        assert row is not None
        found = {k: int(v) for k, v in dict(row).items()}
        violations = await conn.check_invariants()
        problems = []
        if not found["tasks"] == found["tasks_complete"] == tasks:
            problems.append(f"{found['tasks_complete']} of {found['tasks']} tasks complete")
        if not found["steps"] == found["steps_complete"] == found["completions"] == steps:
            problems.append(
                f"{found['steps_complete']} of {found['steps']} steps complete "
                f"({found['completions']} completion transitions, {steps} expected)"
            )
        if found["messages_left"]:
            problems.append(f"{found['messages_left']} queue message(s) left")
        if violations:
            problems.append(f"{len(violations)} invariant violation(s), e.g. {dict(violations[0])}")
        if problems:
            raise BenchError(
                f"expected {tasks} complete tasks with {steps} steps: " + "; ".join(problems)
            )
        return {"retries": found["attempts"] - steps, "all_completed": True}

    # --- baseline ----------------------------------------------------------------------------

    async def _measure_baseline(self, label: str) -> dict[str, Any]:
        """Pre-fill the plain table, drain it with the raw loops; the figures of one drain."""
        messages = self.options.count(BASELINE_MESSAGES)
        async with self.fresh_database(label) as dsn:
            setup = await db.connect(dsn)
            conns: list[db.Connection] = []
            try:
                await setup.execute(_BASELINE_TABLE)
                self._say(f"{label}: pre-filling {messages:,} messages")
                await setup.execute(_BASELINE_FILL, messages)
                await setup.execute("VACUUM ANALYZE bench_queue")
                await self._checkpoint(setup)
                for _ in range(BASELINE_CONNECTIONS):
                    conns.append(await db.connect(dsn))
                meter = _CpuMeter([c.backend_pid for c in conns])
                self._say(f"{label}: draining with {BASELINE_CONNECTIONS} connections")
                client_before = time.process_time()
                meter.start()
                started = time.perf_counter()
                per_conn = await asyncio.gather(*(_baseline_loop(c) for c in conns))
                elapsed = time.perf_counter() - started
                server_cpu = meter.stop() if self.server_local else None
                client_cpu = time.process_time() - client_before
                ids = [i for batch in per_conn for i in batch[0]]
                reads = [r for batch in per_conn for r in batch[1]]
                left = int(await setup.fetchval("SELECT count(*) FROM bench_queue"))
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
            "client_cpu_us_per_msg": _cpu_per_step(client_cpu, messages),
            "server_cpu_us_per_msg": _cpu_per_step(server_cpu, messages),
        }

    async def baseline(self) -> None:
        result = await self._measure_baseline("baseline")
        rate = result["messages_per_s"]
        self.baseline_rate = rate
        self.results["baseline"] = {
            "ok": True,
            "connections": BASELINE_CONNECTIONS,
            "batch": BASELINE_BATCH,
            **result,
            "all_completed": True,
        }
        self._emit(
            Row(
                "baseline",
                f"messages/s ({BASELINE_CONNECTIONS} conns x {BASELINE_BATCH}/claim)",
                f"{rate:,.0f}",
                "1.000x",
            )
        )

    async def baseline_again(self) -> None:
        """The baseline once more after the other scenarios: how steady was the machine?"""
        result = await self._measure_baseline("baseline_end")
        first = self.results["baseline"]
        drift = (result["messages_per_s"] / first["messages_per_s"] - 1) * 100
        first["end_of_run"] = result
        first["drift_pct"] = round(drift, 1)
        self._emit(
            Row(
                "baseline",
                "messages/s, again at the end",
                f"{result['messages_per_s']:,.0f}",
                f"{drift:+.0f}%",
            )
        )

    # --- flat and dag ------------------------------------------------------------------------

    async def _drain(self, label: str, template: str, tasks: int, steps_per_task: int) -> _Drain:
        """Create `tasks` tasks in one transaction with idle workers waiting, time the drain."""
        steps = tasks * steps_per_task
        async with self.fresh_database(label) as dsn:
            conn = await db.connect(dsn)
            workers = self._workers(label, dsn, self.options.workers)
            try:
                await self._register(conn)
                for worker in workers:
                    worker.start()
                await asyncio.gather(*(w.wait_ready() for w in workers))
                self._say(f"{label}: creating {tasks:,} {template} tasks in one transaction")
                async with conn.transaction():
                    for first in range(0, tasks, CREATE_BATCH):
                        contexts = [
                            {"i": i} for i in range(first, min(first + CREATE_BATCH, tasks))
                        ]
                        await conn.create_tasks(NAMESPACE, template, contexts)
                    # Fresh tables: give the planner real statistics (it sees this transaction's
                    # rows), as a database in steady state would have.
                    await conn.execute(
                        "ANALYZE tasker.tasks, tasker.steps, tasker.step_edges, "
                        "tasker.queue_messages"
                    )
                    pids = await self._backend_pids(conn) if self.server_local else []
                    worker_meter = _CpuMeter([w.pid for w in workers])
                    server_meter = _CpuMeter(pids)
                    worker_meter.start()
                    server_meter.start()
                self._say(f"{label}: committed; {len(workers)} worker(s) draining")
                await self._wait_complete(conn, tasks, workers)
                worker_cpu = worker_meter.stop()
                server_cpu = server_meter.stop() if self.server_local else None
                await self._verify(conn, tasks, steps)
                row = await conn.fetchrow(_DRAIN_TIMING)
                assert row is not None
                seconds = float(row["seconds"])
                if not seconds > 0:
                    raise BenchError(f"{label}: no time elapsed between first claim and last task")
            finally:
                await asyncio.gather(*(w.stop() for w in workers))
                await conn.close()
        summaries = [
            f"{w.worker_id}: {w.final_summary() or '(no final stats line)'}" for w in workers
        ]
        return _Drain(
            tasks=tasks,
            steps=steps,
            seconds=seconds,
            claim_batches=int(row["claim_batches"]),
            flush_batches=int(row["flush_batches"]),
            worker_cpu_s=worker_cpu,
            server_cpu_s=server_cpu,
            worker_summaries=summaries,
        )

    async def flat(self) -> None:
        drain = await self._drain("flat", bench_handlers.FLAT, self.options.count(FLAT_TASKS), 1)
        result = drain.as_dict(self.baseline_rate)
        self.results["flat"] = {"ok": True, **self._settings(), **result}
        rate = result["steps_per_s"]
        ratio = result["ratio_to_baseline"]
        self._emit(
            Row(
                "flat",
                f"steps/s ({self.options.workers} worker x {self.options.concurrency})",
                f"{rate:,.0f}",
                self._ratio(rate),
                f">= {TARGET_FLAT_RATIO:.2f}x",
                self._judge(ratio >= TARGET_FLAT_RATIO) if ratio is not None else None,
            )
        )

    async def dag(self) -> None:
        shapes: dict[str, Any] = {}
        for shape in (bench_handlers.DIAMOND, bench_handlers.LINEAR):
            drain = await self._drain(f"dag_{shape}", shape, self.options.count(DAG_TASKS), 4)
            result = drain.as_dict(self.baseline_rate)
            shapes[shape] = result
            rate = result["steps_per_s"]
            ratio = result["ratio_to_baseline"]
            self._emit(
                Row(
                    "dag",
                    f"{shape} steps/s (tasks/s)",
                    f"{rate:,.0f} ({result['tasks_per_s']:,.0f})",
                    self._ratio(rate),
                    f">= {TARGET_DAG_RATIO:.2f}x",
                    self._judge(ratio >= TARGET_DAG_RATIO) if ratio is not None else None,
                )
            )
        self.results["dag"] = {
            "ok": True,
            **self._settings(),
            "shapes": shapes,
            "all_completed": all(s["all_completed"] for s in shapes.values()),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "workers": self.options.workers,
            "concurrency": self.options.concurrency,
            "handler_ms": self.options.handler_ms,
        }

    # --- latency -----------------------------------------------------------------------------

    async def _paced_create(self, conn: db.Connection, template: str, count: int) -> list[float]:
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

    async def latency(self) -> None:
        count = self.options.count(LATENCY_TASKS)
        async with self.fresh_database("latency") as dsn:
            conn = await db.connect(dsn)
            workers = self._workers("latency", dsn, 1)
            try:
                await self._register(conn)
                workers[0].start()
                await workers[0].wait_ready()
                self._say(f"latency: {count} single-step tasks at {LATENCY_RATE:g}/s")
                single_calls = await self._paced_create(conn, bench_handlers.LATENCY_SINGLE, count)
                await self._wait_complete(conn, count, workers)
                self._say(f"latency: {count} four-step linear tasks at {LATENCY_RATE:g}/s")
                linear_calls = await self._paced_create(conn, bench_handlers.LATENCY_LINEAR, count)
                await self._wait_complete(conn, 2 * count, workers)
                checks = await self._verify(conn, 2 * count, count + 4 * count)
                single = await conn.fetch(_LATENCY_SINGLE, bench_handlers.LATENCY_SINGLE)
                handoff = await conn.fetch(_LATENCY_HANDOFF, bench_handlers.LATENCY_LINEAR)
                e2e = await conn.fetch(_LATENCY_E2E, bench_handlers.LATENCY_LINEAR)
            finally:
                await workers[0].stop()
                await conn.close()
        if len(single) != count or len(handoff) != 3 * count or len(e2e) != count:
            raise BenchError(
                f"latency: expected {count} starts, {3 * count} handoffs and {count} tasks, "
                f"found {len(single)}, {len(handoff)}, {len(e2e)}"
            )
        start = _ms_summary([r["to_start"] for r in single])
        hand = _ms_summary([r["to_start"] for r in handoff])
        end_to_end = _ms_summary([r["seconds"] for r in e2e])
        self.results["latency"] = {
            "ok": True,
            "concurrency": self.options.concurrency,
            "handler_ms": self.options.handler_ms,
            "rate_per_s": LATENCY_RATE,
            "create_to_start": {
                **start,
                "to_claim_p50_ms": round(percentile([r["to_claim"] for r in single], 50) * 1e3, 3),
                "create_call_p50_ms": round(percentile(single_calls, 50) * 1e3, 3),
            },
            "handoff": {
                **hand,
                "to_claim_p50_ms": round(percentile([r["to_claim"] for r in handoff], 50) * 1e3, 3),
                "from_parent_outcome": _ms_summary([r["from_parent_outcome"] for r in handoff]),
            },
            "linear_end_to_end": {
                **end_to_end,
                "create_call_p50_ms": round(percentile(linear_calls, 50) * 1e3, 3),
            },
            **checks,
            "worker_summaries": [f"{workers[0].worker_id}: {workers[0].final_summary()}"],
        }
        self._emit(
            Row(
                "latency",
                "create-to-start p50 / p99",
                f"{start['p50_ms']:.2f} / {start['p99_ms']:.2f} ms",
                "",
                f"<= {TARGET_CREATE_START_P50_MS:g} / {TARGET_CREATE_START_P99_MS:g} ms",
                self._judge(
                    start["p50_ms"] <= TARGET_CREATE_START_P50_MS
                    and start["p99_ms"] <= TARGET_CREATE_START_P99_MS
                ),
            )
        )
        self._emit(
            Row(
                "latency",
                "step handoff p50 / p99",
                f"{hand['p50_ms']:.2f} / {hand['p99_ms']:.2f} ms",
                "",
                f"p50 <= {TARGET_HANDOFF_P50_MS:g} ms",
                self._judge(hand["p50_ms"] <= TARGET_HANDOFF_P50_MS),
            )
        )
        self._emit(
            Row(
                "latency",
                "4-step linear end to end p50 / p99",
                f"{end_to_end['p50_ms']:.2f} / {end_to_end['p99_ms']:.2f} ms",
                "",
                f"p50 <= {TARGET_LINEAR_E2E_P50_MS:g} ms",
                self._judge(end_to_end["p50_ms"] <= TARGET_LINEAR_E2E_P50_MS),
            )
        )

    # --- create ------------------------------------------------------------------------------

    async def create(self) -> None:
        single_n = self.options.count(CREATE_SINGLE_TASKS)
        batched_n = self.options.count(CREATE_BATCHED_TASKS)
        batch = min(CREATE_BATCH, batched_n)
        template = bench_handlers.DIAMOND
        async with self.fresh_database("create") as dsn:
            conn = await db.connect(dsn)
            try:
                await self._register(conn)
                await conn.execute(_INSERT_TABLE)
                for i in range(CREATE_WARMUP):
                    await conn.execute(_INSERT_ROW, {"warmup": i})
                    await conn.create_task(NAMESPACE, template, {"warmup": i})
                await conn.create_tasks(
                    NAMESPACE, template, [{"warmup": i} for i in range(CREATE_WARMUP)]
                )
                # The reference: what one commit per call costs here, with nothing else to do.
                self._say(f"create: {single_n:,} bare one-row inserts, one per call")
                started = time.perf_counter()
                for i in range(single_n):
                    await conn.execute(_INSERT_ROW, {"i": i})
                insert_s = time.perf_counter() - started
                self._say(f"create: {single_n:,} tasks, one create_task call each")
                started = time.perf_counter()
                for i in range(single_n):
                    await conn.create_task(NAMESPACE, template, {"i": i})
                single_s = time.perf_counter() - started
                self._say(f"create: {batched_n:,} tasks through create_tasks, {batch:,} per call")
                started = time.perf_counter()
                for first in range(0, batched_n, batch):
                    contexts = [{"i": i} for i in range(first, min(first + batch, batched_n))]
                    await conn.create_tasks(NAMESPACE, template, contexts)
                batched_s = time.perf_counter() - started
                total = 2 * CREATE_WARMUP + single_n + batched_n
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM tasker.tasks) AS tasks, "
                    "(SELECT count(*) FROM tasker.steps) AS steps, "
                    "(SELECT count(*) FROM tasker.step_edges) AS edges, "
                    "(SELECT count(*) FROM tasker.queue_messages) AS messages, "
                    "(SELECT count(*) FROM bench_insert) AS inserted"
                )
                assert row is not None
                found = {k: int(v) for k, v in dict(row).items()}
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
        self.results["create"] = {
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
        self._emit(
            Row("create", "bare one-row INSERT/s (reference)", f"{insert_rate:,.0f}", "1.000x")
        )
        self._emit(
            Row(
                "create",
                "4-step tasks/s, one create_task/call",
                f"{single_rate:,.0f}",
                f"{single_rate / insert_rate:.3f}x",
                f">= {TARGET_CREATE_SINGLE:,.0f}/s",
                single_rate >= TARGET_CREATE_SINGLE,
            )
        )
        self._emit(
            Row(
                "create",
                f"4-step tasks/s, create_tasks x {batch:,}",
                f"{batched_rate:,.0f}",
                f"{batched_rate / insert_rate:.3f}x",
                f">= {TARGET_CREATE_BATCHED:,.0f}/s",
                batched_rate >= TARGET_CREATE_BATCHED,
            )
        )

    # --- driver ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the scenarios; the full report (also printed as a table when `out` is set)."""
        selected = [s for s in SCENARIOS if s in self.options.scenarios]
        if "baseline" not in selected and any(s in selected for s in RATIO_SCENARIOS):
            selected.insert(0, "baseline")
        # Shared machines drift: when ratios were taken, measure the baseline again at the end.
        if any(s in selected for s in RATIO_SCENARIOS):
            selected.append("baseline_again")
        began = time.time()
        if self.options.dsn:
            self.admin_dsn = self.options.dsn
            self.dsn_source = f"--dsn {db.mask_dsn(self.options.dsn)}"
        else:
            from tasker_pg.embedded import EmbeddedCluster

            cluster = EmbeddedCluster()
            self.admin_dsn = await asyncio.to_thread(cluster.start)
            self.dsn_source = f"embedded cluster in {cluster.home}"
        self.admin = await db.connect(self.admin_dsn, check_schema=False)
        self._logdir = tempfile.TemporaryDirectory(prefix="tasker-pg-bench-")
        failures: dict[str, str] = {}
        try:
            machine = await self._machine()
            self._print_header(machine)
            for name in selected:
                if name == "baseline_again" and not self.results.get("baseline", {}).get("ok"):
                    continue
                self._say(f"{name}: starting")
                try:
                    await getattr(self, name)()
                except Exception as exc:  # report it, run the other scenarios, exit 1
                    error = str(exc) if isinstance(exc, TaskerError) else repr(exc)
                    failures[name] = error
                    key = "baseline" if name == "baseline_again" else name
                    self.results[key] = {"ok": False, "error": error, "all_completed": False}
                    self._emit(Row(name, "FAILED", (error.splitlines() or [""])[0][:60]))
        finally:
            await self.admin.close()
            self._logdir.cleanup()
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        report: dict[str, Any] = {
            "tasker_pg_version": __version__,
            "started_at": dt.datetime.fromtimestamp(began, dt.UTC).isoformat(),
            "duration_s": round(time.time() - began, 1),
            "settings": {
                "scenarios": [s for s in selected if s in SCENARIOS],
                "workers": self.options.workers,
                "concurrency": self.options.concurrency,
                "n": self.options.n,
                "handler_ms": self.options.handler_ms,
            },
            "machine": machine,
            "scenarios": self.results,
            "targets": [
                {
                    "scenario": r.scenario,
                    "measure": r.measure,
                    "value": r.value,
                    "target": r.target,
                    "met": r.met,
                }
                for r in self.rows
                if r.target
            ],
            "all_completed": not failures
            and all(r.get("all_completed") for r in self.results.values()),
            "ok": not failures,
            "failures": failures,
        }
        self._print_footer(report)
        return report

    def _print_header(self, machine: dict[str, Any]) -> None:
        if self.out is None:
            return
        o = self.options
        print(
            f"tasker-pg bench {__version__}: {machine['cores']} cores ({machine['cpu_model']}), "
            f"load {' '.join(str(x) for x in machine['load_average'])}\n"
            f"PostgreSQL {machine['postgres_version']}, fsync={machine['fsync']}, "
            f"synchronous_commit={machine['synchronous_commit']}, "
            f"shared_buffers={machine['shared_buffers']}; {machine['server']}\n"
            f"workers={o.workers} concurrency={o.concurrency} n={o.n:g} "
            f"handler_ms={o.handler_ms:g}\n",
            file=self.out,
        )
        print(format_row([name for name, _ in _COLUMNS]), file=self.out)
        print(format_row(["-" * w for _, w in _COLUMNS]), file=self.out, flush=True)

    def _print_footer(self, report: dict[str, Any]) -> None:
        if self.out is None:
            return
        judged = [t for t in report["targets"] if t["met"] is not None]
        met = sum(1 for t in judged if t["met"])
        print(file=self.out)
        print(
            f"targets: {met} met, {len(judged) - met} missed"
            + (
                f", {len(report['targets']) - len(judged)} not applicable (--handler-ms)"
                if len(judged) < len(report["targets"])
                else ""
            )
            + f"; all tasks completed: {'yes' if report['all_completed'] else 'NO'}"
            + f"; {report['duration_s']:g}s",
            file=self.out,
        )
        for name, result in report["scenarios"].items():
            details = []
            for key, value in _cpu_details(result):
                details.append(f"{key}: {value}")
            for line in result.get("worker_summaries", []):
                details.append(f"worker {line}")
            for shape, sub in result.get("shapes", {}).items():
                details.extend(f"{shape}: {key}: {value}" for key, value in _cpu_details(sub))
                details.extend(f"{shape}: worker {line}" for line in sub["worker_summaries"])
            details.extend(_context_notes(name, result))
            for line in details:
                print(f"  {name}: {line}", file=self.out)
        for name, error in report["failures"].items():
            print(f"\n{name} FAILED:\n{error}", file=self.out)


def _context_notes(name: str, result: dict[str, Any]) -> list[str]:
    """How this machine compares with the one the targets were set on (issue 6)."""
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
    if name == "create" and result.get("ok"):
        notes.append(
            "one create_task per call reaches "
            f"{result['one_per_call']['ratio_to_bare_insert']:.2f}x of a bare insert here; the "
            f"target is {TARGET_CREATE_SINGLE:,.0f} of the reference machine's "
            f"~{REFERENCE_BARE_INSERT:,}/s = {TARGET_CREATE_SINGLE / REFERENCE_BARE_INSERT:.2f}x"
        )
    return notes


def _cpu_details(result: dict[str, Any]) -> list[tuple[str, str]]:
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


async def _baseline_loop(conn: db.Connection) -> tuple[list[int], list[int]]:
    """Claim up to BASELINE_BATCH messages, delete them in one statement, until none is left.

    Raw asyncpg by definition (this is the ceiling the engine is compared with); returns the
    acknowledged msg_ids and the read counts they were claimed with.
    """
    raw = conn.raw
    ids: list[int] = []
    reads: list[int] = []
    while True:
        rows = await raw.fetch(_BASELINE_CLAIM, BASELINE_BATCH)
        if not rows:
            return ids, reads
        batch = [r["msg_id"] for r in rows]
        await raw.execute(_BASELINE_ACK, batch)
        ids.extend(batch)
        reads.extend(r["read_ct"] for r in rows)


# pgmq's queue table, minus its vt index (an index on vt would make every claim a non-HOT
# update and lower the ceiling; the engine's own queue has no such index either).
_BASELINE_TABLE = """
CREATE TABLE bench_queue (
    msg_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    read_ct     integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    vt          timestamptz NOT NULL DEFAULT clock_timestamp(),
    message     jsonb NOT NULL
)
"""
# Messages as big as the engine's: two uuids.
_BASELINE_FILL = """
INSERT INTO bench_queue (message)
SELECT jsonb_build_object('step_uuid', gen_random_uuid(), 'task_uuid', gen_random_uuid())
  FROM generate_series(1, $1)
"""
# pgmq's read(): the lock sits in a MATERIALIZED CTE with ORDER BY ... LIMIT, so the UPDATE
# touches exactly the rows locked (a bare subquery could be re-evaluated and update more).
_BASELINE_CLAIM = """
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
_BASELINE_ACK = "DELETE FROM bench_queue WHERE msg_id = ANY($1::bigint[])"

# The create scenario's reference: one commit per call of the smallest useful write.
_INSERT_TABLE = """
CREATE TABLE bench_insert (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload jsonb NOT NULL
)
"""
_INSERT_ROW = "INSERT INTO bench_insert (payload) VALUES ($1::jsonb)"

# From the first claim to the last task completed (database clock); claim and flush calls that
# did work, counted by their distinct (worker, transaction timestamp) pairs.
_DRAIN_TIMING = """
SELECT extract(epoch FROM (SELECT max(completed_at) FROM tasker.tasks)
                        - (SELECT min(created_at) FROM tasker.step_transitions
                            WHERE event = 'claimed'))::float8 AS seconds,
       (SELECT count(DISTINCT (worker_id, created_at)) FROM tasker.step_transitions
         WHERE event = 'claimed') AS claim_batches,
       (SELECT count(DISTINCT (worker_id, created_at)) FROM tasker.step_transitions
         WHERE event = 'succeeded') AS flush_batches
"""
# Task created (create_task began) -> its step claimed (claim_steps began) / handler started.
_LATENCY_SINGLE = """
SELECT (s.results->>'started')::float8 - extract(epoch FROM t.created_at)::float8 AS to_start,
       extract(epoch FROM c.created_at - t.created_at)::float8 AS to_claim
  FROM tasker.tasks t
  JOIN tasker.steps s ON s.task_uuid = t.task_uuid
  JOIN tasker.step_transitions c ON c.step_uuid = s.step_uuid AND c.event = 'claimed'
 WHERE t.name = $1
"""
# Handoff: the child made ready (its `enqueued_at`, written by enqueue_ready at the end of the
# parent's complete_steps, just before that transaction commits) -> child claimed / handler
# started; and, for reference, from the start of the parent's complete_steps call (its
# `succeeded` transition), which adds that call's own execution.
_LATENCY_HANDOFF = """
SELECT (c.results->>'started')::float8 - extract(epoch FROM c.enqueued_at)::float8 AS to_start,
       extract(epoch FROM cc.created_at - c.enqueued_at)::float8 AS to_claim,
       (c.results->>'started')::float8 - extract(epoch FROM ps.created_at)::float8
           AS from_parent_outcome
  FROM tasker.tasks t
  JOIN tasker.steps c ON c.task_uuid = t.task_uuid
  JOIN tasker.step_edges e ON e.child_uuid = c.step_uuid
  JOIN tasker.step_transitions ps ON ps.step_uuid = e.parent_uuid AND ps.event = 'succeeded'
  JOIN tasker.step_transitions cc ON cc.step_uuid = c.step_uuid AND cc.event = 'claimed'
 WHERE t.name = $1
"""
_LATENCY_E2E = """
SELECT extract(epoch FROM t.completed_at - t.created_at)::float8 AS seconds
  FROM tasker.tasks t
 WHERE t.name = $1
"""


async def run_bench(
    options: BenchOptions, *, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark; the report as a dict (the table goes to `out` when given)."""
    return await Bench(options, out=out, progress=progress).run()


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options (shared by `tasker-pg bench` and `python -m tasker_pg.bench`)."""
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        default=[],
        metavar="NAME",
        help=f"scenario to run, repeatable: {', '.join(SCENARIOS)} (default: all; flat and "
        "dag bring the baseline along, their ratios need it)",
    )
    parser.add_argument(
        "--workers",
        type=argtypes.positive_int,
        default=1,
        metavar="N",
        help="worker processes for flat and dag (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=argtypes.positive_int,
        default=200,
        metavar="N",
        help="steps each worker runs at once (default 200)",
    )
    parser.add_argument(
        "--n",
        type=argtypes.positive_float,
        default=1.0,
        metavar="F",
        help="scale every count by F (default 1: 100k baseline messages, 20k flat tasks, "
        "2k + 2k dag tasks, 200 + 200 latency tasks, 2k + 20k created tasks)",
    )
    parser.add_argument(
        "--handler-ms",
        type=argtypes.non_negative_float,
        default=0.0,
        metavar="MS",
        help="each handler awaits asyncio.sleep(MS) first (default 0: no-op handlers; the "
        "targets only apply to 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--dsn",
        help="server to benchmark on (its user needs CREATEDB; default: the embedded cluster, "
        "started if needed)",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to the `tasker-pg` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="throughput and latency against a raw SQL baseline",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    parser.set_defaults(func=cmd_bench)
    return parser


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        scenarios=tuple(args.scenario) or SCENARIOS,
        workers=args.workers,
        concurrency=args.concurrency,
        n=args.n,
        handler_ms=args.handler_ms,
        dsn=args.dsn,
    )


async def _run_cancellable(options: BenchOptions, *, out: TextIO | None) -> dict[str, Any]:
    """`run_bench`, cancelled by SIGTERM as asyncio.run cancels it on SIGINT: either way the
    cleanup runs (workers stopped, bench databases dropped)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = False
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            installed = True
    try:
        return await run_bench(options, out=out, progress=sys.stderr)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed arguments; exit 1 when a scenario failed."""
    options = options_from_args(args)
    try:
        report = asyncio.run(_run_cancellable(options, out=None if args.json else sys.stdout))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("tasker-pg bench: interrupted (workers stopped, databases dropped)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return EXIT_OK if report["ok"] else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of `python -m tasker_pg.bench`."""
    parser = argparse.ArgumentParser(
        prog="python -m tasker_pg.bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tasker_pg.bench`."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
