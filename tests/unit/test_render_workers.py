"""`render.collapse_workers`: long runs of batch workers drawn as one line, with their states."""

from __future__ import annotations

from datetime import UTC, datetime

from tasker_pg.render import COLLAPSE_WORKERS_FROM, collapse_workers, render_dag
from tasker_pg.responses import StepResponse, StepState

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def step(
    name: str,
    state: StepState = "complete",
    *,
    handler: str = "batch.process",
    parents: tuple[str, ...] = ("analyze",),
) -> StepResponse:
    return StepResponse(
        step_uuid=f"uuid-{name}",
        task_uuid="task-1",
        name=name,
        handler=handler,
        current_state=state,
        dependencies=list(parents),
        attempts=1,
        max_attempts=3,
        retryable=True,
        results=None,
        metadata=None,
        last_error=None,
        ready=False,
        readiness_reason="",
        dependencies_satisfied=True,
        worker_id=None,
        next_attempt_at=None,
        lease_expires_at=None,
        created_at=CREATED,
        started_at=None,
        completed_at=None,
        duration_ms=None,
    )


def workers(count: int, first: int = 1, **kw: object) -> list[StepResponse]:
    return [step(f"process_batch_{i:03d}", **kw) for i in range(first, first + count)]  # type: ignore[arg-type]


def test_runs_shorter_than_the_threshold_stay_as_they_are() -> None:
    assert COLLAPSE_WORKERS_FROM == 5
    steps = [step("analyze", parents=()), *workers(COLLAPSE_WORKERS_FROM - 1)]
    out, summaries = collapse_workers(steps)
    assert out == steps
    assert summaries == {}


def test_a_run_at_the_threshold_is_one_line_with_its_state_counts() -> None:
    run = [
        step("process_batch_001", "complete"),
        step("process_batch_002", "error"),
        step("process_batch_003", "complete"),
        step("process_batch_004", "pending"),
        step("process_batch_005", "complete"),
    ]
    steps = [step("analyze", parents=()), *run, step("aggregate", parents=("process_batch",))]
    out, summaries = collapse_workers(steps)
    assert [s.name for s in out] == ["analyze", "process_batch_001..005", "aggregate"]
    assert summaries == {"process_batch_001..005": "5 workers: 3 complete, 1 error, 1 pending"}
    # the run is drawn by its first worker, renamed, in the state that needs attention most
    representative = out[1]
    assert representative.step_uuid == "uuid-process_batch_001"
    assert representative.current_state == "error"
    assert representative.dependencies == ["analyze"]


def test_the_representative_shows_the_most_pressing_state() -> None:
    cases: list[tuple[list[StepState], StepState]] = [
        (["complete"] * 5, "complete"),
        (
            ["complete", "resolved_manually", "complete", "complete", "complete"],
            "resolved_manually",
        ),
        (["complete", "enqueued", "pending", "complete", "complete"], "enqueued"),
        (["enqueued", "waiting_for_retry", "in_progress", "complete", "cancelled"], "in_progress"),
        (["in_progress", "waiting_for_retry", "error", "complete", "complete"], "error"),
    ]
    for states, shown in cases:
        run = [step(f"w_{i}", s) for i, s in enumerate(states, start=1)]
        out, summaries = collapse_workers(run)
        assert [(s.name, s.current_state) for s in out] == [("w_1..5", shown)], states
        assert set(summaries) == {"w_1..5"}


def test_the_summary_orders_states_by_count() -> None:
    states: list[StepState] = ["pending", "complete", "complete", "error", "error", "error"]
    run = [step(f"w_{i}", s) for i, s in enumerate(states, start=1)]
    _, summaries = collapse_workers(run)
    assert summaries == {"w_1..6": "6 workers: 3 error, 2 complete, 1 pending"}


def test_a_different_handler_breaks_a_run() -> None:
    steps = [*workers(5), *workers(5, first=6, handler="batch.other")]
    out, summaries = collapse_workers(steps)
    assert [s.name for s in out] == ["process_batch_001..005", "process_batch_006..010"]
    assert [s.handler for s in out] == ["batch.process", "batch.other"]
    assert set(summaries) == {"process_batch_001..005", "process_batch_006..010"}
    # broken into runs shorter than the threshold, nothing is collapsed
    short = [*workers(3), *workers(3, first=4, handler="batch.other")]
    assert collapse_workers(short) == (short, {})


def test_different_parents_break_a_run() -> None:
    steps = [*workers(6), *workers(5, first=7, parents=("analyze_again",))]
    out, summaries = collapse_workers(steps)
    assert [s.name for s in out] == ["process_batch_001..006", "process_batch_007..011"]
    assert [s.dependencies for s in out] == [["analyze"], ["analyze_again"]]
    assert summaries["process_batch_001..006"] == "6 workers: 6 complete"
    assert summaries["process_batch_007..011"] == "5 workers: 5 complete"
    short = [*workers(4), *workers(4, first=5, parents=("analyze_again",))]
    assert collapse_workers(short) == (short, {})


def test_another_name_prefix_or_a_plain_name_breaks_a_run() -> None:
    steps = [
        *workers(4),
        step("start"),
        *workers(4, first=5),
        step("other_1"),
        *workers(5, first=9),
    ]
    out, summaries = collapse_workers(steps)
    assert [s.name for s in out] == [
        *(f"process_batch_{i:03d}" for i in range(1, 5)),
        "start",
        *(f"process_batch_{i:03d}" for i in range(5, 9)),
        "other_1",
        "process_batch_009..013",
    ]
    assert summaries == {"process_batch_009..013": "5 workers: 5 complete"}


def test_the_dag_draws_a_collapsed_run_with_its_summary() -> None:
    steps = [
        step("analyze", parents=()),
        *workers(4, state="complete"),
        step("process_batch_005", "error"),
        step("aggregate", "pending", parents=("process_batch",)),
    ]
    drawing = render_dag(steps)
    lines = drawing.splitlines()
    [run_line] = [line for line in lines if "process_batch_001..005" in line]
    assert "error" in run_line
    assert any(line.strip().endswith("5 workers: 4 complete, 1 error") for line in lines)
    assert not any("process_batch_002" in line for line in lines)
