"""Shared fixtures: one PostgreSQL per session, a fresh migrated database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import settings

from tasker_pg import db
from tests.support.pgserver import TestServer, start_server

# Property tests: `ci` (what .ci/run uses) is derandomized, keeps no example database and
# prints a blob to reproduce a failure; `dev` explores new examples on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    server = start_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def dsn(pg_server: TestServer) -> AsyncIterator[str]:
    """DSN of a fresh database cloned from the migrated template, dropped afterwards."""
    url = await pg_server.create_database()
    try:
        yield url
    finally:
        await pg_server.drop_database(url)


@pytest.fixture
async def empty_dsn(pg_server: TestServer) -> AsyncIterator[str]:
    """DSN of a fresh database with no tasker schema at all (for migration tests)."""
    url = await pg_server.create_database(from_template=False)
    try:
        yield url
    finally:
        await pg_server.drop_database(url)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[db.Connection]:
    connection = await db.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()
