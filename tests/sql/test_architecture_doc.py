"""docs/architecture.md stays the map of the engine: it names every public SQL object and file.

Public means a function, procedure or view in schema `tasker` whose name does not start with
`_`. Each must be named in the doc as `tasker.<name>` and carry a `COMMENT ON`, so `\\df+` and
`\\dv+` explain the API too. The doc also names every function file, every migration file and
every table of the schema except the per-queue partitions (`tasker.q_<queue>`,
`tasker.a_<queue>`), which the doc describes once as a pattern.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasker_pg import db

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"

# Functions, procedures and views of schema tasker, with their comment; objects that belong to
# an extension installed into the schema are not ours to document.
_PUBLIC_OBJECTS_SQL = """
SELECT 'function' AS kind, p.proname AS name, p.oid::regprocedure::text AS signature,
       obj_description(p.oid, 'pg_proc') AS comment
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'tasker' AND p.prokind IN ('f', 'p') AND left(p.proname, 1) <> '_'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
UNION ALL
SELECT 'view', c.relname, c.oid::regclass::text, obj_description(c.oid, 'pg_class')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tasker' AND c.relkind IN ('v', 'm') AND left(c.relname, 1) <> '_'
 ORDER BY 1, 2, 3
"""

# Tables of schema tasker, without the queue partitions (created per queue by create_queue).
_TABLES_SQL = """
SELECT c.relname AS name
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tasker' AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition
   AND c.relname !~ '^(q|a)_'
 ORDER BY 1
"""


def _doc() -> str:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing: it is the map of the engine"
    return DOC.read_text(encoding="utf-8")


def _names(text: str, name: str) -> bool:
    """Does the doc name `tasker.<name>` (not merely a longer name that starts with it)?"""
    return re.search(rf"\btasker\.{re.escape(name)}(?![A-Za-z0-9_])", text) is not None


async def test_doc_names_every_public_function_and_view(conn: db.Connection) -> None:
    rows = await conn.fetch(_PUBLIC_OBJECTS_SQL)
    assert rows, "no public functions found in schema tasker: is the database migrated?"
    text = _doc()
    missing = sorted(
        {f"tasker.{r['name']} ({r['kind']})" for r in rows if not _names(text, r["name"])}
    )
    assert not missing, (
        "docs/architecture.md does not mention these public SQL objects; add each to the "
        "section of its function file: " + ", ".join(missing)
    )


async def test_every_public_function_and_view_has_a_comment(conn: db.Connection) -> None:
    rows = await conn.fetch(_PUBLIC_OBJECTS_SQL)
    uncommented = [
        f"{r['kind']} {r['signature']}" for r in rows if not (r["comment"] or "").strip()
    ]
    assert not uncommented, (
        "public SQL objects without COMMENT ON (add one next to the definition in "
        "sql/functions/): " + ", ".join(uncommented)
    )


async def test_doc_names_every_table(conn: db.Connection) -> None:
    # A queue's partitions must not count as tables to document: make sure one exists.
    await conn.execute("SELECT tasker.create_queue('architecture_doc')")
    tables = [str(r["name"]) for r in await conn.fetch(_TABLES_SQL)]
    assert "steps" in tables and "queue_messages" in tables
    assert not any(t.endswith("architecture_doc") for t in tables)
    text = _doc()
    missing = [f"tasker.{t}" for t in tables if not _names(text, t)]
    assert not missing, (
        "docs/architecture.md does not mention these tables; describe each in the tables "
        "section: " + ", ".join(missing)
    )


def test_doc_names_every_sql_file() -> None:
    text = _doc()
    files = sorted((ROOT / "sql" / "functions").glob("*.sql")) + sorted(
        (ROOT / "sql" / "migrations").glob("*.sql")
    )
    assert files, "no SQL files found under sql/"
    missing = [f"sql/{p.parent.name}/{p.name}" for p in files if p.name not in text]
    assert not missing, (
        "docs/architecture.md does not mention these SQL files; give each function file its "
        "section and each migration its line: " + ", ".join(missing)
    )
