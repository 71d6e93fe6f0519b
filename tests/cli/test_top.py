"""`tasker-pg top`: one frame (`--once`, plain text off a terminal) of a database with work, the
steps/s rate between two reads, and `tasker.step_durations()` (the P50/P99 columns)."""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Iterator

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tasker_pg.top import COLUMNS, Sampler, _seconds, render_rich
from tests.cli.test_cli import cli
from tests.support import plans
from tests.support.engine import (
    NAMESPACE,
    claim,
    complete,
    diamond,
    drive,
    failure,
    single,
    success,
)

pytestmark = pytest.mark.timeout(120)


async def durations_of(conn: db.Connection, tasks: list[uuid.UUID]) -> list[float]:
    rows = await conn.fetch(
        "SELECT extract(epoch FROM completed_at - started_at)::float8 AS secs FROM tasker.steps "
        "WHERE task_uuid = ANY($1::uuid[]) AND state = 'complete'",
        tasks,
    )
    return [r["secs"] for r in rows]


def percentile(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def test_once_prints_one_frame_of_every_namespace(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(single())
    done, failed, _ready = await conn.create_tasks(NAMESPACE, "single", [{}, {}, {}])
    first, second = await claim(conn, qty=2)
    by_task = {r["task_uuid"]: r for r in (first, second)}
    await complete(conn, success(by_task[done]), failure(by_task[failed], retryable=False))
    [duration] = await durations_of(conn, [done])

    result = cli(dsn, "top", "--once", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    title, header, *rows = result.stdout.splitlines()
    assert title.startswith("tasker-pg top  ")
    assert header.split() == " ".join(COLUMNS).split()
    [row] = rows
    cells = row.split()
    oldest = cells.pop(6)
    assert cells == [NAMESPACE, "1", "0", "0", "0", "0", "1", "1", "0.0"] + [_seconds(duration)] * 2
    assert oldest.endswith(("ms", "s"))


async def test_steps_per_second_is_the_messages_sent_between_two_reads(
    conn: db.Connection,
) -> None:
    await conn.register_template(single())
    await conn.register_template(diamond(name="other"))
    ticks: Iterator[float] = iter([100.0, 102.0, 106.0])
    sampler = Sampler(clock=lambda: next(ticks))
    first = await sampler.read(conn)
    assert [(line.namespace, line.steps_per_second) for line in first.lines] == [(NAMESPACE, None)]
    await conn.create_tasks(NAMESPACE, "single", [{}] * 5)  # five root messages
    second = await sampler.read(conn)
    assert [(line.namespace, line.steps_per_second, line.ready) for line in second.lines] == [
        (NAMESPACE, 2.5, 5)
    ]
    await drive(conn, NAMESPACE, lambda row: {})  # runs them: no new message (single steps)
    await conn.create_task(NAMESPACE, "other", {})  # one root message; its children come later
    third = await sampler.read(conn)
    assert [(line.steps_per_second, line.ready, line.finished_5m) for line in third.lines] == [
        (0.25, 1, 5)
    ]


async def test_step_durations_are_the_percentiles_of_recently_finished_tasks(
    conn: db.Connection,
) -> None:
    await conn.register_template(diamond())
    tasks = await conn.create_tasks(NAMESPACE, "diamond", [{}] * 6)
    await drive(conn, NAMESPACE, lambda row: {})
    secs = await durations_of(conn, tasks)
    assert len(secs) == 24
    [row] = await conn.fetch("SELECT * FROM tasker.step_durations(60)")
    assert (row["namespace"], row["steps"]) == (NAMESPACE, 24)
    assert row["p50_seconds"] == pytest.approx(percentile(secs, 0.5), abs=1e-9)
    assert row["p99_seconds"] == pytest.approx(percentile(secs, 0.99), abs=1e-9)
    assert statistics.median(secs) == pytest.approx(row["p50_seconds"], abs=1e-9)
    # at most the newest p_max_tasks tasks: two tasks, eight steps
    [two] = await conn.fetch("SELECT * FROM tasker.step_durations(60, 2)")
    assert two["steps"] == 8
    # a task finished before the window is not counted
    await conn.execute(
        "UPDATE tasker.tasks SET completed_at = completed_at - interval '10 minutes' "
        "WHERE task_uuid = ANY($1::uuid[])",
        tasks[:5],
    )
    [recent] = await conn.fetch("SELECT * FROM tasker.step_durations(60)")
    assert recent["steps"] == 4
    for bad in ("0, 10", "'NaN', 10", "60, 0", "60, 10001", "90000, 10"):
        with pytest.raises(ValidationError, match="must be") as err:
            await conn.fetch(f"SELECT * FROM tasker.step_durations({bad})")
        assert err.value.sqlstate == "TV002"


async def test_the_terminal_view_is_a_rich_table_of_the_same_cells(conn: db.Connection) -> None:
    from rich.console import Console

    await conn.register_template(single())
    await conn.create_tasks(NAMESPACE, "single", [{}, {}])
    frame = await Sampler().read(conn)
    console = Console(record=True, width=200, color_system=None)
    console.print(render_rich(frame))
    text = console.export_text()
    [line] = frame.lines
    [row] = [r for r in text.splitlines() if NAMESPACE in r]
    assert [c.strip() for c in row.strip("│ ").split("│")] == line.cells()
    assert line.cells()[1:3] == ["2", "0"]
    for column in ("NAMESPACE", "IN-FLIGHT", "STEPS/S", "P99"):
        assert column in text


@pytest.mark.plans
async def test_step_durations_reads_indexes_only(conn: db.Connection) -> None:
    await plans.require_auto_explain(conn)
    await conn.register_template(diamond())
    await conn.create_tasks(NAMESPACE, "diamond", [{}] * 20)
    await drive(conn, NAMESPACE, lambda row: {})
    await conn.execute("ANALYZE tasker.tasks; ANALYZE tasker.steps")
    async with plans.collect_plans(conn) as log:
        [row] = await conn.fetch("SELECT * FROM tasker.step_durations(60)")
    assert row["steps"] == 80
    scanned = {rel for s in log.statements for rel in s.seq_scanned()}
    assert not scanned & {"tasks", "steps", "step_transitions"}, [
        s.describe() for s in log.statements
    ]
    used = {i for s in log.statements for i in s.indexes()}
    assert {"tasks_finished_idx", "steps_task_name_idx"} <= used, used
