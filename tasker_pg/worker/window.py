"""Claim windows: which messages the next claim of a namespace needs to read.

A claim reads, per priority, the claim index's range of messages visible now (see
`tasker._lock_visible`). Every index entry in that range is visited until vacuum removes it,
dead or alive, and while any snapshot is held (a report, a `pg_dump`) nothing is removed:
every message handled since it began leaves entries at the head of the range, and a claim
that starts there walks all of them, each time (the "queue death spiral").

So the worker passes a window: `claim_steps(..., p_visible_since)` reads only messages that
became visible at or after `since`. After a claim that took fewer messages than it asked for
(it took every visible message it could lock), the next window starts at that claim's start
less `MARGIN`. The margin covers a message whose visibility time was computed before that
claim but committed after it (a transaction that enqueues a step commits a little after it
stamps the message). A message that is missed anyway (one committed long after its stamp: a
task created in a long transaction; a message a claim skipped because another transaction
held its lock, and that was not taken after all; one behind a claim that read as many as it
asked for but handed fewer out, because some were expired leases or messages to park) is not
lost: every `FULL_MIN`..`FULL_MAX`
seconds (longer when claims without a window are expensive) a claim reads without a window,
and when that claim fills its slots, the claims after it read without one too until one takes
fewer than it asked for (a large batch committed long after it was stamped is then drained at
full speed, not one claim per interval).

The window is in the database's clock. The worker measures the offset between its clock and
the database's when it starts and every `CLOCK_REFRESH` seconds; the measuring round trip
bounds its error, and it only needs to be small against `MARGIN`.
"""

from __future__ import annotations

import datetime
import math

# The margin subtracted from a drained claim's start (seconds).
MARGIN = 0.5
# A claim without a window at least this often and at most this rarely (seconds) ...
FULL_MIN = 1.0
FULL_MAX = 10.0
# ... and otherwise this many times as long as the last one took.
FULL_FACTOR = 50.0
# How often the clock offset is measured again (seconds).
CLOCK_REFRESH = 300.0


class ClaimWindows:
    """Per namespace, the `since` the next claim may pass (None: read without a window)."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}  # database epoch seconds
        self._full_due: dict[str, float] = {}  # monotonic seconds
        self._offset: float | None = None  # database clock minus this clock (seconds)
        self._offset_error = math.inf
        self._measured_at = -math.inf

    def clock_due(self, now: float) -> bool:
        """Whether the clock offset should be (re)measured before the next claim."""
        return now - self._measured_at >= CLOCK_REFRESH

    def set_clock(self, before: float, db_epoch: float, after: float, now: float) -> None:
        """Record one measurement: local wall clock `before` and `after` a query that read the
        database's clock (`db_epoch`). The offset is taken at the round trip's midpoint; a
        measurement whose round trip is longer than the margin is not trusted."""
        error = (after - before) / 2
        self._measured_at = now
        if error >= MARGIN / 2:
            self._offset, self._offset_error = None, math.inf
            self._since.clear()
            return
        self._offset = db_epoch - (before + after) / 2
        self._offset_error = error

    def since(self, namespace: str, now: float) -> datetime.datetime | None:
        """The window for a claim of `namespace` starting now (monotonic `now`), or None when
        this claim reads without one."""
        since = self._since.get(namespace)
        if since is None or self._offset is None or now >= self._full_due.get(namespace, 0.0):
            return None
        return datetime.datetime.fromtimestamp(since, datetime.UTC)

    def record(
        self,
        namespace: str,
        *,
        windowed: bool,
        sent_at: float,
        took: float,
        drained: bool,
        now: float,
    ) -> None:
        """After a claim that succeeded: `sent_at` is the local wall clock just before it was
        sent, `took` how long it took (seconds), `drained` whether it took fewer messages than
        it asked for."""
        if not windowed:
            self._full_due[namespace] = now + min(max(FULL_FACTOR * took, FULL_MIN), FULL_MAX)
            if not drained:
                # visible work the window may not reach (a million tasks committed after the
                # window moved past their stamps): read without one until a claim drains
                self._since.pop(namespace, None)
        if drained and self._offset is not None:
            # sent_at + offset is at most the claim's own start in the database's clock (up to
            # the offset's error, which the margin covers)
            self._since[namespace] = sent_at + self._offset - self._offset_error - MARGIN

    def forget(self, namespace: str) -> None:
        """The next claim of `namespace` reads without a window (after a lost connection)."""
        self._since.pop(namespace, None)
