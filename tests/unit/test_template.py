"""Tests of the task template model: loading, defaults, canonical JSON, errors, graph queries.

Pure Python: no database is needed or requested.
"""

from __future__ import annotations

import itertools
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tasker_pg import jsonutil
from tasker_pg.errors import NotFoundError, ValidationError
from tasker_pg.template import (
    MAX_STEPS,
    StepTemplate,
    TaskTemplate,
    TemplateValidationError,
    load_template,
    load_templates,
    parse_version,
    version_key,
)

# The guide's checkout workflow, verbatim.
CHECKOUT_YAML = """\
name: checkout_workflow
namespace_name: ecommerce
version: 1.0.0
description: "E-commerce checkout workflow"

steps:
  - name: validate_cart
    handler:
      callable: ecommerce.step_handlers.ValidateCartHandler
    dependencies: []

  - name: process_payment
    handler:
      callable: ecommerce.step_handlers.ProcessPaymentHandler
    dependencies:
      - validate_cart

  - name: update_inventory
    handler:
      callable: ecommerce.step_handlers.UpdateInventoryHandler
    dependencies:
      - validate_cart

  - name: send_confirmation
    handler:
      callable: ecommerce.step_handlers.SendConfirmationHandler
    dependencies:
      - process_payment
      - update_inventory
"""

DEFAULT_RETRY = {
    "retryable": True,
    "max_attempts": 3,
    "backoff": "exponential",
    "backoff_base_ms": 1000,
    "max_backoff_ms": 60000,
    "jitter": 0.0,
}


def step(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    """A minimal step mapping: `name`, a handler and the given dependencies."""
    return {"name": name, "handler": {"callable": f"h.{name}"}, "dependencies": list(deps), **extra}


def template(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A minimal template mapping around `steps`."""
    return {"name": "wf", "namespace_name": "ns", "version": "1.0.0", "steps": list(steps), **extra}


def error_of(data: Any, source: str | None = "wf.yaml") -> TemplateValidationError:
    """The error `from_dict` raises for `data` (fails the test if it raises none)."""
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_dict(data, source=source)
    return info.value


def yaml_error_of(text: str, source: str | None = "wf.yaml") -> TemplateValidationError:
    with pytest.raises(TemplateValidationError) as info:
        TaskTemplate.from_yaml(textwrap.dedent(text), source=source)
    return info.value


def cycles_in(message: str) -> list[list[str]]:
    """Every cycle path printed in an error message, as lists of step names."""
    return [
        path.split(" -> ") for path in re.findall(r"dependency cycle (\S+(?: -> \S+)+)", message)
    ]


# --- loading what users write ----------------------------------------------------------------


def test_guide_checkout_yaml_loads() -> None:
    t = TaskTemplate.from_yaml(CHECKOUT_YAML, source="checkout.yaml")

    assert t.key == ("ecommerce", "checkout_workflow", "1.0.0")
    assert t.description == "E-commerce checkout workflow"
    assert [s.name for s in t.steps] == [
        "validate_cart",
        "process_payment",
        "update_inventory",
        "send_confirmation",
    ]
    assert t.step("process_payment").handler.callable == (
        "ecommerce.step_handlers.ProcessPaymentHandler"
    )
    assert t.parents("send_confirmation") == ["process_payment", "update_inventory"]
    assert t.children("validate_cart") == ["process_payment", "update_inventory"]
    assert t.root_steps() == ["validate_cart"]
    assert t.ancestors("send_confirmation") == {
        "validate_cart",
        "process_payment",
        "update_inventory",
    }


def test_load_template_from_file(tmp_path: Path) -> None:
    path = tmp_path / "checkout.yaml"
    path.write_text(CHECKOUT_YAML, encoding="utf-8")

    assert load_template(path) == TaskTemplate.from_yaml(CHECKOUT_YAML)
    assert load_template(str(path)).name == "checkout_workflow"
    assert load_templates(path) == [load_template(path)]


def test_depends_on_is_an_alias_of_dependencies() -> None:
    t = TaskTemplate.from_dict(
        template(
            {"name": "a", "handler": {"callable": "h.a"}},
            {"name": "b", "handler": {"callable": "h.b"}, "depends_on": ["a"]},
        )
    )
    assert t.step("b").dependencies == ("a",)
    assert t.to_json()["steps"][1]["dependencies"] == ["a"]
    assert t == TaskTemplate.from_dict(template(step("a"), step("b", "a")))


def test_dependencies_and_depends_on_together_are_rejected() -> None:
    data = template(step("a"), {**step("b", "a"), "depends_on": ["a"]})
    message = str(error_of(data))
    assert "steps[1] (b)" in message
    assert "both 'dependencies' and 'depends_on'" in message


def test_to_json_fills_every_default() -> None:
    t = TaskTemplate.from_yaml(
        textwrap.dedent(
            """\
            name: minimal
            namespace_name: ns
            version: 0.1.0
            steps:
              - name: only
                handler: {callable: pkg.Only}
            """
        )
    )
    assert t.to_json() == {
        "name": "minimal",
        "namespace_name": "ns",
        "version": "0.1.0",
        "description": None,
        "metadata": {},
        "steps": [
            {
                "name": "only",
                "description": None,
                "handler": {"callable": "pkg.Only", "initialization": {}},
                "dependencies": [],
                "retry": DEFAULT_RETRY,
                "timeout_seconds": None,
                "type": "standard",
            }
        ],
    }


def test_empty_yaml_values_mean_the_default() -> None:
    t = TaskTemplate.from_yaml(
        "name: wf\nnamespace_name: ns\nversion: 1.0.0\nmetadata:\nsteps:\n"
        "  - name: a\n    handler:\n      callable: h.a\n      initialization:\n"
        "    dependencies:\n    retry:\n"
    )
    body = t.to_json()
    assert body["metadata"] == {}
    assert body["steps"][0]["handler"]["initialization"] == {}
    assert body["steps"][0]["dependencies"] == []
    assert body["steps"][0]["retry"] == DEFAULT_RETRY


FULL = template(
    step(
        "fetch",
        description="fetch the order",
        handler={"callable": "pkg.Fetch", "initialization": {"url": "https://x", "n": [1, 2.5]}},
        retry={
            "retryable": False,
            "max_attempts": 7,
            "backoff": "linear",
            "backoff_base_ms": 0,
            "max_backoff_ms": 5,
            "jitter": 0.25,
        },
        timeout_seconds=2.5,
        type="standard",
    ),
    step("store", "fetch", timeout_seconds=30),
    description="everything set",
    metadata={"owner": "team", "tags": ["a", "b"], "nested": {"x": None, "y": True}},
)


def test_to_json_keeps_explicit_values_and_is_json() -> None:
    t = TaskTemplate.from_dict(FULL)
    body = t.to_json()

    assert body["description"] == "everything set"
    assert body["metadata"] == FULL["metadata"]
    fetch = body["steps"][0]
    assert fetch["handler"] == FULL["steps"][0]["handler"]
    assert fetch["retry"] == FULL["steps"][0]["retry"]
    assert fetch["timeout_seconds"] == 2.5
    assert body["steps"][1]["timeout_seconds"] == 30
    assert list(body) == ["name", "namespace_name", "version", "description", "metadata", "steps"]
    assert list(fetch) == [
        "name",
        "description",
        "handler",
        "dependencies",
        "retry",
        "timeout_seconds",
        "type",
    ]
    assert jsonutil.loads(jsonutil.dumps(body)) == body


@pytest.mark.parametrize("data", [FULL, template(step("a"))], ids=["full", "minimal"])
def test_round_trip(data: dict[str, Any]) -> None:
    t = TaskTemplate.from_dict(data)
    assert TaskTemplate.from_dict(t.to_json()) == t
    assert TaskTemplate.from_dict(t.to_json()).to_json() == t.to_json()


def test_guide_checkout_round_trips_and_is_json() -> None:
    t = TaskTemplate.from_yaml(CHECKOUT_YAML)
    assert TaskTemplate.from_dict(t.to_json()) == t
    assert TaskTemplate.from_dict(jsonutil.loads(jsonutil.dumps(t.to_json()))) == t


def test_template_is_frozen_and_does_not_share_input() -> None:
    data = template(step("a", handler={"callable": "h", "initialization": {"k": [1]}}))
    t = TaskTemplate.from_dict(data)
    data["steps"][0]["handler"]["initialization"]["k"].append(2)
    assert t.step("a").handler.initialization == {"k": [1]}
    t.to_json()["steps"][0]["handler"]["initialization"]["k"].append(3)
    assert t.step("a").handler.initialization == {"k": [1]}
    with pytest.raises(Exception, match="frozen"):
        t.name = "other"


# --- validation errors -----------------------------------------------------------------------


def test_errors_are_project_validation_errors_not_pydantic_dumps() -> None:
    err = error_of(template(step("a", retry={"max_attempts": "3"})))
    assert isinstance(err, ValidationError)
    assert err.error_code == "validation_error"
    assert "pydantic" not in err.message
    assert "Input should be" not in err.message
    assert "errors.pydantic.dev" not in err.message


def test_duplicate_step_names() -> None:
    err = error_of(template(step("a"), step("b"), step("a")))
    assert "wf.yaml" in err.message
    assert "steps[2] (a).name" in err.message
    assert "duplicate step name 'a'" in err.message
    assert "steps[0]" in err.message


def test_unknown_dependency_names_it_and_suggests_the_closest_step() -> None:
    err = error_of(
        template(step("validate_cart"), step("process_payment", "validate_crt")),
        source="checkout.yaml",
    )
    assert "checkout.yaml" in err.message
    assert "steps[1] (process_payment).dependencies[0]" in err.message
    assert "unknown dependency 'validate_crt' in step 'process_payment'" in err.message
    assert "(did you mean 'validate_cart'?)" in err.message


def test_unknown_dependency_without_close_match_lists_steps() -> None:
    message = error_of(template(step("alpha"), step("beta", "zzz"))).message
    assert "unknown dependency 'zzz' in step 'beta'" in message
    assert "'alpha'" in message
    assert "did you mean" not in message


def test_self_dependency() -> None:
    message = error_of(template(step("a"), step("b", "a", "b"))).message
    assert "steps[1] (b).dependencies[1]" in message
    assert "step 'b' depends on itself" in message


def test_repeated_dependency() -> None:
    message = error_of(template(step("a"), step("b", "a", "a"))).message
    assert "step 'b' lists dependency 'a' more than once" in message


def test_cycle_prints_its_path_in_dependency_direction() -> None:
    err = error_of(template(step("a", "b"), step("b", "c"), step("c", "a"), step("d", "a")))
    assert "wf.yaml" in err.message
    assert "dependency cycle a -> b -> c -> a" in err.message
    assert "steps[0] (a)" in err.message
    assert len(err.problems) == 1


def test_cycle_starts_at_first_declared_step_on_it() -> None:
    # "x" is declared first but is not on the cycle; "b" is the first step that is.
    data = template(step("x", "c"), step("b", "c"), step("c", "b"))
    assert cycles_in(error_of(data).message) == [["b", "c", "b"]]


def test_each_separate_cycle_is_reported() -> None:
    data = template(step("a", "b"), step("b", "a"), step("c", "d"), step("d", "c"))
    assert cycles_in(error_of(data).message) == [["a", "b", "a"], ["c", "d", "c"]]


def test_long_cycle_is_found_without_recursion() -> None:
    n = MAX_STEPS
    steps = [step(f"s{i}", f"s{(i + 1) % n}") for i in range(n)]
    [cycle] = cycles_in(error_of(template(*steps)).message)
    assert cycle == [f"s{i}" for i in range(n)] + ["s0"]


def test_long_chain_validates() -> None:
    steps = [step("s0")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, MAX_STEPS)]
    t = TaskTemplate.from_dict(template(*reversed(steps)))
    assert t.topological_order() == [f"s{i}" for i in range(MAX_STEPS)]
    assert len(t.ancestors(f"s{MAX_STEPS - 1}")) == MAX_STEPS - 1


@pytest.mark.parametrize("steps", [[], None], ids=["empty list", "null"])
def test_no_steps(steps: Any) -> None:
    data = template()
    data["steps"] = steps
    message = error_of(data).message
    assert "steps: the template has no steps" in message


def test_missing_steps_key() -> None:
    data = template()
    del data["steps"]
    assert "template: missing required key 'steps'" in error_of(data).message


def test_too_many_steps() -> None:
    steps = [step(f"s{i}") for i in range(MAX_STEPS + 1)]
    message = error_of(template(*steps)).message
    assert f"the template has {MAX_STEPS + 1} steps; at most {MAX_STEPS} are allowed" in message


@pytest.mark.parametrize(
    "version",
    [
        "0.0.1",
        "1.0.0",
        "10.20.30",
        "1.2.0-rc.1",
        "2.0.0-alpha-2",
        "1.0.0-0",
        "1.0.0-0a",  # alphanumeric: a leading zero is fine
        "1.0.0-x.7.z.92",
        "1.0.0--",
        "1.0.0-" + "1" * 30,  # longer than any integer type: still a valid identifier
        "2147483647.0.0",
    ],
)
def test_valid_versions(version: str) -> None:
    assert TaskTemplate.from_dict(template(step("a"), version=version)).version == version


@pytest.mark.parametrize(
    "version",
    [
        "1.0",
        "1",
        "v1.0.0",
        "01.0.0",
        "1.0.0+build.5",
        "1.0.0-",
        "1.0.0\n",
        "1.0.0-rc..1",
        "",
        "1.0.0-01",  # numeric identifier with a leading zero
        "1.0.0-rc.01",
        "1.0.0-a.",
        "1.0.0-.a",
        "2147483648.0.0",  # does not fit an integer
        "1.0.0-é",
    ],
)
def test_invalid_versions_say_which_form_is_expected(version: str) -> None:
    message = error_of(template(step("a"), version=version)).message
    assert f"version {version!r} is not valid" in message
    assert "MAJOR.MINOR.PATCH" in message
    assert "'1.2.0-rc.1'" in message


def test_build_metadata_is_refused_with_the_reason() -> None:
    message = error_of(template(step("a"), version="1.0.0+build.5")).message
    assert "build metadata (+...) is not accepted" in message


def test_versions_order_by_semver_precedence() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1-" + "9" * 29,
        "1.0.1-" + "1" + "0" * 29,  # numeric identifiers by value, past any integer type
        "1.0.1-B",
        "1.0.1-a",  # ASCII: upper case sorts first
        "1.0.1",
        "1.10.0",
    ]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert parse_version("1.0.0-01") is None
    with pytest.raises(ValueError, match="not a valid version"):
        version_key("1.0.0-")


def test_version_read_as_number_by_yaml_says_to_quote_it() -> None:
    message = yaml_error_of(
        "name: wf\nnamespace_name: ns\nversion: 1.0\nsteps: [{name: a, handler: {callable: h}}]\n"
    ).message
    assert "version must be a semantic version MAJOR.MINOR.PATCH" in message
    assert "got number 1.0" in message
    assert "quote it" in message


def test_max_attempts_below_one() -> None:
    data = template(step("a"), step("b"), step("process_payment", retry={"max_attempts": 0}))
    message = error_of(data).message
    assert "steps[2] (process_payment).retry.max_attempts: must be >= 1 (got number 0)" in message


def test_max_backoff_below_base() -> None:
    data = template(step("a", retry={"backoff_base_ms": 5000, "max_backoff_ms": 1000}))
    message = error_of(data).message
    assert "steps[0] (a).retry" in message
    assert "max_backoff_ms (1000) must be >= backoff_base_ms (5000)" in message


@pytest.mark.parametrize(
    ("retry", "words"),
    [
        ({"backoff": "expo"}, "must be one of 'exponential', 'linear', 'fixed' or 'none'"),
        ({"jitter": 1.5}, "retry.jitter: must be <= 1"),
        ({"jitter": -0.1}, "retry.jitter: must be >= 0"),
        ({"backoff_base_ms": -1}, "retry.backoff_base_ms: must be >= 0"),
        ({"max_backoff_ms": 2**31}, "retry.max_backoff_ms: must be <= 2147483647"),
        ({"max_attempts": 2.0}, "retry.max_attempts: expected an integer, got number 2.0"),
        ({"max_attempts": True}, "retry.max_attempts: expected an integer, got boolean true"),
        ({"retryable": "no"}, "retry.retryable: expected true or false, got string 'no'"),
    ],
)
def test_retry_rules(retry: dict[str, Any], words: str) -> None:
    assert words in error_of(template(step("a", retry=retry))).message


@pytest.mark.parametrize("backoff", ["exponential", "linear", "fixed", "none"])
def test_every_backoff_kind_loads(backoff: str) -> None:
    t = TaskTemplate.from_dict(template(step("a", retry={"backoff": backoff})))
    assert t.step("a").retry.backoff == backoff


@pytest.mark.parametrize(
    ("timeout", "words"),
    [
        (0, "must be > 0"),
        (-5, "must be > 0"),
        ("30", "expected a number, got string '30'"),
        (float("inf"), "must be a finite number"),
        (1e300, "must be <= 31536000"),
        (10**400, "must be a finite number (got number 1000000"),
    ],
)
def test_timeout_must_be_a_positive_number(timeout: Any, words: str) -> None:
    message = error_of(template(step("a", timeout_seconds=timeout))).message
    assert "steps[0] (a).timeout_seconds" in message
    assert words in message
    assert len(message) < 500  # a huge number is shortened, not printed in full


@pytest.mark.parametrize("value", ["", "   ", " pkg.Handler"])
def test_handler_callable_must_be_a_name(value: str) -> None:
    message = error_of(template(step("a", handler={"callable": value}))).message
    assert "steps[0] (a).handler.callable: handler.callable" in message


@pytest.mark.parametrize(
    ("data", "location", "key", "suggestion"),
    [
        (
            template(step("a"), stpes=[]),
            "template",
            "unknown key 'stpes' at the top level of the template",
            "(did you mean 'steps'?)",
        ),
        (
            template({"name": "x", "handler": {"callable": "h"}, "dependancies": []}),
            "steps[0] (x)",
            "unknown key 'dependancies' in step 'x'",
            "(did you mean 'dependencies'?)",
        ),
        (
            template(step("x", handler={"callable": "h", "initialisation": {}})),
            "steps[0] (x).handler",
            "unknown key 'initialisation' in the handler of step 'x'",
            "(did you mean 'initialization'?)",
        ),
        (
            template(step("x", retry={"max_attempt": 2})),
            "steps[0] (x).retry",
            "unknown key 'max_attempt' in the retry policy of step 'x'",
            "(did you mean 'max_attempts'?)",
        ),
    ],
    ids=["top", "step", "handler", "retry"],
)
def test_unknown_keys_suggest_the_nearest_valid_key(
    data: dict[str, Any], location: str, key: str, suggestion: str
) -> None:
    message = error_of(data).message
    assert f"{location}: {key} {suggestion}" in message


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = error_of(template(step("x", retry={"zzz": 1}))).message
    assert "unknown key 'zzz' in the retry policy of step 'x'" in message
    assert "'max_attempts'" in message


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"name": 7}, "name: expected a string, got number 7"),
        ({"description": ["x"]}, "description: expected a string, got a list"),
        ({"metadata": "x"}, "metadata: expected a mapping, got string 'x'"),
        ({"steps": {"a": 1}}, "steps: expected a list, got a mapping"),
        ({"steps": ["a"]}, "steps[0]: expected a mapping, got string 'a'"),
    ],
)
def test_wrong_types_at_top_level(patch: dict[str, Any], words: str) -> None:
    assert words in error_of({**template(step("a")), **patch}).message


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"handler": "pkg.Handler"}, "steps[0] (a).handler: expected a mapping, got string"),
        ({"dependencies": "b"}, "steps[0] (a).dependencies: expected a list, got string 'b'"),
        ({"dependencies": ["b", 3]}, "steps[0] (a).dependencies[1]: expected a string"),
        ({"depends_on": [3]}, "steps[0] (a).depends_on[0]: expected a string"),
        ({"description": 5}, "steps[0] (a).description: expected a string, got number 5"),
    ],
)
def test_wrong_types_in_a_step(patch: dict[str, Any], words: str) -> None:
    data = {"name": "a", "handler": {"callable": "h"}, **patch}
    assert words in error_of(template(data, step("b"))).message


def test_yaml_boolean_where_a_string_belongs_says_to_quote_it() -> None:
    message = yaml_error_of(
        """\
        name: wf
        namespace_name: ns
        version: 1.0.0
        steps:
          - name: on
            handler: {callable: h}
        """
    ).message
    assert "steps[0].name: expected a string, got boolean true" in message
    assert "quote it" in message


def test_missing_required_keys_in_a_step() -> None:
    message = error_of(template(step("a"), {"name": "b"}, {})).message
    assert "steps[1] (b): missing required key 'handler' in step 'b'" in message
    assert "steps[2]: missing required key 'name' in step steps[2]" in message


def test_every_problem_is_listed_in_one_error() -> None:
    data = template(
        step("a", "nope"),
        step("b", retry={"max_attempts": 0}),
        {"name": "c", "handler": {"callable": "h"}, "dependancies": []},
        version="1.0",
    )
    err = error_of(data, source="many.yaml")
    assert err.message.startswith("invalid task template 'wf' in many.yaml: 4 problems\n")
    assert len(err.problems) == 4
    assert all(f"  - {problem}" in err.message for problem in err.problems)
    # graph rules are checked even while other rules fail
    assert any("unknown dependency 'nope'" in p for p in err.problems)
    assert err.source == "many.yaml"


def test_error_without_source_still_names_template() -> None:
    err = error_of(template(step("a", "a")), source=None)
    assert err.message.startswith("invalid task template 'wf': 1 problem\n")
    assert err.source is None


def test_top_level_must_be_a_mapping() -> None:
    message = error_of(["not", "a", "template"]).message
    assert "expected a mapping with name, namespace_name, version and steps" in message


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("ecommerce", True),
        ("e2e_tests", True),
        ("a" * 47, True),
        ("a" * 48, False),
        ("Ecommerce", False),
        ("e-commerce", False),
        ("2fast", False),
        ("_private", False),
        ("", False),
    ],
)
def test_namespace_must_be_a_queue_name(name: str, ok: bool) -> None:
    data = template(step("a"), namespace_name=name)
    if ok:
        assert TaskTemplate.from_dict(data).namespace_name == name
    else:
        message = error_of(data).message
        assert f"namespace_name {name!r} is not valid" in message
        assert "lowercase letters, digits and '_'" in message
        assert "at most 47 characters" in message


def test_namespace_error_suggests_a_valid_name() -> None:
    message = error_of(template(step("a"), namespace_name="E-Commerce")).message
    assert "(for example 'e_commerce')" in message


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("checkout_workflow", True),
        ("Checkout-v2.beta", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("_hidden", False),
        ("9lives", False),
        ("with space", False),
        ("slash/name", False),
    ],
)
def test_template_name_rules(name: str, ok: bool) -> None:
    data = template(step("a"), name=name)
    if ok:
        assert TaskTemplate.from_dict(data).name == name
    else:
        message = error_of(data).message
        assert f"name: template name {name!r} is not valid" in message
        assert "starting with a letter, at most 128 characters" in message


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("validate_cart", True),
        ("_internal", True),
        ("Step-2.b", True),
        ("s" * 128, True),
        ("s" * 129, False),
        ("2nd", False),
        ("-x", False),
        ("has space", False),
        ("", False),
    ],
)
def test_step_name_rules(name: str, ok: bool) -> None:
    data = template(step(name))
    if ok:
        assert TaskTemplate.from_dict(data).steps[0].name == name
    else:
        message = error_of(data).message
        assert f"name: step name {name!r} is not valid" in message
        assert "starting with a letter or '_', at most 128 characters" in message


def test_metadata_and_initialization_must_be_json_data() -> None:
    message = yaml_error_of(
        """\
        name: wf
        namespace_name: ns
        version: 1.0.0
        metadata: {created: 2024-01-01}
        steps:
          - name: a
            handler: {callable: h, initialization: {1: x}}
          - name: b
            handler: {callable: h, initialization: {ratio: .nan}}
        """
    ).message
    assert "metadata: metadata.created is a date" in message
    assert "quote dates" in message
    assert "steps[0] (a).handler.initialization: handler.initialization has the key 1" in message
    assert "JSON keys must be strings" in message
    assert "handler.initialization.ratio is nan" in message


# --- step types ------------------------------------------------------------------------------


@pytest.mark.parametrize("step_type", ["deferred", "Standard", "other"])
def test_unknown_step_types_are_rejected(step_type: str) -> None:
    err = error_of(template(step("a"), step("route", "a", type=step_type)), source="flow.yaml")
    assert "flow.yaml" in err.message
    assert "steps[1] (route).type" in err.message
    assert f"step type {step_type!r} is not valid" in err.message


def test_standard_step_type_is_accepted() -> None:
    t = TaskTemplate.from_dict(template(step("a", type="standard")))
    assert t.step("a").type == "standard"


# --- YAML ------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line() -> None:
    text = "name: wf\nnamespace_name: ns\nversion: 1.0.0\nsteps:\n  - name: a\n   handler: x\n"
    err = yaml_error_of(text, source="broken.yaml")
    assert "broken.yaml" in err.message
    assert "invalid YAML" in err.message
    assert "line 6" in err.message


def test_yaml_duplicate_keys_are_errors() -> None:
    err = yaml_error_of(
        """\
        name: wf
        namespace_name: ns
        version: 1.0.0
        steps:
          - name: a
            handler: {callable: h}
            dependencies: []
            dependencies: [a]
        """,
        source="dup.yaml",
    )
    assert "invalid YAML in dup.yaml at line 8" in err.message
    assert "duplicate key 'dependencies' (first defined on line 7)" in err.message


def test_yaml_merge_keys_still_work() -> None:
    text = textwrap.dedent(
        """\
        name: wf
        namespace_name: ns
        version: 1.0.0
        x-defaults: &defaults
          handler: {callable: h}
        steps:
          - <<: *defaults
            name: a
        """
    )
    # the anchor's holder is itself an unknown key, which is the point of the next assertion
    assert "unknown key 'x-defaults'" in yaml_error_of(text).message
    t = TaskTemplate.from_yaml(text.replace("x-defaults", "metadata"))
    assert t.step("a").handler.callable == "h"


@pytest.mark.parametrize("text", ["", "# just a comment\n", "---\n"])
def test_empty_yaml(text: str) -> None:
    assert "empty.yaml is empty" in yaml_error_of(text, source="empty.yaml").message


def test_yaml_python_tags_are_refused() -> None:
    message = yaml_error_of("!!python/object:os.system {}\n").message
    assert "invalid YAML" in message


# --- files and directories -------------------------------------------------------------------


def write(path: Path, name: str, version: str = "1.0.0", namespace: str = "ns") -> Path:
    path.write_text(
        f"name: {name}\nnamespace_name: {namespace}\nversion: {version}\n"
        "steps:\n  - name: a\n    handler: {callable: h}\n",
        encoding="utf-8",
    )
    return path


def test_load_directory_sorted_and_non_recursive(tmp_path: Path) -> None:
    write(tmp_path / "b.yml", "second")
    write(tmp_path / "a.yaml", "first")
    write(tmp_path / "C.YAML", "third")
    (tmp_path / "notes.txt").write_text("not: a template\n")
    write(tmp_path / ".a.yaml.swp.yaml", "hidden")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "nested.yaml", "nested")

    names = [t.name for t in load_templates(tmp_path)]
    assert names == ["third", "first", "second"]  # sorted by file name: 'C.YAML' < 'a.yaml'


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no templates here")
    with pytest.raises(ValidationError) as info:
        load_templates(tmp_path)
    assert f"directory {tmp_path} contains no template files" in str(info.value)


def test_same_template_in_two_files_names_both(tmp_path: Path) -> None:
    first = write(tmp_path / "one.yaml", "wf")
    second = write(tmp_path / "two.yaml", "wf")
    write(tmp_path / "three.yaml", "wf", version="2.0.0")
    with pytest.raises(TemplateValidationError) as info:
        load_templates(tmp_path)
    message = info.value.message
    assert "template ns/wf version 1.0.0 is defined twice" in message
    assert str(first) in message
    assert str(second) in message


def test_directory_errors_name_each_bad_file(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", "good")
    (tmp_path / "bad.yaml").write_text("name: [\n")
    write(tmp_path / "worse.yaml", "worse", version="one")
    with pytest.raises(TemplateValidationError) as info:
        load_templates(tmp_path)
    message = info.value.message
    assert f"invalid YAML in {tmp_path / 'bad.yaml'} at line" in message
    assert f"invalid task template 'worse' in {tmp_path / 'worse.yaml'}" in message
    assert "good.yaml" not in message
    assert len(info.value.problems) == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        load_template(tmp_path / "nope.yaml")
    with pytest.raises(ValidationError, match="does not exist"):
        load_templates(tmp_path / "nope.yaml")


def test_load_template_on_a_directory_points_to_load_templates(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="use load_templates"):
        load_template(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ValidationError, match="not UTF-8"):
        load_template(path)


# --- graph queries ---------------------------------------------------------------------------

MIXED = template(
    step("finalize", "validate", "transform", "analyze"),
    step("analyze", "right"),
    step("transform", "left"),
    step("validate", "left", "right"),
    step("right", "init"),
    step("left", "init"),
    step("init"),
)


def test_diamond() -> None:
    t = TaskTemplate.from_dict(
        template(step("a"), step("c", "a"), step("b", "a"), step("d", "b", "c"))
    )
    assert t.topological_order() == ["a", "c", "b", "d"]
    assert t.root_steps() == ["a"]
    assert t.ancestors("d") == {"a", "b", "c"}
    assert t.ancestors("b") == {"a"}
    assert t.ancestors("a") == set()
    assert t.parents("d") == ["b", "c"]
    assert t.children("a") == ["c", "b"]
    assert t.children("d") == []


def test_mixed_dag() -> None:
    t = TaskTemplate.from_dict(MIXED)
    # ready steps are taken in declared order: right (declared before left) goes first
    assert t.topological_order() == [
        "init",
        "right",
        "analyze",
        "left",
        "transform",
        "validate",
        "finalize",
    ]
    assert t.root_steps() == ["init"]
    assert t.ancestors("finalize") == {"init", "left", "right", "validate", "transform", "analyze"}
    assert t.ancestors("transform") == {"init", "left"}
    assert t.ancestors("validate") == {"init", "left", "right"}
    assert t.children("left") == ["transform", "validate"]
    assert t.children("init") == ["right", "left"]
    assert t.parents("validate") == ["left", "right"]


def test_unknown_step_in_graph_queries() -> None:
    t = TaskTemplate.from_dict(MIXED)
    for query in (t.step, t.parents, t.children, t.ancestors):
        with pytest.raises(NotFoundError, match=r"no step 'analyse' \(did you mean 'analyze'\?\)"):
            query("analyse")


def test_step_returns_the_step_model() -> None:
    t = TaskTemplate.from_dict(MIXED)
    assert isinstance(t.step("init"), StepTemplate)
    assert t.step("init") is t.steps[6]


# --- properties ------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, min_steps: int = 1) -> tuple[list[str], dict[str, list[str]]]:
    """A random DAG: step i may depend only on steps with a lower index; shuffled declaration.

    Returns the declaration order and each step's dependencies (in a random order).
    """
    count = draw(st.integers(min_value=min_steps, max_value=14))
    deps = {
        f"s{i}": [f"s{j}" for j in draw(st.lists(st.sampled_from(range(i)), unique=True))]
        if i
        else []
        for i in range(count)
    }
    order = draw(st.permutations([f"s{i}" for i in range(count)]))
    return list(order), deps


def as_template(order: list[str], deps: dict[str, list[str]]) -> dict[str, Any]:
    return template(*(step(name, *deps[name]) for name in order))


def reachable(deps: dict[str, list[str]], start: str) -> set[str]:
    """Every step `start` depends on, directly or transitively (a reference implementation)."""
    seen: set[str] = set()
    pending = list(deps[start])
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(deps[name])
    return seen


@settings(max_examples=200, deadline=None)
@given(dags())
def test_random_dags_validate_and_order_respects_every_edge(
    dag: tuple[list[str], dict[str, list[str]]],
) -> None:
    order, deps = dag
    t = TaskTemplate.from_dict(as_template(order, deps))

    topo = t.topological_order()
    assert sorted(topo) == sorted(order)
    position = {name: i for i, name in enumerate(topo)}
    for child, parents in deps.items():
        for parent in parents:
            assert position[parent] < position[child]
            assert child in t.children(parent)
    # stable: each step taken is the first declared among those whose parents are all done
    done: set[str] = set()
    for name in topo:
        ready = [s for s in order if s not in done and set(deps[s]) <= done]
        assert name == ready[0]
        done.add(name)
    for name in order:
        assert t.ancestors(name) == reachable(deps, name)
        assert t.parents(name) == deps[name]
    assert t.root_steps() == [s for s in order if not deps[s]]
    assert TaskTemplate.from_dict(t.to_json()) == t


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(dags(min_steps=2), st.data())
def test_random_graphs_with_a_back_edge_are_cycles(
    dag: tuple[list[str], dict[str, list[str]]], data: st.DataObject
) -> None:
    order, deps = dag
    # a back edge: make an ancestor depend on one of its descendants
    pairs = [(a, d) for d in order for a in reachable(deps, d)]
    assume(pairs)
    ancestor, descendant = data.draw(st.sampled_from(sorted(pairs)))
    deps = {**deps, ancestor: [*deps[ancestor], descendant]}

    err = error_of(as_template(order, deps))
    [cycle] = cycles_in(err.message)
    assert len(cycle) >= 3
    assert cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1
    for step_name, dependency in itertools.pairwise(cycle):
        assert dependency in deps[step_name], f"{step_name} -> {dependency} is not an edge"
    on_cycle = [name for name in order if name in reachable(deps, name)]
    assert cycle[0] == on_cycle[0]
