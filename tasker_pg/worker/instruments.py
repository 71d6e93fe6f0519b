"""What the worker reports as it works, beyond its counters: the hooks a metrics exporter fills.

The worker's parts call these hooks where they count outcomes, claims, flushes, heartbeats and
reconnects. `Instruments` itself records nothing (a worker without `metrics_port`);
`tasker_pg.metrics.PrometheusInstruments` turns them into Prometheus metrics. A hook costs one
method call, plus a dictionary lookup of the step's labels when metrics are on.

Step outcomes (the `outcome` of `step`): `claimed`; the engine's answer to an outcome,
`succeeded`, `failed`, `retried`, `checkpointed` or `stale`; `released` (handed back unstarted:
shutdown or a missing handler); and the events `timed_out`, `lease_lost` and `abandoned`, which
are also counted by the outcome that follows them (a time-out is reported as a failure).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasker_pg.worker.state import Claim


class Instruments:
    """The hooks; each does nothing here."""

    def step(self, claim: Claim, outcome: str) -> None:
        """One step of `claim` reached `outcome`."""

    def handler_seconds(self, claim: Claim, seconds: float) -> None:
        """The handler of `claim` ran for `seconds` (from its outcome's duration)."""

    def claim_seconds(self, namespace: str, seconds: float) -> None:
        """One `claim_steps` round trip that succeeded."""

    def flush_seconds(self, seconds: float) -> None:
        """One `complete_steps` round trip that succeeded."""

    def lease_extensions(self, count: int) -> None:
        """A heartbeat extended `count` leases."""

    def reconnect(self, session: str) -> None:
        """The worker's `session` (claim, flush, listen) connected again after losing it."""
