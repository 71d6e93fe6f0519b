"""Real worker processes (`python -m tasker_pg.worker_cli`) killed, stopped and cut off.

- a batch step SIGKILLed after a committed checkpoint resumes on another worker from that
  cursor, not from zero;
- a worker SIGKILLed in the middle of a step: another worker completes it after the lease, as
  attempt 2, and nothing else is lost or duplicated;
- a handler that kills every worker that runs it: each lost lease is recorded (naming the worker
  that lost it, in last_error too) and the next attempt waits for the step's backoff;
- SIGTERM during work: running steps finish, unstarted claims are released (no attempt spent),
  exit code 0;
- pg_terminate_backend of every worker session: the worker reconnects and every task completes.

Handlers and templates live in tests/support/workflows (crash_handlers.py); they signal the test
through marker files and wait on gate files named in the task context.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasker_pg import db
from tests.support.worker import (
    assert_each_completed_once,
    assert_invariants,
    poll,
    steps_of,
    wait_final,
)

pytestmark = pytest.mark.slow

# A worker holds three sessions: claim, flush (outcomes and heartbeats) and listen.
WORKER_SESSIONS = 3

REPO = Path(__file__).resolve().parents[2]
HANDLERS = "tests.support.workflows.crash_handlers"


class WorkerProcess:
    """One `python -m tasker_pg.worker_cli` process with its output in a log file."""

    def __init__(self, dsn: str, log_dir: Path, worker_id: str, *args: str) -> None:
        self.worker_id = worker_id
        self.log_path = log_dir / f"{worker_id}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
        env["TASKER_DATABASE_URL"] = dsn
        command = [
            sys.executable,
            "-m",
            "tasker_pg.worker_cli",
            "--worker-id",
            worker_id,
            "--handlers",
            HANDLERS,
            "--poll-interval",
            "0.2",
            "--summary-interval",
            "0",
            *args,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, *, timeout: float = 20.0) -> None:
        async def probe() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(
                    f"worker {self.worker_id} exited with {self.proc.returncode} before logging "
                    f"{text!r}:\n{self.log()}"
                )
            return text in self.log()

        await poll(probe, timeout=timeout, interval=0.05, what=f"{self.worker_id} logging {text!r}")

    async def wait_ready(self) -> None:
        await self.wait_log(f"worker {self.worker_id} started")

    async def wait_exit(self, *, timeout: float = 20.0) -> int:
        async def probe() -> bool:
            return self.proc.poll() is not None

        try:
            await poll(probe, timeout=timeout, interval=0.05, what=f"{self.worker_id} exiting")
        except AssertionError:
            raise AssertionError(f"worker {self.worker_id} did not exit:\n{self.log()}") from None
        return int(self.proc.returncode)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Started worker processes; any still alive at the end is killed."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.cleanup()


def start(
    workers: list[WorkerProcess], dsn: str, log_dir: Path, worker_id: str, *args: str
) -> WorkerProcess:
    worker = WorkerProcess(dsn, log_dir, worker_id, *args)
    workers.append(worker)
    return worker


def touch(path: Path) -> None:
    path.write_text("open")


def count_files(directory: Path, pattern: str) -> int:
    return len(list(directory.glob(pattern)))


async def wait_file(path: Path, what: str) -> None:
    async def exists() -> bool:
        return count_files(path.parent, path.name) == 1

    await poll(exists, what=what)


# --- checkpoints ---------------------------------------------------------------------------------


async def test_checkpointed_batch_resumes_from_cursor_after_sigkill(
    dsn: str, conn: db.Connection, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    options = ("--namespace", "batch", "--templates", "tests/support/workflows/batch.yaml")
    first = start(workers, dsn, tmp_path, "w1", *options, "--lease-seconds", "2")
    await first.wait_ready()
    call_log = tmp_path / "calls.jsonl"
    task = await conn.create_task(
        "batch",
        "batch_workflow",
        {
            "batch_size": 100,
            "call_log": str(call_log),
            "marker_dir": str(tmp_path),
            "pause_worker": "w1",
        },
    )
    # The handler pauses only when it runs from a checkpoint, i.e. after one was committed.
    await wait_file(tmp_path / "paused", "the handler pausing")
    step = (await steps_of(conn, task))["process"]
    assert step["state"] == "in_progress"
    assert step["attempts"] == 1
    assert step["checkpoint"]["cursor"] == 100
    assert step["checkpoint"]["items_processed"] == 100
    first.send(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL

    second = start(workers, dsn, tmp_path, "w2", "--namespace", "batch", "--lease-seconds", "2")
    assert (await wait_final(conn, [task], timeout=30))[task] == "complete"

    step = (await steps_of(conn, task))["process"]
    assert step["results"] == {"total": sum(range(1, 251)), "processed": 250}
    assert step["attempts"] == 2  # the lost lease cost one attempt
    calls = [json.loads(line) for line in call_log.read_text().splitlines()]
    assert calls == [
        {"worker": "w1", "attempt": 1, "cursor": None},
        {"worker": "w1", "attempt": 1, "cursor": 100},
        {"worker": "w2", "attempt": 2, "cursor": 100},  # resumed from the cursor, not from 0
        {"worker": "w2", "attempt": 2, "cursor": 200},
    ]
    events = await conn.fetch(
        "SELECT event, attempt, worker_id FROM tasker.step_transitions WHERE step_uuid = $1 "
        "ORDER BY transition_id",
        step["step_uuid"],
    )
    assert [(e["event"], e["attempt"], e["worker_id"]) for e in events] == [
        ("created", 0, None),
        ("claimed", 1, "w1"),
        ("checkpointed", 1, "w1"),
        ("resumed", 1, "w1"),  # a continuation keeps its attempt
        ("lease_expired", 1, "w1"),  # recorded by w2's claim; names the worker that lost it
        ("claimed", 2, "w2"),  # after the backoff: a lost lease costs one attempt
        ("checkpointed", 2, "w2"),
        ("resumed", 2, "w2"),
        ("succeeded", 2, "w2"),
    ]
    second.send(signal.SIGTERM)
    assert await second.wait_exit() == 0
    await assert_each_completed_once(conn, [task])
    await assert_invariants(conn)


# --- crash recovery ------------------------------------------------------------------------------


async def test_sigkill_mid_step_is_retried_after_the_lease(
    dsn: str, conn: db.Connection, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    options = ("--namespace", "crash", "--concurrency", "4", "--lease-seconds", "2")
    first = start(
        workers, dsn, tmp_path, "w1", *options, "--templates", "tests/support/workflows/crash.yaml"
    )
    await first.wait_ready()
    tasks: list[uuid.UUID] = []
    for n in range(1, 7):
        context: dict[str, object] = {"n": n, "marker_dir": str(tmp_path)}
        if n == 3:
            context["hang_worker"] = "w1"
        tasks.append(await conn.create_task("crash", "crash_chain", context))
    hung = tasks[2]
    marker = tmp_path / f"hang-{hung}"
    await wait_file(marker, "the step hanging in w1")
    first.send(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL
    killed_at = time.monotonic()

    second = start(workers, dsn, tmp_path, "w2", *options)
    states = await wait_final(conn, tasks, timeout=30)
    assert set(states.values()) == {"complete"}
    assert time.monotonic() - killed_at < 20

    work = (await steps_of(conn, hung))["work"]
    assert work["attempts"] == 2
    assert work["results"] == {"n": 6, "attempt": 2}
    assert work["worker_id"] == "w2"
    events = [
        r["event"]
        for r in await conn.fetch(
            "SELECT event FROM tasker.step_transitions WHERE step_uuid = $1 ORDER BY transition_id",
            work["step_uuid"],
        )
    ]
    assert events[-4:] == ["claimed", "lease_expired", "claimed", "succeeded"]
    for n, task in enumerate(tasks, start=1):
        steps = await steps_of(conn, task)
        assert steps["finish"]["results"] == {"n": 2 * n + 1}
    await assert_each_completed_once(conn, tasks)
    second.send(signal.SIGTERM)
    assert await second.wait_exit() == 0
    await assert_invariants(conn)


async def test_worker_killed_by_its_handler_is_retried_after_backoff(
    dsn: str, conn: db.Connection, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """The handler SIGKILLs w1 and w2 (a real process kill each time); w3 finishes it. Each lost
    lease is recorded as attempt n's failure naming its worker, and attempt n+1 starts no
    sooner than the step's backoff (fixed 3 s) after that record: attempts are not burned back
    to back."""
    options = ("--namespace", "crash_loop", "--lease-seconds", "2")
    first = start(
        workers,
        dsn,
        tmp_path,
        "w1",
        *options,
        "--templates",
        "tests/support/workflows/crash_loop.yaml",
    )
    await first.wait_ready()
    task = await conn.create_task(
        "crash_loop", "crash_loop", {"crash_workers": ["w1", "w2"], "marker_dir": str(tmp_path)}
    )
    assert await first.wait_exit() == -signal.SIGKILL
    second = start(workers, dsn, tmp_path, "w2", *options)
    assert await second.wait_exit(timeout=30) == -signal.SIGKILL
    third = start(workers, dsn, tmp_path, "w3", *options)
    assert (await wait_final(conn, [task], timeout=30))[task] == "complete"

    boom = (await steps_of(conn, task))["boom"]
    assert boom["attempts"] == 3
    assert boom["results"] == {"attempt": 3, "worker": "w3"}
    # the last lost lease stays the step's last error
    assert boom["last_error"]["error_code"] == "lease_expired"
    assert boom["last_error"]["worker_id"] == "w2"
    assert "w2" in boom["last_error"]["message"]
    rows = await conn.fetch(
        "SELECT event, attempt, worker_id, to_state, error_summary, created_at "
        "FROM tasker.step_transitions WHERE step_uuid = $1 ORDER BY transition_id",
        boom["step_uuid"],
    )
    assert [(r["event"], r["attempt"], r["worker_id"], r["to_state"]) for r in rows] == [
        ("created", 0, None, "enqueued"),
        ("claimed", 1, "w1", "in_progress"),
        ("lease_expired", 1, "w1", "waiting_for_retry"),
        ("claimed", 2, "w2", "in_progress"),
        ("lease_expired", 2, "w2", "waiting_for_retry"),
        ("claimed", 3, "w3", "in_progress"),
        ("succeeded", 3, "w3", "complete"),
    ]
    assert "w1" in rows[2]["error_summary"] and "w2" in rows[4]["error_summary"]
    # the backoff separates each record from the next attempt (a lower bound the engine
    # guarantees, whatever the machine's load)
    for lost, retried in ((rows[2], rows[3]), (rows[4], rows[5])):
        assert (retried["created_at"] - lost["created_at"]).total_seconds() >= 3.0
    third.send(signal.SIGTERM)
    assert await third.wait_exit() == 0
    await assert_each_completed_once(conn, [task])
    await assert_invariants(conn)


# --- graceful stop -------------------------------------------------------------------------------


async def test_sigterm_finishes_running_steps_and_releases_unstarted_claims(
    dsn: str, conn: db.Connection, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    worker = start(
        workers,
        dsn,
        tmp_path,
        "w1",
        "--namespace",
        "gated",
        "--templates",
        "tests/support/workflows/gated.yaml",
        "--concurrency",
        "2",
        "--grace",
        "20",
    )
    await worker.wait_ready()
    gate_a, gate_c = tmp_path / "gate-a", tmp_path / "gate-c"

    def ctx(gate: Path) -> dict[str, str]:
        return {"gate": str(gate), "marker_dir": str(tmp_path)}

    running_a = await conn.create_task("gated", "gated", ctx(gate_a))
    running_c = await conn.create_task("gated", "gated", ctx(gate_c))

    async def both_started() -> bool:
        return count_files(tmp_path, "started-*") == 2

    await poll(both_started, what="two gated steps running")
    # Both slots are taken, so these wait in the queue.
    waiting_b = [await conn.create_task("gated", "gated", ctx(gate_a)) for _ in range(2)]

    # Hold the steps table so the claim that follows blocks inside claim_steps: a claim in
    # flight when SIGTERM arrives, whose steps the worker must hand back unstarted.
    locker = await db.connect(dsn)
    try:
        tx = locker.raw.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE tasker.steps IN EXCLUSIVE MODE")
        touch(gate_a)  # A finishes; its slot frees up; the worker claims one B step

        async def claim_blocked() -> bool:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'tasker-pg worker w1 claim' "
                "AND wait_event_type = 'Lock' AND query LIKE '%claim_steps%'"
            )
            return bool(count)

        await poll(claim_blocked, what="the worker's claim waiting on the lock")
        worker.send(signal.SIGTERM)
        await worker.wait_log("worker w1 stopping")
        await tx.commit()
    finally:
        await locker.close()

    async def b_released() -> bool:
        count = await conn.fetchval(
            "SELECT count(*) FROM tasker.step_transitions t JOIN tasker.steps s USING (step_uuid) "
            "WHERE s.task_uuid = ANY($1::uuid[]) AND t.event = 'released' "
            "AND t.worker_id = 'w1'",  # the release names the worker that held the claim
            waiting_b,
        )
        return bool(count == 1)

    await poll(b_released, what="the unstarted claim released")
    # The stop is still waiting for the running C step.
    assert worker.proc.poll() is None
    assert (await steps_of(conn, running_c))["wait"]["state"] == "in_progress"
    touch(gate_c)
    assert await worker.wait_exit() == 0

    log = worker.log()
    assert "released unstarted" in log
    for task in [running_a, running_c]:
        step = (await steps_of(conn, task))["wait"]
        assert (step["state"], step["attempts"]) == ("complete", 1)
    for task in waiting_b:
        step = (await steps_of(conn, task))["wait"]
        assert (step["state"], step["attempts"]) == ("enqueued", 0)  # no attempt spent
    assert count_files(tmp_path, "started-*") == 2  # B never ran
    await assert_invariants(conn)

    # Another worker picks the released steps up at once.
    again = start(workers, dsn, tmp_path, "w2", "--namespace", "gated")
    assert set((await wait_final(conn, waiting_b)).values()) == {"complete"}
    for task in waiting_b:
        assert (await steps_of(conn, task))["wait"]["attempts"] == 1
    again.send(signal.SIGINT)
    assert await again.wait_exit() == 0
    await assert_invariants(conn)


# --- connection loss -----------------------------------------------------------------------------


async def test_worker_reconnects_after_its_backends_are_terminated(
    dsn: str, conn: db.Connection, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    worker = start(
        workers,
        dsn,
        tmp_path,
        "w1",
        "--namespace",
        "crash",
        "--templates",
        "tests/support/workflows/crash.yaml",
        "--concurrency",
        "4",
        "--lease-seconds",
        "2",
    )
    await worker.wait_ready()
    tasks = [
        await conn.create_task("crash", "crash_chain", {"n": n, "delay": 0.05}) for n in range(30)
    ]

    async def completed_steps() -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM tasker.steps WHERE task_uuid = ANY($1::uuid[]) "
                "AND state = 'complete'",
                tasks,
            )
        )

    async def sessions_up() -> bool:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'tasker-pg worker w1 %'"
        )
        return bool(count == WORKER_SESSIONS)

    terminated_total = 0
    for _round in range(3):
        await poll(sessions_up, timeout=20, what=f"the worker's {WORKER_SESSIONS} sessions")
        before = await completed_steps()
        terminated = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE 'tasker-pg worker w1 %'"
        )
        terminated_total += terminated

        async def progressed(before: int = before) -> bool:
            return await completed_steps() > before or await completed_steps() == 90

        await poll(progressed, timeout=20, what="progress after terminating the backends")

    assert terminated_total == 3 * WORKER_SESSIONS
    states = await wait_final(conn, tasks, timeout=40)
    assert set(states.values()) == {"complete"}
    for n, task in enumerate(tasks):
        assert (await steps_of(conn, task))["finish"]["results"] == {"n": 2 * n + 1}
    await assert_each_completed_once(conn, tasks)
    await worker.wait_log("listen session reconnected")
    await worker.wait_log("claim session reconnected")
    worker.send(signal.SIGTERM)
    assert await worker.wait_exit() == 0
    await assert_invariants(conn)
