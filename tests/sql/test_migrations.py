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
        second = await migrations.migrate(conn)
        assert second.applied == ()
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
        f"applied {m.filename}" for m in migrations.load_migrations()
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
        assert await applied_versions(empty_dsn) == [(1, "first")]
        # the failed file's own statements were rolled back with it
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
