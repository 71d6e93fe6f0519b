"""The benchmark's worker processes: `python -m tasker_pg.worker_cli` serving the bench namespace.

Each runs in a process of its own, as a deployed worker would, with the handlers of
`tasker_pg.bench.handlers`; its log goes to a file the benchmark reads for readiness (the
`started` line), failures (the tail) and the worker's own closing stats line.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from tasker_pg.bench import handlers
from tasker_pg.bench.options import WORKER_START_TIMEOUT, WORKER_STOP_TIMEOUT, BenchError


class WorkerProcess:
    """One `python -m tasker_pg.worker_cli` process serving the bench namespace."""

    def __init__(self, worker_id: str, dsn: str, concurrency: int, log_path: Path) -> None:
        self.worker_id = worker_id
        self.dsn = dsn
        self.concurrency = concurrency
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        """The worker's command line (this interpreter, so the same environment)."""
        return [
            sys.executable,
            "-m",
            "tasker_pg.worker_cli",
            "--namespace",
            handlers.NAMESPACE,
            "--handlers",
            handlers.__name__,
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
            # the engine is measured, not the worker's log output
            "--log-steps",
            "failures",
        ]

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
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
            await asyncio.sleep(0.05)  # polling the log file, with a deadline

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
