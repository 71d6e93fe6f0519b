"""The dashboard's routes over HTTP (Starlette's TestClient) against a real database: what each
page shows, filters and keyset paging, escaping, and operator actions on and off."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from markupsafe import escape
from starlette.testclient import TestClient

from tasker_pg import cli, db
from tasker_pg.dashboard.app import create_app
from tests.dashboard.conftest import HOSTILE_CONTEXT, WORKER_ID, Shop, create_order
from tests.dashboard.handlers import HOSTILE


@contextmanager
def client(dsn: str, **options: object) -> Iterator[TestClient]:
    with TestClient(create_app(dsn=dsn, **options), follow_redirects=False) as c:  # type: ignore[arg-type]
        yield c


def cell(page: str, namespace: str, column: str) -> str:
    row = re.search(rf'<tr data-namespace="{namespace}">(.*?)</tr>', page, re.S)
    assert row is not None, page
    found = re.search(rf'data-col="{column}">(?:<a [^>]*>)?([^<]*)<', row.group(1))
    assert found is not None, row.group(1)
    return found.group(1)


def task_rows(page: str) -> list[str]:
    return re.findall(r'<tr data-task="([0-9a-f-]+)">', page)


async def step_state(conn: db.Connection, task: uuid.UUID, name: str) -> str:
    state: str = await conn.fetchval(
        "SELECT state FROM tasker.steps WHERE task_uuid = $1 AND name = $2", task, name
    )
    return state


async def test_namespaces_page_counts(shop: Shop) -> None:
    with client(shop.dsn) as c:
        for path in ("/namespaces", "/fragments/namespaces"):
            page = c.get(path)
            assert page.status_code == 200
            assert cell(page.text, "shop", "ready") == "0"
            assert cell(page.text, "shop", "in_flight") == "0"
            assert cell(page.text, "shop", "live_tasks") == "1"  # the failed one
            assert cell(page.text, "shop", "error_tasks") == "1"
            assert cell(page.text, "shop", "finished_5m") == "2"
        home = c.get("/")
        assert (home.status_code, home.headers["location"]) == (307, "/namespaces")
        assert 'hx-trigger="every 2s"' in c.get("/namespaces").text


async def test_namespaces_count_ready_steps(shop: Shop, conn: db.Connection) -> None:
    await create_order(conn)  # no worker runs now: its first step waits, visible
    with client(shop.dsn) as c:
        page = c.get("/namespaces").text
    assert cell(page, "shop", "ready") == "1"
    assert cell(page, "shop", "live_tasks") == "2"


async def test_task_list_filters(shop: Shop) -> None:
    with client(shop.dsn) as c:
        everything = c.get("/tasks").text
        assert task_rows(everything) == [str(shop.failed), str(shop.ok[1]), str(shop.ok[0])]
        assert task_rows(c.get("/tasks?state=error").text) == [str(shop.failed)]
        assert task_rows(c.get("/tasks?state=complete&namespace=shop").text) == [
            str(shop.ok[1]),
            str(shop.ok[0]),
        ]
        assert task_rows(c.get("/tasks?namespace=elsewhere").text) == []
        assert task_rows(c.get("/tasks?window=5m").text) == task_rows(everything)
        assert task_rows(c.get("/fragments/tasks?state=error").text) == [str(shop.failed)]
        bad = c.get("/tasks?state=sideways")
        assert bad.status_code == 400
        assert "unknown state" in bad.text


async def test_task_list_keyset_pages(shop: Shop) -> None:
    with client(shop.dsn, page_size=2) as c:
        first = c.get("/tasks").text
        assert task_rows(first) == [str(shop.failed), str(shop.ok[1])]
        next_url = html.unescape(re.findall(r'href="([^"]+)" id="next-page"', first)[0])
        second = c.get(next_url).text
        assert task_rows(second) == [str(shop.ok[0])]
        assert 'id="next-page"' not in second


async def test_task_list_scan_budget(shop: Shop) -> None:
    # One index entry per page: the newest task is the failed one, so the first page of
    # `complete` tasks is empty and says where the next one starts.
    with client(shop.dsn, scan_budget=1) as c:
        first = c.get("/tasks?state=complete").text
        assert task_rows(first) == []
        assert "Looked at 1 tasks" in first
        next_url = html.unescape(re.findall(r'href="([^"]+)" id="next-page"', first)[0])
        assert task_rows(c.get(next_url).text) == [str(shop.ok[1])]


async def test_task_page_shows_the_failure_escaped(shop: Shop) -> None:
    with client(shop.dsn) as c:
        page = c.get(f"/tasks/{shop.failed}")
        fragment = c.get(f"/fragments/tasks/{shop.failed}")
    assert page.status_code == 200 and fragment.status_code == 200
    text = page.text
    # the error, as the handler raised it, escaped: no tag of it reaches the page
    assert str(escape(HOSTILE)) in text
    assert "<script>window.__pwned" not in text
    assert "<b>now</b>" not in text
    assert str(escape(json.dumps(HOSTILE_CONTEXT))) in text  # (the context, as JSON)
    assert "<img src=x" not in text
    # the DAG: one SVG group per step, coloured by state
    nodes = re.findall(r'<g class="node ([a-z_]+)[^"]*" data-step="([a-z_]+)"', text)
    assert sorted(nodes) == [("complete", "prepare"), ("error", "charge"), ("pending", "notify")]
    assert text.count("<path d=") == 2
    # steps, readiness and history
    assert "CARD_DECLINED" in text
    assert "task is in error" in text
    assert re.search(r"<td>charge</td>\s*<td>failed</td>\s*<td>in_progress → error</td>", text)
    assert str(escape(HOSTILE)) in fragment.text


async def test_task_page_unknown(shop: Shop) -> None:
    with client(shop.dsn) as c:
        missing = c.get(f"/tasks/{uuid.uuid4()}")
        malformed = c.get("/tasks/not-a-uuid")
    assert missing.status_code == 404 and "does not exist" in missing.text
    assert malformed.status_code == 404 and "not a valid task uuid" in malformed.text


async def test_workers_page(shop: Shop) -> None:
    with client(shop.dsn) as c:
        page = c.get("/workers").text
        fragment = c.get("/fragments/workers").text
    for text in (page, fragment):
        row = re.search(rf'<tr data-worker="{WORKER_ID}">(.*?)</tr>', text, re.S)
        assert row is not None
        assert "<td>shop</td>" in row.group(1)


async def test_static_htmx(shop: Shop) -> None:
    with client(shop.dsn) as c:
        js = c.get("/static/htmx.min.js")
    assert js.status_code == 200
    assert js.text.startswith("/* htmx 2.0.11")


async def test_read_only_by_default(shop: Shop, conn: db.Connection) -> None:
    charge = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 'charge'", shop.failed
    )
    with client(shop.dsn) as c:
        page = c.get(f"/tasks/{shop.failed}").text
        assert (
            "/actions/" not in page
            and "<form" not in page.split("</header>")[1].split('class="filters"')[0]
        )
        for path in (
            f"/actions/steps/{charge}/retry",
            f"/actions/steps/{charge}/resolve",
            f"/actions/tasks/{shop.failed}/cancel",
        ):
            refused = c.post(path, data={"csrf": "x", "result": "{}"})
            assert refused.status_code == 403, path
            assert "--allow-actions" in refused.text
    assert await step_state(conn, shop.failed, "charge") == "error"


async def test_actions_with_allow_actions(shop: Shop, conn: db.Connection) -> None:
    charge = await conn.fetchval(
        "SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1 AND name = 'charge'", shop.failed
    )
    with client(shop.dsn, allow_actions=True) as c:
        page = c.get(f"/tasks/{shop.failed}").text
        token = re.findall(r'name="csrf" value="([^"]+)"', page)[0]
        assert f'action="/actions/steps/{charge}/retry"' in page
        # without the token, or from another origin: refused, nothing changes
        assert c.post(f"/actions/steps/{charge}/retry", data={}).status_code == 403
        foreign = c.post(
            f"/actions/steps/{charge}/retry",
            data={"csrf": token},
            headers={"origin": "http://evil.example"},
        )
        assert foreign.status_code == 403
        assert await step_state(conn, shop.failed, "charge") == "error"
        bad_json = c.post(
            f"/actions/steps/{charge}/resolve", data={"csrf": token, "result": "{nope"}
        )
        assert bad_json.status_code == 400
        # retry: tasker.retry_step, then back to the task's page
        done = c.post(
            f"/actions/steps/{charge}/retry",
            data={"csrf": token},
            headers={"origin": "http://testserver"},
        )
        assert (done.status_code, done.headers["location"]) == (303, f"/tasks/{shop.failed}")
        assert await step_state(conn, shop.failed, "charge") == "enqueued"
        # resolve by hand: tasker.resolve_step with the given result
        done = c.post(
            f"/actions/steps/{charge}/resolve", data={"csrf": token, "result": '{"by": "hand"}'}
        )
        assert done.status_code == 303
        assert await step_state(conn, shop.failed, "charge") == "resolved_manually"
        assert await conn.fetchval(
            "SELECT results FROM tasker.steps WHERE task_uuid = $1 AND name = 'charge'",
            shop.failed,
        ) == {"by": "hand"}
        # cancel a task: tasker.cancel_task
        waiting = await create_order(conn)
        done = c.post(f"/actions/tasks/{waiting}/cancel", data={"csrf": token})
        assert (done.status_code, done.headers["location"]) == (303, f"/tasks/{waiting}")
        assert (
            await conn.fetchval("SELECT state FROM tasker.tasks WHERE task_uuid = $1", waiting)
            == "cancelled"
        )
        # a refused action says why (the task is no longer running)
        again = c.post(f"/actions/tasks/{waiting}/cancel", data={"csrf": token})
        assert again.status_code in (404, 409)


def test_cli_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # as if Starlette were not installed: every starlette module unimportable
    for name in [m for m in sys.modules if m == "starlette" or m.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "starlette", None)
    monkeypatch.delitem(sys.modules, "tasker_pg.dashboard.app", raising=False)
    assert cli.main(["dashboard", "--port", "0"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "pip install 'tasker-pg[dashboard]'" in err
    assert "starlette" in err


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasker_pg.cli", "dashboard", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--port", "--host", "--dsn", "--allow-actions", "127.0.0.1"):
        assert option in out


async def test_in_flight_and_delayed(shop: Shop, conn: db.Connection) -> None:
    running = await create_order(conn)
    claimed = await conn.fetch("SELECT * FROM tasker.claim_steps('shop', 'by-hand', 1, 300)")
    assert [(r["task_uuid"], r["step_name"]) for r in claimed] == [(running, "prepare")]
    await conn.fetchval(
        "SELECT tasker.create_task('shop', 'order', '{}'::jsonb, NULL, $1::jsonb)",
        {"delay_seconds": 600},
    )
    with client(shop.dsn) as c:
        page = c.get("/namespaces").text
    assert cell(page, "shop", "in_flight") == "1"
    assert cell(page, "shop", "delayed") == "1"
    assert cell(page, "shop", "ready") == "0"
    assert cell(page, "shop", "live_tasks") == "3"


async def test_headers_hosts_and_no_password(shop: Shop) -> None:
    password = urlsplit(shop.dsn).password
    assert password
    with client(shop.dsn) as c:
        for path in ("/namespaces", "/tasks", f"/tasks/{shop.failed}", "/workers"):
            response = c.get(path)
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert password not in response.text
    with client(shop.dsn, allowed_hosts=["127.0.0.1"]) as c:
        assert c.get("/namespaces").status_code == 400  # Host: testserver
        assert c.get("http://127.0.0.1/namespaces").status_code == 200
