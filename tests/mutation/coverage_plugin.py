"""A pytest plugin recording which tasker functions each test's database called.

Load it with `-p tests.mutation.coverage_plugin` and set `TASKER_MUTATION_COVERAGE` to the JSON
file to write: {"tests": {nodeid: {"functions": [...], "named": [...], "duration": s,
"outcome": ...}}}. Without the variable it does nothing, so loading it never changes the
suite's behaviour.

How: after the session's server has migrated its template, the plugin turns on
`track_functions = 'all'` for the whole (test) server and waits until new sessions see it.
Every database a test gets goes back through `TestServer.drop_database`; the plugin wraps it
so that, before the database is given back to be dropped, it waits for the test's other
sessions on it to end (a session's function counts reach the shared statistics when it ends)
and reads `pg_stat_user_functions` there. SQL functions that the planner inlines are not
counted; `sql_mutants` falls back to the functions that call them.

A call that raises is not counted (the error leaves the function before its end-of-call
accounting), so a test that only checks a refusal would be missing from the map. The plugin
therefore also records, per test, every `tasker.<name>` named by the statements its sessions
sent ("named"; statements that define functions or views, a migrate's, are left out): it
wraps the query methods of asyncpg's Connection (a pool's connections go through them too),
which see every statement the test process sends, whatever became of it. `sql_mutants`
selects the tests that called a function or named it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support import pgserver

ENV = "TASKER_MUTATION_COVERAGE"

_current: str | None = None
_results: dict[str, dict[str, Any]] = {}
_named: dict[str, set[str]] = {}
_NAME = re.compile(r"\btasker\.(\w+)")
# a statement that defines objects (a migrate applying a file) names them without calling them
_DEFINES = re.compile(r"(?i)\bCREATE\s+(OR\s+REPLACE\s+)?(FUNCTION|VIEW|PROCEDURE)\b|\bDO\s+\$")
# the asyncpg Connection methods that send a statement (its text is the first argument)
_QUERY_METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor")


def _note(query: object) -> None:
    if _current is not None and isinstance(query, str) and not _DEFINES.search(query):
        _named.setdefault(_current, set()).update("tasker." + n for n in _NAME.findall(query))


def _recording(original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _note(args[0] if args else kwargs.get("query", kwargs.get("command")))
        return original(self, *args, **kwargs)

    return wrapper


def _record_statements() -> None:
    for name in _QUERY_METHODS:
        cls = asyncpg.connection.Connection
        setattr(cls, name, _recording(getattr(cls, name)))


async def _enable_tracking(server: pgserver.TestServer) -> None:
    admin = await asyncpg.connect(server.admin_dsn)
    try:
        await admin.execute("ALTER SYSTEM SET track_functions = 'all'")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    deadline = time.monotonic() + 10
    while True:
        probe = await asyncpg.connect(server.admin_dsn)
        try:
            if await probe.fetchval("SHOW track_functions") == "all":
                return
        finally:
            await probe.close()
        if time.monotonic() > deadline:
            raise RuntimeError("track_functions = 'all' did not take effect")
        await asyncio.sleep(0.1)


async def _functions_called(dsn: str) -> list[str]:
    name = urllib.parse.urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(dsn)
    try:
        # the test's sessions flush their function counts when they end: wait for them
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            others = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            if others == 0:
                break
            await asyncio.sleep(0.05)
        rows = await conn.fetch(
            "SELECT schemaname || '.' || funcname AS f FROM pg_stat_user_functions"
            " WHERE schemaname = 'tasker' AND calls > 0"
        )
    finally:
        await conn.close()
    return sorted({r["f"] for r in rows})


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get(ENV):
        return
    original_setup: Callable[[pgserver.TestServer], Awaitable[None]] = (
        pgserver.TestServer.setup_template
    )
    original_drop: Callable[[pgserver.TestServer, str], Awaitable[None]] = (
        pgserver.TestServer.drop_database
    )

    async def setup_template(self: pgserver.TestServer) -> None:
        await original_setup(self)
        await _enable_tracking(self)

    async def drop_database(self: pgserver.TestServer, dsn: str) -> None:
        try:
            if _current is not None:
                entry = _results.setdefault(_current, {"functions": []})
                called = await _functions_called(dsn)
                entry["functions"] = sorted(set(entry["functions"]) | set(called))
        finally:
            await original_drop(self, dsn)

    pgserver.TestServer.setup_template = setup_template  # type: ignore[method-assign]
    pgserver.TestServer.drop_database = drop_database  # type: ignore[method-assign]
    _record_statements()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    global _current
    _current = item.nodeid
    _results.setdefault(item.nodeid, {"functions": []})
    started = time.monotonic()
    try:
        yield
    finally:
        _results[item.nodeid]["duration"] = round(time.monotonic() - started, 3)
        _current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"functions": []})
    entry.setdefault("outcome", "passed")
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    for nodeid, names in _named.items():
        _results.setdefault(nodeid, {"functions": []})["named"] = sorted(names)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"tests": _results}, indent=1, sort_keys=True))
