"""JSON encoding used everywhere tasker-pg crosses into PostgreSQL (jsonb) or out to users.

One place decides the rules: NaN and Infinity are refused (jsonb cannot store them), and
anything that is not plain JSON data raises `TypeError`/`ValueError` so callers can turn it
into a clear error instead of a half-written row.
"""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    """Encode `value` as compact JSON text; raises TypeError/ValueError for non-JSON data."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """Decode JSON text (as returned by PostgreSQL for json/jsonb)."""
    return json.loads(text)
