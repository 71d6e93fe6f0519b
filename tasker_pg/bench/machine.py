"""The machine under the benchmark: CPU seconds of processes (from /proc) and its description."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_text(path: str) -> str | None:
    """A small file's text (from /proc), None when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where that is unavailable)."""
    text = read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds spent by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._before: dict[int, float] = {}
        self.seconds: float | None = None

    def start(self) -> None:
        self._before = {}
        for pid in self.pids:
            value = proc_cpu_seconds(pid)
            if value is not None:
                self._before[pid] = value

    def stop(self) -> float | None:
        if not self._before:
            return None
        total = 0.0
        for pid, before in self._before.items():
            after = proc_cpu_seconds(pid)
            if after is None:
                return None  # the process went away: no honest number
            total += after - before
        self.seconds = total
        return total


def cpu_per_step(seconds: float | None, steps: int) -> float | None:
    """Microseconds of CPU per step (or message), None when not measured."""
    return None if seconds is None or steps <= 0 else round(seconds / steps * 1e6, 1)


def server_is_local(settings: Mapping[str, Any]) -> bool:
    """Whether the server's backend is a `postgres` process on this machine (so /proc reads
    its CPU time), from the row of `queries.server_settings`."""
    addr = settings["server_addr"]
    local_addr = addr is None or addr.split("/")[0] in ("127.0.0.1", "::1")
    comm = (read_text(f"/proc/{settings['backend_pid']}/comm") or "").strip()
    return local_addr and comm == "postgres"


def describe(settings: Mapping[str, Any], server: str, server_local: bool) -> dict[str, Any]:
    """The report's `machine` section: this machine and the server's settings."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    cpu_model = ""
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": cores,
        "cpu_model": cpu_model or platform.processor(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres_version": settings["server_version"],
        "fsync": settings["fsync"],
        "synchronous_commit": settings["synchronous_commit"],
        "shared_buffers": settings["shared_buffers"],
        "full_page_writes": settings["full_page_writes"],
        "max_connections": settings["max_connections"],
        "server": server,
        "server_local": server_local,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
