"""Fetching the dependency results a partial claim row left out (`tasker.dependency_results`).

A convergence step after a large batch fan-out gets only part of its workers' results in its
claim row (`dependency_results_partial`); its `StepContext` fetches the rest through the
`DependencyFetcher` here, on the worker's event loop. It uses a small connection pool of its
own, opened on first use: the claim session is never held up by a handler reading results
(a sync handler blocks its own thread while the fetch runs on the loop, not the loop itself).

A lost connection or a busy database is retried a few times with backoff; a refusal (the step
is gone, a bad argument) is raised to the handler at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tasker_pg import db
from tasker_pg.errors import DatabaseNotFoundError, TransientDatabaseError
from tasker_pg.worker.session import retry_delay
from tasker_pg.worker.state import Shared

logger = logging.getLogger(__name__)

FETCH_POOL_SIZE = 4
"""Most connections the fetch pool opens (never more than the worker's concurrency)."""
FETCH_TIMEOUT = 60.0
"""Seconds one page may take before the fetch counts as failed (and is tried again)."""
FETCH_TRIES = 6
"""Tries per page: a lost connection or busy database is retried with backoff in between."""


class DependencyFetcher:
    """Pages through `tasker.dependency_results` for the worker's step contexts."""

    def __init__(self, shared: Shared, loop: asyncio.AbstractEventLoop) -> None:
        self._shared = shared
        self._loop = loop
        self._pool: db.Pool | None = None
        self._opening = asyncio.Lock()
        self.pages = 0
        """Pages fetched since the worker started."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop: every fetch runs there."""
        return self._loop

    async def fetch_page(
        self, step_uuid: str, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        """One page of the step's finished ancestors' results, in name order."""
        failures = 0
        while True:
            try:
                pool = await self._pool_open()
                async with pool.acquire() as conn:
                    page = await conn.dependency_results(
                        step_uuid, prefix, after, limit, timeout=FETCH_TIMEOUT
                    )
                self.pages += 1
                return page
            except (TransientDatabaseError, DatabaseNotFoundError, TimeoutError) as exc:
                failures += 1
                if failures >= FETCH_TRIES or self._shared.closed.is_set():
                    raise
                delay = retry_delay(failures)
                logger.warning(
                    "worker %s: fetching dependency results of step %s failed (%s); "
                    "trying again in %.1fs",
                    self._shared.worker_id,
                    step_uuid,
                    exc,
                    delay,
                    extra={"step_uuid": step_uuid},
                )
                await asyncio.sleep(delay)

    async def _pool_open(self) -> db.Pool:
        async with self._opening:
            if self._pool is None:
                config = self._shared.config
                self._pool = await db.create_pool(
                    config.dsn,
                    min_size=0,
                    max_size=min(FETCH_POOL_SIZE, config.concurrency),
                    check_schema=False,  # the claim session checked it at start
                    server_settings={
                        **dict(config.server_settings),
                        "application_name": config.application_name("fetch"),
                    },
                )
            return self._pool

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool, if it was ever opened; a fetch still running after `timeout` seconds
        (an abandoned handler's) has its connection terminated."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except TimeoutError:
            pool.terminate()
