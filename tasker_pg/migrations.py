"""Schema migrations: numbered SQL files applied in order, recorded in the database.

The files are `sql/migrations/NNNN_name.sql` (shipped inside the wheel as `tasker_pg/sql`).
`migrate()` takes a session advisory lock so several migrators can run at once, applies each
pending file in its own transaction together with its row in `tasker.schema_migrations`
(version, name, sha256 checksum), and refuses to go on when an applied file has changed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from tasker_pg.errors import (
    DatabaseError,
    InvalidStateError,
    MigrationError,
    NotFoundError,
    SchemaError,
    ValidationError,
)

if TYPE_CHECKING:
    from tasker_pg.db import Connection

# pg_advisory_lock key for migrators: 'tasker' in ASCII, so it is recognisable in pg_locks.
MIGRATION_LOCK_KEY = 0x7461736B6572
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
MIGRATE_HINT = "run `tasker-pg migrate` (or tasker_pg.migrations.migrate()) against this database"

BOOTSTRAP_SQL = """
CREATE SCHEMA IF NOT EXISTS tasker;
CREATE TABLE IF NOT EXISTS tasker.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms double precision
);
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name


def sql_dir() -> Path:
    """The directory of migration files: inside the installed package, else the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql" / "migrations", here.parent / "sql" / "migrations"):
        if candidate.is_dir():
            return candidate
    raise MigrationError(
        f"migration files not found (looked in {here / 'sql'} and {here.parent / 'sql'}); "
        "the tasker-pg installation is incomplete, reinstall it"
    )


def load_migrations(directory: Path | None = None) -> tuple[Migration, ...]:
    """Every migration file, ordered by version; malformed names and duplicates are errors.

    The shipped files are read once per process; an explicit directory is read every time.
    """
    if directory is None:
        return _shipped_migrations()
    return _read_migrations(directory)


@lru_cache(maxsize=1)
def _shipped_migrations() -> tuple[Migration, ...]:
    return _read_migrations(sql_dir())


def _read_migrations(directory: Path) -> tuple[Migration, ...]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE_RE.match(path.name)
        if not m:
            raise MigrationError(
                f"migration file {path.name} is not named NNNN_name.sql "
                "(four digits, then lowercase letters, digits and _)"
            )
        version = int(m.group(1))
        if version in found:
            raise MigrationError(
                f"two migration files share version {version:04d}: "
                f"{found[version].filename} and {path.name}"
            )
        raw = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=m.group(2),
            path=path,
            sql=raw.decode("utf-8"),
            checksum=hashlib.sha256(raw).hexdigest(),
        )
    return tuple(found[v] for v in sorted(found))


def expected_version() -> int:
    """The schema version this code needs: the newest migration it ships."""
    migrations = load_migrations()
    return migrations[-1].version if migrations else 0


@dataclass(frozen=True)
class MigrationReport:
    """What one `migrate()` call did."""

    applied: tuple[Migration, ...]
    current_version: int


async def migrate(conn: Connection, *, directory: Path | None = None) -> MigrationReport:
    """Apply every pending migration; a no-op when the schema is current."""
    migrations = load_migrations(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(BOOTSTRAP_SQL)
        rows = await conn.fetch("SELECT version, name, checksum FROM tasker.schema_migrations")
        applied = {int(r["version"]): r for r in rows}
        by_version = {m.version: m for m in migrations}
        for version, row in sorted(applied.items()):
            known = by_version.get(version)
            if known is None:
                continue  # applied by a newer tasker-pg; nothing to check against
            if row["checksum"] != known.checksum:
                raise MigrationError(
                    f"migration {known.filename} was changed after it was applied "
                    f"(checksum {row['checksum'][:12]} in the database, {known.checksum[:12]} "
                    "on disk); migrations are append-only: restore the file and put the change "
                    "in a new migration"
                )
        done: list[Migration] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await _apply(conn, migration)
            done.append(migration)
        current = max([*applied, *(m.version for m in done)], default=0)
        return MigrationReport(applied=tuple(done), current_version=current)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _apply(conn: Connection, migration: Migration) -> None:
    try:
        async with conn.transaction():
            started = await conn.fetchval("SELECT clock_timestamp()")
            await conn.execute(migration.sql)
            await conn.execute(
                """
                INSERT INTO tasker.schema_migrations (version, name, checksum, duration_ms)
                VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp() - $4) * 1000)
                """,
                migration.version,
                migration.name,
                migration.checksum,
                started,
            )
    except (DatabaseError, ValidationError, NotFoundError, InvalidStateError) as exc:
        where = ""
        position = getattr(exc, "position", None)
        if position is not None:
            line = migration.sql.count("\n", 0, position) + 1
            where = f" at line {line}"
        raise MigrationError(
            f"migration {migration.filename} failed{where}: {exc.message} "
            f"(SQLSTATE {exc.sqlstate}); nothing of it was applied and the schema stays at "
            "the previous version"
        ) from exc


async def schema_version(conn: Connection) -> int | None:
    """The newest applied migration (0 when none is), None when tasker was never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('tasker.schema_migrations') IS NOT NULL")
    if not exists:
        return None
    value = await conn.fetchval("SELECT max(version) FROM tasker.schema_migrations")
    return int(value) if value is not None else 0


async def check_schema(conn: Connection) -> int:
    """Refuse a missing or outdated schema, naming the command that fixes it."""
    current = await schema_version(conn)
    needed = expected_version()
    if current is None:
        raise SchemaError(
            "the database has no tasker schema; " + MIGRATE_HINT, error_code="schema_missing"
        )
    if current < needed:
        pending = [m.filename for m in load_migrations() if m.version > current]
        raise SchemaError(
            f"the database schema is at version {current}, this tasker-pg needs {needed} "
            f"(pending: {', '.join(pending)}); " + MIGRATE_HINT
        )
    return current
