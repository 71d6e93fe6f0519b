"""Fixtures of the worker tests: a session on the test's database that checks the engine's
invariants when the test ends (every worker test runs work)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tasker_pg import db
from tests.support.worker import assert_invariants


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[db.Connection]:
    connection = await db.connect(dsn)
    try:
        yield connection
    finally:
        await assert_invariants(connection)
        await connection.close()
