"""Where the demo finds its examples, and the examples made ready for the demo.

`examples/ecommerce/` (the checkout) and `examples/approval/` (one decision) of the repository
are the one copy of each example (template and handlers, which readers, the README and the
tests use). The wheel carries the same files inside this package, as `tasker_pg/demo/ecommerce/`
and `tasker_pg/demo/approval/` (pyproject's `force-include`, as it does for `sql/`): an
installed `tasker-pg demo` loads them from there with `importlib.resources`, and a checkout (an
editable install, `make demo`), which has no such directory, loads them from `examples/`.
"""

from __future__ import annotations

import importlib
import importlib.resources
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tasker_pg.context import StepContext
from tasker_pg.errors import ConfigurationError, RetryableError
from tasker_pg.handler import StepHandler
from tasker_pg.registry import HandlerRegistry
from tasker_pg.result import StepHandlerResult
from tasker_pg.template import TaskTemplate

DEMO_NAMESPACE = "tasker_demo"
"""The demo's own namespace (and queue): it never mixes with a user's `ecommerce` work."""
TEMPLATE_NAME = "checkout_workflow"
TEMPLATE_FILE = "checkout_workflow.yaml"

APPROVAL_TEMPLATE_NAME = "approval_request"
APPROVAL_TEMPLATE_FILE = "approval_request.yaml"
APPROVAL_CONTEXT = {"amount": 7500, "requester": "tasker-pg demo"}
"""The demo's one approval request: large enough for the manager and finance branches."""

GATEWAY_TIMEOUTS_KEY = "demo_gateway_timeouts"
"""Task context key: how many first attempts of process_payment meet a gateway timeout."""
RETRY_AFTER_SECONDS = 0.3
"""The simulated gateway's retry hint (the example's own is 5 s: too slow for a demo)."""


@dataclass(frozen=True)
class Example:
    """The checkout example as found: its template, its handlers module and where they came
    from (`origin` for the output, `handlers_module` for a worker's `--handlers`)."""

    template: TaskTemplate
    handlers: ModuleType
    origin: str
    source: str

    @property
    def handlers_module(self) -> str:
        return self.handlers.__name__


def find_example() -> Example:
    """The checkout example: the copy inside the installed package, else the checkout's."""
    return _find("ecommerce", TEMPLATE_FILE)


def find_approval_example() -> Example:
    """The conditional approval example (one decision), found like the checkout example."""
    return _find("approval", APPROVAL_TEMPLATE_FILE)


def _find(directory: str, template_file: str) -> Example:
    packaged = importlib.resources.files("tasker_pg.demo").joinpath(directory, template_file)
    if packaged.is_file():
        return Example(
            template=TaskTemplate.from_yaml(packaged.read_text("utf-8"), source=str(packaged)),
            handlers=_import(f"tasker_pg.demo.{directory}.handlers", where="the installed package"),
            origin=f"tasker_pg/demo/{directory}/ (installed with the package)",
            source=str(packaged),
        )
    root = Path(__file__).resolve().parents[2]
    template_path = root / "examples" / directory / template_file
    if template_path.is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        text = template_path.read_text("utf-8")
        return Example(
            template=TaskTemplate.from_yaml(text, source=str(template_path)),
            handlers=_import(f"examples.{directory}.handlers", where=str(root)),
            origin=f"examples/{directory}/",
            source=str(template_path),
        )
    raise ConfigurationError(
        f"the demo's {directory} example is missing: neither {packaged} (an installed package) "
        f"nor {template_path} (a checkout) exists; reinstall tasker-pg "
        "(`pip install --force-reinstall tasker-pg`)"
    )


def _import(module: str, *, where: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import the example handlers {module} from {where}: {exc}"
        ) from exc


def demo_template(example: Example) -> TaskTemplate:
    """The example's template, moved to the demo's namespace."""
    body = example.template.to_json()
    body["namespace_name"] = DEMO_NAMESPACE
    return TaskTemplate.from_dict(body, source=example.source)


def demo_registry(handlers: ModuleType, approval: ModuleType | None = None) -> HandlerRegistry:
    """The example's four handlers, the payment one behind a simulated flaky gateway; and
    the approval example's handlers when given."""
    payment_cls: type[StepHandler] = handlers.ProcessPaymentHandler

    class FlakyGatewayPaymentHandler(StepHandler):
        """ProcessPaymentHandler, except that the first `demo_gateway_timeouts` attempts of a
        task meet a gateway timeout (a retryable error with a short retry_after)."""

        handler_name = payment_cls.handler_name

        def __init__(self) -> None:
            self._payment = payment_cls()

        def call(self, context: StepContext) -> StepHandlerResult | Awaitable[StepHandlerResult]:
            timeouts = int(context.get_input_or(GATEWAY_TIMEOUTS_KEY, 0) or 0)
            if context.attempt <= timeouts:
                raise RetryableError(
                    "Payment gateway timeout (simulated by the demo)",
                    retry_after=RETRY_AFTER_SECONDS,
                    context={"gateway": "simulated", "attempt": context.attempt},
                    error_code="GATEWAY_TIMEOUT",
                )
            return self._payment.call(context)

    registry = HandlerRegistry(allow_import=False)
    for cls_name in ("ValidateCartHandler", "UpdateInventoryHandler", "SendConfirmationHandler"):
        registry.register(getattr(handlers, cls_name))
    registry.register(FlakyGatewayPaymentHandler)
    if approval is not None:
        registry.register_module(approval)
    return registry


def demo_contexts(count: int, products: Mapping[int, Any]) -> tuple[list[dict[str, Any]], int, int]:
    """`count` checkout contexts; returns them with the index of the one the gateway declines
    and of the one that meets a timeout first."""
    ids = sorted(products)
    contexts: list[dict[str, Any]] = []
    for i in range(count):
        items = [{"product_id": ids[i % len(ids)], "quantity": 1 + i % 2}]
        if i % 4 == 3:
            items.append({"product_id": ids[(i + 1) % len(ids)], "quantity": 1})
        contexts.append({"cart_items": items, "customer_email": f"customer{i + 1}@example.com"})
    declined = min(6, count - 1)
    flaky = min(3, count - 2) if count > 1 else 0
    if count > 1 and flaky == declined:
        flaky = declined - 1
    contexts[declined]["payment_token"] = "tok_declined"
    if count > 1:
        contexts[flaky][GATEWAY_TIMEOUTS_KEY] = 1
    return contexts, declined, flaky
