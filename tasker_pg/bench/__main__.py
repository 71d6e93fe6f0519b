"""`python -m tasker_pg.bench`: the benchmark without the rest of the `tasker-pg` command."""

from __future__ import annotations

import sys

from tasker_pg.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
