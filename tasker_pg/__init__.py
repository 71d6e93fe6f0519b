"""tasker-pg: a Postgres-native workflow engine. The handler API is importable from here."""

from __future__ import annotations

from tasker_pg.batch import Batchable, BatchWorkerContext, CursorConfig
from tasker_pg.client import AsyncTaskerClient, TaskerClient
from tasker_pg.context import StepContext
from tasker_pg.decision import DecisionHandler
from tasker_pg.handler import StepHandler
from tasker_pg.registry import HandlerRegistry
from tasker_pg.result import StepHandlerResult
from tasker_pg.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncTaskerClient",
    "BatchWorkerContext",
    "Batchable",
    "CursorConfig",
    "DecisionHandler",
    "HandlerRegistry",
    "StepContext",
    "StepHandler",
    "StepHandlerResult",
    "TaskerClient",
    "Worker",
    "__version__",
]
