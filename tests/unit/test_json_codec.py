"""The JSON codec (tasker_pg.jsonutil): what it accepts, refuses and decodes, pinned.

Every jsonb value the engine stores or reads goes through `jsonutil.dumps`/`jsonutil.loads`
(the asyncpg codec of every connection, the outcome rules, the client's checks). The rules are
the standard library's with `allow_nan=False`: these tests hold the codec to them exactly,
error texts included, whatever library does the work. The last tests send values through a
real PostgreSQL and compare what comes back with the standard library's reading of the
server's own JSON text.

Every test runs twice: with orjson doing the work (when installed, as with `make setup`) and
with the standard library alone (orjson hidden from jsonutil), the codec of an installation
without the `fast` extra.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import math
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasker_pg import StepHandlerResult, db, jsonutil
from tasker_pg.errors import DatabaseError, PermanentError
from tasker_pg.outcome import Fence, outcome_from_exception, outcome_from_result


@pytest.fixture(autouse=True, params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which library jsonutil uses in this test (the other one is hidden from it)."""
    if request.param == "orjson":
        if jsonutil.backend() != "orjson":
            pytest.skip("orjson is not installed (the `fast` extra)")
    else:
        monkeypatch.setattr(jsonutil, "_orjson", None)
    assert jsonutil.backend() == request.param
    return str(request.param)


def stdlib_dumps(value: Any) -> str:
    """What the codec has always written: compact, UTF-8 kept, NaN and Infinity refused."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def stdlib_error(value: Any) -> tuple[type[BaseException], str]:
    """The exception class and text the standard library raises for `value`."""
    try:
        stdlib_dumps(value)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError(f"{value!r} encodes")


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (1 is not 1.0, -0.0 is not 0.0; NaN is
    NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Mode(enum.StrEnum):
    FAST = "fast"


class Name(str):
    pass


class Count(int):
    pass


class Ratio(float):
    pass


class Renamed(dict[str, Any]):
    """A dict whose items() the standard library's encoder asks for (orjson reads the dict)."""

    def items(self) -> Any:
        return [(f"renamed_{k}", v) for k, v in super().items()]


@dataclasses.dataclass
class Point:
    x: int


WITHOUT_ORJSON = r"""
import sys
sys.modules["orjson"] = None  # `import orjson` raises ImportError
from tasker_pg import jsonutil
assert jsonutil.backend() == "json", jsonutil.backend()
assert jsonutil.dumps({1: [2**70, "a\x00"]}) == '{"1":[1180591620717411303424,"a\\u0000"]}'
assert jsonutil.loads("[18446744073709551616]") == [2**64]
try:
    jsonutil.dumps([float("nan")])
except ValueError as exc:
    print(exc)
"""


def test_without_orjson_the_standard_library_does_the_work() -> None:
    """An installation without the `fast` extra: jsonutil imports and keeps the rules."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_ORJSON],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == stdlib_error([math.nan])[1] + "\n"


# --- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        [1, {"a": -math.inf}],
        {"result": {"deep": [[1.5, math.nan]]}},
        {"k": None, "n": math.inf},  # a null elsewhere in the same value
        {math.nan: 1},
        {math.inf: 1},
    ],
    ids=repr,
)
def test_nan_and_infinity_are_refused_with_the_standard_text(value: Any) -> None:
    kind, text = stdlib_error(value)
    assert kind is ValueError
    with pytest.raises(ValueError) as info:
        jsonutil.dumps(value)
    assert str(info.value) == text
    assert "Out of range float values are not JSON compliant" in text


@pytest.mark.parametrize(
    "value",
    [
        uuid.UUID(int=1),
        datetime.date(2024, 1, 1),
        datetime.datetime(2024, 1, 1, 12, 0, tzinfo=datetime.UTC),
        datetime.time(12, 0),
        decimal.Decimal("1.5"),
        {1, 2},
        b"bytes",
        Colour.RED,
        Point(1),
        object(),
        {"nested": [uuid.UUID(int=2)]},
        {"when": Colour.RED},
        {(1, 2): "tuple key"},
        {b"k": "bytes key"},
        {uuid.UUID(int=3): "uuid key"},
    ],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:40],
)
def test_what_is_not_plain_json_is_refused_with_the_standard_text(value: Any) -> None:
    kind, text = stdlib_error(value)
    assert kind is TypeError
    with pytest.raises(TypeError) as info:
        jsonutil.dumps(value)
    assert str(info.value) == text


def test_a_circular_value_is_refused() -> None:
    value: list[Any] = [1]
    value.append(value)
    with pytest.raises(ValueError, match=r"^Circular reference detected$"):
        jsonutil.dumps(value)


def test_nesting_beyond_the_recursion_limit_is_refused() -> None:
    value: Any = None
    for _ in range(100_000):
        value = [value]
    with pytest.raises(RecursionError):
        jsonutil.dumps(value)


# --- what is accepted, and how it is written -----------------------------------------------


def test_non_string_keys_become_strings_as_the_standard_library_writes_them() -> None:
    value = {1: "a", 2.5: "b", False: "c", None: "d", -(2**70): "e", "s": "f"}
    text = jsonutil.dumps(value)
    assert (
        text == '{"1":"a","2.5":"b","false":"c","null":"d","-1180591620717411303424":"e","s":"f"}'
    )
    assert jsonutil.loads(text) == {
        "1": "a",
        "2.5": "b",
        "false": "c",
        "null": "d",
        "-1180591620717411303424": "e",
        "s": "f",
    }


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2**63 - 1, "9223372036854775807"),
        (2**63, "9223372036854775808"),
        (2**64 - 1, "18446744073709551615"),
        (2**64, "18446744073709551616"),
        (-(2**63), "-9223372036854775808"),
        (-(2**63) - 1, "-9223372036854775809"),
        (10**40, "1" + "0" * 40),
        (
            {"id": -(10**30), "n": [2**100]},
            '{"id":-' + "1" + "0" * 30 + ',"n":[' + str(2**100) + "]}",
        ),
    ],
)
def test_integers_of_any_size_are_written_exactly_and_read_back_as_ints(
    value: Any, text: str
) -> None:
    assert jsonutil.dumps(value) == text
    assert same(jsonutil.loads(text), value)


@pytest.mark.parametrize(
    "value",
    [
        Level.HIGH,
        Mode.FAST,
        Name("text"),
        Count(5),
        Ratio(0.25),
        collections.OrderedDict(a=1, b=[2]),
        collections.defaultdict(list, a=[1]),
        (1, "two", (3.5, None)),
        {"k": (1, 2)},
        [True, False, None, 0, -0.0, 1.0, 0.1, 1e-7, 1e16, 1.7976931348623157e308],
        {"levels": [Level.HIGH], Name("key"): Mode.FAST},
        Renamed(a=1),
        {"inner": Renamed(b=[2])},
    ],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:40],
)
def test_subclasses_and_tuples_are_written_as_the_standard_library_writes_them(
    value: Any,
) -> None:
    text = jsonutil.dumps(value)
    assert same(json.loads(text), json.loads(stdlib_dumps(value)))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("a\x00b", '"a\\u0000b"'),
        ('\x01\x1f\t\n\r"\\', '"\\u0001\\u001f\\t\\n\\r\\"\\\\"'),
        ("\x7f\u2028\u00e9\U0001f600", '"\x7f\u2028\u00e9\U0001f600"'),
        ("x\ud800y", '"x\ud800y"'),  # a lone surrogate is kept (outcome.py replaces it)
        ({"k\x00": ["\udcff"]}, '{"k\\u0000":["\udcff"]}'),
    ],
    ids=["nul", "controls", "non-ascii", "lone surrogate", "nul and surrogate key"],
)
def test_nul_and_lone_surrogates_are_written_as_before(value: Any, text: str) -> None:
    assert jsonutil.dumps(value) == text


def test_deep_nesting_within_the_recursion_limit_is_written() -> None:
    value: Any = 1
    for _ in range(300):
        value = {"k": [value]}
    assert jsonutil.dumps(value) == '{"k":[' * 300 + "1" + "]}" * 300


# --- the outcome rules on top of the codec -------------------------------------------------

FENCE = Fence("0b7e3c52-4a57-4c39-a0c4-8f2d0c1e9b11", 1, 3)
FIX_RESULT = (
    "Return only plain JSON data (dict, list, str, int, float, bool, None): convert datetimes "
    "with .isoformat(), Decimals and UUIDs with str(); NaN and Infinity are not allowed."
)


def refusal(value: Any) -> str:
    """How the outcome rules word the standard library's refusal of `value`."""
    kind, text = stdlib_error(value)
    return f"{text} (NaN or Infinity)" if kind is ValueError else text


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf, uuid.UUID(int=1), Colour.RED, Point(2)], ids=repr
)
@pytest.mark.parametrize("part", ["result", "metadata"])
def test_a_result_or_metadata_the_codec_refuses_is_an_invalid_result(bad: Any, part: str) -> None:
    value = {"ok": 1, "bad": [bad]}
    returned = (
        StepHandlerResult.success(value)
        if part == "result"
        else StepHandlerResult.success({"ok": 1}, metadata=value)
    )
    error = outcome_from_result(returned, fence=FENCE, duration_ms=1.0).to_json()["error"]
    assert (error["error_type"], error["retryable"]) == ("invalid_result", False)
    assert error["message"] == (
        f"step handler returned a {part} that is not JSON-serialisable: {refusal(value)}. "
        + FIX_RESULT
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, uuid.UUID(int=1)], ids=repr)
def test_a_checkpoint_the_codec_refuses_is_an_invalid_result(bad: Any) -> None:
    returned = StepHandlerResult.checkpoint(cursor={"at": bad}, items_processed=1)
    error = outcome_from_result(returned, fence=FENCE, duration_ms=1.0).to_json()["error"]
    checkpoint = {"cursor": {"at": bad}, "items_processed": 1, "accumulated_results": None}
    assert error["message"] == (
        f"step handler returned a checkpoint that is not JSON-serialisable: "
        f"{refusal(checkpoint)}. The cursor and accumulated_results must be plain JSON data "
        "(dict, list, str, int, float, bool, None)."
    )


def test_nan_in_an_error_context_or_failure_metadata_is_stored_as_its_repr() -> None:
    exc = PermanentError("x", context={"n": math.nan, "i": -math.inf, 1: 2, "u": Colour.RED})
    error = outcome_from_exception(exc, fence=FENCE, duration_ms=1.0).to_json()["error"]
    assert error["context"] == {"n": "nan", "i": "-inf", "1": 2, "u": repr(Colour.RED)}
    failed = StepHandlerResult.failure("x", context={"n": math.nan}, metadata={"m": math.inf})
    outcome = outcome_from_result(failed, fence=FENCE, duration_ms=1.0).to_json()
    assert (outcome["error"]["context"], outcome["metadata"]) == ({"n": "nan"}, {"m": "inf"})


def test_a_result_with_non_string_keys_and_big_integers_is_stored_as_written() -> None:
    value = {1: 2**70, None: [1.5], "s": -(2**64)}
    outcome = outcome_from_result(
        StepHandlerResult.success(value), fence=FENCE, duration_ms=1.0
    ).to_json()
    assert outcome["result"] is value
    assert jsonutil.dumps(outcome["result"]) == (
        '{"1":1180591620717411303424,"null":[1.5],"s":-18446744073709551616}'
    )


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
        "[1" + "0" * 400 + "]",
        "123456789012345678901234567890.123",
        "1e400",
        "-1e400",
        "1e-400",
        "NaN",
        "[Infinity, -Infinity]",
        "-0",
        "-0.0",
        "1.0",
        "1E+2",
        "0.1e1",
        "1.5e-7",
        '{"a": 1, "a": 2}',
        '"\\ud800"',
        '"\\ud83d\\ude00 \\u0000"',
        '{"id": "12345678901234567890123"}',
        ' {"nested": [{"x": [1, 2.5, null, true, "s"]}], "e": {}} ',
    ],
)
def test_decoding_gives_the_standard_library_values(text: str) -> None:
    assert same(jsonutil.loads(text), json.loads(text))
    assert same(jsonutil.loads(text.encode()), jsonutil.loads(text))


@pytest.mark.parametrize("text", ["", "[1,", "{'a': 1}", "01", '"\x01"', "[1] x"])
def test_invalid_json_text_is_refused(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonutil.loads(text)


# --- any JSON value: the same text meaning, the same values back ----------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.text(alphabet=st.characters(codec=None, categories=None), max_size=8)
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@given(_json_values)
def test_any_json_value_encodes_to_the_standard_library_meaning(value: Any) -> None:
    text = jsonutil.dumps(value)
    assert same(json.loads(text), json.loads(stdlib_dumps(value)))


@given(_json_values)
def test_any_json_text_decodes_to_the_standard_library_values(value: Any) -> None:
    text = stdlib_dumps(value)
    assert same(jsonutil.loads(text), json.loads(text))
    pretty = json.dumps(value, ensure_ascii=True, indent=1)  # other whitespace and escapes
    assert same(jsonutil.loads(pretty), json.loads(pretty))


# --- through PostgreSQL --------------------------------------------------------------------

SENT = [
    0.1,
    1e-7,
    1e300,
    -0.0,
    1.0,
    2**64,
    -(2**70),
    10**40,
    "text \u2028 \u00e9 \U0001f600",
    {"nested": [{"a": [1, 2.5, None, True, "x"], "b": {}}], "id": 2**63},
    [0.1 + 0.2, 123456789.123456789, 5e-324],
]


@pytest.mark.parametrize("value", SENT, ids=repr)
@pytest.mark.parametrize("typename", ["jsonb", "json"])
async def test_values_sent_come_back_as_the_server_text_reads(
    conn: db.Connection, value: Any, typename: str
) -> None:
    row = await conn.fetchrow(f"SELECT $1::{typename} AS v, $1::{typename}::text AS t", value)
    assert row is not None
    assert same(row["v"], json.loads(row["t"]))


async def test_sent_values_keep_their_types_through_jsonb(conn: db.Connection) -> None:
    """jsonb keeps numbers as numerics: a float without a fraction comes back as the int it
    prints as, and a numeric has no negative zero."""
    got = await conn.fetchval("SELECT $1::jsonb", [2**64, 1.5, 1e20, 1e300, -0.0])
    assert same(got, [2**64, 1.5, 10**20, 10**300, 0.0])


@pytest.mark.parametrize(
    "literal",
    [
        "1e400",
        "-1e400",
        "123456789012345678901234567890.123",
        "0.1000000000000000055511151231257827",
        "[1.5e-7, 2E+3, -0, 0.0]",
        "18446744073709551616",
        "9223372036854775807",
        '{"k": [1, {"deep": [null, false, "\\u00e9"]}], "big": 1e25}',
    ],
)
async def test_server_made_jsonb_decodes_to_the_standard_library_values(
    conn: db.Connection, literal: str
) -> None:
    row = await conn.fetchrow("SELECT $1::text::jsonb AS v, $1::text::jsonb::text AS t", literal)
    assert row is not None
    assert same(row["v"], json.loads(row["t"]))


@pytest.mark.parametrize("value", [math.nan, {"a": [math.inf]}, {"x": -math.inf}], ids=repr)
async def test_nan_sent_as_jsonb_is_refused_before_the_server(
    conn: db.Connection, value: Any
) -> None:
    _, text = stdlib_error(value)
    with pytest.raises(DatabaseError) as info:
        await conn.fetchval("SELECT $1::jsonb", value)
    assert str(info.value) == f"invalid input for query argument $1: {value!r} ({text})"
