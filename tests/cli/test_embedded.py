"""The embedded PostgreSQL: start, stop, restart, idempotent start, crash leftovers, root."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasker_pg.dsn import resolve_dsn
from tasker_pg.embedded import EmbeddedCluster
from tasker_pg.errors import DatabaseNotFoundError, EmbeddedDatabaseError
from tests.support.pgserver import docker_unavailable_reason


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    tmp_path.chmod(0o755)
    c = EmbeddedCluster(tmp_path / "home", durable=False)
    try:
        yield c
    finally:
        c.destroy()


def _psql(dsn: str, sql: str) -> str:
    return subprocess.run(
        ["psql", dsn, "-Atc", sql], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def _owner_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def test_start_stop_start(cluster: EmbeddedCluster) -> None:
    dsn = cluster.start()
    assert _psql(dsn, "select 41 + 1") == "42"
    port = cluster.port
    assert cluster.stop() is True
    assert cluster.status().running is False
    assert cluster.stop() is False
    assert cluster.start() == dsn  # same port kept across restarts
    assert cluster.port == port
    assert _psql(dsn, "select current_database()") == "tasker"


def test_shared_buffers_is_a_quarter_of_memory_within_bounds(cluster: EmbeddedCluster) -> None:
    from tasker_pg.embedded import shared_buffers_mb

    total_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    expected = max(128, min(1024, total_mb // 4))
    assert shared_buffers_mb() == expected
    dsn = cluster.start()
    setting = _psql(
        dsn, "select setting::bigint * 8 / 1024 from pg_settings where name = 'shared_buffers'"
    )
    assert int(setting) == expected


def test_a_fresh_cluster_is_durable_and_tuned_for_a_queue_workload(tmp_path: Path) -> None:
    from tasker_pg.embedded import QUEUE_WORKLOAD_SETTINGS

    tmp_path.chmod(0o755)
    durable = EmbeddedCluster(tmp_path / "home")  # the default: what `tasker-pg db start` makes
    try:
        dsn = durable.start()
        names = ["fsync", "synchronous_commit", *(name for name, _ in QUEUE_WORKLOAD_SETTINGS)]
        shown = dict(
            line.split("|", 1)
            for line in _psql(
                dsn,
                "select name, current_setting(name) from unnest(array["
                + ", ".join(f"'{n}'" for n in names)
                + "]) name",
            ).splitlines()
        )
        assert shown["fsync"] == "on" and shown["synchronous_commit"] == "on"
        for name, value in QUEUE_WORKLOAD_SETTINGS:
            assert shown[name] == value, (name, shown[name], value)
    finally:
        durable.destroy()


def test_second_start_is_noop(cluster: EmbeddedCluster) -> None:
    cluster.start()
    pid = cluster.status().pid
    cluster.start()
    assert cluster.status().pid == pid  # the running server was left alone


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the tests run as root")
def test_server_not_owned_by_root(cluster: EmbeddedCluster) -> None:
    cluster.start()
    pid = cluster.status().pid
    assert pid is not None
    assert _owner_of(pid) != 0


def _psql_without_password(dsn: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """psql with the password removed from `dsn` and no other source of one."""
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    env["PGPASSFILE"] = os.devnull
    parts = urllib.parse.urlsplit(dsn)
    port = parts.port
    assert port is not None
    bare = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{port}"))
    return subprocess.run(
        ["psql", "-w", bare, *extra, "-Atc", "select 1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_connections_need_the_password(cluster: EmbeddedCluster) -> None:
    dsn = cluster.start()
    password = cluster.password_file.read_text().strip()
    assert len(password) >= 24
    assert urllib.parse.urlsplit(dsn).password == password
    assert _psql(dsn, "select current_user") == "postgres"

    over_tcp = _psql_without_password(dsn)
    assert over_tcp.returncode != 0
    assert "password" in over_tcp.stderr
    # The unix socket in the data directory asks for it too.
    over_socket = _psql_without_password(dsn, "-h", str(cluster.socket_dir))
    assert over_socket.returncode != 0
    assert "password" in over_socket.stderr
    wrong = dsn.replace(f":{password}@", ":not-the-password@")
    assert _psql_without_password(wrong).returncode != 0

    # Readable by the user who runs tasker-pg only; nothing else left behind by initdb.
    st = cluster.password_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert not list(cluster.data_dir.parent.glob(".initdb-password*"))
    assert cluster.stop() is True
    assert cluster.start() == dsn  # the same password after a restart


def test_cluster_created_with_trust_auth_keeps_working(
    cluster: EmbeddedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = cluster.start()
    cluster.stop()
    # What an older tasker-pg left: trust authentication and no password file.
    hba = cluster.data_dir / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))
    cluster.password_file.unlink()
    trust_dsn = cluster.start()
    assert trust_dsn == dsn.replace(f":{urllib.parse.urlsplit(dsn).password}@", "@")
    assert _psql(trust_dsn, "select 1") == "1"
    assert "created with trust authentication" in caplog.text
    assert "tasker-pg db destroy" in caplog.text


def test_missing_password_file_is_named(cluster: EmbeddedCluster) -> None:
    cluster.start()
    cluster.password_file.unlink()
    with pytest.raises(EmbeddedDatabaseError, match=r"password file .* is missing"):
        cluster.dsn()


def test_start_after_crash_with_stale_pid_file(cluster: EmbeddedCluster) -> None:
    dsn = cluster.start()
    pid = cluster.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cluster.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    # kill the orphaned backends too, as a machine crash would
    subprocess.run(["pkill", "-9", "-f", f"-D {cluster.data_dir}"], check=False)
    assert (cluster.data_dir / "postmaster.pid").exists()
    assert cluster.start() == dsn
    assert _psql(dsn, "select 1") == "1"


def test_cli_url_status_and_dsn_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.chmod(0o755)
    home = tmp_path / "clihome"
    env = {**os.environ, "TASKER_PG_HOME": str(home)}
    for var in ("TASKER_DATABASE_URL", "DATABASE_URL"):
        env.pop(var, None)
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TASKER_PG_HOME", str(home))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tasker_pg.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with pytest.raises(DatabaseNotFoundError) as err:
        resolve_dsn()
    for option in ("--dsn", "TASKER_DATABASE_URL", "DATABASE_URL", "tasker-pg db start"):
        assert option in str(err.value)
    try:
        started = cli("db", "start")
        assert started.returncode == 0
        url = cli("db", "url").stdout.strip()
        password = (home / "password").read_text().strip()
        assert url.startswith(f"postgresql://postgres:{password}@127.0.0.1:")
        status = cli("db", "status")
        assert status.returncode == 0
        # only `db url` prints the password; start and status mask it
        for shown in (started.stdout, status.stdout):
            assert password not in shown and "postgres:***@127.0.0.1:" in shown, shown
        assert resolve_dsn().dsn == url
        assert resolve_dsn("postgresql://x@h/db").source == "--dsn"
        monkeypatch.setenv("DATABASE_URL", "postgresql://from-database-url/db")
        assert resolve_dsn().source == "DATABASE_URL"
        monkeypatch.setenv("TASKER_DATABASE_URL", "postgresql://from-tasker-url/db")
        assert resolve_dsn().source == "TASKER_DATABASE_URL"
        migrate = cli("migrate")
        assert migrate.returncode == 0, migrate.stderr
        assert "schema at version" in migrate.stdout
        assert (
            _psql(url, "select tasker.create_queue('demo'), tasker.send('demo', '{\"a\":1}')")
            == "|1"
        )
    finally:
        cli("db", "destroy")
    assert cli("db", "status").returncode == 1


def test_testcontainers_path() -> None:
    if os.environ.get("TASKER_TEST_DOCKER") != "1":
        pytest.skip("Docker is used only when asked for: TASKER_TEST_DOCKER=1")
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"testcontainers PostgreSQL not tried: {reason}")
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as pg:
        assert _psql(pg.get_connection_url(), "select 1") == "1"
