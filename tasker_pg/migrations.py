"""Schema migrations: versioned migrations once each, function files whenever they change.

`migrate()` takes a session advisory lock (so several migrators can run at once) and then, in
one transaction:
1. applies every pending versioned migration (`sql/migrations/NNNN_name.sql`, tables and other
   state) in order, recording version, name and sha256 checksum in `tasker.schema_migrations`;
2. re-applies every function file (`sql/functions/NN_concern.sql`) whose checksum differs from
   the one recorded in `tasker.schema_functions` (all of them on a fresh database), in file
   order: the objects the file defines (and those its previous version defined) are dropped
   first, so a changed argument list or return type is re-created, not overloaded; objects of
   a file that is gone are dropped; grants files (`NN_grants.sql`) are re-applied whenever any
   function file was, a migration was applied or a role was created;
3. records the engine version in `tasker.schema_engine`.
Between 1 and 2 it creates the cluster-wide group roles (`<prefix>tasker_owner`, `_worker`,
`_client`, `_operator`, `_reader`, all NOLOGIN) that do not exist yet, and records the role
prefix in `tasker.roles_config` on the first run; a later run with another prefix is refused
(docs/architecture.md, "Roles").
Either all of it commits or none of it does. It refuses an applied migration that was edited
afterwards, and a database that a newer tasker-pg migrated (`ENGINE_VERSION` only goes up).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasker_pg import db
from tasker_pg.errors import DatabaseError, MigrationError, TaskerError
from tasker_pg.sqlfiles import (
    ENGINE_VERSION,
    MIGRATE_HINT,
    FunctionFile,
    Migration,
    expected_version,
    load_function_files,
    load_migrations,
    sql_dir,
)

__all__ = [
    "ENGINE_VERSION",
    "MIGRATE_HINT",
    "MIGRATION_LOCK_KEY",
    "ROLE_KINDS",
    "FunctionFile",
    "Migration",
    "MigrationReport",
    "check_schema",
    "expected_version",
    "load_function_files",
    "load_migrations",
    "migrate",
    "role_name",
    "role_prefix",
    "schema_version",
    "sql_dir",
]

# pg_advisory_lock key for migrators: 'tasker' in ASCII, so it is recognisable in pg_locks.
MIGRATION_LOCK_KEY = 0x7461736B6572

# The group roles, by kind; their names are `<prefix>tasker_<kind>`.
ROLE_KINDS = ("owner", "worker", "client", "operator", "reader")
_ROLE_PREFIX_RE = re.compile(r"^(?:[a-z][a-z0-9_]{0,29})?$")

check_schema = db.check_schema
schema_version = db.schema_version

BOOTSTRAP_SQL = """
CREATE SCHEMA IF NOT EXISTS tasker;
CREATE TABLE IF NOT EXISTS tasker.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms double precision
);
COMMENT ON TABLE tasker.schema_migrations IS
    'Versioned migrations applied to this database (sql/migrations), one row each.';
CREATE TABLE IF NOT EXISTS tasker.schema_functions (
    file        text PRIMARY KEY,
    checksum    text NOT NULL,
    objects     text[] NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.schema_functions IS
    'Function files applied here (sql/functions): checksum and the objects each defines.';
CREATE TABLE IF NOT EXISTS tasker.schema_engine (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    engine_version  integer NOT NULL,
    package_version text NOT NULL,
    migrated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.schema_engine IS
    'The engine version (and tasker-pg release) that last migrated this database.';
"""

# The objects named by a function file, as DROP statements in a safe order (views, then
# functions and procedures, then types).
_OBJECTS_SQL = """
SELECT 1 AS ord, 'VIEW ' || c.oid::regclass::text AS target
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tasker' AND c.relkind = 'v' AND c.relname = ANY ($1::text[])
UNION ALL
SELECT 2, CASE p.prokind WHEN 'p' THEN 'PROCEDURE ' ELSE 'FUNCTION ' END
          || p.oid::regprocedure::text
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'tasker' AND p.proname = ANY ($1::text[])
UNION ALL
SELECT 3, 'TYPE ' || t.oid::regtype::text
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = 'tasker' AND t.typname = ANY ($1::text[])
   AND (t.typtype IN ('e', 'd', 'r')
        OR (t.typtype = 'c'
            AND (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c'))
 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class MigrationReport:
    """What one `migrate()` call did."""

    applied: tuple[Migration, ...]
    functions: tuple[FunctionFile, ...]  # function files (re-)applied
    dropped: tuple[str, ...]  # objects of function files that are gone
    current_version: int

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.functions or self.dropped)


async def migrate(
    conn: db.Connection, *, directory: Path | None = None, role_prefix: str | None = None
) -> MigrationReport:
    """Bring the database to this package's schema; a no-op when it is current.

    `directory` (tests, tools) is an SQL root with `migrations/` and `functions/`, or a plain
    directory of versioned migrations. `role_prefix` names the group roles
    (`<prefix>tasker_worker`, ...); None keeps the one recorded (none on a fresh database).
    """
    if role_prefix is not None and not _ROLE_PREFIX_RE.match(role_prefix):
        raise MigrationError(
            f"role prefix {role_prefix!r} is not valid: a lowercase letter, then up to 29 "
            "lowercase letters, digits and _ (e.g. acme_)",
            error_code="invalid_argument",
        )
    from tasker_pg import __version__

    migrations = load_migrations(directory)
    files = load_function_files(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(BOOTSTRAP_SQL)
        await _refuse_newer_database(conn, migrations)
        rows = await conn.fetch("SELECT version, checksum FROM tasker.schema_migrations")
        applied = {int(r["version"]): str(r["checksum"]) for r in rows}
        _refuse_edited_migrations(applied, migrations)
        recorded = {
            str(r["file"]): (str(r["checksum"]), [str(o) for o in r["objects"]])
            for r in await conn.fetch("SELECT file, checksum, objects FROM tasker.schema_functions")
        }
        pending = [m for m in migrations if m.version not in applied]
        async with conn.transaction():
            for migration in pending:
                await _apply_migration(conn, migration)
            roles_changed = await _ensure_roles(conn, role_prefix)
            changed, dropped = await _apply_function_files(
                conn, files, recorded, force_grants=bool(pending) or roles_changed
            )
            await conn.execute(
                """
                INSERT INTO tasker.schema_engine (engine_version, package_version)
                VALUES ($1, $2)
                ON CONFLICT (singleton) DO UPDATE
                   SET engine_version = EXCLUDED.engine_version,
                       package_version = EXCLUDED.package_version,
                       migrated_at = now()
                 WHERE (tasker.schema_engine.engine_version, tasker.schema_engine.package_version)
                       IS DISTINCT FROM (EXCLUDED.engine_version, EXCLUDED.package_version)
                """,
                ENGINE_VERSION,
                __version__,
            )
        current = max([*applied, *(m.version for m in pending)], default=0)
        return MigrationReport(
            applied=tuple(pending),
            functions=tuple(changed),
            dropped=tuple(dropped),
            current_version=current,
        )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _refuse_newer_database(conn: db.Connection, migrations: Sequence[Migration]) -> None:
    from tasker_pg import __version__

    row = await conn.fetchrow("SELECT engine_version, package_version FROM tasker.schema_engine")
    newest_known = migrations[-1].version if migrations else 0
    newest_applied = await conn.fetchval("SELECT max(version) FROM tasker.schema_migrations")
    too_new = row is not None and int(row["engine_version"]) > ENGINE_VERSION
    unknown = newest_applied is not None and int(newest_applied) > newest_known
    if too_new or unknown:
        by = (
            f"tasker-pg {row['package_version']} (engine version {row['engine_version']})"
            if row is not None
            else "a newer tasker-pg"
        )
        has = (
            f", and it has migration {newest_applied}, which this one does not ship"
            if unknown
            else ""
        )
        raise MigrationError(
            f"this database was migrated by {by}{has}; this tasker-pg {__version__} has engine "
            f"version {ENGINE_VERSION} and schema version {newest_known}, and will not move a "
            "database backward: upgrade tasker-pg (pip install -U tasker-pg) to use it",
            error_code="schema_newer",
        )


def _refuse_edited_migrations(applied: dict[int, str], migrations: Sequence[Migration]) -> None:
    for migration in migrations:
        checksum = applied.get(migration.version)
        if checksum is not None and checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.filename} was changed after it was applied "
                f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} "
                "on disk); migrations are append-only: restore the file and put the change "
                "in a new migration"
            )


async def _apply_migration(conn: db.Connection, migration: Migration) -> None:
    async with _reported(migration.filename, migration.sql):
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


async def _apply_function_files(
    conn: db.Connection,
    files: Sequence[FunctionFile],
    recorded: dict[str, tuple[str, list[str]]],
    *,
    force_grants: bool = False,
) -> tuple[list[FunctionFile], list[str]]:
    """Re-apply changed function files; drop the objects of files that are gone."""
    defined_now = {obj for f in files for obj in f.objects}
    changed = [f for f in files if recorded.get(f.name, ("", []))[0] != f.checksum]
    gone = [name for name in recorded if name not in {f.name for f in files}]
    if changed or gone or force_grants:
        # grants follow every change: dropping and re-creating an object loses its grants, and
        # a table a migration created belongs to the migrating user until the grants file runs
        changed += [f for f in files if f.is_grants and f not in changed]
        changed.sort(key=lambda f: f.name)
    dropped: list[str] = []
    for name in gone:
        leftovers = [o for o in recorded[name][1] if o not in defined_now]
        dropped += await _drop_objects(conn, leftovers, name)
        await conn.execute("DELETE FROM tasker.schema_functions WHERE file = $1", name)
    for file in changed:
        # objects the previous version of the file defined and no file defines any more
        stale = [o for o in recorded.get(file.name, ("", []))[1] if o not in defined_now]
        dropped += await _drop_objects(conn, stale, file.name)
        await _drop_objects(conn, file.objects, file.name)
        async with _reported(file.name, file.sql):
            await conn.execute(file.sql)
        await conn.execute(
            """
            INSERT INTO tasker.schema_functions (file, checksum, objects) VALUES ($1, $2, $3)
            ON CONFLICT (file) DO UPDATE
               SET checksum = EXCLUDED.checksum, objects = EXCLUDED.objects, applied_at = now()
            """,
            file.name,
            file.checksum,
            list(file.objects),
        )
    return changed, dropped


def role_name(prefix: str, kind: str) -> str:
    """The name of a group role: `<prefix>tasker_<kind>`."""
    if kind not in ROLE_KINDS:
        raise ValueError(f"unknown role kind {kind!r}; one of {', '.join(ROLE_KINDS)}")
    return f"{prefix}tasker_{kind}"


async def role_prefix(conn: db.Connection) -> str | None:
    """The role prefix recorded in the database; None before the roles migration."""
    if not await conn.fetchval("SELECT to_regclass('tasker.roles_config') IS NOT NULL"):
        return None
    value = await conn.fetchval("SELECT role_prefix FROM tasker.roles_config")
    return str(value) if value is not None else None


async def _ensure_roles(conn: db.Connection, requested: str | None) -> bool:
    """Record the role prefix (first run) and create the group roles that are missing.

    Returns whether anything changed (the grants file must then run). Roles are cluster-wide:
    another database on the server may have created them already, which is fine.
    """
    if not await conn.fetchval("SELECT to_regclass('tasker.roles_config') IS NOT NULL"):
        return False  # a migrations directory without the roles migration (tests, tools)
    recorded = await role_prefix(conn)
    changed = False
    if recorded is None:
        recorded = requested or ""
        await conn.execute("INSERT INTO tasker.roles_config (role_prefix) VALUES ($1)", recorded)
        changed = True
    elif requested is not None and requested != recorded:
        raise MigrationError(
            f"this database's roles use the prefix {recorded!r} (e.g. "
            f"{role_name(recorded, 'worker')}), not {requested!r}; the prefix is chosen on the "
            "first migrate and kept: run migrate without --role-prefix, or with "
            f"--role-prefix {recorded!r}",
            error_code="role_prefix_mismatch",
        )
    me = await conn.fetchrow(
        "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    )
    for kind in ROLE_KINDS:
        name = role_name(recorded, kind)
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
            continue
        if me is None or not (me["rolsuper"] or me["rolcreaterole"]):
            raise MigrationError(
                f"role {name} does not exist and this user cannot create it: run migrate once "
                "as a user with CREATEROLE (or a superuser), or create the roles first: "
                + "; ".join(f'CREATE ROLE "{role_name(recorded, k)}" NOLOGIN' for k in ROLE_KINDS),
                error_code="roles_missing",
            )
        try:
            async with conn.transaction():  # a savepoint: another migrator may win the race
                await conn.execute(f'CREATE ROLE "{name}" NOLOGIN')
        except DatabaseError as exc:
            if exc.sqlstate not in ("42710", "23505"):  # duplicate_object, unique_violation
                raise
        changed = True
    owner = role_name(recorded, "owner")
    if not me or not me["rolsuper"]:
        # the migrating user re-creates the owner's objects: it must be a member of the owner
        # role, and the owner of schema tasker needs CREATE on the database
        if not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'USAGE')", owner):
            await conn.execute(f'GRANT "{owner}" TO current_user')
            changed = True
        if not await conn.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')", owner
        ):
            grant = await conn.fetchval(
                "SELECT format('GRANT CREATE ON DATABASE %I TO %I', current_database(), $1::text)",
                owner,
            )
            await conn.execute(str(grant))
            changed = True
    return changed


async def _drop_objects(conn: db.Connection, names: Sequence[str], file: str) -> list[str]:
    if not names:
        return []
    targets = [str(r["target"]) for r in await conn.fetch(_OBJECTS_SQL, list(names))]
    for target in targets:
        try:
            async with conn.transaction():  # a savepoint, so the error below is ours to report
                await conn.execute(f"DROP {target}")
        except DatabaseError as exc:
            if exc.sqlstate != "2BP01":  # dependent_objects_still_exist
                raise
            raise MigrationError(
                f"function file {file}: cannot re-create {target.lower()}: {exc.message}. "
                "An object outside this file depends on it; move the dependent object into "
                "the same function file, or drop it in a versioned migration first"
            ) from exc
    return targets


class _reported:
    """Turn a database error inside one SQL file into a MigrationError naming file and line."""

    def __init__(self, filename: str, sql: str) -> None:
        self.filename = filename
        self.sql = sql

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if not isinstance(exc, TaskerError) or isinstance(exc, MigrationError):
            return False
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is None:
            return False
        where = ""
        position = getattr(exc, "position", None)
        if position is not None:
            where = f" at line {self.sql.count(chr(10), 0, int(position)) + 1}"
        raise MigrationError(
            f"{self.filename} failed{where}: {exc.message} (SQLSTATE {sqlstate}); nothing of "
            "this migrate run was applied and the schema stays as it was"
        ) from exc
