"""A worker that polls once a minute still starts work at once: NOTIFY wakes it.

Every other worker test polls every 0.05-0.2 s, so a worker that ignored notifications would
pass them all. Here the poll interval is 60 s and each task must finish within 5 s: first on
NOTIFY alone, then again after the worker's listen session was terminated by the server, which
the worker must notice and replace (re-subscribing) without waiting for its next poll.
"""

from __future__ import annotations

from tasker_pg import Worker, db
from tests.support.worker import poll, registry_of, templates, wait_final
from tests.support.workflows import math_handlers

SLOW_POLL = {"poll_interval": 60.0, "summary_interval": 0}
# Far below the poll interval, and room for a stalled CI machine.
WAKE_DEADLINE = 5.0


async def _listen_pid(conn: db.Connection, worker: Worker) -> int | None:
    pid: int | None = await conn.fetchval(
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()",
        worker.config.application_name("listen"),
    )
    return pid


async def _run_linear(conn: db.Connection, n: int) -> None:
    task = await conn.create_task("math", "linear_workflow", {"even_number": n})
    states = await wait_final(conn, [task], timeout=WAKE_DEADLINE)
    assert states[task] == "complete"


async def test_notify_alone_wakes_a_worker_that_polls_once_a_minute(
    conn: db.Connection, dsn: str
) -> None:
    async with Worker(
        ["math"], registry_of(math_handlers), dsn=dsn, templates=templates("linear"), **SLOW_POLL
    ) as worker:
        first_listener = await poll(
            lambda: _listen_pid(conn, worker), timeout=10, what="the worker's listen session"
        )
        # let the start-up claim (which looks at every queue once) come back empty first
        await poll(
            lambda: conn.fetchval(
                "SELECT count(*) = 0 FROM pg_stat_activity"
                " WHERE application_name LIKE 'tasker-pg worker %' AND state = 'active'"
            ),
            timeout=10,
            what="an idle worker",
        )
        await _run_linear(conn, 6)

        terminated = await conn.fetchval("SELECT pg_terminate_backend($1)", first_listener)
        assert terminated is True

        async def new_listener() -> int | None:
            pid = await _listen_pid(conn, worker)
            return pid if pid not in (None, first_listener) else None

        # the worker notices the lost session itself; the next poll is a minute away
        await poll(new_listener, timeout=WAKE_DEADLINE, what="a new listen session")
        await _run_linear(conn, 8)
        assert worker.stats.reconnects >= 1
