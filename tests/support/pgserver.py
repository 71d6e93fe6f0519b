"""The PostgreSQL server a test session runs against, and cheap per-test databases on it.

One server per session: `TASKER_TEST_DSN` when set; else a testcontainers PostgreSQL when a
Docker engine answers; else an embedded cluster in a temporary directory (fsync off). A
template database is migrated once; each test gets a fresh database cloned from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
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

    async def create_database(self, *, from_template: bool = True) -> str:
        """A new database (migrated when `from_template`); returns its DSN."""
        name = f"tasker_test_{os.getpid()}_{next(self._counter)}"
        admin = await self._admin()
        try:
            if from_template:
                strategy = " STRATEGY FILE_COPY" if self.version_num >= 150000 else ""
                await admin.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"{strategy}'
                )
            else:
                await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return with_database(self.admin_dsn, name)

    async def drop_database(self, dsn: str) -> None:
        name = urllib.parse.urlsplit(dsn).path.lstrip("/")
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


def start_server() -> TestServer:
    """Start (or find) the session's server and migrate its template database."""
    explicit = os.environ.get("TASKER_TEST_DSN")
    if explicit:
        server = TestServer(admin_dsn=explicit, kind="TASKER_TEST_DSN")
    elif docker_unavailable_reason() is None and not os.environ.get("TASKER_TEST_NO_DOCKER"):
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
    return server
