"""`tasker-pg bench` and `python -m tasker_pg.bench`: parse the options, run, print, exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tasker_pg import bench_args
from tasker_pg.bench.options import EXIT_FAILED, EXIT_OK, BenchOptions, options_from_args
from tasker_pg.bench.runner import run_bench
from tasker_pg.errors import TaskerError


async def _run_cancellable(options: BenchOptions, *, out: TextIO | None) -> dict[str, Any]:
    """`run_bench`, cancelled by SIGTERM as asyncio.run cancels it on SIGINT: either way the
    cleanup runs (workers stopped, bench databases dropped)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = False
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            installed = True
    try:
        return await run_bench(options, out=out, progress=sys.stderr)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed arguments; exit 1 when a scenario failed."""
    options = options_from_args(args)
    try:
        report = asyncio.run(_run_cancellable(options, out=None if args.json else sys.stdout))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("tasker-pg bench: interrupted (workers stopped, databases dropped)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return EXIT_OK if report["ok"] else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of `python -m tasker_pg.bench`."""
    parser = argparse.ArgumentParser(
        prog="python -m tasker_pg.bench", description=bench_args.DESCRIPTION
    )
    bench_args.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tasker_pg.bench`."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
