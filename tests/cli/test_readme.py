"""A newcomer's walk through README.md: every block, in order, on one fresh database.

The fenced blocks are read from the README itself, so the walk follows it when it changes.
Each block is handled by its language, as a reader would use it:

- `bash`: run through `bash -e -o pipefail` in a working directory of the walk's own (with
  `.venv`, `examples`, `Makefile` and `pyproject.toml` of this checkout linked into it, so
  `./.tasker-pg` and the files the README has the reader write land there), with `.venv/bin`
  on PATH and the test database in TASKER_DATABASE_URL. A block that starts a foreground
  worker (`tasker-pg worker ...`) or the dashboard (`tasker-pg dashboard`) runs in the
  background until the end of the walk, when it is stopped with SIGINT and must exit 0.
- `sql`: run through psql (ON_ERROR_STOP), or through asyncpg when psql is not installed.
- `python` / `yaml` with `file=PATH` in the fence: written to PATH, as the README asks.
- `python`: run in one namespace shared by the README's snippets (a REPL session); the
  `test_*` functions a block defines are called. A block that runs a worker forever runs in a
  background process instead, stopped like the CLI worker.
- `text` or no language: drawings, output and synopses; nothing to run.

Any other block fails the walk, so a new kind of block cannot be skipped silently. The few
blocks that cannot run as written are in SKIPPED, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
# What the walk's working directory borrows from the checkout.
LINKED = (".venv", "examples", "Makefile", "pyproject.toml")
WORKER_READY = "started"  # the worker's INFO line once it claims; the dashboard's first line
STARTUP_SECONDS = 60.0
STOP_SECONDS = 60.0


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    options: dict[str, str]
    code: str
    line: int
    section: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.section}, ```{self.lang})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with its info string's first word as language and key=value options."""
    blocks: list[Block] = []
    section = "(top)"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            info = line[3:].split()
            lang = info[0] if info else ""
            options = dict(word.split("=", 1) for word in info[1:] if "=" in word)
            start = i + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(lang, options, "\n".join(lines[start:end]) + "\n", i + 1, section))
            i = end
        i += 1
    return blocks


# Blocks that cannot run as written: a substring of the block -> why.
SKIPPED = {
    "cron.schedule": "pg_cron is an extension the test server does not have; the statements it "
    "schedules, tasker.purge_finished(...) and tasker.fire_due_schedules(), run in the blocks "
    "before and after it (tests/sql/test_pg_cron.py runs pg_cron itself where it is installed)",
    "make demo": "`make demo` is run by tests/cli/test_demo.py on its own embedded database, and "
    "`make test` is the suite this walk is part of",
}


def _starts_worker(block: Block) -> bool:
    """A block that runs a foreground server: a worker, or the dashboard (it prints
    `dashboard started on ...`)."""
    if block.lang == "bash":
        return any(
            line.startswith(
                ("tasker-pg worker ", "tasker-pg dashboard", ".venv/bin/tasker-pg dashboard")
            )
            for line in block.code.splitlines()
        )
    return block.lang == "python" and (
        "run_forever()" in block.code or "await worker.run()" in block.code
    )


class Background:
    """A process the walk leaves running (a foreground worker), its output collected."""

    def __init__(self, block: Block, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.block = block
        stdin = subprocess.PIPE if argv[-1] == "-" else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        if stdin == subprocess.PIPE:
            assert self.proc.stdin is not None
            self.proc.stdin.write(block.code)
            self.proc.stdin.close()
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in "".join(self.lines):
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None and not self._reader.is_alive():
                    break
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            seen = "".join(self.lines)
        assert needle in seen, f"{self.block.where}: no {needle!r} in its output:\n{seen}"

    def stop(self) -> int:
        """SIGINT (Ctrl-C), then its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


@dataclass
class Walk:
    """The reader's state: working directory, environment, Python session, running workers."""

    cwd: Path
    env: dict[str, str]
    dsn: str
    namespace: dict[str, object] = field(default_factory=dict)
    background: list[Background] = field(default_factory=list)
    transcript: list[tuple[Block, str]] = field(default_factory=list)
    skipped: list[tuple[Block, str]] = field(default_factory=list)

    def run(self, block: Block) -> None:
        for needle, reason in SKIPPED.items():
            if needle in block.code:
                self.skipped.append((block, reason))
                return
        if block.lang in ("", "text"):
            return
        if "file" in block.options:
            self.write_file(block)
        elif _starts_worker(block):
            self.start_worker(block)
        elif block.lang == "bash":
            self.bash(block)
        elif block.lang == "sql":
            self.sql(block)
        elif block.lang == "python":
            self.python(block)
        else:
            pytest.fail(f"{block.where}: the walk does not know how to run this block")

    def write_file(self, block: Block) -> None:
        path = self.cwd / block.options["file"]
        assert path.resolve().is_relative_to(self.cwd.resolve()), block.where
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)

    def bash(self, block: Block) -> None:
        # `make` targets run in the checkout itself, as the reader runs them: `make setup` may
        # reinstall the package in editable mode, which must point at the checkout, not at the
        # walk's scratch directory.
        cwd = ROOT if block.code.lstrip().startswith("make ") else self.cwd
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.code],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{output}"
        self.transcript.append((block, output))

    def sql(self, block: Block) -> None:
        if shutil.which("psql") is not None:
            proc = subprocess.run(
                ["psql", self.dsn, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-At"],
                input=block.code,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, f"{block.where}:\n{proc.stderr}"
            self.transcript.append((block, proc.stdout))
            return
        if re.search(r"^\\|\\gset|:'?\w+'?", block.code, flags=re.M):
            pytest.skip(f"{block.where} uses psql variables and psql is not installed")

        async def run() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(block.code)
            finally:
                await conn.close()

        asyncio.run(run())
        self.transcript.append((block, ""))

    def python(self, block: Block) -> None:
        before = set(self.namespace)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block.code, f"README.md:{block.line}", "exec"), self.namespace)
            for name in sorted(set(self.namespace) - before):
                value = self.namespace[name]
                if name.startswith("test_") and callable(value):
                    value()
        self.transcript.append((block, buffer.getvalue()))

    def start_worker(self, block: Block) -> None:
        if block.lang == "bash":
            lines = [line for line in block.code.splitlines() if line.strip()]
            assert len(lines) == 1, f"{block.where}: a worker block holds the worker only"
            argv = ["bash", "-c", f"exec {lines[0]}"]
        else:
            argv = [str(VENV_BIN / "python"), "-"]
        worker = Background(block, argv, self.cwd, self.env)
        self.background.append(worker)
        worker.wait_for(WORKER_READY, STARTUP_SECONDS)
        dashboard = re.search(r"dashboard started on (http://\S+/)", worker.output)
        if dashboard is not None:  # the reader opens it: the namespaces page answers
            with urllib.request.urlopen(dashboard.group(1), timeout=STARTUP_SECONDS) as page:
                assert page.status == 200 and "Namespaces" in page.read().decode()

    def stop_workers(self) -> list[tuple[Background, int]]:
        return [(worker, worker.stop()) for worker in self.background]

    def output_of(self, needle: str) -> str:
        """The output of the one block whose code contains `needle`."""
        found = [out for block, out in self.transcript if needle in block.code]
        assert len(found) == 1, (needle, len(found))
        return found[0]


@pytest.fixture
def walk(dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Walk]:
    # As root the embedded server runs as the postgres user, who must reach ./.tasker-pg.
    tmp_path.chmod(0o755)
    work = tmp_path / "reader"
    work.mkdir()
    work.chmod(0o755)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    env = dict(os.environ, TASKER_DATABASE_URL=dsn, NO_COLOR="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for var in ("DATABASE_URL", "TASKER_PG_HOME", "PYTHONPATH"):
        env.pop(var, None)
    monkeypatch.setenv("TASKER_DATABASE_URL", dsn)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(work)
    state = Walk(cwd=work, env=env, dsn=dsn)
    try:
        yield state
    finally:
        for worker in state.background:
            if worker.proc.poll() is None:
                with contextlib.suppress(Exception):
                    worker.stop()
        subprocess.run(
            [str(VENV_BIN / "tasker-pg"), "db", "destroy"],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=60,
        )
        # roles are server-wide: drop the login roles the README's SQL created
        with contextlib.suppress(Exception):
            asyncio.run(_drop_readme_roles(dsn))


async def _drop_readme_roles(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name in re.findall(r"CREATE ROLE (\w+)", README.read_text()):
            await conn.execute(f"DROP ROLE IF EXISTS {name}")
    finally:
        await conn.close()


def test_readme_blocks_are_all_known() -> None:
    """Every block is of a kind the walk runs (checked without a database)."""
    blocks = readme_blocks(README.read_text())
    assert len(blocks) > 10
    known = {"", "text", "bash", "sql", "python", "yaml"}
    assert [b.where for b in blocks if b.lang not in known] == []
    assert [b.where for b in blocks if b.lang == "yaml" and "file" not in b.options] == []


def test_readme_walk(walk: Walk) -> None:
    blocks = readme_blocks(README.read_text())
    for block in blocks:
        walk.run(block)
    stopped = walk.stop_workers()

    for worker, code in stopped:
        assert code == 0, f"{worker.block.where} exited {code} on SIGINT:\n{worker.output}"
    # Only the listed blocks were skipped, each with its reason.
    assert {reason for _, reason in walk.skipped} <= set(SKIPPED.values())

    # What the reader is told to expect, as the README tells it.
    assert "complete 100.0" in walk.output_of("TaskerClient(initiator=")
    declined = walk.output_of('"payment_token": "tok_declined"')
    assert "failed step process_payment" in declined
    assert "Payment declined by the card issuer" in declined
    assert "tasker-pg step resolve" in declined
    assert "resolved_manually" in declined
    assert "complete (all_complete" in declined.splitlines()[-1]
    # the README's workers are running and every task was taken: the probe passes
    assert walk.output_of("tasker-pg health ||").startswith("status: healthy\n")
    health = walk.output_of("health.oldest_ready_age_seconds")
    assert health.startswith("healthy ")
    assert "FAIL" not in health
    greeting = walk.output_of("tasker-pg task create greet greeting")
    assert "complete" in greeting
    assert "destroyed" in walk.output_of("tasker-pg db destroy")
    states = asyncio.run(_task_states(walk.dsn))
    assert states.get("greeting") == {"complete"}
    assert states.get("checkout_from_sql") == {"complete"}
    assert states.get("checkout_workflow") == {"complete"}


async def _task_states(dsn: str) -> dict[str, set[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT name, state FROM tasker.v_tasks")
    finally:
        await conn.close()
    states: dict[str, set[str]] = {}
    for row in rows:
        states.setdefault(row["name"], set()).add(row["state"])
    return states
