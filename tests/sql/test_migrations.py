"""Migrations: fresh apply, re-apply, concurrent migrators, failures, checksums, version checks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tasker_pg import db, migrations
from tasker_pg.errors import MigrationError, SchemaError

ROOT = Path(__file__).resolve().parents[2]


async def applied_versions(dsn: str) -> list[tuple[int, str]]:
    conn = await db.connect(dsn, check_schema=False)
    try:
        rows = await conn.fetch("SELECT version, name FROM tasker.schema_migrations ORDER BY 1")
        return [(r["version"], r["name"]) for r in rows]
    finally:
        await conn.close()


async def test_fresh_apply_then_noop(empty_dsn: str) -> None:
    conn = await db.connect(empty_dsn, check_schema=False)
    try:
        first = await migrations.migrate(conn)
        assert [m.version for m in first.applied] == [
            m.version for m in migrations.load_migrations()
        ]
        assert first.current_version == migrations.expected_version()
        assert await conn.fetchval(
            "SELECT to_regprocedure('tasker.read(text,double precision,integer)') IS NOT NULL"
        )
        assert [f.name for f in first.functions] == [
            f.name for f in migrations.load_function_files()
        ]
        second = await migrations.migrate(conn)
        assert second.applied == ()
        assert second.functions == ()
        assert not second.changed
        assert second.current_version == first.current_version
        assert await migrations.check_schema(conn) == migrations.expected_version()
    finally:
        await conn.close()


def _migrate_cli(dsn: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tasker_pg.cli", "migrate", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


async def test_four_concurrent_migrators(empty_dsn: str) -> None:
    procs = [_migrate_cli(empty_dsn) for _ in range(4)]
    outputs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=60) for p in procs))
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"stdout={out!r} stderr={err!r}"
    applied_lines = [line for out, _ in outputs for line in out.splitlines() if "applied" in line]
    # each file was applied by exactly one of the four processes
    assert sorted(applied_lines) == sorted(
        [f"applied {m.filename}" for m in migrations.load_migrations()]
        + [f"applied functions/{f.name}" for f in migrations.load_function_files()]
    )
    versions = await applied_versions(empty_dsn)
    assert [v for v, _ in versions] == [m.version for m in migrations.load_migrations()]


def _write(directory: Path, name: str, sql: str) -> None:
    (directory / name).write_text(sql)


async def test_failing_migration_leaves_version(empty_dsn: str, tmp_path: Path) -> None:
    _write(tmp_path, "0001_first.sql", "CREATE TABLE tasker.first_table (id int);\n")
    _write(
        tmp_path,
        "0002_broken.sql",
        "CREATE TABLE tasker.second_table (id int);\n\n"
        "SELECT no_such_column FROM tasker.first_table;\n",
    )
    conn = await db.connect(empty_dsn, check_schema=False)
    try:
        with pytest.raises(MigrationError) as err:
            await migrations.migrate(conn, directory=tmp_path)
        message = str(err.value)
        assert "0002_broken.sql" in message
        assert "no_such_column" in message
        assert "line 3" in message
        # one transaction: the good file before it was rolled back too
        assert await applied_versions(empty_dsn) == []
        assert await conn.fetchval("SELECT to_regclass('tasker.first_table') IS NULL")
        assert await conn.fetchval("SELECT to_regclass('tasker.second_table') IS NULL")
        # the advisory lock was released: a fixed file applies
        _write(tmp_path, "0002_broken.sql", "CREATE TABLE tasker.second_table (id int);\n")
        await migrations.migrate(conn, directory=tmp_path)
        assert [v for v, _ in await applied_versions(empty_dsn)] == [1, 2]
    finally:
        await conn.close()


async def test_changed_checksum_is_detected(empty_dsn: str, tmp_path: Path) -> None:
    _write(tmp_path, "0001_first.sql", "CREATE TABLE tasker.t1 (id int);\n")
    conn = await db.connect(empty_dsn, check_schema=False)
    try:
        await migrations.migrate(conn, directory=tmp_path)
        _write(tmp_path, "0001_first.sql", "CREATE TABLE tasker.t1 (id bigint);\n")
        _write(tmp_path, "0002_next.sql", "CREATE TABLE tasker.t2 (id int);\n")
        with pytest.raises(MigrationError) as err:
            await migrations.migrate(conn, directory=tmp_path)
        assert "0001_first.sql" in str(err.value)
        assert "changed after it was applied" in str(err.value)
        # nothing after the tampered file was applied
        assert [v for v, _ in await applied_versions(empty_dsn)] == [1]
    finally:
        await conn.close()


def test_malformed_file_names(tmp_path: Path) -> None:
    _write(tmp_path, "1_bad.sql", "select 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        migrations.load_migrations(tmp_path)
    other = tmp_path / "dup"
    other.mkdir()
    _write(other, "0001_a.sql", "select 1;")
    _write(other, "0001_b.sql", "select 1;")
    with pytest.raises(MigrationError, match="share version 0001"):
        migrations.load_migrations(other)


async def test_missing_schema_refused_with_hint(empty_dsn: str) -> None:
    with pytest.raises(SchemaError) as err:
        await db.connect(empty_dsn)
    assert "tasker-pg migrate" in str(err.value)
    assert err.value.error_code == "schema_missing"


async def test_outdated_schema_refused_with_hint(dsn: str) -> None:
    admin = await db.connect(dsn)
    try:
        await admin.execute(
            "DELETE FROM tasker.schema_migrations WHERE version = $1",
            migrations.expected_version(),
        )
    finally:
        await admin.close()
    with pytest.raises(SchemaError) as err:
        await db.connect(dsn)
    message = str(err.value)
    assert "tasker-pg migrate" in message
    assert migrations.load_migrations()[-1].filename in message
    pool_error = None
    try:
        await db.create_pool(dsn)
    except SchemaError as exc:
        pool_error = exc
    assert pool_error is not None and "tasker-pg migrate" in str(pool_error)


def test_installed_wheel_finds_migrations(tmp_path: Path) -> None:
    """A built wheel carries sql/ and an installed package finds it outside the checkout."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheel_dir.glob("tasker_pg-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert any(n.startswith("tasker_pg/sql/migrations/0001_") for n in names), names
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tasker_pg.migrations as m; print(m.sql_dir()); "
            "print(len(m.load_migrations()), m.expected_version())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert Path(out[0]).is_relative_to(site), out
    assert out[1] == f"{len(migrations.load_migrations())} {migrations.expected_version()}"
    shutil.rmtree(site)


# --- function files ------------------------------------------------------------------------------


def _copy_sql(tmp_path: Path) -> Path:
    root = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", root)
    return root


async def _has_execute(conn: db.Connection, role: str, function: str) -> bool:
    return bool(
        await conn.fetchval("SELECT has_function_privilege($1, $2, 'EXECUTE')", role, function)
    )


async def test_changed_function_file_reapplies_that_file_and_keeps_grants(
    empty_dsn: str, tmp_path: Path
) -> None:
    root = _copy_sql(tmp_path)
    role = f"tasker_reader_{os.getpid()}"
    readiness = "tasker.step_readiness(uuid)"
    grants = root / "functions" / "99_grants.sql"
    grants.write_text(
        f"REVOKE EXECUTE ON FUNCTION {readiness} FROM PUBLIC;\n"
        f"GRANT EXECUTE ON FUNCTION {readiness} TO {role};\n"
    )
    conn = await db.connect(empty_dsn, check_schema=False)
    await conn.execute(f"DROP ROLE IF EXISTS {role}")
    await conn.execute(f"CREATE ROLE {role}")
    try:
        await migrations.migrate(conn, directory=root)
        assert await _has_execute(conn, role, readiness)
        assert not await _has_execute(conn, "public", readiness)

        inspection = root / "functions" / "90_inspection.sql"
        text = inspection.read_text()
        # a changed body, a changed signature (old overload must not survive) and a removed
        # function, all in one file
        assert "'Per step of a task:" in text
        text = text.replace("'Per step of a task:", "'Changed: per step of a task:")
        text = text.replace(
            "CREATE FUNCTION tasker.effective_task_state(p_task uuid, p_state text)",
            "CREATE FUNCTION tasker.effective_task_state(p_task uuid, p_state text, "
            "p_extra integer DEFAULT 0)",
        )
        text = text.replace(
            "COMMENT ON FUNCTION tasker.effective_task_state(uuid,text)",
            "COMMENT ON FUNCTION tasker.effective_task_state(uuid,text,integer)",
        )
        text += "\nCREATE FUNCTION tasker.scratch_fn() RETURNS int LANGUAGE sql AS 'SELECT 1';\n"
        inspection.write_text(text)
        report = await migrations.migrate(conn, directory=root)
        assert report.applied == ()
        assert [f.name for f in report.functions] == ["90_inspection.sql", "99_grants.sql"]
        assert await conn.fetchval(
            f"SELECT obj_description('{readiness}'::regprocedure, 'pg_proc')"
        ) == "Changed: per step of a task: dependencies, retry eligibility, readiness and, " + (
            "in words, why it is not running."
        )
        overloads = await conn.fetch(
            "SELECT oid::regprocedure::text AS sig FROM pg_proc "
            "WHERE proname = 'effective_task_state' AND pronamespace = 'tasker'::regnamespace"
        )
        assert [r["sig"] for r in overloads] == ["tasker.effective_task_state(uuid,text,integer)"]
        assert await _has_execute(conn, role, readiness)
        assert not await _has_execute(conn, "public", readiness)
        # the view that uses the function was re-created with it
        assert await conn.fetchval("SELECT count(*) FROM tasker.v_tasks") == 0

        # a function that leaves the files is dropped
        inspection.write_text(
            inspection.read_text().replace(
                "\nCREATE FUNCTION tasker.scratch_fn() RETURNS int LANGUAGE sql AS 'SELECT 1';\n",
                "",
            )
        )
        report = await migrations.migrate(conn, directory=root)
        assert report.dropped == ("FUNCTION tasker.scratch_fn()",)
        assert await conn.fetchval("SELECT to_regprocedure('tasker.scratch_fn()') IS NULL")
        again = await migrations.migrate(conn, directory=root)
        assert not again.changed
    finally:
        await conn.execute("DROP SCHEMA tasker CASCADE")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_outdated_function_file_refused_then_fixed_by_migrate(dsn: str) -> None:
    admin = await db.connect(dsn)
    try:
        await admin.execute(
            "UPDATE tasker.schema_functions SET checksum = 'edited' WHERE file = '50_claim.sql'"
        )
        with pytest.raises(SchemaError) as err:
            await db.connect(dsn)
        assert "50_claim.sql" in str(err.value)
        assert err.value.error_code == "schema_outdated"
        report = await migrations.migrate(admin)
        # the grants file follows every change (re-creating a function drops its grants)
        assert [f.name for f in report.functions] == ["50_claim.sql", "99_grants.sql"]
        await (await db.connect(dsn)).close()
    finally:
        await admin.close()


async def test_older_package_refuses_newer_database(dsn: str) -> None:
    admin = await db.connect(dsn)
    try:
        await admin.execute(
            "UPDATE tasker.schema_engine SET engine_version = $1, package_version = '9.9.9'",
            migrations.ENGINE_VERSION + 1,
        )
        with pytest.raises(MigrationError) as err:
            await migrations.migrate(admin)
        message = str(err.value)
        assert "tasker-pg 9.9.9" in message
        assert "will not move a database backward" in message
        assert err.value.error_code == "schema_newer"
        with pytest.raises(SchemaError) as refused:
            await db.connect(dsn)
        assert refused.value.error_code == "schema_newer"
        # nothing was changed by the refused run
        assert await admin.fetchval("SELECT package_version FROM tasker.schema_engine") == "9.9.9"
    finally:
        await admin.close()


async def test_unknown_newer_migration_refused(dsn: str) -> None:
    admin = await db.connect(dsn)
    try:
        await admin.execute(
            "INSERT INTO tasker.schema_migrations (version, name, checksum) "
            "VALUES (9999, 'from_the_future', 'x')"
        )
        with pytest.raises(MigrationError, match="migration 9999"):
            await migrations.migrate(admin)
    finally:
        await admin.close()


def test_function_files_hold_no_state_and_define_each_object_once(tmp_path: Path) -> None:
    root = _copy_sql(tmp_path)
    shipped = migrations.load_function_files()
    names = [obj for f in shipped for obj in f.objects]
    assert len(names) == len(set(names)) > 40
    bad = root / "functions" / "97_bad.sql"
    bad.write_text("CREATE TABLE tasker.oops (id int);\n")
    with pytest.raises(MigrationError, match=r"97_bad\.sql creates a TABLE"):
        migrations.load_function_files(root)
    bad.write_text("CREATE FUNCTION tasker.send() RETURNS int LANGUAGE sql AS 'SELECT 1';\n")
    with pytest.raises(MigrationError, match=r"tasker\.send is defined in two function files"):
        migrations.load_function_files(root)


async def test_missing_schema_hint_names_the_dsn_given(empty_dsn: str) -> None:
    with pytest.raises(SchemaError) as err:
        await db.connect(empty_dsn)
    assert f"tasker-pg migrate --dsn '{db.mask_dsn(empty_dsn)}'" in str(err.value)
