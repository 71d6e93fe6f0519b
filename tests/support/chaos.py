"""What the chaos test (tests/worker/test_chaos.py) drives: a PostgreSQL cluster of its own that
it may restart, a database session that outlives those restarts, worker processes it may
SIGKILL, and the server log where the timeouts it injects show up.

The session's shared server (tests/support/pgserver.py) cannot be restarted under the other
tests, so the chaos test starts an embedded cluster of its own (fsync off) in a temporary
directory. Its server log prefixes each line with the session's application_name, so a
timeout can be attributed to a worker and to the statement it cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from tasker_pg import db, migrations
from tasker_pg.embedded import EmbeddedCluster, find_binaries
from tasker_pg.errors import ConnectionLostError, DatabaseNotFoundError, EmbeddedDatabaseError

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]

# %a: application_name ("tasker-pg worker <id> <role>" for a worker's sessions).
LOG_LINE_PREFIX = "%m [%p] app=%a: "
# The errors PostgreSQL raises when a lock_timeout / statement_timeout fires.
TIMEOUT_ERRORS = {
    "lock": "canceling statement due to lock timeout",
    "statement": "canceling statement due to statement timeout",
}
_ERROR_LINE = re.compile(r"\[(\d+)\] app=(.*?): ERROR:\s+(.*)$")
_STATEMENT_LINE = re.compile(r"\[(\d+)\] app=.*?: STATEMENT:\s+(.*)$")
_ENGINE_CALL = re.compile(r"tasker\.(\w+)\(")


def binaries_missing_reason() -> str | None:
    """None when PostgreSQL server binaries are available, else why not (for a skip)."""
    try:
        find_binaries()
    except EmbeddedDatabaseError as exc:
        return str(exc)
    return None


class PrivateCluster:
    """An embedded PostgreSQL cluster owned by one test: started, restarted, destroyed."""

    def __init__(self) -> None:
        home = Path(tempfile.mkdtemp(prefix="tasker-pg-chaos-"))
        # The server runs as the postgres OS user when we are root: let it reach its home.
        home.chmod(0o755)
        self.cluster = EmbeddedCluster(home, durable=False)
        self.dsn = ""

    async def start(self) -> str:
        """Start the cluster, migrate its database, name sessions in the log; returns the DSN."""
        self.dsn = await asyncio.to_thread(self.cluster.start)
        conn = await db.connect(self.dsn, check_schema=False)
        try:
            await migrations.migrate(conn)
            await conn.execute(f"ALTER SYSTEM SET log_line_prefix = '{LOG_LINE_PREFIX}'")
            # An immediate shutdown is a server crash: with the throwaway cluster's
            # synchronous_commit=off it would lose commits already acknowledged (a created
            # task, a delivered outcome), which no engine can survive. fsync=off stays: the
            # operating system does not crash, so what was written to it survives.
            await conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        return self.dsn

    async def restart(self, *, immediate: bool) -> None:
        """Stop the server (fast shutdown, or immediate: SIGQUIT, a crash without a
        checkpoint) and start it again on the same port."""
        if immediate:
            pid = self.cluster.status().pid
            assert pid is not None, "the chaos cluster is not running"
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 30
            while self.cluster.status().running:
                assert time.monotonic() < deadline, "the chaos cluster did not stop on SIGQUIT"
                await asyncio.sleep(0.05)
        else:
            await asyncio.to_thread(self.cluster.stop)
        dsn = await asyncio.to_thread(self.cluster.start)
        assert dsn == self.dsn, f"the restarted cluster moved: {dsn} (was {self.dsn})"

    def server_log(self, start: int = 0) -> str:
        """The server log from byte offset `start` on."""
        try:
            with open(self.cluster.log_file, "rb") as log:
                log.seek(start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def server_log_size(self) -> int:
        try:
            return self.cluster.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.cluster.destroy()


def timeouts_in_log(log: str, app_prefix: str = "tasker-pg worker ") -> Counter[tuple[str, str]]:
    """Timeouts that fired in sessions whose application_name starts with `app_prefix`:
    (kind, engine function of the cancelled statement) -> count; kind is "lock" or "statement"."""
    found: Counter[tuple[str, str]] = Counter()
    pending: dict[str, str] = {}  # backend pid -> kind of its last timeout error
    for line in log.splitlines():
        error = _ERROR_LINE.search(line)
        if error is not None:
            pid, app, message = error.groups()
            pending.pop(pid, None)
            if app.startswith(app_prefix):
                for kind, text in TIMEOUT_ERRORS.items():
                    if text in message:
                        pending[pid] = kind
            continue
        statement = _STATEMENT_LINE.search(line)
        if statement is not None and statement.group(1) in pending:
            kind = pending.pop(statement.group(1))
            call = _ENGINE_CALL.search(statement.group(2))
            found[(kind, call.group(1) if call else "other")] += 1
    for kind in pending.values():  # an error logged without its statement
        found[(kind, "other")] += 1
    return found


class Db:
    """A session on the chaos database that reconnects after the server restarts.

    `call(fn)` runs `fn(conn)`; when the connection is lost (or cannot be opened while the
    server restarts) it reconnects and runs `fn` again, until `timeout` passes. Only for
    idempotent work.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: db.Connection | None = None

    async def connection(self) -> db.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await db.connect(self.dsn)
        return self.conn

    async def call(
        self, fn: Callable[[db.Connection], Awaitable[T]], *, timeout: float = 60.0
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await fn(await self.connection())
            except (ConnectionLostError, DatabaseNotFoundError, OSError):
                await self.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()


class WorkerProcess:
    """One `python -m tasker_pg.worker_cli` process with its output in a log file."""

    def __init__(self, dsn: str, log_dir: Path, worker_id: str, *args: str) -> None:
        self.worker_id = worker_id
        self.log_path = log_dir / f"{worker_id}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGOPTIONS")}
        env["TASKER_DATABASE_URL"] = dsn
        command = [sys.executable, "-m", "tasker_pg.worker_cli", "--worker-id", worker_id, *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def wait_exit(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.worker_id} did not exit:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
