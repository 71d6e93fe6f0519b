"""Databases seeded once per session and cloned for each test that reads them.

Seeding 100,000 rows takes seconds; cloning the seeded database (CREATE DATABASE ... TEMPLATE,
a file copy) a fraction of that. A session fixture seeds a database with `seed_template` the
first time a test asks for it; each test then gets its own clone from `clone_connection`, so a
test may change the data (claim, complete, drop an index) without another test seeing it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

from tasker_pg import db
from tests.support.pgserver import TestServer, with_database

Seed = Callable[[db.Connection], Awaitable[None]]


async def seed_template(server: TestServer, label: str, seed: Seed) -> str:
    """A new database cloned from the migrated template and filled by `seed`; returns its
    name. No session stays connected to it (a database being cloned must have none)."""
    name = f"tasker_seed_{label}_{os.getpid()}"
    await server.drop(name)
    await server.clone(name)
    conn = await db.connect(with_database(server.admin_dsn, name))
    try:
        await seed(conn)
    finally:
        await conn.close()
    return name


@contextlib.asynccontextmanager
async def clone_connection(server: TestServer, template: str) -> AsyncIterator[db.Connection]:
    """A connection to a fresh clone of the seeded database `template`, dropped afterwards."""
    name = server.new_name()
    await server.clone(name, template=template)
    url = with_database(server.admin_dsn, name)
    try:
        conn = await db.connect(url)
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        await server.drop_database(url)
