"""Text output of the CLI and the demo: tables, durations, and a task's DAG for the terminal.

Everything here is pure formatting (no database): the CLI and the demo hand it response
objects and print what comes back. Colour is opt-in per call (`Style`), decided by the caller
from the terminal (a tty and no NO_COLOR); widths are computed on the plain text so colour never
breaks alignment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from tasker_pg.responses import StepNotCreated, StepResponse, StepState, TaskResponse

__all__ = [
    "STEP_COMMANDS_INTRO",
    "Style",
    "dag_depths",
    "format_duration",
    "format_table",
    "render_dag",
    "render_failure",
    "render_task_header",
    "step_commands",
    "traceback_origin",
    "truncate",
    "without_sql_hint",
]

WIDTH = 100
"""The drawing fits in this many columns."""

# ANSI colours per state (only used when Style.color is on).
_STATE_COLOURS = {
    "complete": "32",  # green
    "resolved_manually": "32",
    "error": "31",  # red
    "cancelled": "35",  # magenta
    "waiting_for_retry": "33",  # yellow
    "waiting": "33",
    "in_progress": "36",  # cyan
    "steps_in_process": "36",
    "enqueued": "34",  # blue
    "pending": "2",  # dim
}
# States whose readiness reason adds nothing to the state itself.
_SELF_EXPLAINING = frozenset({"complete", "resolved_manually", "cancelled"})
# The readiness reason of a failed step ends with the SQL functions that repair it, in
# parentheses; the CLI names its own commands instead.
_SQL_HINT_RE = re.compile(r"\s*\([^()]*tasker\.(?:retry|resolve)_step[^()]*\)\s*$")
# One frame line of a formatted Python traceback.
_FRAME_RE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')


@dataclass(frozen=True)
class Style:
    """How to draw: box-drawing characters or plain ASCII, and ANSI colour or none."""

    unicode: bool = True
    color: bool = False

    @classmethod
    def for_stream(cls, stream: TextIO | None = None) -> Style:
        """Box-drawing when the stream's encoding has it; colour only on a tty without
        NO_COLOR (https://no-color.org)."""
        stream = stream if stream is not None else sys.stdout
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "├─└│…".encode(encoding)
            unicode = True
        except (UnicodeEncodeError, LookupError):
            unicode = False
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
        return cls(unicode=unicode, color=tty and not os.environ.get("NO_COLOR"))

    @property
    def tee(self) -> str:
        return "├─ " if self.unicode else "|- "

    @property
    def elbow(self) -> str:
        return "└─ " if self.unicode else "`- "

    @property
    def bar(self) -> str:
        return "│" if self.unicode else "|"

    @property
    def arrow(self) -> str:
        return "←" if self.unicode else "<-"

    @property
    def ellipsis(self) -> str:
        return "…" if self.unicode else "..."

    def state(self, text: str, state: str) -> str:
        """`text` (already padded) coloured for `state`."""
        code = _STATE_COLOURS.get(state)
        if not self.color or code is None:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def bold(self, text: str) -> str:
        return f"\x1b[1m{text}\x1b[0m" if self.color else text


PLAIN = Style(unicode=False, color=False)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def truncate(text: str, width: int, ellipsis: str = "…") -> str:
    """`text` cut to `width` characters, ending in `ellipsis` when it was cut."""
    if len(text) <= width:
        return text
    return text[: max(width - len(ellipsis), 0)] + ellipsis


def format_duration(ms: float | None) -> str:
    """12 ms, 1.2 s, 3m04s; '-' when unknown."""
    if ms is None:
        return "-"
    if ms < 1:
        return "<1 ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_time(value: datetime | None) -> str:
    """A timestamp in local time, to the second; '-' when unknown."""
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def dag_depths(steps: Sequence[StepResponse]) -> dict[str, int]:
    """Each step's depth: 0 for a root, else one more than its deepest parent."""
    by_name = {s.name: s for s in steps}
    depths: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in depths:
            return depths[name]
        step = by_name.get(name)
        parents = [p for p in (step.dependencies if step else []) if p in by_name]
        # (templates are acyclic; `seen` only guards against a corrupted graph)
        d = 0 if not parents else 1 + max(depth(p, seen | {name}) for p in parents if p not in seen)
        depths[name] = d
        return d

    for s in steps:
        depth(s.name, frozenset())
    return depths


def render_task_header(task: TaskResponse, style: Style = PLAIN) -> str:
    """Two lines: which task, and where it stands."""
    first = f"task {task.task_uuid}  {task.namespace}/{task.name} {task.version}"
    sep = " · " if style.unicode else " - "
    parts = [
        f"{style.state(task.status, task.status)} ({task.execution_status})",
        f"{task.completed_steps}/{task.total_steps} steps done ({task.completion_percentage:g}%)",
        f"created {format_time(task.created_at)}",
    ]
    if task.completed_at is not None:
        took = (task.completed_at - task.created_at).total_seconds() * 1000
        parts.append(f"took {format_duration(took)}")
    second = sep.join(parts)
    return f"{style.bold(first)}\n{second}"


def render_dag(
    steps: Sequence[StepResponse],
    style: Style = PLAIN,
    width: int = WIDTH,
    *,
    show_uuids: bool = False,
) -> str:
    """The task's steps as a spine of dependency levels, one line per step.

    Steps are grouped by depth (roots first) and keep template order inside a level; a bare
    spine line separates levels. Each line shows state, attempts/max, the last run's duration
    and the parents (`← a, b`); with `show_uuids` a line under it gives the step's uuid (what
    the `step` commands take); a further line says why a step that is not running or done is
    where it is (the readiness reason).
    """
    if not steps:
        return "(no steps)"
    depths = dag_depths(steps)
    order = {s.name: i for i, s in enumerate(steps)}
    ordered, collapsed = collapse_workers(
        sorted(steps, key=lambda s: (depths[s.name], order[s.name]))
    )
    for name in collapsed:  # a run of workers sits at its first worker's depth
        depths[name] = depths[name.split("..")[0]]
    name_w = min(max(len(s.name) for s in ordered), 30)
    state_w = max(len(s.current_state) for s in ordered)
    attempts_w = max(len(f"{s.attempts}/{s.max_attempts}") for s in ordered)
    lines: list[str] = []
    for index, step in enumerate(ordered):
        last = index == len(ordered) - 1
        if index > 0 and depths[step.name] != depths[ordered[index - 1].name]:
            lines.append(style.bar)
        connector = style.elbow if last else style.tee
        name = truncate(step.name, name_w, style.ellipsis).ljust(name_w)
        state = style.state(step.current_state.ljust(state_w), step.current_state)
        attempts = f"{step.attempts}/{step.max_attempts}".rjust(attempts_w)
        duration = format_duration(step.duration_ms).rjust(8)
        line = f"{connector}{name}  {state}  {attempts}  {duration}"
        plain_len = 3 + name_w + 2 + state_w + 2 + attempts_w + 2 + 8
        if step.dependencies:
            room = width - plain_len - 2 - len(style.arrow) - 1
            parents = truncate(", ".join(step.dependencies), max(room, 10), style.ellipsis)
            line += f"  {style.dim(style.arrow + ' ' + parents)}"
        lines.append(line.rstrip())
        gutter = "   " if last else style.bar + "  "
        group = collapsed.get(step.name)
        if group is not None:
            lines.append(gutter + "  " + style.dim(group))
            continue
        if show_uuids:
            lines.append(gutter + "  " + style.dim(f"step {step.step_uuid}"))
        why = _why(step)
        if why:
            lines.append(gutter + "  " + truncate(why, width - len(gutter) - 2, style.ellipsis))
    return "\n".join(lines)


_WORKER_NAME_RE = re.compile(r"^(?P<prefix>.+_)(?P<batch>[A-Za-z0-9-]+)$")
COLLAPSE_WORKERS_FROM = 5
"""Runs of at least this many batch workers are drawn as one line."""


def collapse_workers(
    steps: Sequence[StepResponse],
) -> tuple[list[StepResponse], dict[str, str]]:
    """Long runs of batch workers (`process_batch_001` .. `_040`: consecutive steps with one
    name prefix, one handler and the same parents) as one line each: returns the steps with
    each run replaced by its first step renamed `process_batch_001..040`, and for those names
    a summary of the run's states (`40 workers: 38 complete, 2 error`)."""
    out: list[StepResponse] = []
    summaries: dict[str, str] = {}
    i = 0
    while i < len(steps):
        first = _WORKER_NAME_RE.match(steps[i].name)
        j = i + 1
        if first is not None:
            while j < len(steps):
                m = _WORKER_NAME_RE.match(steps[j].name)
                if (
                    m is None
                    or m["prefix"] != first["prefix"]
                    or steps[j].handler != steps[i].handler
                    or steps[j].dependencies != steps[i].dependencies
                ):
                    break
                j += 1
        if first is None or j - i < COLLAPSE_WORKERS_FROM:
            out.append(steps[i])
            i += 1
            continue
        run = steps[i:j]
        last = _WORKER_NAME_RE.match(run[-1].name)
        assert last is not None
        name = f"{run[0].name}..{last['batch']}"
        states: dict[StepState, int] = {}
        for step in run:
            states[step.current_state] = states.get(step.current_state, 0) + 1
        worst = next((s for s in _RUN_STATE_ORDER if s in states), run[0].current_state)
        out.append(dataclasses.replace(run[0], name=name, current_state=worst))
        summaries[name] = f"{len(run)} workers: " + ", ".join(
            f"{n} {state}" for state, n in sorted(states.items(), key=lambda kv: -kv[1])
        )
        i = j
    return out, summaries


# The state a collapsed run of workers shows: the first of these any worker is in.
_RUN_STATE_ORDER: tuple[StepState, ...] = (
    "error",
    "in_progress",
    "waiting_for_retry",
    "waiting",
    "enqueued",
    "pending",
    "cancelled",
    "resolved_manually",
    "complete",
)


def render_not_created(steps: Sequence[StepNotCreated], style: Style = PLAIN) -> str:
    """The template steps a task has no row for, one line each with why."""
    if not steps:
        return ""
    lines = ["not created:"]
    for step in steps:
        lines.append(f"  {step.name}  {style.dim(step.reason)}")
    return "\n".join(lines)


def _why(step: StepResponse) -> str | None:
    """The readiness reason when it says more than the state (not for running/done steps)."""
    state = step.current_state
    reason = step.readiness_reason or ""
    if state in _SELF_EXPLAINING or not reason:
        return None
    if state == "in_progress" and reason.startswith("running on"):
        return None
    return without_sql_hint(reason)


def without_sql_hint(reason: str) -> str:
    """A readiness reason without its closing "(tasker.retry_step or ...)" SQL hint."""
    return _SQL_HINT_RE.sub("", reason)


def step_commands(step_uuid: str) -> list[str]:
    """The CLI commands that move a failed step on: run it again, or complete it by hand."""
    return [
        f"tasker-pg step retry {step_uuid}",
        f"tasker-pg step resolve {step_uuid} --result JSON",
    ]


STEP_COMMANDS_INTRO = (
    "to go on: run it again, or complete it by hand with a JSON result (its dependents then run):"
)


def error_line(error: dict[str, Any]) -> str:
    """`Type [code]: message` of a stored step error."""
    kind = error.get("error_type") or "error"
    code = error.get("error_code")
    return f"{kind}{f' [{code}]' if code else ''}: {error.get('message')}"


def traceback_origin(tb: str | None) -> str | None:
    """`file:line in function` of the innermost frame of a formatted traceback."""
    found = None
    for line in (tb or "").splitlines():
        match = _FRAME_RE.match(line)
        if match:
            found = f"{match['file']}:{match['line']} in {match['func']}"
    return found


def render_failure(
    step: StepResponse, style: Style = PLAIN, *, max_traceback_lines: int = 0
) -> str:
    """A failed step: which one, its error, the traceback the handler raised, what to do next.

    `max_traceback_lines` keeps only the last lines of a long traceback (0 keeps all).
    """
    error = step.last_error or {}
    lines = [style.bold(f"failed step {step.name} ({step.step_uuid})")]
    lines.append("  " + style.state(error_line(error) if error else "error", "error"))
    tb = error.get("traceback")
    if isinstance(tb, str) and tb.strip():
        tb_lines = tb.rstrip().splitlines()
        if 0 < max_traceback_lines < len(tb_lines) - 1:
            # the "Traceback ..." header, then the innermost frames, where the handler raised
            skipped = len(tb_lines) - 1 - max_traceback_lines
            note = f"  ({skipped} lines left out: tasker-pg step explain {step.step_uuid})"
            tb_lines = [tb_lines[0], note, *tb_lines[-max_traceback_lines:]]
        lines += ["    " + line for line in tb_lines]
    lines.append("  " + STEP_COMMANDS_INTRO)
    lines += ["    " + command for command in step_commands(step.step_uuid)]
    return "\n".join(lines)
