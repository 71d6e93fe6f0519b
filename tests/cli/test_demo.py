"""`tasker-pg demo` on a clean embedded database: it runs the batch and exits 0.

The output must show tasks that completed, the one that failed and the one that was retried.
No timing assertion (the demo prints its wall time; CI machines vary).
"""

from __future__ import annotations

import os
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


def test_demo_on_a_clean_embedded_database(home: Path) -> None:
    env = dict(os.environ, TASKER_PG_HOME=str(home), NO_COLOR="1")
    for var in ("TASKER_DATABASE_URL", "DATABASE_URL"):
        env.pop(var, None)
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
    assert "20/20 tasks: 19 complete, 1 error" in out
    assert "tasks complete                19" in out
    assert "tasks error                   1" in out
    assert "tasks retried, then complete  1" in out
    assert "failed:  process_payment of task" in out and "PAYMENT_DECLINED" in out
    assert "retried: process_payment of task" in out and "complete after 2 attempts" in out
    # the two DAGs: the retried payment took 2 attempts; the declined one says why
    assert "process_payment    complete  2/3" in out
    assert "failed: PermanentError: Payment declined" in out
    assert "tasker-pg task show " in out and "tasker-pg step explain " in out
    assert 'psql "$(tasker-pg db url)"' in out and "tasker.v_tasks" in out
    assert "Traceback" not in result.stderr
