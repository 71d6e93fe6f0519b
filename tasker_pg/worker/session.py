"""The worker's database sessions: each reconnects on its own with capped exponential backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from tasker_pg import db
from tasker_pg.errors import ConnectionLostError, TaskerError
from tasker_pg.worker.state import Shared

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Reconnect backoff: first retry after 0.1 s, doubling, never more than 5 s apart.
RECONNECT_INITIAL_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0


class Session:
    """One logical database session that reconnects itself with capped exponential backoff.

    Calls are serialised by `lock` (one asyncpg connection runs one query at a time). A call that
    loses the connection drops it and raises `ConnectionLostError`; the next call reconnects,
    waiting 0.1 s, 0.2 s, ... up to 5 s between attempts, until the worker is closed.
    """

    def __init__(
        self,
        shared: Shared,
        role: str,
        on_connect: Callable[[db.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self._shared = shared
        self.role = role
        self.on_connect = on_connect
        self.conn: db.Connection | None = None
        self.lock = asyncio.Lock()
        self.ever_connected = False

    async def connect_once(self, *, check_schema: bool = False) -> db.Connection:
        """Open the connection (one attempt), name it, run the on-connect hook."""
        config = self._shared.config
        conn = await db.connect(
            config.dsn, check_schema=check_schema, server_settings=dict(config.server_settings)
        )
        try:
            await conn.execute(
                "SELECT set_config('application_name', $1, false)",
                config.application_name(self.role),
            )
            if self.on_connect is not None:
                await self.on_connect(conn)
        except BaseException:
            conn.terminate()
            raise
        if self.ever_connected:
            self._shared.bump("reconnects")
            self._shared.instruments.reconnect(self.role)
        logger.info(
            "worker %s: %s session %s (backend pid %d)",
            config.worker_id,
            self.role,
            "reconnected" if self.ever_connected else "connected",
            conn.backend_pid,
        )
        self.ever_connected = True
        self.conn = conn
        return conn

    async def ensure(self) -> db.Connection:
        """The live connection, reconnecting with backoff; raises once the worker is closed."""
        if self.conn is not None and not self.conn.is_closed():
            return self.conn
        self.drop()
        closed = self._shared.closed
        delay = RECONNECT_INITIAL_DELAY
        while True:
            if closed.is_set():
                raise ConnectionLostError(f"worker closed; {self.role} session not reopened")
            try:
                return await self.connect_once()
            except TaskerError as exc:  # connection refused, server starting up, ...
                logger.warning(
                    "worker %s: cannot reconnect the %s session (%s); retrying in %.1fs",
                    self._shared.worker_id,
                    self.role,
                    exc,
                    delay,
                )
            await wait_event(closed, delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def call(self, fn: Callable[[db.Connection], Awaitable[T]]) -> T:
        """Run `fn(conn)` on this session; a lost connection is dropped and re-raised."""
        async with self.lock:
            conn = await self.ensure()
            try:
                return await fn(conn)
            except ConnectionLostError:
                self.drop()
                raise
            # Any other TaskerError: PostgreSQL answered with an error, the session is fine.
            # (tasker_pg.db translates every driver-level failure, asyncpg's protocol-state
            # errors on a terminated backend included, into ConnectionLostError.)

    def drop(self) -> None:
        """Forget the connection (closing it without waiting)."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                conn.terminate()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` consecutive failures: 0, then 0.1 s doubling up to 5 s."""
    if failures <= 0:
        return 0.0
    return min(RECONNECT_INITIAL_DELAY * 2.0 ** (failures - 1), RECONNECT_MAX_DELAY)


def retry_delay(failures: int, *, at_once_first: bool = False) -> float:
    """`backoff(failures)` jittered down by up to half, so that workers held up by one lock or
    one outage do not retry in step; `at_once_first`: no wait after the first failure."""
    return backoff(failures - 1 if at_once_first else failures) * random.uniform(0.5, 1.0)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds; whether it is set."""
    if event.is_set():
        return True
    if timeout is not None and timeout <= 0:
        return False
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def wait_any(events: Iterable[asyncio.Event], timeout: float) -> None:
    """Wait until any of `events` is set, at most `timeout` seconds."""
    waiters = {asyncio.ensure_future(e.wait()) for e in events}
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def wait_task(task: asyncio.Task[None], timeout: float) -> bool:
    """Wait for `task` at most `timeout` seconds without cancelling it; whether it is done."""
    if not task.done():
        await asyncio.wait({task}, timeout=max(timeout, 0))
    return task.done()
