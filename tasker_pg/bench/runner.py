"""The run around the scenarios: the server, fresh databases, worker processes, the completion
poll, the verification that nothing is reported that did not happen, and the report."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from tasker_pg import __version__, db, migrations
from tasker_pg.bench import handlers, machine, queries, report, scenarios
from tasker_pg.bench.options import (
    LIMITS_CONCURRENCY,
    LIMITS_RATE,
    POLL_INTERVAL,
    RATIO_SCENARIOS,
    SCENARIOS,
    STALL_TIMEOUT,
    BenchError,
    BenchOptions,
)
from tasker_pg.bench.report import Row
from tasker_pg.bench.workers import WorkerProcess
from tasker_pg.errors import TaskerError

# How many engine functions `--function-times` lists per scenario database (the JSON has all).
FUNCTION_TIMES_SHOWN = 12


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


class Bench:
    """Runs the selected scenarios against one server and builds the report.

    `scenarios` maps each name to its function (`tasker_pg.bench.scenarios.RUNNERS`); the
    scenario functions use the helpers below.
    """

    def __init__(
        self, options: BenchOptions, *, out: TextIO | None = None, progress: TextIO | None = None
    ) -> None:
        self.options = options
        self.out = out  # the table (None: print nothing, e.g. --json)
        self.progress = progress
        self.scenarios: dict[str, scenarios.Scenario] = dict(scenarios.RUNNERS)
        self.admin: db.Connection | None = None
        self.admin_dsn = ""
        self.dsn_source = ""
        self.server_version_num = 0
        self.server_local = False
        self.baseline_rate: float | None = None
        self.rows: list[Row] = []
        self.results: dict[str, dict[str, Any]] = {}
        # `--function-times`: per scenario database, its engine functions' calls and times
        self.function_times: dict[str, list[dict[str, Any]]] = {}
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    # --- for the scenarios -------------------------------------------------------------------

    def say(self, message: str) -> None:
        """A progress line (stderr), never part of the report."""
        if self.progress is not None:
            print(f"# {message}", file=self.progress, flush=True)

    def emit(self, row: Row) -> None:
        """Add a row to the report, and print it now when the table is printed."""
        self.rows.append(row)
        if self.out is not None:
            print(report.format_row(row.cells()), file=self.out, flush=True)

    def ratio(self, rate: float) -> str:
        return f"{rate / self.baseline_rate:.3f}x" if self.baseline_rate else "-"

    @property
    def targets_apply(self) -> bool:
        """Targets hold for the default no-op handlers; with --handler-ms they do not apply."""
        return not self.options.handler_ms

    def judge(self, ok: bool) -> bool | None:
        """`ok`, or None where the targets do not apply (--handler-ms)."""
        return report.verdict(ok, self.targets_apply)

    @contextlib.asynccontextmanager
    async def fresh_database(self, label: str) -> AsyncIterator[str]:
        """A new, migrated database on the server (dropped afterwards); yields its DSN."""
        assert self.admin is not None
        name = f"bench_{label}_{os.getpid()}"
        force = self.server_version_num >= 130000
        await queries.drop_database(self.admin, name, force=force)
        await queries.create_database(self.admin, name)
        if self.options.function_times:
            await queries.track_functions(self.admin, name)
        try:
            dsn = with_database(self.admin_dsn, name)
            conn = await db.connect(dsn, check_schema=False)
            try:
                await migrations.migrate(conn)
                await queries.checkpoint(conn)
            finally:
                await conn.close()
            yield dsn
            if self.options.function_times:
                await self._report_function_times(label, dsn)
        finally:
            await queries.drop_database(self.admin, name, force=force)

    async def _report_function_times(self, label: str, dsn: str) -> None:
        """The engine functions' server time in the scenario's database (pg_stat_user_functions:
        `self` excludes the functions a function calls, `total` includes them)."""
        conn = await db.connect(dsn, check_schema=False)
        try:
            rows = await queries.function_times(conn)
        finally:
            await conn.close()
        times = [
            {
                "function": r["funcname"],
                "calls": int(r["calls"]),
                "self_ms": float(r["self_time"]),
                "total_ms": float(r["total_time"]),
            }
            for r in rows
        ]
        self.function_times[label] = times
        self.say(f"{label}: server time per engine function (self / total per call, calls)")
        for t in times[:FUNCTION_TIMES_SHOWN]:
            calls = max(t["calls"], 1)
            self.say(
                f"  {t['function']:<28} {t['self_ms'] * 1000 / calls:9.1f} us "
                f"/ {t['total_ms'] * 1000 / calls:9.1f} us  x {t['calls']:,}"
            )

    async def register(self, conn: db.Connection) -> None:
        """Register every benchmark template (with the run's handler sleep), after the rate
        limit the limits scenario's steps name."""
        await conn.execute(
            "SELECT tasker.set_rate_limit($1, $2, $3)",
            handlers.RATE_LIMIT,
            LIMITS_RATE,
            int(LIMITS_RATE),
        )
        templates = handlers.templates(
            self.options.handler_ms, limits_concurrency=LIMITS_CONCURRENCY
        )
        for template in templates.values():
            await conn.register_template(template.to_json())

    def workers(
        self, label: str, dsn: str, count: int, concurrency: int | None = None
    ) -> list[WorkerProcess]:
        """`count` worker processes for `dsn` (not started), logging into the run's log dir;
        each runs `concurrency` steps at once (default: the run's --concurrency)."""
        assert self._logdir is not None
        return [
            WorkerProcess(
                f"bench-{label}-{i}",
                dsn,
                concurrency or self.options.concurrency,
                Path(self._logdir.name) / f"{label}-{i}.log",
            )
            for i in range(count)
        ]

    async def wait_complete(
        self,
        conn: db.Connection,
        expected: int,
        workers: Sequence[WorkerProcess],
        since: dt.datetime | None = None,
        poll: float = POLL_INTERVAL,
    ) -> None:
        """Poll (every `poll` seconds) until `expected` tasks (created since `since`, when
        given) are complete; fail on errors, dead workers or a stall."""
        last = -1
        last_change = time.monotonic()
        while True:
            complete, failed = await queries.task_progress(conn, since)
            if failed:
                example = await queries.first_step_error(conn)
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
            await asyncio.sleep(poll)  # detection of the end only, with a stall limit

    async def verify(
        self, conn: db.Connection, tasks: int, steps: int, since: dt.datetime | None = None
    ) -> dict[str, Any]:
        """Fail loudly unless every task and step (of the tasks created since `since`, when
        given) really completed, once, leaving nothing."""
        found = await queries.drain_totals(conn, since)
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

    # --- the run -----------------------------------------------------------------------------

    async def _describe_server(self) -> dict[str, Any]:
        assert self.admin is not None
        settings = await queries.server_settings(self.admin)
        self.server_version_num = int(settings["server_version_num"])
        self.server_local = machine.server_is_local(settings)
        described = machine.describe(settings, self.dsn_source, self.server_local)
        described["settings"] = await queries.reported_settings(self.admin)
        return described

    def _selected(self) -> list[str]:
        """The scenarios to run, in order; the baseline comes along when ratios need it."""
        wanted = set(self.options.scenarios)
        if wanted & {"deep", "backlog", "retention", "limits"}:
            wanted.add("flat")  # the clean rate those drains are compared with
        if "xmin" in wanted:
            wanted.add("dag")  # the capacity whose quarter the xmin arrivals are
        selected = [s for s in SCENARIOS if s in wanted]
        if "baseline" not in selected and any(s in selected for s in RATIO_SCENARIOS):
            selected.insert(0, "baseline")
        # Shared machines drift: when ratios were taken, measure the baseline again at the end.
        if any(s in selected for s in RATIO_SCENARIOS):
            selected.append("baseline_again")
        return selected

    async def run(self) -> dict[str, Any]:
        """Run the scenarios; the full report (also printed as a table when `out` is set)."""
        selected = self._selected()
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
            described = await self._describe_server()
            if self.out is not None:
                report.print_header(self.out, self.options, described)
            for name in selected:
                if name == "baseline_again" and not self.results.get("baseline", {}).get("ok"):
                    continue
                self.say(f"{name}: starting")
                try:
                    await self.scenarios[name](self)
                except Exception as exc:  # report it, run the other scenarios, exit 1
                    error = str(exc) if isinstance(exc, TaskerError) else repr(exc)
                    failures[name] = error
                    key = "baseline" if name == "baseline_again" else name
                    self.results[key] = {"ok": False, "error": error, "all_completed": False}
                    self.emit(Row(name, "FAILED", (error.splitlines() or [""])[0][:60]))
        finally:
            await self.admin.close()
            self._logdir.cleanup()
        described["load_average_end"] = machine.load_average()
        result: dict[str, Any] = {
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
            "machine": described,
            "scenarios": self.results,
            **({"function_times": self.function_times} if self.options.function_times else {}),
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
        if self.out is not None:
            report.print_footer(self.out, result)
        return result


async def run_bench(
    options: BenchOptions, *, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark; the report as a dict (the table goes to `out` when given)."""
    return await Bench(options, out=out, progress=progress).run()
