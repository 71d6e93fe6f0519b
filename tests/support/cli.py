"""The command line run in this process: a CLI `main` called as its console script would call
it, with its own environment, working directory, stdin, stdout and stderr.

Starting a Python interpreter per command cost about half a second each; the tests call the
entry points in-process instead, and one test per command group runs the installed `tasker-pg`
console script as a real process (`console_script`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from tasker_pg.worker import steplog

REPO = Path(__file__).resolve().parents[2]

# main() changes process-wide state (os.environ, the working directory, sys.std*, logger
# levels): one call at a time.
_LOCK = threading.Lock()
_LOGGERS = ("", "tasker_pg", steplog.STEP_LOGGER)


class _Output(io.StringIO):
    """What a process's stdout or stderr pipe collects: text in UTF-8 (the CLI draws its box
    characters when the stream's encoding has them), not a terminal."""

    @property
    def encoding(self) -> str:
        return "utf-8"


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _logger_levels() -> Iterator[None]:
    """The levels main() sets on the root and package loggers, put back afterwards."""
    saved = {name: logging.getLogger(name).level for name in _LOGGERS}
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _exit_code(exc: SystemExit, stderr: io.StringIO) -> int:
    """The process exit status `raise SystemExit(code)` would give (as sys.exit does)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=stderr)
    return 1


def run_main(
    main: Callable[[Sequence[str]], int],
    args: Sequence[str],
    *,
    env: Mapping[str, str | None],
    stdin: str | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """`main(args)` with `env` applied to os.environ (None removes a variable), `cwd` as the
    working directory and `stdin` as standard input, in a thread of its own (so its
    asyncio.run works inside a test's running event loop): its exit code and what it wrote
    to stdout and stderr. An exception main() lets escape is raised here (a real process
    would print a traceback and exit 1; a test should see it)."""
    out, err = _Output(), _Output()
    outcome: dict[str, int | BaseException] = {}

    def call() -> None:
        with (
            _LOCK,
            _environment(env),
            contextlib.chdir(cwd),
            _logger_levels(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            saved_stdin = sys.stdin
            sys.stdin = io.StringIO(stdin or "")
            try:
                outcome["code"] = main(list(args))
            except SystemExit as exc:
                outcome["code"] = _exit_code(exc, err)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                sys.stdin = saved_stdin

    thread = threading.Thread(target=call, name="cli-main")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    code = outcome["code"]
    assert isinstance(code, int)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def console_script() -> str:
    """The installed `tasker-pg` console script (next to this interpreter)."""
    path = Path(sys.executable).parent / "tasker-pg"
    assert path.exists(), f"no console script at {path}: is the package installed (make setup)?"
    return str(path)
