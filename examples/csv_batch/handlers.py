"""Batch fan-out over a CSV file of products: analyze, process in batches, aggregate.

`analyze_csv` (batchable) counts the data rows and returns one cursor range of 200 rows per
worker; the engine creates `process_batch_001`, `process_batch_002`, ... in the transaction
that commits it. Each worker reads its rows and totals their quantity and inventory value
(price x quantity, in exact decimals). `aggregate` (a deferred convergence after every worker)
adds the workers' totals up. A file with a header and no rows goes through one no-op worker.

Task context: `csv_path` (default: `products.csv` next to this file, 1,000 products) and, to
see a retry, `fail_batches_once` (batch ids whose first attempt fails retryably).
"""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path
from typing import Any

from tasker_pg import Batchable, StepContext, StepHandler, StepHandlerResult
from tasker_pg.errors import PermanentError, RetryableError

PRODUCTS_CSV = Path(__file__).with_name("products.csv")
"""The shipped file: 1,000 products (id, sku, name, category, price, quantity)."""
COLUMNS = ("id", "sku", "name", "category", "price", "quantity")
WORKER_TEMPLATE = "process_batch"


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The file's data rows (the header names the columns; it must hold `COLUMNS`)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise PermanentError(
                f"{path}: the header lacks {sorted(missing)}", error_code="bad_csv_header"
            )
        return list(reader)


def csv_path(context: StepContext) -> str:
    return str(context.get_input_or("csv_path", str(PRODUCTS_CSV)))


class AnalyzeCsvHandler(StepHandler, Batchable):
    """Counts the rows; one worker per `batch_size` rows (the handler's initialization)."""

    handler_name = "csv_batch.AnalyzeCsvHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        path = csv_path(context)
        total = len(read_rows(path))
        if total == 0:
            return self.no_batches_outcome(f"{Path(path).name} has a header and no rows")
        return self.batch_analyzer_success(
            cursor_configs=self.create_cursor_ranges(
                total, int(context.get_config("batch_size", 200))
            ),
            worker_template_name=WORKER_TEMPLATE,
            total_items=total,
            batch_metadata={"csv_path": path},
        )


class ProcessBatchHandler(StepHandler, Batchable):
    """Totals the quantity and inventory value of its range of rows."""

    handler_name = "csv_batch.ProcessBatchHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        no_op = self.handle_no_op_worker(context)
        if no_op is not None:
            return no_op
        batch = self.get_batch_context(context)
        if batch.batch_id in context.get_input_or("fail_batches_once", []) and context.attempt == 1:
            raise RetryableError(
                f"batch {batch.batch_id}: the file share hiccuped", retry_after=0.1
            )
        rows = read_rows(batch.batch_metadata.get("csv_path", csv_path(context)))
        mine = rows[batch.start_cursor : batch.end_cursor]
        value = sum((Decimal(r["price"]) * int(r["quantity"]) for r in mine), Decimal(0))
        return self.batch_worker_success(
            items_processed=len(mine),
            results={
                "inventory_value": str(value),
                "quantity": sum(int(r["quantity"]) for r in mine),
                "first_id": int(mine[0]["id"]),
                "last_id": int(mine[-1]["id"]),
            },
        )


class AggregateHandler(StepHandler, Batchable):
    """Adds up the workers' totals (the no-op worker of an empty file adds nothing)."""

    handler_name = "csv_batch.AggregateHandler"

    def call(self, context: StepContext) -> StepHandlerResult:
        summary = self.aggregate_batch_worker_results(context, f"{WORKER_TEMPLATE}_")
        totals: list[dict[str, Any]] = list(summary["results"].values())
        value = sum((Decimal(t["inventory_value"]) for t in totals), Decimal(0))
        return self.success(
            {
                "total_processed": summary["total_processed"],
                "worker_count": summary["worker_count"],
                "inventory_value": str(value),
                "total_quantity": sum(t["quantity"] for t in totals),
            }
        )
