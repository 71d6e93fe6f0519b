"""Running a worker as a program: signals wired to a graceful stop, logging for a console.

Used by `Worker.run_forever()` and by the `tasker-pg worker` command. These are application
entry points, so they may configure logging; the rest of the library never does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from tasker_pg import logformat

if TYPE_CHECKING:
    from tasker_pg.worker.core import Worker

logger = logging.getLogger(__name__)


def configure_console_logging(
    level: int, log_format: str = "text"
) -> logformat.TextFormatter | logformat.JsonFormatter:
    """Send every logger's records at `level` and above to stderr, in one format.

    The root logger gets the level (and a stderr handler when it has none), so a handler's own
    `logging.getLogger(__name__)` records come out next to the worker's. Its plain stream
    handlers (the one added here, or by `logging.basicConfig`) get the `log_format` formatter
    (`tasker_pg.logformat`), which is returned; other handlers are left alone.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    chosen = logformat.formatter(log_format)
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(chosen)
    root.setLevel(level)
    return chosen


async def run_with_signals(worker: Worker) -> None:
    """`await worker.run()` with SIGTERM and SIGINT asking it to stop (a second one: at once)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, worker, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        await worker.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    if not worker.stop_requested:
        logger.info("worker %s: received %s", worker.worker_id, sig.name)
    worker.request_stop(reason=sig.name)


def run_forever(worker: Worker) -> None:
    """Run `worker` in a new event loop until SIGINT/SIGTERM, then return after a clean stop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "Worker.run_forever() blocks and starts its own event loop; inside async code use "
            "`await worker.run()` or `async with worker:`"
        )
    if not logging.getLogger().handlers:
        configure_console_logging(logging.INFO)
    try:
        asyncio.run(run_with_signals(worker))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were in place: asyncio.run cancelled the worker,
        # whose run() closed its sessions; there is nothing left to stop.
        logger.info("worker %s: interrupted while starting", worker.worker_id)
    if worker.abandoned_threads:
        logger.warning(
            "worker %s: %d sync handler thread(s) still running; the interpreter waits for them "
            "before it exits",
            worker.worker_id,
            worker.abandoned_threads,
        )
