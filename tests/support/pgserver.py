"""The PostgreSQL server a test session runs against, and cheap per-test databases on it.

One server per session: `TASKER_TEST_DSN` when set; else a testcontainers PostgreSQL when
`TASKER_TEST_DOCKER=1` asks for one; else an embedded cluster in a temporary directory (fsync
off; its binaries from `TASKER_PG_BIN`, else the system's). `TASKER_TEST_EXPECT_PG=16` makes
the session fail at once unless the server is PostgreSQL 16 (CI runs the suite once per
version and must know which one it got).

A template database is migrated once; each test gets a fresh database cloned from it. A
background thread clones the next databases while tests run and drops used ones, so a test
waits for neither (a clone costs 0.2-0.8 s, which was half the suite's time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tasker_pg import db, migrations
from tasker_pg.embedded import EmbeddedCluster


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers, else why not (for skip messages)."""
    try:
        import docker
    except ImportError:
        return "the docker Python package is not installed"
    try:
        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as exc:
        return f"no Docker engine reachable ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@dataclass
class TestServer:
    """An admin DSN plus the means to hand out databases cloned from a migrated template."""

    admin_dsn: str
    kind: str
    template: str = ""
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _cleanup: list[Callable[[], object]] = field(default_factory=list)
    version_num: int = 0
    _pool: DatabasePool | None = None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_dsn)

    async def setup_template(self) -> None:
        self.template = f"tasker_tpl_{os.getpid()}"
        admin = await self._admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.template}"')
            await admin.execute(f'CREATE DATABASE "{self.template}"')
            self.version_num = int(await admin.fetchval("SHOW server_version_num"))
        finally:
            await admin.close()
        conn = await db.connect(with_database(self.admin_dsn, self.template), check_schema=False)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()

    def start_pool(self, depth: int = 3) -> None:
        """Clone databases ahead of time from now on (see `DatabasePool`)."""
        self._pool = DatabasePool(self, depth)
        self._cleanup.append(self._pool.close)

    async def create_database(self, *, from_template: bool = True) -> str:
        """A new database (migrated when `from_template`); returns its DSN."""
        if from_template and self._pool is not None:
            return with_database(self.admin_dsn, await asyncio.to_thread(self._pool.take))
        name = self.new_name()
        await self.clone(name, from_template=from_template)
        return with_database(self.admin_dsn, name)

    def new_name(self) -> str:
        return f"tasker_test_{os.getpid()}_{next(self._counter)}"

    async def clone(
        self, name: str, *, from_template: bool = True, template: str | None = None
    ) -> None:
        """CREATE DATABASE `name`, from the migrated template (or the database `template`)
        unless told otherwise."""
        admin = await self._admin()
        try:
            if from_template:
                strategy = " STRATEGY FILE_COPY" if self.version_num >= 150000 else ""
                await admin.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE "{template or self.template}"{strategy}'
                )
            else:
                await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()

    async def drop_database(self, dsn: str) -> None:
        name = urllib.parse.urlsplit(dsn).path.lstrip("/")
        if self._pool is not None:
            self._pool.give_back(name)
            return
        await self.drop(name)

    async def drop(self, name: str) -> None:
        admin = await self._admin()
        try:
            force = " WITH (FORCE)" if self.version_num >= 130000 else ""
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')
        finally:
            await admin.close()

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                fn()


class DatabasePool:
    """A thread that keeps `depth` clones of the template ready and drops used databases.

    Tests take a ready clone (waiting only when the thread has fallen behind) and give
    databases back to be dropped. A failure in the thread is raised by the next `take`.
    """

    def __init__(self, server: TestServer, depth: int) -> None:
        self._server = server
        self._depth = depth
        self._ready: queue.Queue[str] = queue.Queue()
        self._used: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-db-pool", daemon=True)
        self._thread.start()

    def take(self) -> str:
        while True:
            if self._error is not None:
                raise RuntimeError("the test database pool failed") from self._error
            try:
                return self._ready.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the test database pool stopped") from self._error

    def give_back(self, name: str) -> None:
        self._used.put(name)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while not self._stop.is_set():
                behind = self._ready.qsize() < self._depth
                try:
                    # drop what tests gave back first: it frees the server's memory and disk
                    name = self._used.get(timeout=0 if behind else 0.05)
                except queue.Empty:
                    if behind:
                        name = self._server.new_name()
                        loop.run_until_complete(self._server.clone(name))
                        self._ready.put(name)
                    continue
                loop.run_until_complete(self._server.drop(name))
        except BaseException as exc:
            self._error = exc
        finally:
            loop.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        leftovers: list[str] = []
        for q in (self._ready, self._used):
            while not q.empty():
                leftovers.append(q.get_nowait())

        async def drop_all() -> None:
            for name in leftovers:
                await self._server.drop(name)

        asyncio.run(drop_all())


def start_server() -> TestServer:
    """Start (or find) the session's server and migrate its template database."""
    explicit = os.environ.get("TASKER_TEST_DSN")
    if explicit:
        server = TestServer(admin_dsn=explicit, kind="TASKER_TEST_DSN")
    elif os.environ.get("TASKER_TEST_DOCKER") == "1":
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        server = TestServer(admin_dsn=container.get_connection_url(), kind="testcontainers")
        server._cleanup.append(container.stop)
    else:
        home = Path(tempfile.mkdtemp(prefix="tasker-pg-test-"))
        # The server runs as the postgres OS user when we are root: let it reach its home.
        home.chmod(0o755)
        cluster = EmbeddedCluster(home, durable=False)
        dsn = cluster.start()
        server = TestServer(admin_dsn=with_database(dsn, "postgres"), kind=f"embedded ({home})")
        server._cleanup.append(cluster.destroy)
    asyncio.run(server.setup_template())
    expected = os.environ.get("TASKER_TEST_EXPECT_PG")
    if expected and server.version_num // 10000 != int(expected):
        server.close()
        raise RuntimeError(
            f"TASKER_TEST_EXPECT_PG={expected}, but the test server ({server.kind}) is"
            f" PostgreSQL {server.version_num // 10000} (server_version_num {server.version_num})"
        )
    server.start_pool()
    return server
