"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright):
the `tasker-pg dashboard` command serves the database a real worker ran; the test opens each
page and checks what a person sees, watches a live update arrive without a reload, and saves a
screenshot of each page in its output directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tasker_pg import db
from tests.dashboard.conftest import WORKER_ID, Shop, create_order
from tests.dashboard.handlers import HOSTILE

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root Chromium refuses to start with its sandbox
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTED = re.compile(r"dashboard started on (http://\S+/)")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
    ".ci/run installs it)",
)


class Dashboard:
    """`tasker-pg dashboard --port 0` in a subprocess; its output collected."""

    def __init__(self, dsn: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasker_pg.cli", "dashboard", "--dsn", dsn, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                found = STARTED.search(line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(60)
        assert self.url, "".join(self.lines)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def dashboard(shop: Shop) -> Iterator[Dashboard]:
    server = Dashboard(shop.dsn)
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.lines)


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_dashboard_in_chromium(
    shop: Shop, dashboard: Dashboard, browser: object, conn: db.Connection, tmp_path: Path
) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    started = time.monotonic()
    # the command line names the database, never its password
    password = urlsplit(shop.dsn).password
    assert password and password not in "".join(dashboard.lines)
    assert dashboard.url.startswith("http://127.0.0.1:")

    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # (a script or style the page's security policy blocked is logged as a console error)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # namespaces: the counts of the one namespace
    await page.goto(dashboard.url)
    assert page.url == dashboard.url + "namespaces"
    row = page.locator('tr[data-namespace="shop"]')
    await expect(row.locator('[data-col="live_tasks"]')).to_have_text("1")
    await expect(row.locator('[data-col="error_tasks"]')).to_have_text("1")
    await expect(row.locator('[data-col="finished_5m"]')).to_have_text("2")
    await expect(row.locator('[data-col="ready"]')).to_have_text("0")
    await page.screenshot(path=tmp_path / "namespaces.png", full_page=True)

    # live: a value set in the page survives the update a new task brings
    await page.evaluate("window.__marker = 42")
    await create_order(conn)  # no worker runs: it waits, open and ready
    await expect(row.locator('[data-col="live_tasks"]')).to_have_text("2", timeout=20_000)
    await expect(row.locator('[data-col="ready"]')).to_have_text("1")
    assert await page.evaluate("window.__marker") == 42

    # tasks: four rows, newest first; the failed one links to its page
    await page.click("text=Tasks")
    await expect(page.locator("#tasks tbody tr")).to_have_count(4)
    await page.select_option('select[name="state"]', "error")
    await page.click('button[type="submit"]')
    await expect(page.locator("#tasks tbody tr")).to_have_count(1)
    await expect(page.locator("#tasks tbody tr")).to_contain_text("error")
    await page.screenshot(path=tmp_path / "tasks.png", full_page=True)

    # the failed task: its error as text, its DAG as SVG nodes coloured by state
    await page.click(f'a[href="/tasks/{shop.failed}"]')
    await expect(page.locator("#task-state")).to_have_text("error")
    charge = page.locator('#steps tr[data-step="charge"]')
    await expect(charge.locator(".error-text")).to_have_text(
        f"PermanentError [CARD_DECLINED]: {HOSTILE}"
    )
    nodes = page.locator("svg#dag g.node")
    await expect(nodes).to_have_count(3)
    states = {
        await n.get_attribute("data-step"): await n.get_attribute("data-state")
        for n in await nodes.all()
    }
    assert states == {"prepare": "complete", "charge": "error", "notify": "pending"}
    assert await page.locator("svg#dag rect").count() == 3
    assert await page.locator("svg#dag path").count() == 2
    await expect(page.locator("#history")).to_contain_text("in_progress → error")
    # the hostile texts stayed text: nothing of them ran
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    await page.screenshot(path=tmp_path / "task.png", full_page=True)

    # workers: the worker that ran them, its heartbeat
    await page.click("text=Workers")
    worker = page.locator(f'tr[data-worker="{WORKER_ID}"]')
    await expect(worker).to_contain_text("shop")
    await expect(worker).to_contain_text("ago")
    await page.screenshot(path=tmp_path / "workers.png", full_page=True)

    assert errors == []
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".png")) == [
        "namespaces.png",
        "task.png",
        "tasks.png",
        "workers.png",
    ]
    print(f"browser walk took {time.monotonic() - started:.1f} s; screenshots in {tmp_path}")
