"""argparse value types shared by the command-line modules (cli, worker_cli, bench).

Each raises `argparse.ArgumentTypeError`, so a bad value is a usage error (exit 2) whose
message says what was expected.
"""

from __future__ import annotations

import argparse
import math
import re
from datetime import datetime, timedelta


def number(text: str) -> float:
    """A finite number (seconds, milliseconds, scale factors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def integer(text: str) -> int:
    """A whole number."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port number, 0 (any free port) to 65535."""
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 to 65535), got {value}")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_AGO = re.compile(r"^(\d{1,9})([smhdw])$")
_AGO_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGO_LIMIT = timedelta(days=36500)


def point_in_time(text: str) -> datetime:
    """A timezone-aware point in time: an ISO 8601 timestamp (`2026-12-07T09:30:00Z`,
    `2026-12-07 09:30`; without an offset it is local time), or how long ago, a whole number
    with a unit: `30s`, `15m`, `1h`, `2d`, `1w` (at most 100 years)."""
    value = text.strip()
    ago = _AGO.match(value)
    if ago is not None:
        delta = timedelta(seconds=int(ago.group(1)) * _AGO_SECONDS[ago.group(2)])
        if delta > _AGO_LIMIT:
            raise argparse.ArgumentTypeError(f"at most 100 years ago, got {text!r}")
        return datetime.now().astimezone() - delta
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time (2026-12-07T09:30:00Z) or how long ago "
            f"(30m, 1h, 2d, 1w), got {text!r}"
        ) from None
    if moment.tzinfo is not None:
        return moment
    try:
        return moment.astimezone()
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"out of range: {text!r}") from None
