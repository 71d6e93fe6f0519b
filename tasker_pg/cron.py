"""Cron expressions as the engine reads them (the rules of sql/functions/87_schedules.sql).

The database parses cron and computes every slot (`tasker.cron_next`); this module applies the
same validity rules in Python, so a template whose `schedules:` the database would refuse is
refused when it is loaded, with the same verdict:

- five fields: minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC, day of week
  0-7 or SUN-SAT (0 and 7 both Sunday), each a comma list of `*`, `N` or `N-M`, with an optional
  `/STEP` (1 to the size of the field's range; `N/STEP` runs from N to the field's end); names
  are case-insensitive and ranges may not run backwards;
- or one alias: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly;
- at most 256 bytes, and at least one slot within 3000 days of today;
- a time zone is a name of the tz database (`zoneinfo`), at most 64 bytes.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo
from dataclasses import dataclass

__all__ = ["ALIASES", "CronError", "CronSpec", "check_time_zone", "parse_cron"]

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_CRON_BYTES = 256
MAX_ZONE_BYTES = 64
SEARCH_DAYS = 3000

_ITEM_RE = re.compile(r"(\*|[0-9]{1,2}|[A-Z]{3})(?:-([0-9]{1,2}|[A-Z]{3}))?(?:/([0-9]{1,2}))?")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


class CronError(ValueError):
    """A cron expression or time zone the engine would refuse; the message says why."""


@dataclass(frozen=True)
class CronSpec:
    """The allowed values of each field (days of week 0-6, Sunday 0) and whether each day
    field started with `*` (when neither does, a day matches either of them)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]
    dom_star: bool
    dow_star: bool

    def day_matches(self, day: datetime.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.doms
        dow = (day.isoweekday() % 7) in self.dows
        return (dom and dow) if (self.dom_star or self.dow_star) else (dom or dow)

    def fires_within(self, start: datetime.date, days: int = SEARCH_DAYS) -> bool:
        """Whether some day from `start` to `start + days` has a slot."""
        return any(self.day_matches(start + datetime.timedelta(d)) for d in range(days + 1))


def _field(text: str, what: str, lo: int, hi: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()

    def number(token: str) -> int | None:
        if token[0].isdigit():
            return int(token)
        return names.index(token) + lo if token in names else None

    for item in text.upper().split(","):
        shown = repr(item.lower())
        m = _ITEM_RE.fullmatch(item)
        if m is None or (m[1] == "*" and m[2] is not None):
            raise CronError(
                f"cron {what} field: {shown} is not *, N, N-M or one of them with /STEP"
            )
        if m[1] == "*":
            start, end = lo, hi
        else:
            first = number(m[1])
            last = number(m[2]) if m[2] is not None else first if m[3] is None else hi
            if first is None or last is None:
                listed = ", ".join(n.lower() for n in names) or "none: numbers only"
                raise CronError(f"cron {what} field: {shown} names no {what} (names: {listed})")
            start, end = first, last
        if not (lo <= start <= hi and lo <= end <= hi):
            raise CronError(f"cron {what} field: {shown} is out of range {lo}-{hi}")
        if start > end:
            raise CronError(f"cron {what} field: {shown} is a range that runs backwards")
        step = int(m[3]) if m[3] is not None else 1
        if not 1 <= step <= hi - lo + 1:
            raise CronError(
                f"cron {what} field: {shown} has step {step}; a step is from 1 to {hi - lo + 1}"
            )
        values.update(range(start, end + 1, step))
    return frozenset(values)


def parse_cron(expr: str, *, today: datetime.date | None = None) -> CronSpec:
    """Parse `expr` by the engine's rules; `CronError` when the database would refuse it
    (including an expression with no slot within 3000 days of `today`, default today UTC)."""
    raw = len(expr.encode())
    text = expr.strip().lower()
    size = raw if raw > 65536 else len(text.encode())
    if raw > 65536 or size > MAX_CRON_BYTES:
        raise CronError(f"cron expression is {size} bytes; at most {MAX_CRON_BYTES} are allowed")
    text = ALIASES.get(text, text)
    if text.startswith("@"):
        raise CronError(f"cron alias {text[:40]!r} is unknown (valid: {', '.join(ALIASES)})")
    fields = text.split() if text else []
    if len(fields) != 5:
        raise CronError(
            f"cron expression {expr[:100]!r} has {len(fields)} fields; expected 5: minute hour "
            "day-of-month month day-of-week (or an alias such as @hourly)"
        )
    spec = CronSpec(
        minutes=_field(fields[0], "minute", 0, 59, ()),
        hours=_field(fields[1], "hour", 0, 23, ()),
        doms=_field(fields[2], "day-of-month", 1, 31, ()),
        months=_field(fields[3], "month", 1, 12, _MONTHS),
        dows=frozenset(d % 7 for d in _field(fields[4], "day-of-week", 0, 7, _DAYS)),
        dom_star=fields[2].startswith("*"),
        dow_star=fields[4].startswith("*"),
    )
    start = today or datetime.datetime.now(datetime.UTC).date()
    if not spec.fires_within(start):
        raise CronError(f"cron expression {expr!r} never fires (no slot within 3000 days)")
    return spec


def check_time_zone(name: str) -> str:
    """`name` if it is a time zone of the tz database, else `CronError`."""
    ok = len(name.encode()) <= MAX_ZONE_BYTES and re.fullmatch(r"[A-Za-z][A-Za-z0-9_/+-]*", name)
    if ok:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            ok = None
    if not ok:
        raise CronError(
            f"time zone {name[:100]!r} is unknown: give a name of the tz database such as UTC "
            "or Europe/Berlin"
        )
    return name
