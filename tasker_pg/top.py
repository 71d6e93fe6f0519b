"""`tasker-pg top`: a live terminal view of every namespace, refreshed every `--interval` seconds.

```
tasker-pg top [--dsn URL] [--interval 1] [--once]
```

Per namespace (a row), from three reads that touch no whole table:
- READY, IN-FLIGHT, DELAYED, RETRYING, EXPIRED (leases), OLDEST READY (age), ERRORS (tasks in
  error) and DONE/5M (tasks that finished complete in the last 5 minutes):
  `tasker.engine_metrics()`;
- STEPS/S: messages sent to the namespace's queue per second between two refreshes, from the
  queue's message sequence (`total_messages` of `tasker.metrics_all()`). Every step run is sent
  one message (a root step at creation, a child when its parents are done, a retry), so it is
  the rate steps become runnable; when the workers keep up, the rate they run;
- P50 and P99: durations from last claim to completion of the completed steps of the tasks
  finished in the last minute (`tasker.step_durations(60)`; steps of tasks still running are
  counted once their task finishes).

The view needs the `top` extra (`rich`) on a terminal; `--once` prints one frame (two reads one
interval apart, so STEPS/S has a value) and exits, as plain text when stdout is not a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasker_pg import argtypes, db
from tasker_pg.errors import ConfigurationError, TaskerError

EXTRA_HINT = "install the top extra: pip install 'tasker-pg[top]'"
EXIT_OK = 0
EXIT_FAILED = 1

COLUMNS = (
    "NAMESPACE",
    "READY",
    "IN-FLIGHT",
    "DELAYED",
    "RETRYING",
    "EXPIRED",
    "OLDEST READY",
    "ERRORS",
    "DONE/5M",
    "STEPS/S",
    "P50",
    "P99",
)


@dataclass(frozen=True)
class NamespaceLine:
    """One namespace's row of the view."""

    namespace: str
    ready: int
    in_flight: int
    delayed: int
    retry_waiting: int
    expired_leases: int
    oldest_ready_seconds: float
    tasks_in_error: int
    finished_5m: int
    steps_per_second: float | None  # None on the first read (no previous one to compare)
    p50_seconds: float | None  # None when no step of a task finished in the last minute
    p99_seconds: float | None

    def cells(self) -> list[str]:
        return [
            self.namespace,
            str(self.ready),
            str(self.in_flight),
            str(self.delayed),
            str(self.retry_waiting),
            str(self.expired_leases),
            _seconds(self.oldest_ready_seconds),
            str(self.tasks_in_error),
            str(self.finished_5m),
            "-" if self.steps_per_second is None else f"{self.steps_per_second:.1f}",
            "-" if self.p50_seconds is None else _seconds(self.p50_seconds),
            "-" if self.p99_seconds is None else _seconds(self.p99_seconds),
        ]


@dataclass(frozen=True)
class Frame:
    """What one refresh read."""

    taken_at: datetime.datetime
    lines: list[NamespaceLine]


class Sampler:
    """Reads one frame per call; STEPS/S compares each read's message totals with the last."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: tuple[float, dict[str, int]] | None = None

    async def read(self, conn: db.Connection) -> Frame:
        metrics = await conn.fetch(
            "SELECT metric, namespace, label, value FROM tasker.engine_metrics() "
            "WHERE namespace IS NOT NULL"
        )
        totals_rows = await conn.fetch(
            "SELECT queue_name, total_messages FROM tasker.metrics_all()"
        )
        durations = await conn.fetch(
            "SELECT namespace, p50_seconds, p99_seconds FROM tasker.step_durations(60)"
        )
        now = self._clock()
        totals = {str(r["queue_name"]): int(r["total_messages"]) for r in totals_rows}
        rates: dict[str, float] = {}
        if self._last is not None:
            then, before = self._last
            elapsed = now - then
            if elapsed > 0:
                rates = {
                    ns: max(total - before[ns], 0) / elapsed
                    for ns, total in totals.items()
                    if ns in before
                }
        self._last = (now, totals)
        return Frame(
            taken_at=datetime.datetime.now(datetime.UTC),
            lines=build_lines(metrics, rates, durations),
        )


def build_lines(
    metrics: Sequence[Mapping[str, Any]],
    rates: Mapping[str, float],
    durations: Sequence[Mapping[str, Any]],
) -> list[NamespaceLine]:
    """The rows of the view, by namespace name, from the rows of the three reads."""
    values: dict[str, dict[tuple[str, str | None], float]] = {}
    for row in metrics:
        values.setdefault(row["namespace"], {})[(row["metric"], row["label"])] = row["value"]
    by_ns = {r["namespace"]: r for r in durations}
    lines: list[NamespaceLine] = []
    for ns in sorted(values):
        got = values[ns]

        def count(metric: str, label: str | None = None, got: Any = got) -> int:
            return int(got.get((metric, label), 0))

        duration = by_ns.get(ns)
        lines.append(
            NamespaceLine(
                namespace=ns,
                ready=count("ready_steps"),
                in_flight=count("in_flight_steps"),
                delayed=count("delayed_steps"),
                retry_waiting=count("retry_waiting_steps"),
                expired_leases=count("expired_leases"),
                oldest_ready_seconds=float(got.get(("oldest_ready_age_seconds", None), 0.0)),
                tasks_in_error=count("tasks", "error"),
                finished_5m=count("tasks_finished_5m", "complete"),
                steps_per_second=rates.get(ns),
                p50_seconds=None if duration is None else duration["p50_seconds"],
                p99_seconds=None if duration is None else duration["p99_seconds"],
            )
        )
    return lines


def render_text(frame: Frame) -> str:
    """The frame as plain text: a header line and aligned columns."""
    rows = [list(COLUMNS), *(line.cells() for line in frame.lines)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = [f"tasker-pg top  {frame.taken_at:%Y-%m-%d %H:%M:%S} UTC"]
    for r in rows:
        first = r[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join([first, *rest]).rstrip())
    if not frame.lines:
        out.append("(no namespace has a registered template yet)")
    return "\n".join(out)


def render_rich(frame: Frame) -> Any:
    """The frame as a rich Table (the `top` extra)."""
    from rich.table import Table

    table = Table(
        title=f"tasker-pg top  {frame.taken_at:%Y-%m-%d %H:%M:%S} UTC",
        caption="STEPS/S: steps made runnable per second; P50/P99: last claim to completion, "
        "steps of tasks finished in the last minute",
    )
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for line in frame.lines:
        style = "red" if line.tasks_in_error or line.expired_leases else None
        table.add_row(*line.cells(), style=style)
    return table


def require_rich() -> None:
    try:
        import rich  # noqa: F401
    except ImportError:
        raise ConfigurationError(f"the live view needs the rich library; {EXTRA_HINT}") from None


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.0f}h"


# --- the command -----------------------------------------------------------------------------


def add_parser(sub: Any, with_dsn: Any) -> None:
    """Add `top` to the `tasker-pg` subcommands."""
    top = with_dsn(
        sub.add_parser(
            "top",
            help="a live view of every namespace: ready, in flight, errors, steps/s, p50/p99",
            description="Refresh a table of every namespace (ready, in-flight, delayed and "
            "retrying steps, expired leases, oldest ready step, tasks in error, tasks done in "
            "5 minutes, steps/s, p50/p99 step durations) until Ctrl-C. Needs the top extra "
            "(rich) on a terminal: pip install 'tasker-pg[top]'.",
        )
    )
    top.add_argument(
        "--interval",
        type=argtypes.positive_float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit (two reads one interval apart; plain text when stdout "
        "is not a terminal)",
    )
    top.set_defaults(func=cmd_top)


def cmd_top(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_top(args.dsn, interval=args.interval, once=args.once))
    except KeyboardInterrupt:
        return EXIT_OK
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def run_top(dsn: str | None, *, interval: float, once: bool) -> int:
    """Show frames on stdout until interrupted (or one with `once`)."""
    tty = sys.stdout.isatty()
    if tty:
        require_rich()
    conn = await db.connect(dsn)
    try:
        sampler = Sampler()
        if once:
            await sampler.read(conn)
            await asyncio.sleep(interval)
            frame = await sampler.read(conn)
            if tty:
                from rich.console import Console

                Console().print(render_rich(frame))
            else:
                print(render_text(frame))
            return EXIT_OK
        if not tty:
            while True:
                print(render_text(await sampler.read(conn)), flush=True)
                print()
                await asyncio.sleep(interval)
        from rich.live import Live

        with Live(render_rich(await sampler.read(conn)), auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render_rich(await sampler.read(conn)), refresh=True)
    finally:
        await conn.close()
