"""Leases: the heartbeat that keeps running steps claimed, and handing back unstarted claims.

A heartbeat extends, in one `tasker.extend_leases` call, the leases of every held step that
would otherwise expire before the next heartbeat: running steps, and finished ones whose outcome
the database has not acknowledged yet. Two kinds are left to expire: a claim whose handler ran
past its max run time (the worker reported a `timeout` failure for it), and an outcome the
worker gave up on after `outcome_retry_cap` (no longer held). A heartbeat that fails without a
refusal (a lock timeout behind the step's own delivery, a lost connection) is tried again after
a short backoff rather than a whole interval. A lease reported lost is logged; the handler keeps
running (at-least-once) and its outcome will come back stale. At shutdown, claims whose handler
never started go back with `tasker.release_steps` (no attempt spent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from tasker_pg import db
from tasker_pg.errors import ConnectionLostError, TaskerError
from tasker_pg.worker.session import Session, backoff, retry_delay, wait_event
from tasker_pg.worker.state import Claim, Shared

logger = logging.getLogger(__name__)


class Leases:
    """Heartbeats and releases, on the claim session."""

    def __init__(self, shared: Shared, session: Session) -> None:
        self._shared = shared
        self._session = session

    async def heartbeat_loop(self) -> None:
        """Every heartbeat_interval, extend the leases that would lapse before the next one;
        sooner after a heartbeat that failed for a reason that may pass."""
        shared = self._shared
        interval = shared.config.heartbeat_interval
        failures = 0
        while True:
            delay = interval if failures == 0 else min(retry_delay(failures), interval)
            await asyncio.sleep(delay)
            failures = 0 if await self.heartbeat() else failures + 1
            shared.check_stalled()

    async def heartbeat(self) -> bool:
        """One `extend_leases` call for every held claim whose lease ends within two intervals
        (claims past their max run time excepted); False when it should be tried again soon."""
        shared = self._shared
        config = shared.config
        now = time.monotonic()
        horizon = now + 2 * config.heartbeat_interval
        due = [
            c
            for c in shared.held
            if not c.lease_lost and c.lease_deadline < horizon and not shared.is_overdue(c, now)
        ]
        if not due:
            return True
        fences = [c.fence.to_json() for c in due]
        sent_at = time.monotonic()
        try:
            rows = await self._session.call(
                lambda conn: conn.extend_leases(fences, config.lease_seconds)
            )
        except TaskerError as exc:
            if db.is_refusal(exc):
                logger.error(
                    "worker %s: extend_leases refused the heartbeat for %d step(s): %s [%s]",
                    shared.worker_id,
                    len(due),
                    exc,
                    exc.error_code,
                )
                return True
            logger.warning(
                "worker %s: heartbeat for %d step(s) failed (%s [%s]); trying again shortly",
                shared.worker_id,
                len(due),
                exc,
                exc.error_code,
            )
            return False
        extended = {str(r["step_uuid"]): bool(r["extended"]) for r in rows}
        shared.instruments.lease_extensions(sum(extended.values()))
        for claim in due:
            if extended.get(claim.fence.step_uuid, False):
                claim.lease_deadline = sent_at + config.lease_seconds
            elif claim in shared.held:
                claim.lease_lost = True
                shared.bump("leases_lost")
                shared.instruments.step(claim, "lease_lost")
                logger.warning(
                    "worker %s: lost the lease of %s; another worker may run it now, and this "
                    "run's outcome will be stale",
                    shared.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
        return True

    async def release(self, claims: Sequence[Claim], timeout: float) -> None:
        """Hand back claims whose handler never started (no attempt spent)."""
        shared = self._shared
        fences = [c.fence.to_json() for c in claims]
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    rows = await self._session.call(
                        lambda conn: conn.release_steps(fences, worker_id=shared.worker_id)
                    )
            except TimeoutError:
                logger.error(
                    "worker %s: could not release %d unstarted claim(s) in time; they become "
                    "visible when their leases expire",
                    shared.worker_id,
                    len(claims),
                )
                return
            except ConnectionLostError as exc:
                if time.monotonic() >= deadline or shared.closed.is_set():
                    logger.error("worker %s: releasing claims failed: %s", shared.worker_id, exc)
                    return
                failures += 1
                await wait_event(shared.closed, backoff(failures - 1))
                continue
            except TaskerError as exc:
                logger.error("worker %s: releasing claims failed: %s", shared.worker_id, exc)
                return
            break
        released = {str(r["step_uuid"]) for r in rows if r["released"]}
        for claim in claims:
            shared.held.pop(claim, None)
            if claim.fence.step_uuid in released:
                shared.bump("released")
                shared.instruments.step(claim, "released")
                logger.info(
                    "worker %s: released unstarted %s",
                    shared.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
            else:
                logger.info(
                    "worker %s: could not release %s (no longer held)",
                    shared.worker_id,
                    claim.describe(),
                    extra=claim.log,
                )
