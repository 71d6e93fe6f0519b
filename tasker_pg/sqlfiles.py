"""The engine's SQL as shipped: versioned migrations and function files, read from disk.

`sql/migrations/NNNN_name.sql` hold what has state (tables, indexes, data changes); they are
applied once each, in order, and never edited after a release. `sql/functions/NN_concern.sql`
hold the current definition of every function, view and function-only type, one concern per
file; `migrate` re-applies a function file whenever its checksum differs from the one recorded
in the database. The wheel ships the top-level `sql/` inside the package as `tasker_pg/sql`.

This module only reads files; it imports nothing that talks to the database, so both the
database seam (`db`) and the migrator (`migrations`) can use it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasker_pg.errors import MigrationError

# The engine version: goes up by one with every release whose sql/ differs from the previous
# release. `migrate` records it and refuses to run an older engine against a database that a
# newer one migrated (functions and tables would no longer match the code).
ENGINE_VERSION = 1

MIGRATE_HINT = "run `tasker-pg migrate` (or tasker_pg.migrations.migrate()) against this database"

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_FUNCTION_FILE_RE = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")
# What a function file defines: every object of these kinds is dropped and re-created when the
# file changes, so each must live in exactly one file.
_DEFINES_RE = re.compile(
    r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE|VIEW|TYPE)\s+tasker\.(\w+)",
    re.IGNORECASE | re.MULTILINE,
)
# Statements that create state: they belong in a versioned migration, never in a function file.
_STATEFUL_RE = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX|SEQUENCE|MATERIALIZED\s+VIEW)\b",
    re.IGNORECASE | re.MULTILINE,
)
_COMMENT_RE = re.compile(r"--[^\n]*")


@dataclass(frozen=True)
class Migration:
    """One versioned migration file."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class FunctionFile:
    """One function file: its text, checksum and the names of the objects it defines."""

    name: str  # the file name, e.g. "50_claim.sql"
    path: Path
    sql: str
    checksum: str
    objects: tuple[str, ...]  # unqualified names in schema tasker, sorted

    @property
    def is_grants(self) -> bool:
        """Grants files are re-applied whenever any function file changes."""
        return self.name.endswith("_grants.sql")


def sql_root() -> Path:
    """The directory holding `migrations/` and `functions/`: in the package, else the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError(
        f"the engine's SQL files were not found (looked in {here / 'sql'} and "
        f"{here.parent / 'sql'}); the tasker-pg installation is incomplete, reinstall it"
    )


def sql_dir() -> Path:
    """The directory of versioned migrations."""
    return sql_root() / "migrations"


def split_directory(directory: Path | None) -> tuple[Path, Path | None]:
    """(migrations dir, functions dir or None) for a `directory` argument.

    `directory` is either an SQL root (with `migrations/` and `functions/` inside) or a plain
    directory of versioned migrations, which then has no function files.
    """
    if directory is None:
        root = sql_root()
        return root / "migrations", root / "functions"
    if (directory / "migrations").is_dir():
        functions = directory / "functions"
        return directory / "migrations", functions if functions.is_dir() else None
    return directory, None


def load_migrations(directory: Path | None = None) -> tuple[Migration, ...]:
    """Every versioned migration, ordered by version; malformed names and duplicates are errors.

    The shipped files are read once per process; an explicit directory is read every time.
    """
    if directory is None:
        return _shipped()[0]
    return _read_migrations(split_directory(directory)[0])


def load_function_files(directory: Path | None = None) -> tuple[FunctionFile, ...]:
    """Every function file, in file-name order (the order they are applied in)."""
    if directory is None:
        return _shipped()[1]
    functions = split_directory(directory)[1]
    return _read_function_files(functions) if functions is not None else ()


@lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[Migration, ...], tuple[FunctionFile, ...]]:
    root = sql_root()
    return _read_migrations(root / "migrations"), _read_function_files(root / "functions")


def expected_version() -> int:
    """The schema version this code needs: the newest migration it ships."""
    migrations = load_migrations()
    return migrations[-1].version if migrations else 0


def _read_migrations(directory: Path) -> tuple[Migration, ...]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _MIGRATION_RE.match(path.name)
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


def _read_function_files(directory: Path) -> tuple[FunctionFile, ...]:
    if not directory.is_dir():
        return ()
    files: list[FunctionFile] = []
    owner: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        if not _FUNCTION_FILE_RE.match(path.name):
            raise MigrationError(
                f"function file {path.name} is not named NN_concern.sql "
                "(two digits, then lowercase letters, digits and _)"
            )
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        code = _COMMENT_RE.sub("", text)
        stateful = _STATEFUL_RE.search(code)
        if stateful:
            raise MigrationError(
                f"function file {path.name} creates a {stateful.group(1).upper()}: state "
                "belongs in a versioned migration (sql/migrations/NNNN_name.sql), because "
                "function files are dropped and re-applied whenever they change"
            )
        objects = sorted({m.group(2).lower() for m in _DEFINES_RE.finditer(code)})
        for obj in objects:
            if obj in owner:
                raise MigrationError(
                    f"tasker.{obj} is defined in two function files, {owner[obj]} and "
                    f"{path.name}; each function, view and type lives in exactly one file"
                )
            owner[obj] = path.name
        files.append(
            FunctionFile(
                name=path.name,
                path=path,
                sql=text,
                checksum=hashlib.sha256(raw).hexdigest(),
                objects=tuple(objects),
            )
        )
    return tuple(files)
