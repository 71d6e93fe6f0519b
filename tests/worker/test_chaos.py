"""Faults together: diamond tasks through two worker processes while a fault driver kills
workers, terminates their backends, restarts PostgreSQL, injects lock and statement timeouts
and holds a snapshot. Afterwards every task is complete, every step's success was committed
exactly once (whatever number of times its handler ran), no message is left in the queue and
`check_invariants()` is empty.

The test proves the faults happened, and happened to work in flight, by construction: before
each fault the driver waits until a step is claimed (`in_progress`), and it repeats its round
of faults until each kind has taken effect at least once:

- kills: a worker process SIGKILLed while it held a claimed step (then started again);
- terminated backends: `pg_terminate_backend` calls on the workers' sessions that returned true;
- restarts: PostgreSQL restarted (fast shutdown, or immediate: a crash) while steps were
  `in_progress`, counted from the query just before the stop;
- lock and statement timeouts that fired in a worker's session, read from the server log (its
  line prefix names each session's application_name, and the STATEMENT line the engine call
  that was cancelled). One worker slot runs with `lock_timeout=200ms`, the other with
  `statement_timeout=300ms` (and no lock timeout), both passed as DSN query parameters, which
  asyncpg sends as server settings (asyncpg ignores PGOPTIONS). The driver makes them fire by
  holding `FOR UPDATE` on the rows of the steps one worker is running, until one of that
  worker's `complete_and_claim` calls has been cancelled, and then letting go at once (so the
  worker's next try of that outcome gets through), for each worker in every round;
- snapshot holds: a REPEATABLE READ transaction kept open for a few seconds while other
  sessions committed step outcomes it does not see.

Handlers (tests/support/workflows/chaos_handlers.py) log every run with a run id; the committed
result names its run, so the test checks that what was committed came from a real run and that
each child consumed its parents' committed results. Handler runs are counted and reported.

PostgreSQL is restarted, so the test runs on a cluster of its own (tests/support/chaos.py), not
on the session's server, and is skipped when no PostgreSQL server binaries are installed (e.g.
a run that only has TASKER_TEST_DSN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasker_pg import db
from tests.support.chaos import (
    Db,
    PrivateCluster,
    WorkerProcess,
    binaries_missing_reason,
    timeouts_in_log,
)
from tests.support.worker import FINAL_TASK_STATES, most_in_progress_per_key, templates
from tests.support.workflows.chaos_handlers import expected_values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

HANDLERS = "tests.support.workflows.chaos_handlers"
NAMESPACE = "chaos"
TEMPLATE = "chaos_diamond"
PARENTS = {"left": ("start",), "right": ("start",), "join": ("left", "right")}
# One worker process per slot at any time (a killed one is replaced), each with its own
# server settings; the value goes into the DSN's query string.
SLOTS = {"lt": "lock_timeout=200ms", "st": "statement_timeout=300ms"}
WORKER_ARGS = (
    "--namespace",
    NAMESPACE,
    "--handlers",
    HANDLERS,
    "--concurrency",
    "4",
    "--lease-seconds",
    "2",
    "--poll-interval",
    "0.2",
    "--grace",
    "3",
    "--summary-interval",
    "0",
)
BACKLOG = 12  # unfinished tasks the producer keeps in the system while the faults run
# Every round: kill one slot's worker, terminate the backends, hold locks on each slot's steps,
# hold a snapshot, restart PostgreSQL; two rounds kill both slots and restart both ways.
MIN_ROUNDS = 2
FAULT_PHASE_LIMIT_S = 120.0
IN_FLIGHT_LIMIT_S = 30.0
DRAIN_LIMIT_S = 120.0
SNAPSHOT_HOLD_S = 2.0
LOCK_HOLD_LIMIT_S = 3.0


@dataclass
class Faults:
    kills: int = 0  # SIGKILLs of a worker that held a claimed step
    terminated: int = 0  # pg_terminate_backend calls on worker sessions that returned true
    restarts: int = 0
    restarts_in_flight: int = 0  # with steps in_progress just before the stop
    lock_holds: int = 0  # FOR UPDATE holds on a worker's running steps' rows
    snapshot_holds: int = 0  # snapshots held while others committed step outcomes
    timeouts: Counter[tuple[str, str]] = field(default_factory=Counter)  # from the server log

    def timeouts_of(self, kind: str) -> int:
        return sum(n for (k, _), n in self.timeouts.items() if k == kind)

    def timeouts_in(self, call: str) -> int:
        return sum(n for (_, c), n in self.timeouts.items() if c == call)

    def missing(self) -> list[str]:
        """The fault kinds that have not taken effect yet."""
        checks = {
            "a kill with work in flight": self.kills,
            "a terminated worker backend": self.terminated,
            "a restart with work in flight": self.restarts_in_flight,
            "a lock timeout": self.timeouts_of("lock"),
            "a statement timeout": self.timeouts_of("statement"),
            "a timeout cancelling complete_and_claim": self.timeouts_in("complete_and_claim"),
            "a snapshot held across commits": self.snapshot_holds,
        }
        return [what for what, count in checks.items() if count < 1]

    def summary(self) -> str:
        timeouts = ", ".join(f"{k} in {c}: {n}" for (k, c), n in sorted(self.timeouts.items()))
        return (
            f"kills {self.kills}, terminated backends {self.terminated}, restarts "
            f"{self.restarts} ({self.restarts_in_flight} with work in flight), lock holds "
            f"{self.lock_holds}, snapshot holds {self.snapshot_holds}, timeouts fired: "
            f"{timeouts or 'none'}"
        )


class Chaos:
    """The private cluster, the two worker slots, the producer of tasks and the fault driver."""

    def __init__(self, cluster: PrivateCluster, dsn: str, log_dir: Path) -> None:
        self.cluster = cluster
        self.dsn = dsn
        self.log_dir = log_dir
        self.run_log = log_dir / "runs.jsonl"
        self.db = Db(dsn)  # the driver's session
        self.producer_db = Db(dsn)
        self.workers: dict[str, WorkerProcess] = {}
        self.retired: list[WorkerProcess] = []  # killed workers (their logs are kept)
        self.generation: Counter[str] = Counter()
        self.tasks: dict[uuid.UUID, int] = {}  # task -> its n
        self.faults = Faults()

    # --- workers ---------------------------------------------------------------------------

    def start_worker(self, slot: str) -> WorkerProcess:
        self.generation[slot] += 1
        worker_id = f"{slot}{self.generation[slot]}"
        separator = "&" if "?" in self.dsn else "?"
        dsn = f"{self.dsn}{separator}{SLOTS[slot]}"
        worker = WorkerProcess(dsn, self.log_dir, worker_id, *WORKER_ARGS)
        self.workers[slot] = worker
        return worker

    def all_workers(self) -> list[WorkerProcess]:
        return [*self.retired, *self.workers.values()]

    def kill_everything(self) -> None:
        for worker in self.all_workers():
            worker.kill()

    def worker_logs(self, tail: int = 2500) -> str:
        return "\n".join(
            f"--- worker {w.worker_id} (exit {w.proc.poll()}):\n{w.log()[-tail:]}"
            for w in self.all_workers()
        )

    # --- the database ----------------------------------------------------------------------

    async def in_progress(self, worker_id: str | None = None) -> int:
        return int(
            await self.db.call(
                lambda c: c.fetchval(
                    "SELECT count(*) FROM tasker.steps WHERE state = 'in_progress' "
                    "AND ($1::text IS NULL OR worker_id = $1)",
                    worker_id,
                )
            )
        )

    async def state(self) -> str:
        """The engine's state, for failure messages."""

        async def read(conn: db.Connection) -> str:
            tasks = await conn.fetch("SELECT state, count(*) AS n FROM tasker.tasks GROUP BY 1")
            steps = await conn.fetch("SELECT state, count(*) AS n FROM tasker.steps GROUP BY 1")
            messages = await conn.fetchval(
                "SELECT count(*) FROM tasker.queue_messages WHERE queue = $1", NAMESPACE
            )
            return (
                f"tasks {dict((r['state'], r['n']) for r in tasks)}, steps "
                f"{dict((r['state'], r['n']) for r in steps)}, messages {messages}"
            )

        try:
            return await self.db.call(read, timeout=10)
        except Exception as exc:
            return f"(state unreadable: {exc})"

    async def fail(self, what: str) -> AssertionError:
        return AssertionError(
            f"{what}\nfaults so far: {self.faults.summary()}\nengine: {await self.state()}\n"
            f"{self.worker_logs()}"
        )

    async def wait_in_flight(self, worker_id: str | None = None) -> int:
        """Wait until a step is in_progress (on `worker_id`, or anywhere); returns how many."""
        deadline = time.monotonic() + IN_FLIGHT_LIMIT_S
        while True:
            count = await self.in_progress(worker_id)
            if count:
                return count
            if time.monotonic() > deadline:
                who = f"on worker {worker_id}" if worker_id else "anywhere"
                raise await self.fail(
                    f"no step in_progress {who} within {IN_FLIGHT_LIMIT_S}s before a fault"
                )
            await asyncio.sleep(0.02)

    # --- the producer ----------------------------------------------------------------------

    async def produce(self, stop: asyncio.Event) -> None:
        """Keep BACKLOG unfinished tasks in the system until `stop` is set."""
        n = 0
        while not stop.is_set():
            unfinished = await self.producer_db.call(
                lambda c: c.fetchval(
                    "SELECT count(*) FROM tasker.tasks WHERE state <> ALL($1::text[])",
                    list(FINAL_TASK_STATES),
                )
            )
            if unfinished >= BACKLOG:
                await asyncio.sleep(0.05)
                continue
            context = {"n": n, "run_log": str(self.run_log), "customer": f"c{n % 3}"}
            # The idempotency key makes a create retried after a lost connection safe.
            options = {"idempotency_key": f"chaos-{n}"}

            async def create(
                conn: db.Connection, context: dict[str, Any] = context, options: Any = options
            ) -> tuple[uuid.UUID, bool]:
                return await conn.create_or_get_task(NAMESPACE, TEMPLATE, context, options=options)

            task, _created = await self.producer_db.call(create)
            self.tasks[task] = n
            n += 1

    # --- the faults ------------------------------------------------------------------------

    async def kill_worker(self, slot: str) -> None:
        """SIGKILL the slot's worker while it holds a claimed step, then start a new one."""
        worker = self.workers[slot]
        await self.wait_in_flight(worker.worker_id)
        worker.proc.send_signal(signal.SIGKILL)
        code = await worker.wait_exit()
        assert code == -signal.SIGKILL, f"worker {worker.worker_id} exited with {code}"
        self.faults.kills += 1
        self.retired.append(worker)
        self.start_worker(slot)

    async def terminate_backends(self) -> None:
        await self.wait_in_flight()
        terminated = await self.db.call(
            lambda c: c.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name LIKE 'tasker-pg worker %'"
            )
        )
        self.faults.terminated += int(terminated)

    async def hold_locks(self, slot: str) -> None:
        """Hold FOR UPDATE on the rows of the steps the slot's worker is running, until one of
        its `complete_and_claim` calls has been cancelled by its lock or statement timeout (or
        LOCK_HOLD_LIMIT_S passes); then let go at once."""
        worker = self.workers[slot]
        await self.wait_in_flight(worker.worker_id)
        log_start = self.cluster.server_log_size()
        locker = await db.connect(self.dsn)
        try:
            tx = locker.raw.transaction()
            await tx.start()
            locked = await locker.fetch(
                "SELECT step_uuid FROM tasker.steps WHERE state = 'in_progress' "
                "AND worker_id = $1 FOR UPDATE SKIP LOCKED",
                worker.worker_id,
            )
            deadline = time.monotonic() + LOCK_HOLD_LIMIT_S
            while locked and time.monotonic() < deadline:
                fired = timeouts_in_log(self.cluster.server_log(log_start))
                if any(call == "complete_and_claim" for _, call in fired):
                    break
                await asyncio.sleep(0.01)
            await tx.rollback()
        finally:
            locker.terminate()
        if locked:
            self.faults.lock_holds += 1

    async def hold_snapshot(self) -> None:
        """Keep a REPEATABLE READ snapshot for a few seconds while step outcomes commit."""
        await self.wait_in_flight()
        count_sql = "SELECT count(*) FROM tasker.step_transitions WHERE to_state = 'complete'"
        holder = await db.connect(self.dsn)
        try:
            tx = holder.raw.transaction(isolation="repeatable_read")
            await tx.start()
            seen_before = await holder.fetchval(count_sql)
            await asyncio.sleep(SNAPSHOT_HOLD_S)
            seen_after = await holder.fetchval(count_sql)
            committed = await self.db.call(lambda c: c.fetchval(count_sql))
            await tx.rollback()
        finally:
            holder.terminate()
        assert seen_after == seen_before  # the snapshot was really held
        if committed > seen_before:
            self.faults.snapshot_holds += 1

    async def restart_postgres(self, *, immediate: bool) -> None:
        await self.wait_in_flight()
        in_flight = await self.in_progress()  # the last query before the stop
        await self.db.close()
        await self.cluster.restart(immediate=immediate)
        self.faults.restarts += 1
        if in_flight:
            self.faults.restarts_in_flight += 1

    async def read_timeouts(self) -> None:
        self.faults.timeouts = timeouts_in_log(self.cluster.server_log())

    async def run_faults(self) -> None:
        """Rounds of every fault kind until each has taken effect (at least MIN_ROUNDS)."""
        deadline = time.monotonic() + FAULT_PHASE_LIMIT_S
        rounds = 0
        while rounds < MIN_ROUNDS or self.faults.missing():
            if time.monotonic() > deadline:
                raise await self.fail(
                    f"after {rounds} rounds of faults in {FAULT_PHASE_LIMIT_S}s, still missing: "
                    f"{', '.join(self.faults.missing())}"
                )
            slot = list(SLOTS)[rounds % len(SLOTS)]
            await self.kill_worker(slot)
            await self.terminate_backends()
            for locked_slot in SLOTS:
                await self.hold_locks(locked_slot)
            await self.hold_snapshot()
            await self.restart_postgres(immediate=rounds % 2 == 1)
            await self.read_timeouts()
            rounds += 1

    async def wait_all_final(self) -> None:
        tasks = list(self.tasks)
        deadline = time.monotonic() + DRAIN_LIMIT_S
        while True:
            unfinished = await self.db.call(
                lambda c: c.fetchval(
                    "SELECT count(*) FROM tasker.tasks WHERE task_uuid = ANY($1::uuid[]) "
                    "AND state <> ALL($2::text[])",
                    tasks,
                    list(FINAL_TASK_STATES),
                )
            )
            if unfinished == 0:
                return
            if time.monotonic() > deadline:
                raise await self.fail(
                    f"{unfinished} of {len(tasks)} tasks not final {DRAIN_LIMIT_S}s after the "
                    "faults stopped"
                )
            await asyncio.sleep(0.2)


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def test_faults_together_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    missing = binaries_missing_reason()
    if missing is not None:
        pytest.skip(
            "the chaos test restarts PostgreSQL, so it starts a cluster of its own and needs "
            f"the PostgreSQL server binaries: {missing}"
        )
    cluster = PrivateCluster()
    chaos: Chaos | None = None
    producer: asyncio.Task[None] | None = None
    try:
        dsn = await cluster.start()
        chaos = Chaos(cluster, dsn, tmp_path)
        conn = await chaos.db.connection()
        for template in templates("chaos"):
            await conn.register_template(template.to_json())
        for slot in SLOTS:
            chaos.start_worker(slot)

        stop_producing = asyncio.Event()
        producer = asyncio.create_task(chaos.produce(stop_producing))
        await chaos.run_faults()
        stop_producing.set()
        await producer
        await chaos.wait_all_final()
        for worker in chaos.workers.values():
            worker.proc.send_signal(signal.SIGTERM)
        for worker in chaos.workers.values():
            code = await worker.wait_exit()
            assert code == 0, f"worker {worker.worker_id} exited with {code}:\n{worker.log()}"
        await chaos.read_timeouts()
        await check_outcome(chaos)
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
            with contextlib.suppress(BaseException):
                await producer
        if chaos is not None:
            chaos.kill_everything()
            await chaos.db.close()
            await chaos.producer_db.close()
        cluster.destroy()


async def check_outcome(chaos: Chaos) -> None:
    """Every task complete, every step's success committed once and consistent, no message
    left, no invariant broken, and every fault kind taken effect."""
    faults = chaos.faults
    tasks = list(chaos.tasks)
    conn = await chaos.db.connection()
    runs = read_runs(chaos.run_log)
    ended = {r["run_id"]: r for r in runs if r["event"] == "end"}
    started = [r for r in runs if r["event"] == "start"]
    runs_per_step = Counter((r["task"], r["step"]) for r in started)
    report = (
        f"chaos: {len(tasks)} tasks, {4 * len(tasks)} steps; handler runs {len(started)} "
        f"started, {len(ended)} finished, {sum(1 for n in runs_per_step.values() if n > 1)} "
        f"steps ran more than once\nfaults: {faults.summary()}"
    )
    print(report)
    # (the limit is 4 per customer: tests/support/workflows/chaos.yaml)

    steps = await conn.fetch(
        """
        SELECT s.task_uuid, s.step_uuid, s.name, s.state, s.attempts, s.results, s.last_error,
               t.state AS task_state,
               (SELECT count(*) FROM tasker.step_transitions x
                 WHERE x.step_uuid = s.step_uuid AND x.to_state = 'complete') AS completions,
               (SELECT count(*) FROM tasker.step_transitions x
                 WHERE x.step_uuid = s.step_uuid AND x.event = 'succeeded') AS successes,
               (SELECT string_agg(x.event || coalesce(' (' || x.error_summary || ')', ''), ', '
                                  ORDER BY x.transition_id)
                  FROM tasker.step_transitions x WHERE x.step_uuid = s.step_uuid) AS history
          FROM tasker.steps s JOIN tasker.tasks t USING (task_uuid)
         WHERE s.task_uuid = ANY($1::uuid[])
        """,
        tasks,
    )
    problems: dict[str, list[str]] = {}
    with_steps = Counter(r["task_uuid"] for r in steps)
    problems["created tasks without their 4 steps"] = [
        f"task {t} (n={n}): {with_steps[t]} steps"
        for t, n in chaos.tasks.items()
        if with_steps[t] != 4
    ]

    # 1. Every task complete.
    problems["steps not complete"] = [
        f"task {r['task_uuid']} ({r['task_state']}) step {r['name']}: {r['state']}, "
        f"last_error {json.dumps(r['last_error'])[:400]}; history: {r['history']}"
        for r in steps
        if r["state"] != "complete"
    ]

    # 2. Every step's success committed exactly once, whatever the number of handler runs.
    problems["steps not committed exactly once"] = [
        f"task {r['task_uuid']} step {r['name']}: {r['completions']} completions, "
        f"{r['successes']} successes; history: {r['history']}"
        for r in steps
        if (r["completions"], r["successes"]) != (1, 1)
        and (r["state"] == "complete" or r["completions"] or r["successes"])
    ]

    # 3. The committed results: right values, from a run that happened, consuming the parents'
    #    committed results.
    by_task: dict[uuid.UUID, dict[str, Any]] = {}
    for r in steps:
        if r["state"] == "complete":
            by_task.setdefault(r["task_uuid"], {})[r["name"]] = r["results"]
    wrong = problems["inconsistent results"] = []
    for task, results in by_task.items():
        expected = expected_values(chaos.tasks[task])
        for name, result in results.items():
            run = ended.get(result["run_id"])
            if result["value"] != expected[name]:
                wrong.append(f"{task} {name}: value {result['value']}, expected {expected[name]}")
            if run is None or (run["task"], run["step"]) != (str(task), name):
                wrong.append(f"{task} {name}: committed run {result['run_id']} not in the run log")
        for name, parents in PARENTS.items():
            if name in results and all(p in results for p in parents):
                committed = {p: results[p]["run_id"] for p in parents}
                if results[name]["parents"] != committed:
                    wrong.append(
                        f"{task} {name} consumed {results[name]['parents']}, committed {committed}"
                    )

    # 3b. Flow control held under the faults: never more than 4 steps of a customer in
    #     progress, from the audit (a lost lease ends an attempt there).
    most = await most_in_progress_per_key(conn, tasks)
    print(f"most steps of a customer in progress at once: {dict(sorted(most.items()))}")
    problems["concurrency limit exceeded"] = [
        f"{k}: {n} in progress" for k, n in most.items() if n > 4
    ]

    # 4. No message left, 5. no invariant broken.
    messages = await conn.fetch(
        "SELECT msg_id, message FROM tasker.queue_messages WHERE queue = $1", NAMESPACE
    )
    problems["messages left"] = [str(dict(m)) for m in messages]
    violations = await conn.fetch("SELECT * FROM tasker.check_invariants()")
    problems["check_invariants()"] = [str(dict(v)) for v in violations]

    found = {what: lines for what, lines in problems.items() if lines}
    assert not found, (
        "\n".join(
            f"{what} ({len(lines)}):\n  " + "\n  ".join(lines[:8]) for what, lines in found.items()
        )
        + f"\n{report}"
    )

    # 6. The faults happened (run_faults repeats until they have; checked here once more).
    assert faults.kills >= 1
    assert faults.terminated >= 1
    assert faults.restarts_in_flight >= 1
    assert faults.timeouts_of("lock") >= 1
    assert faults.timeouts_of("statement") >= 1
    assert faults.timeouts_in("complete_and_claim") >= 1
    assert faults.snapshot_holds >= 1
