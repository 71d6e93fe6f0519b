"""Maps the `handler.callable` names of templates to the handler classes a worker runs."""

from __future__ import annotations

import importlib
import inspect
import threading
from types import ModuleType
from typing import TypeVar

from tasker_pg.errors import ConfigurationError, PermanentError, ValidationError
from tasker_pg.handler import StepHandler

H = TypeVar("H", bound=type[StepHandler])

# How many registered names an "unknown handler" message lists before summarising the rest.
_MAX_NAMES_IN_MESSAGE = 50


class HandlerRegistry:
    """The handler classes one worker (or test) knows, and one shared instance of each.

    Handlers are found by `handler_name` only: a worker runs only classes its operator registered
    (`register`, `register_module`, `tasker-pg worker --handlers`), whatever names templates
    carry. With `allow_import=True` a name that is not registered is also tried as a dotted
    import path `package.module.ClassName` and imported on demand; then whoever can register a
    template can make the worker import any installed module and run any `StepHandler` subclass
    in it. Each registry is independent; there is no global registry.
    """

    def __init__(self, *, allow_import: bool = False) -> None:
        self._allow_import = allow_import
        self._by_name: dict[str, type[StepHandler]] = {}
        self._by_path: dict[str, type[StepHandler]] = {}
        self._instances: dict[type[StepHandler], StepHandler] = {}
        # resolve() may be called from several worker threads; importing and instantiating must
        # happen once per class.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<HandlerRegistry {len(self._by_name)} handler(s)>"

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        """The registered handler names, sorted."""
        return sorted(self._by_name)

    def register(self, cls: H) -> H:
        """Register a handler class under its `handler_name`; returns it (usable as a decorator).

        Registering the same class twice does nothing. Raises `ValidationError` for anything that
        is not a concrete `StepHandler` subclass, and when another class already holds the name.
        """
        if not (isinstance(cls, type) and issubclass(cls, StepHandler)):
            raise ValidationError(
                f"cannot register {cls!r}: handlers must be subclasses of tasker_pg.StepHandler"
            )
        if inspect.isabstract(cls):
            raise ValidationError(
                f"cannot register {_class_path(cls)}: it is abstract (define a call() method)"
            )
        name = cls.handler_name
        if not isinstance(name, str) or not name:
            raise ValidationError(
                f"cannot register {_class_path(cls)}: handler_name must be a non-empty string"
            )
        with self._lock:
            existing = self._by_name.get(name)
            if existing is cls:
                return cls
            if existing is not None:
                raise ValidationError(
                    f"handler name {name!r} is already registered to {_class_path(existing)}; "
                    f"cannot register {_class_path(cls)} under the same name "
                    "(give one of them a different handler_name)"
                )
            self._by_name[name] = cls
        return cls

    def register_module(self, module_or_name: ModuleType | str) -> list[type[StepHandler]]:
        """Register every concrete `StepHandler` subclass defined in a module; returns them.

        Classes the module merely imports are skipped, so registering a module that does
        `from other import SomeHandler` does not register `SomeHandler`. Raises
        `ConfigurationError` when a module given by name cannot be imported.
        """
        if isinstance(module_or_name, str):
            try:
                module = importlib.import_module(module_or_name)
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import handler module {module_or_name!r}: {exc}; check the module "
                    "name and that its directory is on PYTHONPATH"
                ) from exc
        else:
            module = module_or_name
        found = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, StepHandler)
            and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
        ]
        for cls in found:
            self.register(cls)
        return found

    def get(self, name: str) -> type[StepHandler] | None:
        """The class registered under `name`, or None (no import is attempted)."""
        return self._by_name.get(name)

    def resolve(self, callable_name: str) -> StepHandler:
        """The shared handler instance for a template's `handler.callable`.

        Looks the name up among registered handler names, then (only with `allow_import=True`)
        as a dotted `module.ClassName` import path. Raises `PermanentError` with error_code
        `handler_not_found` when neither finds a handler (the message names the callable and the
        registered handlers), and `handler_import_failed` / `invalid_handler` when an imported
        module breaks on import or the attribute is not a handler class.
        """
        cls = self.handler_class(callable_name)
        instance = self._instances.get(cls)
        if instance is None:
            with self._lock:
                instance = self._instances.get(cls)
                if instance is None:
                    instance = cls()
                    self._instances[cls] = instance
        return instance

    def handler_class(self, callable_name: str) -> type[StepHandler]:
        """The class `resolve` would instantiate for `callable_name` (importing it if allowed).

        Raises the same `PermanentError`s as `resolve`; creates no instance.
        """
        cls = self._by_name.get(callable_name) or self._by_path.get(callable_name)
        if cls is None:
            cls = self._import(callable_name)
        return cls

    def _import(self, callable_name: str) -> type[StepHandler]:
        """Find `callable_name` as `module.attr[.attr...]`, trying the longest module path first."""
        if not self._allow_import or "." not in callable_name:
            raise self._not_found(callable_name)
        with self._lock:
            cached = self._by_path.get(callable_name)
            if cached is not None:
                return cached
            parts = callable_name.split(".")
            for split in range(len(parts) - 1, 0, -1):
                module_name = ".".join(parts[:split])
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as exc:
                    if exc.name is not None and _is_prefix_of(exc.name, module_name):
                        continue  # no such module: try a shorter module path
                    raise self._import_failed(callable_name, exc) from exc
                except Exception as exc:
                    raise self._import_failed(callable_name, exc) from exc
                obj: object = module
                for attr in parts[split:]:
                    obj = getattr(obj, attr, None)
                    if obj is None:
                        break
                if obj is None:
                    continue
                if not (isinstance(obj, type) and issubclass(obj, StepHandler)):
                    raise PermanentError(
                        f"handler {callable_name!r} is {obj!r}, not a StepHandler subclass",
                        error_code="invalid_handler",
                    )
                if inspect.isabstract(obj):
                    raise PermanentError(
                        f"handler {callable_name!r} is abstract (it has no call() method)",
                        error_code="invalid_handler",
                    )
                self._by_path[callable_name] = obj
                return obj
        raise self._not_found(callable_name)

    def _not_found(self, callable_name: str) -> PermanentError:
        """The error for a callable that is neither registered nor importable."""
        names = self.names()
        if not names:
            listed = "none"
        elif len(names) <= _MAX_NAMES_IN_MESSAGE:
            listed = ", ".join(names)
        else:
            shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
            listed = f"{shown} and {len(names) - _MAX_NAMES_IN_MESSAGE} more"
        how = (
            "nor importable as a dotted 'module.ClassName' path"
            if self._allow_import
            else "(importing by dotted path is disabled; HandlerRegistry(allow_import=True) "
            "or `tasker-pg worker --allow-import` enables it)"
        )
        return PermanentError(
            f"no step handler {callable_name!r}: it is not registered in this worker {how}. "
            f"Registered handlers: {listed}. Register the class with HandlerRegistry.register() "
            "or start the worker with --handlers MODULE.",
            error_code="handler_not_found",
            context={"callable": callable_name, "registered": names[:_MAX_NAMES_IN_MESSAGE]},
        )

    @staticmethod
    def _import_failed(callable_name: str, exc: BaseException) -> PermanentError:
        """The error for a handler module that exists but raises when imported."""
        return PermanentError(
            f"importing handler {callable_name!r} failed: {type(exc).__name__}: {exc}",
            error_code="handler_import_failed",
            context={"callable": callable_name},
        )


def _is_prefix_of(missing: str, module_name: str) -> bool:
    """Whether the module that was not found is `module_name` itself or one of its packages."""
    return module_name == missing or module_name.startswith(missing + ".")


def _class_path(cls: type) -> str:
    """`module.QualName` of a class, for messages."""
    return f"{cls.__module__}.{cls.__qualname__}"
