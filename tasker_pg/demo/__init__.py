"""`tasker-pg demo` (`make demo`): the checkout example end to end, in one process, in seconds.

Starts the embedded PostgreSQL (unless given a DSN), migrates, registers the checkout template
of the example under a namespace of its own (`tasker_demo`, so a worker you run on `ecommerce`
never takes the demo's steps, nor the demo yours), runs a `Worker` in this process with the
example's handlers, creates a batch of tasks in one call and shows them finish: most complete,
one is declined by the payment gateway (a permanent failure), one meets a gateway timeout on
its first attempt and completes on the retry. Then it draws two tasks' DAGs (the renderer of
`tasker-pg task show`), prints a summary and the commands to try next.

The handlers are the example's own (`examples/ecommerce/` of the repository, shipped inside the
wheel as `tasker_pg/demo/ecommerce/`; see `tasker_pg.demo.example`): the demo shows the code a
reader finds in the repository, not a copy of it. The one addition is a wrapper around the
payment handler that simulates the gateway timeout for a task whose context asks for it
(`demo_gateway_timeouts`), with a short `retry_after` so the demo stays fast.
"""

from __future__ import annotations

from tasker_pg.demo.example import DEMO_NAMESPACE, find_example
from tasker_pg.demo.run import main, run_demo

__all__ = ["DEMO_NAMESPACE", "find_example", "main", "run_demo"]
