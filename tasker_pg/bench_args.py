"""The command-line options of `tasker-pg bench`, without the benchmark itself.

`tasker-pg` builds its whole parser at start-up; this module lets it add the `bench` subcommand
without importing `tasker_pg.bench` (scenarios, worker processes, report), which is loaded only
when the subcommand runs. `python -m tasker_pg.bench` registers the same options from here.
"""

from __future__ import annotations

import argparse
from typing import Any

from tasker_pg import argtypes

SCENARIOS = (
    "baseline",
    "flat",
    "dag",
    "fanout",
    "deep",
    "backlog",
    "retention",
    "limits",
    "scale",
    "xmin",
    "latency",
    "create",
)
DESCRIPTION = (
    "`tasker-pg bench`: throughput and latency, measured against a raw SQL baseline in the "
    "same run."
)
HELP = "throughput and latency against a raw SQL baseline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options (shared by `tasker-pg bench` and `python -m tasker_pg.bench`)."""
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        default=[],
        metavar="NAME",
        help=f"scenario to run, repeatable: {', '.join(SCENARIOS)} (default: all; flat, dag, "
        "fanout, deep, backlog, retention and scale bring the baseline along, their ratios need "
        "it; deep, backlog and retention bring flat, their clean rate, and xmin brings dag, "
        "its capacity)",
    )
    parser.add_argument(
        "--workers",
        type=argtypes.positive_int,
        default=1,
        metavar="N",
        help="worker processes for flat and dag (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=argtypes.positive_int,
        default=200,
        metavar="N",
        help="steps each worker runs at once (default 200)",
    )
    parser.add_argument(
        "--n",
        type=argtypes.positive_float,
        default=1.0,
        metavar="F",
        help="scale every count by F (default 1: 100k baseline messages, 20k flat tasks, "
        "2k + 2k dag tasks, 200 + 200 latency tasks, 2k + 20k created tasks)",
    )
    parser.add_argument(
        "--handler-ms",
        type=argtypes.non_negative_float,
        default=0.0,
        metavar="MS",
        help="each handler awaits asyncio.sleep(MS) first (default 0: no-op handlers; the "
        "targets only apply to 0)",
    )
    parser.add_argument(
        "--function-times",
        action="store_true",
        help="track the server time of every engine function in each scenario's database "
        "(track_functions = all) and report the top ones per scenario: calls, and self and "
        "total time per call",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--dsn",
        help="server to benchmark on (its user needs CREATEDB, and CREATEROLE until migrate has "
        "created the tasker roles; default: the embedded cluster, started if needed)",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run `tasker-pg bench` with parsed options (imports the benchmark now, not before)."""
    from tasker_pg.bench.cli import cmd_bench

    return cmd_bench(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to the `tasker-pg` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help=HELP, description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser
