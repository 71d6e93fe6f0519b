"""Fixtures of the SQL tests: extra sessions on the test's database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tasker_pg import db

Opener = Callable[[int], Awaitable[list[db.Connection]]]


@pytest.fixture
async def sessions(dsn: str) -> AsyncIterator[Opener]:
    """Opens separate connections (other sessions, one per simulated worker); all closed after
    the test."""
    opened: list[db.Connection] = []

    async def open_(count: int) -> list[db.Connection]:
        new = [await db.connect(dsn) for _ in range(count)]
        opened.extend(new)
        return new

    yield open_
    for c in opened:
        await c.close()
