"""Checks the mutation campaign (`make mutate`) found missing: each test kills mutants of the
outcome rules that the rest of the unit tests let survive (named in each docstring)."""

from __future__ import annotations

import asyncio
import json
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tasker_pg import StepHandlerResult, jsonutil
from tasker_pg.context import BlockingFetchError, StepContext
from tasker_pg.errors import PermanentError, RetryableError, TaskerError
from tasker_pg.outcome import (
    Failure,
    Fence,
    StepError,
    _safe_object,
    _truncate_text,
    outcome_from_exception,
    outcome_from_result,
    refused_outcome,
    timeout_outcome,
    truncate_head,
    truncate_tail,
)
from tasker_pg.rows import ClaimedStep
from tasker_pg.template import (
    MAX_STEPS,
    VERSION_MAX_LEN,
    TaskTemplate,
    TemplateValidationError,
    load_template,
    load_templates,
    parse_version,
)

STEP = "0b7e3c52-4a57-4c39-a0c4-8f2d0c1e9b11"
FENCE = Fence(STEP, 3, 9)


@pytest.mark.parametrize(
    "value",
    [
        StepHandlerResult.success({"n": 1}),
        StepHandlerResult.checkpoint(cursor=4, items_processed=4, accumulated_results=[1]),
        StepHandlerResult.failure("boom", error_type="E", retryable=True),
        StepHandlerResult.success({1, 2}),  # not JSON: an invalid_result failure
        StepHandlerResult.checkpoint(cursor={1}, items_processed=1),  # not JSON either
        StepHandlerResult.success(1, metadata=["not", "a", "dict"]),  # type: ignore[arg-type]
        "not a result",
    ],
    ids=["success", "checkpoint", "failure", "bad-result", "bad-checkpoint", "bad-meta", "junk"],
)
def test_every_outcome_carries_its_worker_and_duration(value: object) -> None:
    """outcome_from_result#10/11/29/30/44/45/79/80/94/100/105/106, _invalid_result#2/3: the
    worker id and the duration were dropped (None) on every path without a test noticing."""
    stored = outcome_from_result(value, fence=FENCE, duration_ms=12, worker_id="w-7").to_json()
    assert (stored["worker_id"], stored["duration_ms"], stored["claim_seq"]) == ("w-7", 12.0, 9)


def test_exception_and_timeout_outcomes_carry_worker_duration_and_codes() -> None:
    """outcome_from_exception#28/29/53/54, timeout_outcome#2/3/6/24/25: worker, duration and
    the timeout's error_code `timeout` (what operators filter on) were unchecked."""
    exc = outcome_from_exception(RuntimeError("x"), fence=FENCE, duration_ms=5, worker_id="w-1")
    out = exc.to_json()
    assert (out["worker_id"], out["duration_ms"]) == ("w-1", 5.0)
    assert out["error"]["context"] == {}
    timed = timeout_outcome(fence=FENCE, duration_ms=30_000, timeout_seconds=30, worker_id="w-2")
    out = timed.to_json()
    assert (out["worker_id"], out["duration_ms"]) == ("w-2", 30000.0)
    assert (out["error"]["error_type"], out["error"]["error_code"]) == ("timeout", "timeout")
    assert out["error"]["retryable"] is True
    assert out["error"]["context"] == {"timeout_seconds": 30}


def test_retry_after_zero_is_a_valid_delay() -> None:
    """StepHandlerResult.failure#6/7 and _safe_retry_after#7/8: 0 s ("retry at once") was
    refused or dropped by `<= 0` / `< 1` mutants; fractions of a second must pass too."""
    for seconds in (0, 0.5):
        result = StepHandlerResult.failure("busy", retryable=True, retry_after=seconds)
        stored = outcome_from_result(result, fence=FENCE, duration_ms=1).to_json()
        assert stored["error"]["retry_after"] == float(seconds)
    with pytest.raises(ValueError, match="retry_after must be >= 0"):
        StepHandlerResult.failure("busy", retryable=True, retry_after=-0.001)


@pytest.mark.parametrize("truncate", [truncate_head, truncate_tail])
def test_text_of_exactly_the_limit_is_not_cut(truncate: object) -> None:
    """truncate_head#5, truncate_tail#5: `<` for `<=` cut a text of exactly `limit` bytes."""
    assert callable(truncate)
    text = "é" * 50  # 100 bytes
    assert truncate(text, 100) == text
    cut = truncate(text, 99)
    assert cut != text
    assert "truncated 100 bytes to 99" in cut


# --- template validation ---------------------------------------------------------------------


def _template(*steps: dict[str, object], **extra: object) -> dict[str, object]:
    return {"name": "wf", "namespace_name": "ns", "version": "1.0.0", "steps": list(steps), **extra}


def test_a_cycle_written_with_depends_on_is_refused() -> None:
    """_raw_graph#16/18/21/22/23: the cycle check read only `dependencies`; a cycle declared
    through the `depends_on` alias went unchecked by the tests."""
    data = _template(
        {"name": "a", "handler": {"callable": "h.a"}, "depends_on": ["b"]},
        {"name": "b", "handler": {"callable": "h.b"}, "depends_on": ["a"]},
    )
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(data, source="wf.yaml")
    assert "dependency cycle a -> b -> a" in info.value.message


def _nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"k": value}
    return value


def test_json_nesting_limit_is_exactly_the_documented_depth() -> None:
    """_plain_json#1/61/62/69/70, _json_mapping#9: the depth limit on metadata and handler
    initialization (a value 100 levels below the mapping is the deepest allowed) had no test."""
    ok = TaskTemplate.from_dict(
        _template({"name": "a", "handler": {"callable": "h.a"}}, metadata=_nested(100))
    )
    assert ok.metadata == _nested(100)
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(
            _template({"name": "a", "handler": {"callable": "h.a"}}, metadata=_nested(101))
        )
    assert "is nested more than 100 levels deep" in info.value.message
    in_list: dict[str, object] = {"l": [_nested(98)]}
    assert (
        TaskTemplate.from_dict(
            _template({"name": "a", "handler": {"callable": "h.a"}}, metadata=in_list)
        ).metadata
        == in_list
    )
    with pytest.raises(TemplateValidationError):
        TaskTemplate.from_dict(
            _template({"name": "a", "handler": {"callable": "h.a"}}, metadata={"l": [_nested(99)]})
        )


# --- outcome rules: messages users read, and the size guarantees -------------------------------

FIX = (
    "call() must return self.success(...), self.failure(...) or "
    "StepHandlerResult.checkpoint(...), e.g. `return self.success({...})`"
)


def _error(value: object, **kw: object) -> dict[str, object]:
    out = outcome_from_result(value, fence=FENCE, duration_ms=1, **kw).to_json()  # type: ignore[arg-type]
    error = out["error"]
    assert isinstance(error, dict)
    return error


def test_invalid_return_messages_name_the_handler_and_the_fix() -> None:
    """outcome_from_result#5/6/7, _invalid_return_message#9/10/13, _invalid_result#6/21/22:
    the message a developer reads when call() returns the wrong thing, and its error_code."""
    error = _error(None)
    assert error["message"] == f"step handler returned None instead of a StepHandlerResult; {FIX}"
    assert (error["error_type"], error["error_code"], error["retryable"]) == (
        "invalid_result",
        "invalid_result",
        False,
    )

    async def handler() -> None:
        return None

    pending = handler()
    try:
        error = _error(pending, handler_name="orders.Charge")
    finally:
        pending.close()
    assert error["message"] == (
        "step handler 'orders.Charge' returned coroutine instead of a StepHandlerResult"
        " (an awaitable: was an async call() run without being awaited?); " + FIX
    )


def test_not_serialisable_messages_say_what_to_return() -> None:
    """outcome_from_result#51/52/106-111, _not_serialisable#12-17, _json_problem#2/3."""
    error = _error(StepHandlerResult.success(1, metadata=["x"]), handler_name="h")  # type: ignore[arg-type]
    assert error["message"] == (
        "step handler 'h' returned success metadata of type list; "
        "metadata must be a JSON object (a dict) or None"
    )
    error = _error(StepHandlerResult.success({"when": object}))
    message = str(error["message"])
    assert message.startswith("step handler returned a result that is not JSON-serialisable: ")
    assert message.endswith(
        ". Return only plain JSON data (dict, list, str, int, float, bool, None): convert"
        " datetimes with .isoformat(), Decimals and UUIDs with str(); NaN and Infinity are"
        " not allowed."
    )
    error = _error(StepHandlerResult.checkpoint(cursor={1}))
    message = str(error["message"])
    assert message.startswith("step handler returned a checkpoint that is not JSON-serialisable: ")
    assert message.endswith(
        ". The cursor and accumulated_results must be plain JSON data"
        " (dict, list, str, int, float, bool, None)."
    )
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    error = _error(StepHandlerResult.success(deep))
    assert "returned a result that is not JSON-serialisable: it is nested too deeply." in str(
        error["message"]
    )


def test_a_failure_without_message_or_type_gets_the_defaults() -> None:
    """outcome_from_result#160/162/163: `or ""` and `or "unexpected_error"`."""
    bare = StepHandlerResult(kind="failure", error_message=None, error_type=None)
    error = _error(bare)
    assert (error["message"], error["error_type"], error["retryable"]) == (
        "",
        "unexpected_error",
        False,
    )


def test_checkpoint_strings_jsonb_cannot_hold_are_replaced() -> None:
    """outcome_from_result#113-125: a NUL or lone surrogate in the cursor or the accumulated
    results would make the engine refuse the checkpoint."""
    value = StepHandlerResult.checkpoint(
        cursor={"k\x00": "a\udc80"}, items_processed=2, accumulated_results=["\x00"]
    )
    out = outcome_from_result(value, fence=FENCE, duration_ms=1).to_json()
    assert out["checkpoint"] == {
        "cursor": {"k\ufffd": "a\ufffd"},
        "items_processed": 2,
        "accumulated_results": ["\ufffd"],
    }


def test_success_strings_jsonb_cannot_hold_are_replaced_and_counted() -> None:
    """_text_may_hold_unstorable#1/4: NUL (escaped in JSON text) and
    lone surrogates (raw in it) are both found."""
    for bad in ("\x00", "\udc80"):
        out = outcome_from_result(
            StepHandlerResult.success({"v": f"a{bad}{bad}"}, metadata={"m": bad}),
            fence=FENCE,
            duration_ms=1,
        ).to_json()
        assert out["result"] == {"v": "a\ufffd\ufffd"}
        assert out["metadata"] == {"m": "\ufffd", "tasker_replaced_characters": 3}
        error = _error(StepHandlerResult.failure("x", context={"c": bad}))
        assert error["context"] == {"c": "\ufffd"}
        assert error["message"] == "x [tasker: 1 NUL / lone-surrogate character replaced]"


def test_replacement_note_counts_failure_metadata_and_plural() -> None:
    """_failure#72/80/82/84: metadata's replacements are counted; "character" vs
    "characters"."""
    out = outcome_from_result(
        StepHandlerResult.failure("m", metadata={"a": "\x00\x00"}), fence=FENCE, duration_ms=1
    ).to_json()
    assert out["metadata"] == {"a": "\ufffd\ufffd"}
    assert out["error"]["message"] == "m [tasker: 2 NUL / lone-surrogate characters replaced]"


def test_error_type_and_code_are_capped_at_200_bytes() -> None:
    """_failure#37/50: the 200-byte caps."""
    for n, kept in ((200, True), (201, False)):
        error = _error(StepHandlerResult.failure("m", error_type="t" * n, error_code="c" * n))
        assert (error["error_type"] == "t" * n) is kept
        assert (error["error_code"] == "c" * n) is kept
        assert len(str(error["error_type"]).encode()) <= 200
        assert len(str(error["error_code"]).encode()) <= 200


def test_exception_outcomes_keep_worker_duration_context_and_traceback() -> None:
    """outcome_from_exception#28/29/59/77 on every path (Permanent, Retryable, other)."""
    for exc in (
        PermanentError("p", context={"k": 1}),
        RetryableError("r", retry_after=float("inf")),
        ValueError("v"),
    ):
        try:
            raise exc
        except Exception as raised:
            caught = raised
        out = outcome_from_exception(caught, fence=FENCE, duration_ms=7, worker_id="w").to_json()
        assert (out["worker_id"], out["duration_ms"]) == ("w", 7.0)
        error = out["error"]
        if isinstance(caught, PermanentError):
            assert (error["context"], error["traceback"]) == ({"k": 1}, None)
        elif isinstance(caught, RetryableError):
            assert error["retry_after"] is None  # _safe_retry_after#4: infinity is no delay
        else:
            assert error["context"] == {}
            assert error["traceback"] == "".join(traceback.format_exception(caught))


def test_a_broken_str_falls_back_to_the_class_name() -> None:
    """_exception_message#3/4."""

    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    error = outcome_from_exception(Odd(), fence=FENCE, duration_ms=1).to_json()["error"]
    assert error["message"] == "Odd"


@pytest.mark.parametrize(
    ("limit", "what", "fix"),
    [
        (None, "its timeout", "raise timeout_seconds in the template if it needs longer"),
        (
            "timeout_seconds",
            "its timeout",
            "raise timeout_seconds in the template if it needs longer",
        ),
        (
            "max_runtime",
            "the worker's max run time",
            "give the step a timeout_seconds in the template, or start the worker with a "
            "larger --max-runtime, if it needs longer",
        ),
    ],
)
def test_timeout_messages_name_the_limit_and_the_fix(
    limit: str | None, what: str, fix: str
) -> None:
    """timeout_outcome#1-19: the message operators read for an abandoned run."""
    kw = {} if limit is None else {"limit": limit}
    out = timeout_outcome(fence=FENCE, duration_ms=1, timeout_seconds=2.5, **kw).to_json()  # type: ignore[arg-type]
    assert out["error"]["message"] == (
        f"step handler did not finish within {what} of 2.5 seconds and was abandoned; {fix}"
    )


def test_a_refused_failure_is_replaced_by_a_minimal_ascii_one() -> None:
    """refused_outcome#4-16/35-60: the replacement keeps worker and duration, the first 200
    characters of the message, the type made ASCII and the code in brackets."""
    message = "é\x00" + "m" * 300
    original = Failure(
        fence=FENCE,
        duration_ms=3,
        worker_id="w",
        error=StepError(
            message=message,
            error_type="Érr\x00",
            error_code="boom",
            retryable=True,
            retry_after=5,
            context={"c": 1},
            traceback="tb",
        ),
        metadata={},
    )
    out = refused_outcome(original, TaskerError("too big"))
    assert out is not None
    stored = out.to_json()
    assert (stored["worker_id"], stored["duration_ms"]) == ("w", 3.0)
    error = stored["error"]
    head = "\\xe9\\x00" + "m" * 198
    assert error["message"] == (
        "the engine refused the step's failure outcome (too big); the handler's error was"
        f" \\xc9rr\\x00 [boom]: {head}"
    )
    assert (error["error_type"], error["error_code"], error["retryable"]) == (
        "?rr?",
        "outcome_refused",
        True,
    )
    assert (error["retry_after"], error["context"], error["traceback"]) == (None, {}, None)
    no_code = refused_outcome(
        replace(original, error=replace(original.error, error_code=None, message="x")),
        TaskerError("t"),
    )
    assert no_code is not None
    assert no_code.error.message == (
        "the engine refused the step's failure outcome (t); the handler's error was \\xc9rr\\x00: x"
    )
    assert refused_outcome(out, TaskerError("again")) is None


def test_a_refused_success_becomes_a_permanent_invalid_result() -> None:
    """refused_outcome#68/82/83: error_code the engine's, else invalid_result."""
    success = outcome_from_result(StepHandlerResult.success(1), fence=FENCE, duration_ms=1)
    plain = TaskerError("no")
    plain.error_code = ""
    for err, code in (
        (TaskerError("no", error_code="payload_too_large"), "payload_too_large"),
        (plain, "invalid_result"),
    ):
        out = refused_outcome(success, err)
        assert out is not None
        assert (out.error.message, out.error.error_type, out.error.error_code) == (
            "the engine refused the step's success outcome: no",
            "invalid_result",
            code,
        )
        assert (out.error.retryable, out.error.context) == (False, {})


@pytest.mark.parametrize("truncate", [truncate_head, truncate_tail])
def test_a_limit_below_the_marker_keeps_only_the_marker(truncate: object) -> None:
    """truncate_head#13, truncate_tail#13: nothing of the text is kept when the marker alone
    exceeds the limit."""
    assert callable(truncate)
    assert truncate("q" * 60, 5) in (
        " ... [truncated 60 bytes to 5]",
        "[truncated 60 bytes to 5, start omitted] ...\n",
    )


# --- _truncate_text: a failure always fits max_error_bytes -----------------------------------


def _pg_len(error: StepError) -> int:
    return len(
        json.dumps(error.to_json(), ensure_ascii=False, separators=(", ", ": ")).encode(
            "utf-8", "surrogatepass"
        )
    )


def _step_error(**kw: object) -> StepError:
    base: dict[str, object] = {
        "message": "m",
        "error_type": "E",
        "error_code": None,
        "retryable": True,
        "retry_after": None,
        "context": {},
        "traceback": None,
    }
    base.update(kw)
    return StepError(**base)  # type: ignore[arg-type]


def test_truncate_text_leaves_an_error_of_exactly_the_limit_alone() -> None:
    """_truncate_text#5/6/7: `over <= 0` is the boundary; one byte over is cut."""
    error = _step_error(message="x" * 500)
    size = _pg_len(error)
    assert _truncate_text(error, size) == error
    cut = _truncate_text(error, size - 1)
    assert cut != error and _pg_len(cut) <= size - 1
    assert cut.message.startswith("x" * 100) and "[truncated 500 bytes to " in cut.message


def test_truncate_text_cuts_the_traceback_first_keeping_its_end() -> None:
    """_truncate_text#8-31: the traceback goes first, by what is over plus 256 bytes of
    room for its marker; context and message stay."""
    error = _step_error(message="msg", context={"k": "v"}, traceback="t" * 3000 + "END")
    limit = _pg_len(error) - 1000
    cut = _truncate_text(error, limit)
    assert (cut.message, cut.context) == ("msg", {"k": "v"})
    assert cut.traceback is not None and cut.traceback.endswith("tEND")
    assert cut.traceback.startswith("[truncated 3003 bytes to 1747, start omitted]")
    assert len(cut.traceback.encode()) <= 1747 and _pg_len(cut) <= limit
    # a traceback smaller than the cut is dropped, then the context is previewed
    error = _step_error(message="msg", context={"k": "c" * 40000}, traceback="t" * 100)
    limit = _pg_len(error) - 1000
    cut = _truncate_text(error, limit)
    assert cut.traceback is None and cut.message == "msg"
    assert cut.context["truncated"] is True
    preview = cut.context["preview"]
    # what was still over once the traceback was gone, plus the marker's room
    cut_by = _pg_len(replace(error, traceback=None)) - limit + 256
    assert preview.startswith('{"k":"ccc') and preview.endswith(f" to {limit // 4 - cut_by}]")
    assert _pg_len(cut) <= limit


def test_truncate_text_then_drops_a_previewed_context_then_cuts_the_message() -> None:
    """_truncate_text#32-84: an already truncated context is reduced to the flag, then the
    message is cut keeping its start. Found by the campaign: the loop kept re-setting a
    context of {"truncated": True} and never reached the message, so after 12 rounds the whole
    message was replaced by the marker (fails before the fix in outcome.py)."""
    error = _step_error(message="M" * 2000, context={"truncated": True, "preview": "p" * 3000})
    limit = _pg_len(error) - 2000
    cut = _truncate_text(error, limit)
    assert cut.context == {"truncated": True}
    assert cut.message == "M" * 2000 and _pg_len(cut) <= limit
    limit = _pg_len(cut) - 500
    cut2 = _truncate_text(cut, limit)
    assert cut2.context == {"truncated": True}
    assert cut2.message.startswith("M" * 1000)
    assert cut2.message.endswith(f"[truncated 2000 bytes to {2000 - 756}]")
    assert _pg_len(cut2) <= limit


def test_truncate_text_gives_up_with_the_marker_alone() -> None:
    """_truncate_text#85-96: when nothing fits, the message is the marker only and context
    and traceback are gone."""
    error = _step_error(message="M" * 100, context={"k": 1}, traceback="tb")
    cut = _truncate_text(error, 10)
    assert (cut.context, cut.traceback) == ({}, None)
    assert cut.message.startswith(" ... [truncated ") and "M" not in cut.message


# --- _safe_object / _jsonable: error contexts and metadata are always storable ----------------


def test_safe_object_wraps_non_objects_and_previews_what_is_too_large() -> None:
    """_safe_object#3/4/5/17/25/26/37: a non-object is wrapped as {"value": ...}; the size
    check sees the JSON text after repair (datetime-like objects, NUL) and keeps a value of
    exactly the limit; a preview is the head of half the limit."""
    assert _safe_object([1, 2], 100, [0]) == {"value": [1, 2]}
    assert _safe_object(None, 100, [0]) == {}
    exact = {"s": "x" * 10}
    size = len(jsonutil.dumps(exact).encode())
    assert _safe_object(exact, size, [0]) == exact
    text = jsonutil.dumps(exact)
    assert _safe_object(exact, size - 1, [0]) == {
        "truncated": True,
        "preview": truncate_head(text, (size - 1) // 2),
    }
    assert _safe_object({"o": object, "s": "x" * 100}, 60, [0])["truncated"] is True
    count = [0]
    assert _safe_object({"s": "\x00" + "x" * 100}, 60, count)["truncated"] is True
    assert count == [1]


def _chain(depth: int, leaf: object, *, as_list: bool) -> object:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


@pytest.mark.parametrize("as_list", [False, True], ids=["dicts", "lists"])
def test_jsonable_cuts_below_depth_50(as_list: bool) -> None:
    """_safe_object#15, _jsonable#1-4/16/17/22/23: a non-JSON leaf 50 levels below the
    context is kept as its repr, one level deeper it becomes "<nested too deeply>"."""

    class Leaf:
        def __repr__(self) -> str:
            return "Leaf()"

    for depth, expected in ((50, "Leaf()"), (51, "<nested too deeply>")):
        value = {"top": _chain(depth - 1, Leaf(), as_list=as_list)}
        safe = _safe_object(value, 1_000_000, [0])
        assert safe == {"top": _chain(depth - 1, expected, as_list=as_list)}


def test_jsonable_keeps_finite_floats_and_names_unrepresentable_objects() -> None:
    """_jsonable#7/25."""

    class Bad:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    safe = _safe_object({"f": 1.5, "n": float("nan"), "b": Bad()}, 10_000, [0])
    assert safe == {"f": 1.5, "n": "nan", "b": "<unrepresentable Bad>"}


def test_checkpoint_items_processed_type_error_names_the_type() -> None:
    """StepHandlerResult.checkpoint#5: the message names the type the handler passed."""
    with pytest.raises(TypeError, match=r"^items_processed must be an int, got str$"):
        StepHandlerResult.checkpoint(cursor=1, items_processed="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^items_processed must be an int, got bool$"):
        StepHandlerResult.checkpoint(cursor=1, items_processed=True)


# --- template loading: every error says which file or directory it is about -----------------
# (the wording of template problems is being rewritten by issue 11: these check `source`,
# the number of problems and positions, not the text)


def test_template_errors_carry_their_source(tmp_path: Path) -> None:
    """load_template#9/14/25, load_templates#21/59/62, _parse_yaml#27/37-41, from_yaml#13:
    `source` was dropped (None) on every file-level error without a test noticing."""
    missing = tmp_path / "missing.yaml"
    bad_utf8 = tmp_path / "latin1.yaml"
    bad_utf8.write_bytes(b"name: caf\xe9\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for call, path in (
        (load_template, missing),
        (load_template, tmp_path),
        (load_template, bad_utf8),
        (load_template, bad_yaml),
        (load_templates, empty),
    ):
        with pytest.raises(TemplateValidationError) as info:
            call(path)
        assert info.value.source == str(path)
        assert len(info.value.problems) == 1
        assert str(path) in info.value.problems[0]
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_yaml("a: [", source="inline.yaml")
    assert info.value.source == "inline.yaml" and len(info.value.problems) == 1
    dup = tmp_path / "dup"
    dup.mkdir()
    body = (
        "name: wf\nnamespace_name: ns\nversion: 1.0.0\n"
        "steps:\n  - name: a\n    handler:\n      callable: h.a\n"
    )
    (dup / "one.yaml").write_text(body)
    (dup / "two.yaml").write_text(body)
    (dup / "zz.yaml").write_text("name: [unclosed\n")  # sorted after the duplicate
    with pytest.raises(TemplateValidationError) as info:
        load_templates(dup)
    assert info.value.source == str(dup)
    # load_templates#37: files after a duplicate are still loaded and reported
    assert str(dup / "zz.yaml") in str(info.value)
    assert str(dup / "two.yaml") in str(info.value)


def test_duplicate_keys_after_a_merge_key_are_refused() -> None:
    """construct_mapping#15 (`continue` -> `break` at a `<<` merge key): keys after it were
    not checked for duplicates."""
    text = (
        "base: &b {x: 1}\n"
        "name: wf\nnamespace_name: ns\nversion: 1.0.0\n"
        "meta:\n  <<: *b\n  y: 1\n  y: 2\n"
    )
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_yaml(text, source="m.yaml")
    assert info.value.source == "m.yaml"
    assert any(" at line 8, column 3: " in p and "'y'" in p for p in info.value.problems)


def test_steps_after_a_nameless_step_are_still_checked() -> None:
    """_graph_problems#12 (`continue` -> `break` at a step without a name): the rules were not
    applied to the steps after it."""
    data = _template(
        {"handler": {"callable": "h.x"}},
        {"name": "a", "handler": {"callable": "h.a"}, "dependencies": ["nope"]},
    )
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(data)
    assert any("nope" in p for p in info.value.problems), info.value.problems


def test_yaml_syntax_errors_name_line_and_column() -> None:
    """_parse_yaml#14/17/18/19: the 1-based position of a YAML syntax error."""
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_yaml("name: wf\nsteps: [a, b\n", source="x.yaml")
    [problem] = info.value.problems
    assert " at line 3, column 1" in problem, problem


def test_exactly_max_steps_steps_are_checked_for_graph_problems() -> None:
    """_raw_graph#7 (`len(steps) >= MAX_STEPS` skipped the early graph check)."""
    steps = [{"name": f"s{i}", "handler": {"callable": "h.s"}} for i in range(MAX_STEPS - 1)]
    steps.append({"name": "s0", "handler": {"callable": "h.s"}})
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(_template(*steps))
    assert any("s0" in p for p in info.value.problems)


def test_yaml_reader_errors_and_empty_documents_carry_their_source() -> None:
    """_parse_yaml#32-41 (a YAMLError without a position: a character YAML cannot read),
    from_yaml#13 (an empty document)."""
    for source, where in (("r.yaml", "r.yaml"), (None, "YAML text")):
        with pytest.raises(TemplateValidationError) as info:
            TaskTemplate.from_yaml("name: a\x00", source=source)
        assert info.value.source == source
        [problem] = info.value.problems
        assert problem.startswith(f"invalid YAML in {where}: ")
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_yaml("", source="e.yaml")
    assert info.value.source == "e.yaml" and len(info.value.problems) == 1


def test_graph_problems_written_with_depends_on_are_reported_with_schema_problems() -> None:
    """_raw_graph#16/18/21: when the schema check fails, the early graph pass over the raw
    data still reports dependency problems, also those written with the `depends_on` alias."""
    data = _template(
        {"name": "a", "handler": {"callable": "h.a"}, "depends_on": ["ghost"], "bogus": 1},
    )
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(data)
    assert any("ghost" in p for p in info.value.problems), info.value.problems
    assert any("bogus" in p for p in info.value.problems), info.value.problems


def _problems(*steps: dict[str, object]) -> list[str]:
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(_template(*steps))
    return info.value.problems


def test_names_after_a_nameless_step_are_indexed() -> None:
    """_graph_problems#12 (`continue` -> `break`): names after a step without one were not
    indexed, so a dependency on them was reported unknown and a duplicate of them missed
    (compared with the same template without that dependency / duplicate)."""
    nameless = {"handler": {"callable": "h.x"}}
    a = {"name": "a", "handler": {"callable": "h.a"}}
    b = {"name": "b", "handler": {"callable": "h.b"}}
    assert _problems(nameless, a, {**b, "dependencies": ["a"]}) == _problems(nameless, a, b)
    assert len(_problems(nameless, a, {**a})) == len(_problems(nameless, a, b)) + 1


# --- step types, graphs, versions and names (found by the campaign on 82a3038) ----------------


def _step(name: str | None, *deps: str, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"handler": {"callable": "handlers.run"}, "dependencies": list(deps)}
    if name is not None:
        raw["name"] = name
    return {**raw, **extra}


def _body(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": list(steps), **extra}


def _refusal(raw: Any, source: str | None = None) -> TemplateValidationError:
    with pytest.raises(TemplateValidationError) as err:
        TaskTemplate.from_dict(raw, source=source)
    return err.value


def _refused_steps(*steps: dict[str, Any]) -> list[str]:
    """Where the step-type rules refuse the template: each problem's location."""
    return [problem.split(": ", 1)[0] for problem in _refusal(_body(*steps)).problems]


PIPELINE = (
    _step("analyze", type="batchable"),
    _step("work", "analyze", type="batch_worker"),
    _step("aggregate", "work", type="deferred_convergence"),
)


@pytest.mark.parametrize(
    ("steps", "dynamic"),
    [
        ((_step("a"), _step("b", "a")), set()),
        (PIPELINE, {"work", "aggregate"}),
        (
            (
                _step("a"),
                _step("d", "a", type="decision"),
                _step("x", "d"),
                _step("y", "d"),
                _step("j", "x", "y", type="deferred_convergence"),
                _step("z", "x"),
            ),
            {"x", "y", "j", "z"},
        ),
        (
            (
                _step("a"),
                _step("d", "a", type="decision"),
                _step("x", "d"),
                _step("j", "x", "a", type="deferred_convergence"),
                _step("after", "j"),
            ),
            {"x"},
        ),
        (
            (
                _step("a"),
                _step("d", "a", type="decision"),
                _step("j", "d", "a", type="deferred_convergence"),
            ),
            {"j"},
        ),
    ],
    ids=["plain", "batch", "decision-branches", "convergence-with-a-static-step", "dc-on-decision"],
)
def test_valid_step_type_templates_and_their_dynamic_steps(
    steps: tuple[dict[str, Any], ...], dynamic: set[str]
) -> None:
    """_type_problems#2/3/6/9/10/11/22/30/33/49/50/51/52/64/65/70/84 refused one of these valid
    templates (or crashed); _dynamic_steps#5/6/7/8/12/15/16/19/20/21/22/26/27 changed which
    steps are created at run time (a batch worker, a decision's children and what follows them,
    a convergence all of whose listed steps are dynamic) instead of with the task."""
    tpl = TaskTemplate.from_dict(_body(*steps))
    assert tpl.dynamic_steps == frozenset(dynamic)
    assert tpl.static_steps == [s["name"] for s in steps if s["name"] not in dynamic]


@pytest.mark.parametrize(
    ("steps", "refused"),
    [
        ((_step("d", type="decision"),), ["steps[0] (d)"]),
        (
            (_step("a"), _step("d", "a", type="decision"), _step("c", "d", "a")),
            ["steps[2] (c)"],
        ),
        ((_step("a"), _step("w", "a", type="batch_worker")), ["steps[1] (w)"]),
        (
            (
                _step("b", type="batchable"),
                _step("a"),
                _step("w", "b", "a", type="batch_worker"),
                _step("j", "w", type="deferred_convergence"),
            ),
            ["steps[2] (w)"],
        ),
        ((_step("b", type="batchable"), _step("s", "b")), ["steps[0] (b)"]),
        ((*PIPELINE, _step("s", "work")), ["steps[3] (s)"]),
        ((_step("a"), _step("j", type="deferred_convergence")), ["steps[1] (j)"]),
    ],
    ids=[
        "decision-without-dependency",
        "decision-child-with-another-parent",
        "worker-of-a-standard-step",
        "worker-with-two-parents",
        "batchable-without-worker",
        "standard-step-after-a-worker",
        "convergence-listing-nothing",
    ],
)
def test_each_step_type_rule_refuses_the_step_that_breaks_it(
    steps: tuple[dict[str, Any], ...], refused: list[str]
) -> None:
    """_type_problems#14/23/34/39/48/55/66/77/85/89: a rule that no longer refused its step
    (or refused another one, or crashed)."""
    assert _refused_steps(*steps) == refused


def test_only_a_batch_worker_carries_batch_config_in_its_json() -> None:
    """StepTemplate.to_json#16/21/24: the batch worker's batch_config (defaults filled in) was
    left out of the body sent to SQL, or given to the other steps."""
    body = TaskTemplate.from_dict(_body(*PIPELINE)).to_json()
    configs = {s["name"]: s.get("batch_config") for s in body["steps"]}
    assert configs == {
        "analyze": None,
        "work": {
            "batch_size": 1000,
            "parallelism": 10,
            "cursor_field": "id",
            "failure_strategy": "continue_on_failure",
        },
        "aggregate": None,
    }
    assert ["batch_config" in s for s in body["steps"]] == [False, True, False]


def test_to_json_metadata_is_a_deep_copy() -> None:
    """TaskTemplate.to_json#12 (copy.copy): changing the nested metadata of the JSON body
    changed the template."""
    tpl = TaskTemplate.from_dict(_body(_step("a"), metadata={"owner": {"team": "a"}}))
    body = tpl.to_json()
    body["metadata"]["owner"]["team"] = "b"
    assert tpl.metadata == {"owner": {"team": "a"}}


def test_a_template_that_is_not_a_mapping_names_what_it_is_and_its_source() -> None:
    """TaskTemplate.from_dict#6/7: the problem described None instead of the value given, and
    the error lost its source file."""
    err = _refusal([1, 2], source="x.yaml")
    assert err.source == "x.yaml"
    assert err.problems == [
        "template: expected a mapping with name, namespace_name, version and steps at the top"
        " level, got a list"
    ]


def test_a_name_that_is_not_text_is_not_named_in_the_heading() -> None:
    """TaskTemplate.from_dict#42: a non-string name (a YAML number) was put in the heading."""
    err = _refusal(_body(_step("a"), name=5), source="src.yaml")
    assert str(err).splitlines()[0] == "invalid task template in src.yaml: 1 problem"


def test_a_nameless_step_is_located_by_its_position() -> None:
    """_raw_graph#9 (a nameless step named ""), _graph_problems#5/23 (named None): the
    problems of a step without a name were located as `steps[0] ()` / `steps[0] (None)`."""
    err = _refusal(_body(_step(None, "ghost"), _step("a")))
    assert err.problems == [
        "steps[0]: missing required key 'name' in step steps[0]",
        "steps[0].dependencies[0]: unknown dependency 'ghost' in step steps[0]: no step has"
        " that name (steps: 'a')",
    ]


def test_cycles_are_reported_in_declared_order_of_their_first_step() -> None:
    """_find_cycles#8/10 (components sorted as lists, not by their first declared step): the
    cycle through steps[1] came before the one through steps[0]."""
    err = _refusal(
        _body(_step("s0", "s3"), _step("s1", "s2"), _step("s2", "s1"), _step("s3", "s0"))
    )
    assert [p.split(": ", 1)[0] for p in err.problems] == [
        "steps[0] (s0).dependencies",
        "steps[1] (s1).dependencies",
    ]


def test_the_cycle_reported_is_a_shortest_one_through_the_first_step() -> None:
    """_find_cycles#22 (`while queue or found is None`): the search went on after finding the
    first way back and reported a later one (a -> c -> a instead of a -> b -> a)."""
    err = _refusal(_body(_step("a", "b", "c"), _step("b", "a"), _step("c", "a")))
    assert len(err.problems) == 1
    assert "dependency cycle a -> b -> a (" in err.problems[0]


def test_parse_version_keys_and_bounds() -> None:
    """parse_version#3/5 (the 64-character limit dropped / made exclusive), #22/23 (minor or
    patch above the integer maximum accepted), #29/36 (the documented key: 1 for a release,
    (1, text) for an alphanumeric identifier)."""
    exact = "1.0.0-" + "a" * 58
    assert len(exact) == VERSION_MAX_LEN
    assert parse_version(exact) == (1, 0, 0, 0, ((1, "a" * 58),))
    assert parse_version(exact + "a") is None
    assert parse_version("0.2147483648.0") is None
    assert parse_version("0.0.2147483648") is None
    assert parse_version("0.2147483647.2147483647") == (0, 2147483647, 2147483647, 1, ())
    assert parse_version("1.2.3") == (1, 2, 3, 1, ())
    assert parse_version("1.2.3-rc.4") == (1, 2, 3, 0, ((1, "rc"), (0, 4)))


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        (
            "name",
            "my template_",
            "name: template name 'my template_' is not valid: use {rule}"
            " (for example 'my_template')",
        ),
        ("name", "!!!", "name: template name '!!!' is not valid: use {rule}"),
        ("name", "1abc", "name: template name '1abc' is not valid: use {rule}"),
        (
            "step",
            "_my step",
            "steps[0] (_my step).name: step name '_my step' is not valid:"
            " use {rule} (for example '_my_step')",
        ),
    ],
)
def test_name_hints_suggest_only_a_valid_fix(where: str, value: str, problem: str) -> None:
    """_check_pattern#2 (no hint rendered as `None`), #19/20/21/23 (underscores stripped from
    the ends of step names, where they are allowed, or kept on other names), #25 (a hint that
    is itself invalid, or the name unchanged)."""
    raw = _body(_step(value)) if where == "step" else _body(_step("a"), name=value)
    rule = (
        "letters, digits, '_', '-' and '.', starting with a letter or '_', at most 128 characters"
        if where == "step"
        else "letters, digits, '_', '-' and '.', starting with a letter, at most 128 characters"
    )
    assert _refusal(raw).problems == [problem.format(rule=rule)]


def test_non_json_metadata_names_its_path_value_and_no_date_hint() -> None:
    """_plain_json#64 (a list item's path lost), #91 (the value shown as None), #95 (the
    date hint given for any value)."""
    err = _refusal(_body(_step("a"), metadata={"items": [1, {2}]}))
    assert err.problems == ["metadata: metadata.items[1] is a set ({2}), which is not JSON data"]


# --- a context's dependency results (found by the campaign on 82a3038) -------------------------


class _RecordingFetcher:
    """Serves `results` like the worker's fetcher, recording every page asked for."""

    def __init__(
        self, results: dict[str, Any], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._results = results
        self._loop = loop
        self.calls: list[tuple[str, str, str | None, int]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    async def fetch_page(
        self, step_uuid: str, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        self.calls.append((step_uuid, prefix, after, limit))
        names = [
            n
            for n in sorted(self._results)
            if n.startswith(prefix) and (after is None or n > after)
        ]
        return [(n, self._results[n]) for n in names[:limit]]


def _claimed(partial: bool, results: dict[str, Any]) -> ClaimedStep:
    return ClaimedStep(
        step_uuid=STEP,
        task_uuid="5d1c3e0a-7b0e-4b52-9a1e-2f8e8e0c6a01",
        step_name="aggregate",
        handler="handlers.aggregate",
        dependency_results=results,
        dependency_results_partial=partial,
    )


def test_from_claimed_keeps_a_partial_claim_and_its_fetcher() -> None:
    """StepContext.from_claimed#16/17/33/34: the claim's dependency_results_partial or the
    fetcher was dropped, so a partial claim answered from part of the results (None for a
    result it left out) or could not fetch."""
    fetcher = _RecordingFetcher({"a": 1, "w_1": {"n": 1}, "w_2": {"n": 2}})
    context = StepContext.from_claimed(_claimed(True, {"a": 1}), dependency_fetcher=fetcher)
    assert context.dependency_results_partial is True
    assert context.get_dependency_result("w_2") == {"n": 2}
    assert context.get_all_dependency_results("w_") == {"w_1": {"n": 1}, "w_2": {"n": 2}}
    assert fetcher.calls == [(STEP, "w_2", None, 1), (STEP, "w_", None, 100)]


def test_async_single_result_fetches_one_row_for_its_own_step() -> None:
    """get_dependency_result_async#1/4 (a result in a full claim answered None or fetched),
    #11 (two rows fetched for one name), _fetch_page#2 (the step's uuid not passed on),
    iter_dependency_results#4 (the first page asked after "" instead of from the start)."""
    full = StepContext.from_claimed(_claimed(False, {"a": 1, "b": 2}))
    assert asyncio.run(full.get_dependency_result_async("a")) == 1
    assert asyncio.run(full.get_dependency_result_async("c")) is None
    fetcher = _RecordingFetcher({"a": 1, "b": 2, "bb": 3})
    lazy = StepContext.from_claimed(_claimed(True, {}), dependency_fetcher=fetcher)
    assert asyncio.run(lazy.get_dependency_result_async("b")) == 2
    assert fetcher.calls == [(STEP, "b", None, 1)]

    async def every(prefix: str) -> list[tuple[str, Any]]:
        return [item async for item in lazy.iter_dependency_results(prefix)]

    assert asyncio.run(every("b")) == [("b", 2), ("bb", 3)]
    assert fetcher.calls[1:] == [(STEP, "b", None, 100)]


def test_iter_dependency_results_defaults_to_every_result() -> None:
    """iter_dependency_results#1 (default prefix "XXXX"): without a prefix it yielded
    nothing."""
    context = StepContext.from_claimed(_claimed(False, {"b": 2, "a": 1}))

    async def every() -> list[tuple[str, Any]]:
        return [item async for item in context.iter_dependency_results()]

    assert asyncio.run(every()) == [("a", 1), ("b", 2)]


def test_a_partial_claim_without_fetcher_says_how_to_build_one() -> None:
    """_lazy#5/7/8/9: the message naming the fix (StepContext.from_claimed(...,
    dependency_fetcher=...)) was unchecked."""
    context = StepContext.from_claimed(_claimed(True, {}))
    with pytest.raises(RuntimeError) as err:
        context.get_all_dependency_results()
    assert str(err.value) == (
        "the claim of step 'aggregate' left some dependency results out "
        "(dependency_results_partial) and this context has no fetcher to get them: "
        "build it with StepContext.from_claimed(..., dependency_fetcher=...)"
    )


def test_blocking_fetch_on_the_loop_names_the_async_helpers() -> None:
    """_run_blocking#11..18: the message of BlockingFetchError (the async helpers to use
    instead) was unchecked."""
    fetcher = _RecordingFetcher({"a": 1})
    context = StepContext.from_claimed(_claimed(True, {}), dependency_fetcher=fetcher)

    async def run() -> None:
        context.get_dependency_result("a")

    with pytest.raises(BlockingFetchError) as err:
        asyncio.run(run())
    assert str(err.value) == (
        "step 'aggregate': its claim left some dependency results out, and fetching them would"
        " block the event loop. In an async handler use"
        " `async for name, result in context.iter_dependency_results(prefix)`,"
        " `await context.get_all_dependency_results_async(prefix)` or"
        " `await context.get_dependency_result_async(name)`"
    )
    assert fetcher.calls == []


def test_blocking_fetch_from_another_loop_runs_on_the_fetchers_loop() -> None:
    """_run_blocking#9 (`running is not loop`): a blocking fetch called on a loop other than
    the fetcher's (which it cannot block) was refused, and one on the fetcher's own loop was
    not."""
    fetcher_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=fetcher_loop.run_forever, daemon=True)
    thread.start()
    try:
        fetcher = _RecordingFetcher({"a": 1, "b": 2}, loop=fetcher_loop)
        context = StepContext.from_claimed(_claimed(True, {}), dependency_fetcher=fetcher)

        async def on_another_loop() -> Any:
            return context.get_dependency_result("b")

        assert asyncio.run(on_another_loop()) == 2
        assert fetcher.calls == [(STEP, "b", None, 1)]
    finally:
        fetcher_loop.call_soon_threadsafe(fetcher_loop.stop)
        thread.join()
        fetcher_loop.close()


def test_from_claimed_keeps_the_tasks_traceparent() -> None:
    """StepContext.from_claimed (traceparent=None) and StepContext.__init__ (traceparent not
    kept): a handler saw no trace context for a task created under one."""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    step = replace(_claimed(False, {}), traceparent=parent)
    assert StepContext.from_claimed(step).traceparent == parent
    assert StepContext.from_claimed(_claimed(False, {})).traceparent is None
