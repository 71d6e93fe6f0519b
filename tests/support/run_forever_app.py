"""A script that runs a worker the way the README shows: `Worker([...], registry).run_forever()`.

`python -m tests.support.run_forever_app GRACE_SECONDS`, with the database in
TASKER_DATABASE_URL; serves the `console` namespace with tests/support/workflows/console.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tasker_pg
from tasker_pg.template import load_templates

TEMPLATE = Path(__file__).parent / "workflows" / "console.yaml"


def main() -> None:
    registry = tasker_pg.HandlerRegistry()
    registry.register_module("tests.support.workflows.console_handlers")
    worker = tasker_pg.Worker(
        ["console"],
        registry,
        templates=load_templates(TEMPLATE),
        grace_seconds=float(sys.argv[1]),
        poll_interval=0.2,
        summary_interval=0,
        worker_id="app",
    )
    worker.run_forever()
    print("run_forever returned", flush=True)


if __name__ == "__main__":
    main()
