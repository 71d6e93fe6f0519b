"""Only handlers the operator registered run unless importing by dotted path is switched on."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tasker_pg import HandlerRegistry
from tasker_pg.errors import PermanentError
from tests.support.workflows import math_handlers

MODULE = "tests.support.unregistered_handler"
DOTTED = f"{MODULE}.UnregisteredHandler"


@pytest.fixture
def not_imported() -> Iterator[None]:
    """The test-only handler module is not imported before or after the test."""
    sys.modules.pop(MODULE, None)
    yield
    sys.modules.pop(MODULE, None)


@pytest.mark.usefixtures("not_imported")
@pytest.mark.parametrize("callable_name", [DOTTED, "os.path", "os.system"])
def test_default_registry_does_not_import_a_dotted_path(callable_name: str) -> None:
    registry = HandlerRegistry()
    registry.register_module(math_handlers)
    with pytest.raises(PermanentError) as exc_info:
        registry.resolve(callable_name)
    error = exc_info.value
    assert error.error_code == "handler_not_found"
    assert repr(callable_name) in error.message
    assert "allow_import=True" in error.message
    assert "linear_step_1" in error.context["registered"]
    with pytest.raises(PermanentError) as exc_info:
        registry.handler_class(callable_name)
    assert exc_info.value.error_code == "handler_not_found"
    assert MODULE not in sys.modules


@pytest.mark.usefixtures("not_imported")
def test_allow_import_opts_in_to_importing_a_dotted_path() -> None:
    with pytest.raises(PermanentError):
        HandlerRegistry().resolve(DOTTED)
    assert MODULE not in sys.modules
    handler = HandlerRegistry(allow_import=True).resolve(DOTTED)
    assert type(handler).__name__ == "UnregisteredHandler"
    assert MODULE in sys.modules
