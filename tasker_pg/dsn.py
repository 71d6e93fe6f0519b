"""Where tasker-pg finds its database, the same way in the CLI, the library and the tests.

Order: an explicit `dsn` (`--dsn`), `TASKER_DATABASE_URL`, `DATABASE_URL`, then the embedded
cluster when it is running. An explicitly configured URL is never skipped in favour of a later
one: connecting to a different database than the one configured would be worse than failing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tasker_pg.errors import DatabaseNotFoundError

ENV_VARS = ("TASKER_DATABASE_URL", "DATABASE_URL")


@dataclass(frozen=True)
class ResolvedDsn:
    """A connection URL and where it came from (for error messages)."""

    dsn: str
    source: str


def resolve_dsn(explicit: str | None = None) -> ResolvedDsn:
    """Pick the database URL by the documented order; raise when nothing is configured."""
    if explicit:
        return ResolvedDsn(explicit, "--dsn")
    for var in ENV_VARS:
        value = os.environ.get(var)
        if value:
            return ResolvedDsn(value, var)
    from tasker_pg.embedded import EmbeddedCluster

    cluster = EmbeddedCluster()
    if cluster.status().running:
        return ResolvedDsn(cluster.dsn(), f"embedded cluster in {cluster.home}")
    raise DatabaseNotFoundError(no_database_message())


def no_database_message() -> str:
    return (
        "no database configured. tasker-pg looks, in this order, at: the --dsn option; "
        "TASKER_DATABASE_URL; DATABASE_URL; the embedded cluster "
        "(start it with `tasker-pg db start`, data in ./.tasker-pg or TASKER_PG_HOME)"
    )
