"""JSON encoding used everywhere tasker-pg crosses into PostgreSQL (jsonb) or out to users.

One place decides the rules: NaN and Infinity are refused (jsonb cannot store them), and
anything that is not plain JSON data raises `TypeError`/`ValueError` so callers can turn it
into a clear error instead of a half-written row.

The rules are the standard library's `json` with `allow_nan=False`, error texts included. When
orjson is installed (the `fast` extra) it does the work, and every case where it would differ
from those rules goes to `json` instead:

- encoding: orjson writes NaN and Infinity as null and natively encodes UUIDs, enums, dates
  and dataclasses, which `json` refuses; it refuses non-string keys, integers beyond 64 bits,
  lone surrogates and nesting deeper than 254, which `json` accepts. So its text is used only
  when it decodes back equal to the value (NaN becomes None, a UUID a str: not equal) and
  orjson raised nothing (subclasses, dates and dataclasses are passed through to raise);
  otherwise `json` encodes the value, accepting or refusing it exactly as before.
- decoding: orjson reads an integer beyond 64 bits as a float. Text holding a run of 19 or
  more digits (anywhere, strings included) goes to `json`, as does text orjson refuses (NaN
  and Infinity literals, 1e400, lone surrogate escapes).

The module is the only one that imports orjson; without it everything runs on `json`.
"""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Any

_orjson: ModuleType | None
try:
    import orjson as _orjson
except ImportError:  # the `fast` extra is not installed
    _orjson = None

_OPTIONS = 0
if _orjson is not None:
    # dates, dataclasses and subclasses of str/int/dict/list go to `json` (orjson raises)
    _OPTIONS = (
        _orjson.OPT_PASSTHROUGH_DATETIME
        | _orjson.OPT_PASSTHROUGH_DATACLASS
        | _orjson.OPT_PASSTHROUGH_SUBCLASS
    )

# 19 digits: every integer orjson could misread (beyond 64 bits) has at least 20, and a run of
# 19 covers the signed 64-bit edge; numbers with long mantissas go to `json` as well.
_LONG_DIGITS = re.compile("[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(b"[0-9]{19}")


def backend() -> str:
    """Which library encodes and decodes: "orjson" or "json"."""
    return "json" if _orjson is None else "orjson"


def dumps(value: Any) -> str:
    """Encode `value` as compact JSON text; raises TypeError/ValueError for non-JSON data."""
    fast = _orjson
    if fast is not None:
        try:
            data: bytes = fast.dumps(value, option=_OPTIONS)
            if fast.loads(data) == value:
                return data.decode()
        except (TypeError, ValueError):
            pass  # `json` decides: it refuses with its own text, or accepts as it always did
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """Decode JSON text (as returned by PostgreSQL for json/jsonb)."""
    fast = _orjson
    if fast is not None:
        if isinstance(text, str):
            short_numbers = _LONG_DIGITS.search(text) is None
        else:
            short_numbers = _LONG_DIGITS_BYTES.search(text) is None
        if short_numbers:
            try:
                return fast.loads(text)
            except ValueError:
                pass  # `json` decides (NaN literals, 1e400, lone surrogates) or refuses
    return json.loads(text)
