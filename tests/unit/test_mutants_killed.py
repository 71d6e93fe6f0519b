"""Checks the mutation campaign (`make mutate`) found missing: each test kills mutants of the
outcome rules that the rest of the unit tests let survive (named in each docstring)."""

from __future__ import annotations

import pytest

from tasker_pg import StepHandlerResult
from tasker_pg.outcome import (
    Fence,
    outcome_from_exception,
    outcome_from_result,
    timeout_outcome,
    truncate_head,
    truncate_tail,
)
from tasker_pg.template import TaskTemplate, TemplateValidationError

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
