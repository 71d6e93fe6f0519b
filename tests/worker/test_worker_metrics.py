"""The worker's metrics port: Prometheus metrics scraped over HTTP, and the health probes.

Workers run real steps on PostgreSQL; `/metrics` is read over HTTP and parsed with
prometheus-client's own parser, and the values are compared with what the steps did.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from examples.csv_batch import handlers as csv_batch
from tasker_pg import Worker, db
from tasker_pg.errors import ConfigurationError
from tasker_pg.template import load_templates
from tests.support.metrics import Samples, http_get, sample, scrape
from tests.support.worker import assert_invariants, poll, registry_of, templates, wait_final
from tests.support.workflows import console_handlers

REPO = Path(__file__).resolve().parents[2]
CSV_BATCH = REPO / "examples" / "csv_batch"
FAST: dict[str, Any] = {"poll_interval": 0.1, "summary_interval": 0}

FLAKY_YAML = """
name: flaky
namespace_name: console
version: 1.0.0
steps:
  - name: ok
    handler: {callable: console.ok}
  - name: boom
    depends_on: [ok]
    retry: {max_attempts: 2, backoff: none}
    handler: {callable: console.boom}
"""


def labelled(samples: Samples, name: str, label: str) -> set[str]:
    """Every value the label takes in the samples of `name`."""
    return {dict(k[1])[label] for k in samples if k[0] == name and label in dict(k[1])}


@pytest.fixture
async def worker(dsn: str, tmp_path: Path) -> AsyncIterator[Worker]:
    (tmp_path / "flaky.yaml").write_text(FLAKY_YAML)
    async with Worker(
        ["csv_batch", "console"],
        registry_of(csv_batch, console_handlers),
        dsn=dsn,
        templates=[*load_templates(CSV_BATCH), *load_templates(tmp_path / "flaky.yaml")],
        concurrency=4,
        metrics_port=0,
        metrics_host="127.0.0.1",
        export_engine_metrics=True,
        **FAST,
    ) as running:
        yield running


async def create(conn: db.Connection, namespace: str, name: str) -> uuid.UUID:
    task: uuid.UUID = await conn.fetchval(
        "SELECT tasker.create_task($1, $2, '{}'::jsonb)", namespace, name
    )
    return task


async def test_metrics_count_each_step_by_template_step_and_outcome(
    worker: Worker, conn: db.Connection
) -> None:
    port = worker.metrics_port
    assert port is not None and port > 0
    csv_task = await create(conn, "csv_batch", "csv_product_import")
    flaky = await create(conn, "console", "flaky")
    states = await wait_final(conn, [csv_task, flaky], timeout=60)
    assert states == {csv_task: "complete", flaky: "error"}

    # the outcomes are counted once complete_steps answered: after the task is final
    async def all_counted() -> bool:
        return worker.stats.outcomes == 7 + 3

    await poll(all_counted, what="every outcome counted")
    samples = await scrape(port)
    steps = "tasker_steps_total"
    # the five batch workers (process_batch_001..005) share their template step's label
    assert labelled(samples, steps, "step") == {
        "analyze_csv",
        "process_batch",
        "aggregate",
        "ok",
        "boom",
    }
    expected = {
        ("csv_batch", "analyze_csv", "claimed"): 1,
        ("csv_batch", "analyze_csv", "succeeded"): 1,
        ("csv_batch", "process_batch", "claimed"): 5,
        ("csv_batch", "process_batch", "succeeded"): 5,
        ("csv_batch", "aggregate", "claimed"): 1,
        ("csv_batch", "aggregate", "succeeded"): 1,
        ("console", "ok", "claimed"): 1,
        ("console", "ok", "succeeded"): 1,
        ("console", "boom", "claimed"): 2,
        ("console", "boom", "retried"): 1,
        ("console", "boom", "failed"): 1,
    }
    got = {
        (dict(k[1])["namespace"], dict(k[1])["step"], dict(k[1])["outcome"]): v
        for k, v in samples.items()
        if k[0] == steps
    }
    assert got == expected
    duration = "tasker_step_duration_seconds_count"
    assert sample(samples, duration, namespace="csv_batch", step="process_batch") == 5
    assert sample(samples, duration, namespace="console", step="boom") == 2
    # every successful flush was timed; claims go on polling, so between two reads of stats
    stats = worker.stats
    assert sample(samples, "tasker_flush_duration_seconds_count") == stats.flush_calls
    claims = sum(v for k, v in samples.items() if k[0] == "tasker_claim_duration_seconds_count")
    assert 0 < claims <= stats.claim_calls
    # the worker's gauges, at rest
    assert sample(samples, "tasker_worker_in_flight_steps") == 0
    assert sample(samples, "tasker_worker_running_steps") == 0
    assert sample(samples, "tasker_worker_free_slots") == 4
    assert sample(samples, "tasker_worker_concurrency") == 4
    assert sample(samples, "tasker_worker_stalled") == 0
    assert (
        sample(
            samples,
            "tasker_worker_info",
            worker_id=worker.worker_id,
            namespaces="csv_batch,console",
        )
        == 1
    )
    # the process's own, as prometheus-client's default registry has them
    assert sample(samples, "process_open_fds") > 0
    assert labelled(samples, "python_info", "implementation") == {"CPython"}
    assert labelled(samples, "python_gc_collections_total", "generation") == {"0", "1", "2"}
    # the engine's gauges: this worker is the only one, so it exports them
    assert sample(samples, "tasker_engine_metrics_exporter") == 1
    assert sample(samples, "tasker_engine_metrics_up") == 1
    tasks = "tasker_namespace_tasks"
    assert sample(samples, tasks, namespace="console", state="error") == 1
    assert sample(samples, tasks, namespace="csv_batch", state="pending") == 0
    finished = "tasker_namespace_tasks_finished_5m"
    assert sample(samples, finished, namespace="csv_batch", state="complete") == 1
    for ns in ("csv_batch", "console"):
        assert sample(samples, "tasker_namespace_ready_steps", namespace=ns) == 0
        assert sample(samples, "tasker_namespace_oldest_ready_age_seconds", namespace=ns) == 0
    assert "q_csv_batch" in labelled(samples, "tasker_table_dead_tuples", "table")
    assert sample(samples, "tasker_oldest_xmin_age_xids", holder="prepared_xact") == 0
    await assert_invariants(conn)


async def test_health_probes_answer_on_the_metrics_port(
    worker: Worker, conn: db.Connection
) -> None:
    port = worker.metrics_port
    assert port is not None
    status, body = await http_get(port, "/healthz")
    assert status == 200
    assert json.loads(body) == {
        "status": "ok",
        "worker_id": worker.worker_id,
        "sessions": {"claim": True, "flush": True, "listen": True},
    }
    status, body = await http_get(port, "/readyz")
    assert status == 200
    ready = json.loads(body)
    assert (ready["status"], ready["reasons"], ready["free_slots"]) == ("ok", [], 4)
    assert (await http_get(port, "/nothing"))[0] == 404


async def test_readyz_fails_once_the_schema_is_outdated(dsn: str, conn: db.Connection) -> None:
    async with Worker(
        ["csv_batch"],
        registry_of(csv_batch),
        dsn=dsn,
        templates=load_templates(CSV_BATCH),
        metrics_port=0,
        metrics_host="127.0.0.1",
        **FAST,
    ) as worker:
        port = worker.metrics_port
        assert port is not None
        # a newer migration is missing now: what a worker meets after a downgrade, or before
        # an upgrade's migrate
        await conn.execute(
            "DELETE FROM tasker.schema_migrations "
            "WHERE version = (SELECT max(version) FROM tasker.schema_migrations)"
        )
        status, body = await http_get(port, "/readyz")
        assert status == 503
        [reason] = json.loads(body)["reasons"]
        assert reason.startswith("schema: the database schema is at version")
        assert "tasker-pg migrate" in reason
        # the process and its sessions are fine
        assert (await http_get(port, "/healthz"))[0] == 200
        # no engine gauges without --export-engine-metrics
        samples = await scrape(port)
        assert not [k for k in samples if k[0].startswith("tasker_namespace_")]
        assert ("tasker_engine_metrics_exporter", frozenset()) not in samples


async def test_one_worker_of_many_exports_the_engine_metrics(dsn: str, conn: db.Connection) -> None:
    def new_worker() -> Worker:
        return Worker(
            ["csv_batch"],
            registry_of(csv_batch),
            dsn=dsn,
            templates=load_templates(CSV_BATCH),
            metrics_port=0,
            metrics_host="127.0.0.1",
            export_engine_metrics=True,
            **FAST,
        )

    async def exporting(worker: Worker) -> float:
        assert worker.metrics_port is not None
        return sample(await scrape(worker.metrics_port), "tasker_engine_metrics_exporter")

    first, second = new_worker(), new_worker()
    async with first:
        async with second:
            # the first one scraped takes the lock; the other exports no engine gauges
            assert await exporting(first) == 1
            assert await exporting(second) == 0
            assert second.metrics_port is not None
            samples = await scrape(second.metrics_port)
            assert not [k for k in samples if k[0].startswith("tasker_namespace_")]
            # and keeps trying at each scrape, in vain while the first runs
            assert await exporting(second) == 0
        async with new_worker() as third:
            assert await exporting(third) == 0
    # the first one stopped: its session, and so its lock, are gone
    async with new_worker() as fourth:
        assert await exporting(fourth) == 1
    await assert_invariants(conn)


def test_metrics_port_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # what an installation without the extra sees (an import of the module fails)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError) as info:
        Worker(["csv_batch"], registry_of(csv_batch), metrics_port=0)
    assert "pip install 'tasker-pg[metrics]'" in str(info.value)
    # without a port, nothing needs it
    assert Worker(["csv_batch"], registry_of(csv_batch)).metrics_port is None


async def test_lease_extensions_and_reconnects_are_counted(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    async with Worker(
        ["console"],
        registry_of(console_handlers),
        dsn=dsn,
        templates=templates("console"),
        lease_seconds=1.5,  # a heartbeat every 0.5 s
        metrics_port=0,
        metrics_host="127.0.0.1",
        **FAST,
    ) as worker:
        port = worker.metrics_port
        assert port is not None
        gate = tmp_path / "gate"
        task = await conn.create_task(
            "console", "console", {"gate": str(gate), "marker_dir": str(tmp_path)}
        )

        async def extended_twice() -> bool:
            return sample(await scrape(port), "tasker_lease_extensions_total") >= 2

        await poll(extended_twice, what="two lease extensions")
        samples = await scrape(port)
        assert sample(samples, "tasker_worker_running_steps") == 1
        assert sample(samples, "tasker_worker_in_flight_steps") == 1
        assert sample(samples, "tasker_worker_free_slots") == worker.config.concurrency - 1

        # the listener's backend goes away: the worker reconnects it
        terminated = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            worker.config.application_name("listen"),
        )
        assert terminated == 1

        async def reconnected() -> bool:
            samples = await scrape(port)
            return ("tasker_reconnects_total", frozenset({("session", "listen")})) in samples

        await poll(reconnected, what="the listener reconnected")
        samples = await scrape(port)
        assert sample(samples, "tasker_reconnects_total", session="listen") == 1
        assert worker.stats.reconnects == 1
        gate.write_text("open")
        assert (await wait_final(conn, [task]))[task] == "complete"
    await assert_invariants(conn)
