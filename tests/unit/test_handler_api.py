"""The pure-Python handler API: context, results, handler base class, registry, outcome rules.

No database: these tests exercise what a handler sees and what the worker sends to
`tasker.complete_steps`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import tasker_pg
from tasker_pg import HandlerRegistry, StepContext, StepHandler, StepHandlerResult, jsonutil
from tasker_pg.errors import (
    ConfigurationError,
    PermanentError,
    RetryableError,
    ValidationError,
)
from tasker_pg.outcome import (
    MAX_MESSAGE_BYTES,
    MAX_TRACEBACK_BYTES,
    Checkpoint,
    Failure,
    Fence,
    Success,
    outcome_from_exception,
    outcome_from_result,
    refused_outcome,
    timeout_outcome,
    truncate_head,
    truncate_tail,
)
from tasker_pg.testing import build_test_context

STEP = "0b7e3c52-4a57-4c39-a0c4-8f2d0c1e9b11"
CLAIM_SEQ = 7

DEPS: dict[str, Any] = {
    "fetch": {
        "orders": [
            {"id": 10, "lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 4}]},
            {"id": 11, "lines": []},
        ],
        "meta": {"count": 2, "tags": ["x", "y"], "none": None, "1": "one"},
        "label": "text",
    },
    "fetch_extra": [1, 2, 3],
    "other": None,
}


def make_context(**overrides: Any) -> StepContext:
    """A fully specified context; keyword overrides replace single fields."""
    fields: dict[str, Any] = {
        "task_uuid": "task-1",
        "step_uuid": "step-1",
        "step_name": "summarise",
        "handler_name": "app.Summarise",
        "task_context": {"customer_id": 7, "note": None},
        "dependency_results": DEPS,
        "step_config": {"batch_size": 50},
        "attempt": 1,
        "max_attempts": 3,
        "checkpoint": None,
        "step_inputs": None,
        "timeout_seconds": 30.0,
        "worker_id": "w-1",
        "namespace": "shop",
        "task_name": "checkout",
    }
    fields.update(overrides)
    return StepContext(**fields)


# === StepContext ================================================================================


def test_context_identity_and_repr() -> None:
    ctx = make_context()
    assert ctx.task_uuid == "task-1"
    assert ctx.step_uuid == "step-1"
    assert ctx.step_name == "summarise"
    assert ctx.handler_name == "app.Summarise"
    assert (ctx.namespace, ctx.task_name, ctx.worker_id) == ("shop", "checkout", "w-1")
    assert ctx.timeout_seconds == 30.0
    text = repr(ctx)
    assert "task-1" in text
    assert "step-1" in text
    assert "summarise" in text
    assert "1/3" in text


def test_context_has_no_setters() -> None:
    ctx = make_context()
    with pytest.raises(AttributeError):
        ctx.attempt = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.extra = 1  # type: ignore[attr-defined]


def test_get_input_and_get_input_or() -> None:
    ctx = make_context()
    assert ctx.get_input("customer_id") == 7
    assert ctx.get_input("missing") is None
    assert ctx.get_input_or("missing", 100) == 100
    assert ctx.get_input_or("customer_id", 100) == 7
    # Present but null is not "missing".
    assert ctx.get_input_or("note", "default") is None
    assert ctx.task_context == {"customer_id": 7, "note": None}


def test_get_dependency_result() -> None:
    ctx = make_context()
    assert ctx.get_dependency_result("fetch_extra") == [1, 2, 3]
    assert ctx.get_dependency_result("other") is None
    assert ctx.get_dependency_result("nope") is None
    assert ctx.dependency_results is DEPS


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("label",), "text"),
        (("meta", "count"), 2),
        (("orders", 0, "id"), 10),
        (("orders", 0, "lines", 1, "sku"), "B"),
        (("orders", "1", "id"), 11),  # numeric strings index lists
        (("orders", -1, "id"), 11),  # negative ints count from the end
        (("orders", "-2", "lines", "0", "qty"), 1),
        (("meta", "tags", 1), "y"),
        (("meta", 1), "one"),  # an int finds the object key "1"
        ((), DEPS["fetch"]),
    ],
)
def test_get_dependency_field_walks_dicts_and_lists(path: tuple[Any, ...], expected: Any) -> None:
    assert make_context().get_dependency_field("fetch", *path) == expected


@pytest.mark.parametrize(
    ("step", "path"),
    [
        ("fetch", ("missing",)),
        ("fetch", ("meta", "missing", "deeper")),
        ("fetch", ("orders", 2)),  # index out of range
        ("fetch", ("orders", -3)),
        ("fetch", ("orders", "first")),  # non-numeric key into a list
        ("fetch", ("orders", "1.0")),
        ("fetch", ("label", 0)),  # strings are scalars, not lists
        ("fetch", ("label", "x")),
        ("fetch", ("meta", "count", "x")),  # stepping into an int
        ("fetch", ("meta", "none", "x")),  # stepping into null
        ("fetch", ("orders", True)),  # bools are not indexes
        ("fetch", (None,)),
        ("fetch_extra", ("0", "x")),
        ("other", ("anything",)),
        ("no_such_step", ("a",)),
        ("no_such_step", ()),
    ],
)
def test_get_dependency_field_returns_none_never_raises(step: str, path: tuple[Any, ...]) -> None:
    assert make_context().get_dependency_field(step, *path) is None


def test_get_all_dependency_results_by_prefix() -> None:
    ctx = make_context()
    assert ctx.get_all_dependency_results() == DEPS
    assert ctx.get_all_dependency_results() is not DEPS
    assert ctx.get_all_dependency_results("fetch") == {
        "fetch": DEPS["fetch"],
        "fetch_extra": [1, 2, 3],
    }
    assert ctx.get_all_dependency_results("zzz") == {}


def test_step_config_and_get_config() -> None:
    ctx = make_context()
    assert ctx.step_config == {"batch_size": 50}
    assert ctx.get_config("batch_size") == 50
    assert ctx.get_config("missing") is None
    assert ctx.get_config("missing", 5) == 5


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "retry_count", "is_retry", "is_last"),
    [
        (1, 3, 0, False, False),
        (2, 3, 1, True, False),
        (3, 3, 2, True, True),
        (4, 3, 3, True, True),
        (1, 1, 0, False, True),
    ],
)
def test_attempt_accessors(
    attempt: int, max_attempts: int, retry_count: int, is_retry: bool, is_last: bool
) -> None:
    ctx = make_context(attempt=attempt, max_attempts=max_attempts)
    assert ctx.attempt == attempt
    assert ctx.max_attempts == max_attempts
    assert ctx.retry_count == retry_count
    assert ctx.is_retry() is is_retry
    assert ctx.is_last_retry() is is_last


def test_attempt_must_be_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        make_context(attempt=0)


def test_checkpoint_accessors_without_checkpoint() -> None:
    empty: list[dict[str, Any] | None] = [None, {}]
    for checkpoint in empty:
        ctx = make_context(checkpoint=checkpoint)
        assert ctx.has_checkpoint() is False
        assert ctx.checkpoint is None
        assert ctx.checkpoint_cursor is None
        assert ctx.checkpoint_items_processed == 0
        assert ctx.accumulated_results is None


def test_checkpoint_accessors_with_checkpoint() -> None:
    raw = {"cursor": {"page": 3}, "items_processed": 300, "accumulated_results": {"sum": 9}}
    ctx = make_context(checkpoint=raw)
    assert ctx.has_checkpoint() is True
    assert ctx.checkpoint == raw
    assert ctx.checkpoint_cursor == {"page": 3}
    assert ctx.checkpoint_items_processed == 300
    assert ctx.accumulated_results == {"sum": 9}
    # A cursor of 0 is still a checkpoint; missing parts default.
    ctx = make_context(checkpoint={"cursor": 0})
    assert ctx.has_checkpoint() is True
    assert ctx.checkpoint_cursor == 0
    assert ctx.checkpoint_items_processed == 0
    assert ctx.accumulated_results is None


def test_from_claim_full_row() -> None:
    task_uuid = uuid.uuid4()
    step_uuid = uuid.uuid4()
    row = {
        "task_uuid": task_uuid,
        "step_uuid": step_uuid,
        "step_name": "process_payment",
        "handler": "ecommerce.step_handlers.ProcessPaymentHandler",
        "task_context": {"cart_items": [1]},
        "dependency_results": '{"validate_cart": {"total": 10.5}}',  # jsonb as text
        "config": {"gateway": "stripe"},
        "attempt": 2,
        "max_attempts": 5,
        "checkpoint": {"cursor": 4, "items_processed": 4, "accumulated_results": [1]},
        "inputs": {"x": 1},
        "timeout_seconds": Decimal("12.5"),
        "worker_id": "host:1",
        "namespace": "ecommerce",
        "task_name": "checkout_workflow",
    }
    ctx = StepContext.from_claim(row)
    assert ctx.task_uuid == str(task_uuid)
    assert ctx.step_uuid == str(step_uuid)
    assert ctx.step_name == "process_payment"
    assert ctx.handler_name == "ecommerce.step_handlers.ProcessPaymentHandler"
    assert ctx.get_input("cart_items") == [1]
    assert ctx.get_dependency_field("validate_cart", "total") == 10.5
    assert ctx.get_config("gateway") == "stripe"
    assert (ctx.attempt, ctx.max_attempts, ctx.retry_count) == (2, 5, 1)
    assert ctx.checkpoint_cursor == 4
    assert ctx.step_inputs == {"x": 1}
    assert ctx.timeout_seconds == 12.5
    assert (ctx.worker_id, ctx.namespace, ctx.task_name) == (
        "host:1",
        "ecommerce",
        "checkout_workflow",
    )


def test_from_claim_minimal_row_uses_defaults() -> None:
    ctx = StepContext.from_claim(
        {"task_uuid": "t", "step_uuid": "s", "step_name": "a", "handler": "h", "checkpoint": None}
    )
    assert ctx.task_context == {}
    assert ctx.dependency_results == {}
    assert ctx.step_config == {}
    assert (ctx.attempt, ctx.max_attempts) == (1, 3)
    assert ctx.has_checkpoint() is False
    assert ctx.step_inputs is None
    assert ctx.timeout_seconds is None
    assert ctx.worker_id is None


def test_from_claim_rejects_broken_rows() -> None:
    with pytest.raises(ValidationError, match="step_uuid, handler"):
        StepContext.from_claim({"task_uuid": "t", "step_name": "a"})
    with pytest.raises(ValidationError, match="'task_context' must be a JSON object, got list"):
        StepContext.from_claim(
            {
                "task_uuid": "t",
                "step_uuid": "s",
                "step_name": "a",
                "handler": "h",
                "task_context": [1, 2],
            }
        )


# === StepHandlerResult ==========================================================================


def test_success_result() -> None:
    result = StepHandlerResult.success({"a": 1}, metadata={"op": "x"})
    assert result.is_success and not result.is_failure and not result.is_checkpoint
    assert result.kind == "success"
    assert result.result == {"a": 1}
    assert result.metadata == {"op": "x"}
    assert result.error_message is None
    assert StepHandlerResult.success(None).result is None
    assert StepHandlerResult.success([1, 2]).metadata == {}


def test_failure_result_defaults_and_fields() -> None:
    default = StepHandlerResult.failure("boom")
    assert default.is_failure and not default.is_success
    assert default.error_message == "boom"
    assert default.error_type == "unexpected_error"
    assert default.retryable is True
    assert default.error_code is None
    assert default.retry_after is None
    assert default.error_context == {}
    assert default.metadata == {}

    full = StepHandlerResult.failure(
        message="bad",
        error_type="validation_error",
        retryable=False,
        error_code="E1",
        metadata={"m": 1},
        context={"field": "x"},
        retry_after=2.5,
    )
    assert (full.error_type, full.retryable, full.error_code) == ("validation_error", False, "E1")
    assert full.metadata == {"m": 1}
    assert full.error_context == {"field": "x"}
    assert full.retry_after == 2.5
    with pytest.raises(ValueError, match="retry_after"):
        StepHandlerResult.failure("x", retry_after=-1)


def test_checkpoint_result() -> None:
    result = StepHandlerResult.checkpoint(
        cursor={"page": 2}, items_processed=20, accumulated_results=[1]
    )
    assert result.is_checkpoint and not result.is_success and not result.is_failure
    assert result.cursor == {"page": 2}
    assert result.items_processed == 20
    assert result.accumulated_results == [1]
    bare = StepHandlerResult.checkpoint(5)
    assert (bare.cursor, bare.items_processed, bare.accumulated_results) == (5, 0, None)
    with pytest.raises(ValueError, match="items_processed"):
        StepHandlerResult.checkpoint(1, items_processed=-1)
    with pytest.raises(TypeError, match="items_processed"):
        StepHandlerResult.checkpoint(1, items_processed=True)


def test_result_is_immutable_and_kind_checked() -> None:
    result = StepHandlerResult.success(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.result = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind"):
        StepHandlerResult(kind="maybe")  # type: ignore[arg-type]


# === StepHandler ================================================================================


class SyncHandler(StepHandler):
    handler_name = "sync_handler"

    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success({"n": context.get_input("n")})


class AsyncHandler(StepHandler):
    handler_name = "async_handler"
    handler_version = "2.1.0"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0)
        return self.success({"n": context.get_input("n")})


class UnnamedHandler(StepHandler):
    def call(self, context: StepContext) -> StepHandlerResult:
        return self.success(None)


class UnnamedChild(SyncHandler):
    pass


def test_handler_names_and_versions() -> None:
    assert SyncHandler.handler_name == "sync_handler"
    assert SyncHandler.handler_version == "1.0.0"
    assert AsyncHandler.handler_version == "2.1.0"
    assert UnnamedHandler.handler_name == f"{__name__}.UnnamedHandler"
    # A subclass does not inherit its parent's registered name.
    assert UnnamedChild.handler_name == f"{__name__}.UnnamedChild"


def test_is_async() -> None:
    assert SyncHandler.is_async is False
    assert SyncHandler().is_async is False
    assert AsyncHandler.is_async is True
    assert AsyncHandler().is_async is True

    class AsyncChild(AsyncHandler):
        pass

    assert AsyncChild.is_async is True


def test_sync_and_async_handlers_run() -> None:
    ctx = build_test_context({"n": 3})
    assert SyncHandler().call(ctx).result == {"n": 3}
    assert asyncio.run(AsyncHandler().call(ctx)).result == {"n": 3}


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        StepHandler()  # type: ignore[abstract]


def test_handler_helpers_build_results() -> None:
    handler = SyncHandler()
    ok = handler.success([1], metadata={"m": True})
    assert (ok.kind, ok.result, ok.metadata) == ("success", [1], {"m": True})
    failed = handler.failure(
        "nope",
        error_type="network_error",
        retryable=True,
        error_code="NET",
        metadata={"m": 1},
        context={"host": "x"},
        retry_after=4,
    )
    assert failed == StepHandlerResult.failure(
        "nope",
        error_type="network_error",
        retryable=True,
        error_code="NET",
        metadata={"m": 1},
        context={"host": "x"},
        retry_after=4,
    )
    assert handler.failure("x").error_type == "unexpected_error"


# === HandlerRegistry ============================================================================


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory on sys.path and a unique module-name prefix for throwaway handler modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    prefix = f"thmod_{uuid.uuid4().hex[:10]}"
    yield tmp_path, prefix
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_register_get_names_contains_len() -> None:
    registry = HandlerRegistry()
    assert len(registry) == 0
    assert registry.register(SyncHandler) is SyncHandler

    @registry.register
    class Decorated(StepHandler):
        handler_name = "decorated"

        def call(self, context: StepContext) -> StepHandlerResult:
            return self.success(1)

    assert Decorated.handler_name == "decorated"  # the decorator returns the class itself
    registry.register(SyncHandler)  # same class again: no-op
    assert len(registry) == 2
    assert registry.names() == ["decorated", "sync_handler"]
    assert "sync_handler" in registry
    assert "async_handler" not in registry
    assert registry.get("decorated") is Decorated
    assert registry.get("nope") is None


def test_register_refuses_name_clash_and_non_handlers() -> None:
    registry = HandlerRegistry()
    registry.register(SyncHandler)

    class Impostor(StepHandler):
        handler_name = "sync_handler"

        def call(self, context: StepContext) -> StepHandlerResult:
            return self.success(None)

    with pytest.raises(ValidationError) as exc_info:
        registry.register(Impostor)
    message = str(exc_info.value)
    assert "'sync_handler' is already registered" in message
    assert "SyncHandler" in message
    assert "Impostor" in message
    assert registry.get("sync_handler") is SyncHandler

    with pytest.raises(ValidationError, match=r"subclasses of tasker_pg\.StepHandler"):
        registry.register(dict)  # type: ignore[type-var]
    with pytest.raises(ValidationError, match=r"subclasses of tasker_pg\.StepHandler"):
        registry.register(SyncHandler())  # type: ignore[type-var]
    with pytest.raises(ValidationError, match="abstract"):
        registry.register(StepHandler)


def test_resolve_by_name_caches_one_instance_per_class() -> None:
    registry = HandlerRegistry()
    registry.register(SyncHandler)
    first = registry.resolve("sync_handler")
    assert isinstance(first, SyncHandler)
    assert registry.resolve("sync_handler") is first


def test_resolve_by_dotted_path() -> None:
    from examples.ecommerce.handlers import ValidateCartHandler

    registry = HandlerRegistry(allow_import=True)
    by_path = registry.resolve("examples.ecommerce.handlers.ValidateCartHandler")
    assert type(by_path) is ValidateCartHandler
    assert registry.resolve("examples.ecommerce.handlers.ValidateCartHandler") is by_path
    # Importing by path does not register the class under its handler_name...
    assert len(registry) == 0
    # ...but registering it later shares the same instance.
    registry.register(ValidateCartHandler)
    assert registry.resolve(ValidateCartHandler.handler_name) is by_path


def test_resolve_nested_class_path(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    write_module(
        directory,
        f"{prefix}_nested",
        """
        from tasker_pg import StepHandler

        class Outer:
            class Inner(StepHandler):
                def call(self, context):
                    return self.success("inner")
        """,
    )
    handler = HandlerRegistry(allow_import=True).resolve(f"{prefix}_nested.Outer.Inner")
    assert handler.call(build_test_context({})).result == "inner"  # type: ignore[union-attr]


def test_unknown_handler_names_the_callable_and_registered_handlers() -> None:
    registry = HandlerRegistry()
    registry.register(SyncHandler)
    registry.register(AsyncHandler)
    for name in ("nope", "no.such.module.Handler", "examples.ecommerce.handlers.NoSuchHandler"):
        with pytest.raises(PermanentError) as exc_info:
            registry.resolve(name)
        error = exc_info.value
        assert error.error_code == "handler_not_found"
        assert repr(name) in error.message
        assert "Registered handlers: async_handler, sync_handler." in error.message
        assert error.context["registered"] == ["async_handler", "sync_handler"]

    with pytest.raises(PermanentError, match="Registered handlers: none"):
        HandlerRegistry().resolve("x")


def test_import_can_be_disabled() -> None:
    registry = HandlerRegistry(allow_import=False)
    with pytest.raises(PermanentError, match="disabled") as exc_info:
        registry.resolve("examples.ecommerce.handlers.ValidateCartHandler")
    assert exc_info.value.error_code == "handler_not_found"


def test_resolve_refuses_things_that_are_not_handlers() -> None:
    with pytest.raises(PermanentError, match="not a StepHandler subclass") as exc_info:
        HandlerRegistry(allow_import=True).resolve("json.dumps")
    assert exc_info.value.error_code == "invalid_handler"


def test_resolve_reports_a_module_that_fails_to_import(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    write_module(directory, f"{prefix}_broken", "raise RuntimeError('config missing')\n")
    write_module(directory, f"{prefix}_dep", "import thmod_missing_dependency_xyz\n")
    registry = HandlerRegistry(allow_import=True)
    with pytest.raises(PermanentError, match="RuntimeError: config missing") as exc_info:
        registry.resolve(f"{prefix}_broken.Handler")
    assert exc_info.value.error_code == "handler_import_failed"
    # A missing dependency of an existing module is an import failure, not "not found".
    with pytest.raises(PermanentError, match="thmod_missing_dependency_xyz") as exc_info:
        registry.resolve(f"{prefix}_dep.Handler")
    assert exc_info.value.error_code == "handler_import_failed"


def test_register_module_takes_only_classes_defined_there(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    write_module(
        directory,
        f"{prefix}_a",
        """
        from abc import abstractmethod
        from tasker_pg import StepHandler

        class AHandler(StepHandler):
            handler_name = "a_handler"
            def call(self, context):
                return self.success("a")

        class Base(StepHandler):
            @abstractmethod
            def call(self, context): ...

        class NotAHandler:
            pass
        """,
    )
    write_module(
        directory,
        f"{prefix}_b",
        f"""
        from tasker_pg import StepHandler, StepHandlerResult
        from {prefix}_a import AHandler, Base

        class BHandler(Base):
            def call(self, context):
                return self.success("b")
        """,
    )
    registry = HandlerRegistry()
    registered = registry.register_module(f"{prefix}_b")
    assert [cls.__name__ for cls in registered] == ["BHandler"]
    assert registry.names() == [f"{prefix}_b.BHandler"]

    module_a = sys.modules[f"{prefix}_a"]
    assert [cls.__name__ for cls in registry.register_module(module_a)] == ["AHandler"]
    assert registry.names() == ["a_handler", f"{prefix}_b.BHandler"]
    # Registering the same module twice is harmless.
    registry.register_module(module_a)
    assert len(registry) == 2


def test_register_module_missing_module() -> None:
    with pytest.raises(ConfigurationError, match="cannot import handler module 'no_such_mod_q'"):
        HandlerRegistry().register_module("no_such_mod_q")


# === outcome rules ==============================================================================


def assert_storable(outcome: dict[str, Any]) -> None:
    """Every outcome must encode as JSON (the worker sends them as one jsonb array)."""
    jsonutil.dumps(outcome)


def test_success_outcome_shape() -> None:
    result = StepHandlerResult.success({"total": 1.5}, metadata={"op": "x"})
    outcome = outcome_from_result(
        result, fence=Fence(STEP, 2, CLAIM_SEQ), duration_ms=3, worker_id="w1"
    ).to_json()
    assert outcome == {
        "step_uuid": STEP,
        "attempt": 2,
        "kind": "success",
        "duration_ms": 3.0,
        "worker_id": "w1",
        "result": {"total": 1.5},
        "metadata": {"op": "x"},
        "claim_seq": CLAIM_SEQ,
    }
    assert isinstance(outcome["duration_ms"], float)
    assert_storable(outcome)


def test_success_with_none_result_is_stored_as_null() -> None:
    outcome = outcome_from_result(
        StepHandlerResult.success(None), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=0.1
    ).to_json()
    assert outcome["kind"] == "success"
    assert outcome["result"] is None
    assert outcome["metadata"] == {}
    assert outcome["worker_id"] is None


def test_failure_result_outcomes() -> None:
    retryable = StepHandlerResult.failure(
        "gateway down",
        error_type="network_error",
        retry_after=7,
        context={"gw": "x"},
        metadata={"m": 1},
    )
    outcome = outcome_from_result(
        retryable, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()
    assert outcome["kind"] == "failure"
    assert outcome["error"] == {
        "message": "gateway down",
        "error_type": "network_error",
        "error_code": None,
        "retryable": True,
        "retry_after": 7.0,
        "context": {"gw": "x"},
        "traceback": None,
    }
    assert outcome["metadata"] == {"m": 1}

    permanent = StepHandlerResult.failure(
        "bad", error_type="validation_error", retryable=False, error_code="E1", retry_after=9
    )
    error = outcome_from_result(
        permanent, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]
    assert error["retryable"] is False
    assert error["error_code"] == "E1"
    assert error["retry_after"] is None  # no retry, so no delay
    assert error["context"] == {}


def test_checkpoint_outcome_shape() -> None:
    result = StepHandlerResult.checkpoint(
        cursor={"offset": 200}, items_processed=200, accumulated_results={"sum": 5}
    )
    outcome = outcome_from_result(
        result, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=5.5
    ).to_json()
    assert outcome == {
        "step_uuid": STEP,
        "attempt": 1,
        "kind": "checkpoint",
        "duration_ms": 5.5,
        "worker_id": None,
        "checkpoint": {
            "cursor": {"offset": 200},
            "items_processed": 200,
            "accumulated_results": {"sum": 5},
        },
        "claim_seq": CLAIM_SEQ,
    }


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(None, "None"), ({"total": 1}, "dict"), ("ok", "str"), (True, "bool")],
)
def test_non_result_return_is_a_permanent_invalid_result(value: object, type_name: str) -> None:
    outcome = outcome_from_result(
        value, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0, handler_name="app.Foo"
    ).to_json()
    error = outcome["error"]
    assert outcome["kind"] == "failure"
    assert error["error_type"] == "invalid_result"
    assert error["retryable"] is False
    assert error["message"].startswith(
        f"step handler 'app.Foo' returned {type_name} instead of a StepHandlerResult"
    )
    assert "return self.success(" in error["message"]
    assert_storable(outcome)


def test_returned_coroutine_gets_an_await_hint() -> None:
    coroutine = AsyncHandler().call(build_test_context({}))
    try:
        outcome = outcome_from_result(
            coroutine, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
        ).to_json()
    finally:
        coroutine.close()
    assert "returned coroutine instead of a StepHandlerResult" in outcome["error"]["message"]
    assert "awaited" in outcome["error"]["message"]


def test_non_json_result_is_a_permanent_invalid_result() -> None:
    result = StepHandlerResult.success({"at": datetime(2024, 1, 1, tzinfo=timezone.utc)})  # noqa: UP017
    outcome = outcome_from_result(
        result, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0, handler_name="app.Stamp"
    ).to_json()
    error = outcome["error"]
    assert outcome["kind"] == "failure"
    assert error["error_type"] == "invalid_result"
    assert error["retryable"] is False
    assert error["message"].startswith(
        "step handler 'app.Stamp' returned a result that is not JSON-serialisable: "
        "Object of type datetime is not JSON serializable"
    )
    assert "result" not in outcome
    assert_storable(outcome)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_not_serialisable(bad: float) -> None:
    outcome = outcome_from_result(
        StepHandlerResult.success({"ratio": bad}), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()
    assert outcome["error"]["error_type"] == "invalid_result"
    assert "not JSON-serialisable" in outcome["error"]["message"]
    assert "NaN or Infinity" in outcome["error"]["message"]
    assert_storable(outcome)


def test_non_json_metadata_and_checkpoint_are_invalid_results() -> None:
    bad_meta = StepHandlerResult.success({"ok": 1}, metadata={"when": {1, 2}})
    message = outcome_from_result(
        bad_meta, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]["message"]
    assert "returned a metadata that is not JSON-serialisable: Object of type set" in message

    list_meta = StepHandlerResult.success({"ok": 1}, metadata=[1])  # type: ignore[arg-type]
    error = outcome_from_result(
        list_meta, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]
    assert error["error_type"] == "invalid_result"
    assert "metadata must be a JSON object" in error["message"]

    bad_checkpoint = StepHandlerResult.checkpoint(cursor=Decimal("1.5"))
    error = outcome_from_result(
        bad_checkpoint, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]
    assert error["error_type"] == "invalid_result"
    assert error["retryable"] is False
    assert "checkpoint that is not JSON-serialisable: Object of type Decimal" in error["message"]


def test_permanent_error_outcome() -> None:
    exc = PermanentError(
        "Product 9 not found", error_code="PRODUCT_NOT_FOUND", context={"product_id": 9}
    )
    outcome = outcome_from_exception(
        exc, fence=Fence(STEP, 3, CLAIM_SEQ), duration_ms=2.0, worker_id="w"
    ).to_json()
    assert outcome == {
        "step_uuid": STEP,
        "attempt": 3,
        "kind": "failure",
        "duration_ms": 2.0,
        "worker_id": "w",
        "error": {
            "message": "Product 9 not found",
            "error_type": "PermanentError",
            "error_code": "PRODUCT_NOT_FOUND",
            "retryable": False,
            "retry_after": None,
            "context": {"product_id": 9},
            "traceback": None,
        },
        "metadata": {},
        "claim_seq": CLAIM_SEQ,
    }
    default = outcome_from_exception(
        PermanentError("x"), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=0.0
    ).to_json()
    assert default["error"]["error_code"] == "permanent_error"


def test_retryable_error_outcome() -> None:
    exc = RetryableError("Payment gateway timeout", retry_after=30, context={"gateway": "stripe"})
    error = outcome_from_exception(exc, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=2.0).to_json()[
        "error"
    ]
    assert error["error_type"] == "RetryableError"
    assert error["retryable"] is True
    assert error["retry_after"] == 30.0
    assert error["error_code"] == "retryable_error"
    assert error["context"] == {"gateway": "stripe"}
    no_delay = outcome_from_exception(
        RetryableError("x", error_code="FLAKY"), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=0.0
    ).to_json()
    assert no_delay["error"]["retry_after"] is None
    assert no_delay["error"]["error_code"] == "FLAKY"


def _explode() -> None:
    raise KeyError("missing_key")


def test_generic_exception_is_retryable_with_traceback() -> None:
    try:
        _explode()
    except KeyError as exc:
        outcome = outcome_from_exception(
            exc, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
        ).to_json()
    error = outcome["error"]
    assert error["error_type"] == "KeyError"
    assert error["message"] == "'missing_key'"
    assert error["retryable"] is True
    assert error["error_code"] is None
    assert error["retry_after"] is None
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert "in _explode" in error["traceback"]
    assert error["traceback"].rstrip().endswith("KeyError: 'missing_key'")
    assert_storable(outcome)


def test_exception_without_message_uses_class_name() -> None:
    error = outcome_from_exception(
        ZeroDivisionError(), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]
    assert error["message"] == "ZeroDivisionError"
    assert error["traceback"] == "ZeroDivisionError\n"  # never raised: no frames


def test_other_tasker_errors_keep_their_code_and_stay_retryable() -> None:
    error = outcome_from_exception(
        ValidationError("bad name"), fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]
    assert error["error_type"] == "ValidationError"
    assert error["error_code"] == "validation_error"
    assert error["retryable"] is True


def test_non_json_error_context_is_made_storable() -> None:
    when = datetime(2024, 5, 1)
    context: dict[Any, Any] = {"when": when, "ratio": math.nan, 3: (1, 2)}
    exc = PermanentError("x", context=context)
    outcome = outcome_from_exception(
        exc, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()
    assert outcome["error"]["context"] == {"when": repr(when), "ratio": "nan", "3": [1, 2]}
    assert_storable(outcome)

    failure = StepHandlerResult.failure("x", context={"obj": object()}, metadata={"s": {1}})
    outcome = outcome_from_result(
        failure, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()
    assert outcome["error"]["context"]["obj"].startswith("<object object")
    assert outcome["metadata"] == {"s": "{1}"}
    assert_storable(outcome)


def test_huge_error_context_is_replaced_by_a_preview() -> None:
    exc = RetryableError("x", context={"blob": "z" * 100_000})
    context = outcome_from_exception(
        exc, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]["context"]
    assert context["truncated"] is True
    assert len(context["preview"].encode()) <= 8 * 1024


def test_long_messages_and_tracebacks_are_truncated() -> None:
    long_message = "é" * 10_000  # 20,000 bytes of UTF-8
    try:
        raise RuntimeError(long_message)
    except RuntimeError as exc:
        error = outcome_from_exception(
            exc, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
        ).to_json()["error"]
    message = error["message"]
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.startswith("éééé")
    assert message.endswith(f"[truncated 20000 bytes to {MAX_MESSAGE_BYTES}]")
    tb = error["traceback"]
    assert len(tb.encode()) <= MAX_TRACEBACK_BYTES
    assert tb.startswith("[truncated ")
    assert tb.rstrip().endswith("é")  # the end, where the exception line is, is kept

    failure = StepHandlerResult.failure("m" * 5000)
    message = outcome_from_result(
        failure, fence=Fence(STEP, 1, CLAIM_SEQ), duration_ms=1.0
    ).to_json()["error"]["message"]
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert "truncated 5000 bytes" in message


def test_outcomes_are_frozen_values_carrying_their_fence() -> None:
    fence = Fence(STEP, 2, CLAIM_SEQ)
    success = outcome_from_result(StepHandlerResult.success({"a": 1}), fence=fence, duration_ms=1)
    checkpoint = outcome_from_result(
        StepHandlerResult.checkpoint(cursor=5), fence=fence, duration_ms=1
    )
    failure = outcome_from_exception(ValueError("boom"), fence=fence, duration_ms=1)
    assert isinstance(success, Success)
    assert isinstance(checkpoint, Checkpoint)
    assert isinstance(failure, Failure)
    for outcome in (success, checkpoint, failure):
        assert outcome.fence is fence
        json = outcome.to_json()
        assert (json["step_uuid"], json["attempt"], json["claim_seq"]) == (STEP, 2, CLAIM_SEQ)
        assert json["kind"] == outcome.kind
        with pytest.raises(dataclasses.FrozenInstanceError):
            outcome.fence = Fence(STEP, 3, 8)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        failure.error.retryable = False  # type: ignore[misc]
    assert failure.error.error_type == "ValueError"
    assert fence.to_json() == {"step_uuid": STEP, "attempt": 2, "claim_seq": CLAIM_SEQ}


def test_refused_outcome_replaces_a_result_the_engine_would_not_store() -> None:
    success = outcome_from_result(
        StepHandlerResult.success({"a": 1}),
        fence=Fence(STEP, 1, CLAIM_SEQ),
        duration_ms=4.0,
        worker_id="w",
    )
    refusal = ValidationError("result too big", error_code="payload_too_large")
    replacement = refused_outcome(success, refusal)
    assert replacement.to_json() == {
        "step_uuid": STEP,
        "attempt": 1,
        "kind": "failure",
        "duration_ms": 4.0,
        "worker_id": "w",
        "error": {
            "message": "the engine refused the step's success outcome: result too big",
            "error_type": "invalid_result",
            "error_code": "payload_too_large",
            "retryable": False,
            "retry_after": None,
            "context": {},
            "traceback": None,
        },
        "metadata": {},
        "claim_seq": CLAIM_SEQ,
    }


def test_truncate_helpers_leave_short_text_alone() -> None:
    assert truncate_head("short", 100) == "short"
    assert truncate_tail("short", 100) == "short"
    cut = truncate_tail("abcdefghij" * 20, 80)
    assert len(cut) <= 80
    assert cut.endswith("ghij")


def test_timeout_outcome() -> None:
    outcome = timeout_outcome(
        fence=Fence(STEP, 2, CLAIM_SEQ), duration_ms=2500.0, timeout_seconds=2.5, worker_id="w"
    ).to_json()
    error = outcome["error"]
    assert outcome["kind"] == "failure"
    assert outcome["attempt"] == 2
    assert error["error_type"] == "timeout"
    assert error["retryable"] is True
    assert "2.5 seconds" in error["message"]
    assert error["context"] == {"timeout_seconds": 2.5}
    assert_storable(outcome)


# === testing helper and package ==================================================================


def test_build_test_context_defaults() -> None:
    a = build_test_context({"k": 1})
    b = build_test_context({"k": 1})
    assert str(uuid.UUID(a.task_uuid)) == a.task_uuid
    assert str(uuid.UUID(a.step_uuid)) == a.step_uuid
    assert a.task_uuid != b.task_uuid
    assert a.step_uuid != b.step_uuid
    assert a.step_name == "test_step"
    assert (a.attempt, a.max_attempts) == (1, 3)
    assert a.dependency_results == {}
    assert a.step_config == {}
    assert a.has_checkpoint() is False
    assert a.step_inputs is None


def test_build_test_context_arguments_and_isolation() -> None:
    task_context = {"items": [1, 2]}
    checkpoint = {"cursor": 1, "items_processed": 1, "accumulated_results": {"n": 1}}
    ctx = build_test_context(
        task_context,
        {"up": {"v": 1}},
        {"cfg": True},
        checkpoint,
        step_name="s1",
        attempt=3,
        max_attempts=3,
        step_inputs={"i": 1},
        task_uuid="t",
        step_uuid="s",
    )
    assert (ctx.task_uuid, ctx.step_uuid, ctx.step_name) == ("t", "s", "s1")
    assert ctx.is_last_retry() is True
    assert ctx.get_dependency_field("up", "v") == 1
    assert ctx.get_config("cfg") is True
    assert ctx.step_inputs == {"i": 1}
    # A handler mutating what it reads does not change the test's own data.
    ctx.get_input("items").append(3)
    ctx.accumulated_results["n"] = 99
    assert task_context == {"items": [1, 2]}
    assert checkpoint["accumulated_results"] == {"n": 1}


def test_package_exports() -> None:
    assert tasker_pg.__version__ == "0.1.0"
    assert set(tasker_pg.__all__) >= {
        "HandlerRegistry",
        "StepContext",
        "StepHandler",
        "StepHandlerResult",
        "__version__",
    }
    assert tasker_pg.StepHandler is StepHandler
