"""The demo's pieces that need no database: the command it suggests, the result it suggests
for `step resolve`, and the checkout handlers' refusal of an upstream result missing a field."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from examples.ecommerce.handlers import SendConfirmationHandler
from tasker_pg.demo.example import find_example
from tasker_pg.demo.run import command_name, resolve_suggestion
from tasker_pg.errors import PermanentError
from tasker_pg.testing import build_test_context


def _script(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_command_is_plain_when_path_finds_the_running_script(tmp_path: Path) -> None:
    script = _script(tmp_path / "venv" / "bin" / "tasker-pg")
    assert command_name(str(script), which=lambda _: str(script), cwd=tmp_path) == "tasker-pg"


def test_command_is_relative_inside_the_current_directory(tmp_path: Path) -> None:
    _script(tmp_path / ".venv" / "bin" / "tasker-pg")
    other = _script(tmp_path / "elsewhere" / "tasker-pg")
    # `make demo` runs `.venv/bin/tasker-pg`; PATH has none, or another installation.
    for found in (None, str(other)):
        name = command_name(".venv/bin/tasker-pg", which=lambda _, f=found: f, cwd=tmp_path)
        assert name == ".venv/bin/tasker-pg"


def test_command_is_absolute_outside_the_current_directory(tmp_path: Path) -> None:
    script = _script(tmp_path / "venv" / "bin" / "tasker-pg")
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert command_name(str(script), which=lambda _: None, cwd=cwd) == str(script)


def test_python_m_names_the_script_next_to_the_interpreter(tmp_path: Path) -> None:
    script = _script(tmp_path / "venv" / "bin" / "tasker-pg")
    python = str(tmp_path / "venv" / "bin" / "python")
    name = command_name(
        "/x/tasker_pg/cli.py", executable=python, which=lambda _: None, cwd=tmp_path
    )
    assert name == "venv/bin/tasker-pg"
    assert script.exists()
    # No script next to the interpreter: the module form runs the same installation.
    lone = str(tmp_path / "bare" / "python")
    name = command_name("/x/tasker_pg/cli.py", executable=lone, which=lambda _: None, cwd=tmp_path)
    assert name == f"{lone} -m tasker_pg.cli"


def _confirmation_context(payment: dict[str, Any]) -> Any:
    inventory = {
        "reserved_items": [{"product_id": 1, "name": "Widget A", "quantity": 2}],
        "status": "reserved",
    }
    return build_test_context(
        {"customer_email": "ada@example.com"},
        {"process_payment": payment, "update_inventory": inventory},
        step_name="send_confirmation",
    )


def test_the_suggested_resolve_result_is_one_send_confirmation_accepts() -> None:
    suggestion = resolve_suggestion({"total": 64.77, "subtotal": 59.98}, "9f3ca880-d057-44d0")
    assert suggestion is not None
    step_uuid, text = suggestion
    assert step_uuid == "9f3ca880-d057-44d0"
    result = SendConfirmationHandler().call(_confirmation_context(json.loads(text)))
    assert result.is_success
    assert result.result["amount_charged"] == 64.77
    assert "$64.77 charged" in result.result["body"]
    assert resolve_suggestion(None, "x") is None
    assert resolve_suggestion({"total": "lots"}, "x") is None


@pytest.mark.parametrize(
    ("payment", "field", "problem"),
    [
        ({"charged": "by hand"}, "payment_id", "has no 'payment_id'"),
        ({"payment_id": "pay_1"}, "amount_charged", "has no 'amount_charged'"),
        ({"payment_id": "pay_1", "amount_charged": "12"}, "amount_charged", "has a str as its"),
        ({"payment_id": 7, "amount_charged": 12.5}, "payment_id", "has a int as its"),
    ],
)
def test_send_confirmation_names_the_upstream_field_it_lacks(
    payment: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        SendConfirmationHandler().call(_confirmation_context(payment))
    error = caught.value
    assert error.error_code == "MISSING_UPSTREAM_FIELD"
    message = str(error)
    assert "send_confirmation" in message and "process_payment" in message
    assert problem in message and f"'{field}'" in message
    assert error.context["field"] == field and error.context["step"] == "process_payment"


def test_the_checkout_finds_the_example_of_the_checkout() -> None:
    example = find_example()
    assert example.origin == "examples/ecommerce/"
    assert example.handlers_module == "examples.ecommerce.handlers"
    assert example.template.name == "checkout_workflow"
    assert [s.name for s in example.template.steps] == [
        "validate_cart",
        "process_payment",
        "update_inventory",
        "send_confirmation",
    ]
