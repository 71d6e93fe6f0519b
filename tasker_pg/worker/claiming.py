"""Claiming: one claim loop per worker, woken by LISTEN/NOTIFY and a polling fallback.

A namespace is "dirty" when a notification on `tasker_<namespace>` arrived, when the polling
fallback fires (`poll_interval`, for work that becomes visible by time: retries, expired
leases), or when the last claim filled every free slot. A claim that met expired leases or
parked messages hands none of them out (the engine records them) and notifies the namespace,
so the loop asks again for the ready steps behind them. The loop clears the flag *before* it
claims, so a notification that arrives while a claim is in flight marks the namespace again and
triggers a re-check: no wake-up is lost. Each claim asks for as many steps as there are free
slots (capped at `max_batch`) in one `tasker.claim_steps` call, with the namespace's claim
window (`tasker_pg.worker.window`): after a claim that took every visible message, the next
reads only messages that became visible since, so a held snapshot's dead index entries behind
it are not walked again; every few seconds a claim reads without a window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tasker_pg import db
from tasker_pg.errors import ConnectionLostError, NotFoundError, TaskerError
from tasker_pg.rows import ClaimedStep
from tasker_pg.worker.leases import Leases
from tasker_pg.worker.session import Session, backoff, wait_any, wait_event, wait_task
from tasker_pg.worker.state import Claim, Shared
from tasker_pg.worker.window import ClaimWindows

logger = logging.getLogger(__name__)

# How long the shutdown keeps trying to hand back claims to an unreachable database.
SHUTDOWN_DB_TIMEOUT = 10.0
# The listener session is idle by nature; probe it this often so a dead TCP peer is noticed.
LISTENER_PROBE_INTERVAL = 30.0


class Claimer:
    """The claim loop and the listener session that wakes it."""

    def __init__(
        self,
        shared: Shared,
        session: Session,
        leases: Leases,
        start_step: Callable[[Claim], None],
        paused: Callable[[], bool],
    ) -> None:
        self._shared = shared
        self._session = session
        # The listener session: LISTEN on every namespace's channel, re-subscribed on reconnect.
        self.listen_session = Session(shared, "listen", on_connect=self._on_listener_connect)
        # Set when the listener connection ends (the server terminated it, the socket broke):
        # an idle connection learns of that from asyncpg, not from a query.
        self._listener_lost = asyncio.Event()
        self._leases = leases
        self._start_step = start_step
        self._paused = paused  # True while outcomes cannot be delivered
        self.dirty: set[str] = set()
        self.missing_queues: set[str] = set()
        self._rr = 0  # round-robin position over namespaces
        self._in_flight = False  # a claim_steps query is running right now
        self._failures = 0  # consecutive claims lost to connection trouble
        self.windows = ClaimWindows()
        self.task: asyncio.Task[None] | None = None

    async def loop(self) -> None:
        """Claim while there are free slots and dirty namespaces; else wait for a wake-up."""
        shared = self._shared
        config = shared.config
        next_poll = time.monotonic() + config.poll_interval
        while not shared.stop_requested.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self.dirty.update(config.namespaces)
                next_poll = now + config.poll_interval
            free = shared.free_slots()
            if free > 0 and self.dirty and not self._paused():
                namespace = self._next_dirty()
                # Clear before claiming: a notification during the claim marks it again.
                self.dirty.discard(namespace)
                qty = min(free, config.max_batch)
                # the slots stay kept while the claim is in flight: a flush in flight must not
                # be handed children into them (complete_and_claim)
                shared.reserved += qty
                try:
                    claims = await self._claim(namespace, qty)
                finally:
                    shared.reserved -= qty
                if shared.stop_requested.is_set():
                    if claims:
                        await self._leases.release(claims, SHUTDOWN_DB_TIMEOUT)
                    return
                for claim in claims:
                    self._start_step(claim)
                if len(claims) >= qty:
                    self.dirty.add(namespace)  # it may hold more
                continue
            shared.claim_wake.clear()
            await wait_event(shared.claim_wake, next_poll - time.monotonic())

    async def stop(self, deadline: float) -> None:
        """End the loop: after a claim in flight (whose rows it releases at once), or at once."""
        assert self.task is not None
        if self._in_flight:
            await wait_task(self.task, deadline - time.monotonic())
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _next_dirty(self) -> str:
        """The next dirty namespace in round-robin order (fair when slots are scarce)."""
        namespaces = self._shared.config.namespaces
        count = len(namespaces)
        for i in range(count):
            namespace = namespaces[(self._rr + i) % count]
            if namespace in self.dirty:
                self._rr = (self._rr + i + 1) % count
                return namespace
        return next(iter(self.dirty))

    async def _claim(self, namespace: str, qty: int) -> list[Claim]:
        """One `claim_steps` call; connection trouble and errors yield no claims."""
        shared = self._shared
        config = shared.config
        lease_deadline = time.monotonic() + config.lease_seconds

        windows = self.windows

        async def claim_rows(conn: db.Connection) -> list[ClaimedStep]:
            self._in_flight = True
            try:
                if windows.clock_due(time.monotonic()):
                    before = time.time()
                    db_epoch = await conn.fetchval(
                        "SELECT extract(epoch FROM clock_timestamp())::float8"
                    )
                    windows.set_clock(before, float(db_epoch), time.time(), time.monotonic())
                since = windows.since(namespace, time.monotonic())
                sent_at, started = time.time(), time.monotonic()
                steps = await conn.claim_steps(
                    namespace, config.worker_id, qty, config.lease_seconds, visible_since=since
                )
                now = time.monotonic()
                shared.instruments.claim_seconds(namespace, now - started)
                windows.record(
                    namespace,
                    windowed=since is not None,
                    sent_at=sent_at,
                    took=now - started,
                    drained=len(steps) < qty,
                    now=now,
                )
                if since is None:
                    shared.counts["full_claims"] += 1
                return steps
            finally:
                self._in_flight = False

        try:
            steps = await self._session.call(claim_rows)
        except ConnectionLostError as exc:
            self.windows.forget(namespace)
            if not shared.closed.is_set():
                logger.warning(
                    "worker %s: lost the claim connection (%s); reconnecting", shared.worker_id, exc
                )
                self.dirty.add(namespace)
                # The session reconnects with backoff when connecting fails; this backoff also
                # covers a session that connects but keeps failing.
                self._failures += 1
                await wait_event(shared.stop_requested, backoff(self._failures - 1))
            return []
        except NotFoundError as exc:
            if namespace not in self.missing_queues:
                self.missing_queues.add(namespace)
                logger.warning(
                    "worker %s: cannot claim from %r: %s", shared.worker_id, namespace, exc
                )
            return []
        except TaskerError as exc:
            # A lock or statement timeout, a cancel, too many connections: the claim is tried
            # again (WARNING). Only a refusal, which would fail the same way again, is an ERROR.
            refused = db.is_refusal(exc)
            logger.log(
                logging.ERROR if refused else logging.WARNING,
                "worker %s: claim_steps(%r) %s: %s [%s]",
                shared.worker_id,
                namespace,
                "was refused" if refused else "failed; trying again",
                exc,
                exc.error_code,
            )
            if not refused:
                self.dirty.add(namespace)
            await wait_event(shared.stop_requested, config.poll_interval)
            return []
        shared.counts["claim_calls"] += 1
        self._failures = 0
        if not steps:
            return []
        self.missing_queues.discard(namespace)
        return self.adopt(steps, lease_deadline, namespace)

    def adopt(
        self, steps: list[ClaimedStep], lease_deadline: float, namespace: str | None = None
    ) -> list[Claim]:
        """Track claimed steps (from claim_steps, or handed off by complete_and_claim) as held.

        A claim's namespace is the queue it was claimed from, else its task's namespace."""
        shared = self._shared
        claims = [
            Claim(step, namespace or step.namespace or "", lease_deadline, shared.worker_id)
            for step in steps
        ]
        shared.bump("claimed", len(claims))
        debug = logger.isEnabledFor(logging.DEBUG)
        instruments = shared.instruments
        for claim in claims:
            shared.held[claim] = None
            instruments.step(claim, "claimed")
            if debug:
                logger.debug(
                    "worker %s: claimed %s (%s)",
                    shared.worker_id,
                    claim.describe(),
                    claim.step.claim_event,
                    extra=claim.log,
                )
        return claims

    # --- listening ---------------------------------------------------------------------------

    async def _on_listener_connect(self, conn: db.Connection) -> None:
        namespaces = self._shared.config.namespaces
        self._listener_lost.clear()
        conn.on_termination(self._listener_lost.set)
        for namespace in namespaces:
            await conn.listen(f"tasker_{namespace}", self._on_notification)
        # Notifications sent while we were not listening are lost: look at every queue.
        self.dirty.update(namespaces)
        self._shared.claim_wake.set()

    def _on_notification(self, channel: str, _payload: str) -> None:
        namespace = channel.removeprefix("tasker_")
        if namespace not in self.dirty:
            self.dirty.add(namespace)
            self._shared.claim_wake.set()

    async def listen_loop(self) -> None:
        """Keep the listener session alive; reconnecting re-subscribes and re-checks the queues."""
        shared = self._shared
        last_probe = time.monotonic()
        while True:
            try:
                conn = await self.listen_session.ensure()
            except ConnectionLostError:
                return  # closed
            await wait_any((shared.closed, self._listener_lost), shared.config.poll_interval)
            if shared.closed.is_set():
                return
            if conn.is_closed():
                logger.warning(
                    "worker %s: lost the listener connection; reconnecting", shared.worker_id
                )
                self.listen_session.drop()
                continue
            if time.monotonic() - last_probe >= LISTENER_PROBE_INTERVAL:
                last_probe = time.monotonic()
                try:
                    await self.listen_session.call(lambda c: c.execute("SELECT 1", timeout=10))
                except ConnectionLostError:
                    logger.warning(
                        "worker %s: listener connection probe failed; reconnecting",
                        shared.worker_id,
                    )
