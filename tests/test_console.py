"""The web console in real headless Chromium (driven over WebDriver by chromedriver).

* A run started from the page streams its text into the page, and keeps streaming after
  the API server goes away and comes back (the page resumes from its last event id); the
  page's text is the model's output, and a screenshot shows it rendered.
* An approval clicked in the page reaches the workflow; the cancel and kill buttons work.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api import ApiServer
from budget_actor import Ledger
from bus import Bus
from gateway_actor._script import _long_text
from persistence import SignalReceived, StepScheduled
from tests import webdriver
from tests.api_helpers import Api, api_stack, eventually, long_task

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not webdriver.available(), reason="chromium and chromedriver are not "
                       "installed (tests/setup_system.py installs them)"),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[webdriver.Browser]:
    b = await webdriver.Browser().start()
    try:
        yield b
    finally:
        await b.close()


async def use_key(browser: webdriver.Browser, url: str, key: str) -> None:
    await browser.get(url)
    await browser.type("#key", key)
    await browser.click("#key-save")
    await browser.wait_for("return document.body.dataset.tenant === 'acme'")


async def restart(api: Api, tmp_path: Path) -> None:
    """Stop the API server and start a new one on the same port and database."""
    old = api.server
    port = old.port
    await old.stop()
    config = dataclasses.replace(old.config, port=port)
    new = ApiServer(old.bus, config)
    async with asyncio.timeout(20):
        while True:  # the port may take a moment to be free again
            try:
                await new.start()
                break
            except OSError:
                new = ApiServer(old.bus, config)
                await asyncio.sleep(0.1)
    api.server = new


async def test_a_run_started_in_the_page_streams_and_survives_a_server_restart(
        browser: webdriver.Browser, bus: Bus, tmp_path: Path) -> None:
    words = 1500
    task = long_task(words, "console")
    async with api_stack(bus, tmp_path, token_delay=0.004) as api:
        await use_key(browser, api.server.url + "/", api.acme.key or "")
        await browser.type("#task", task)
        await browser.click("#start")
        await browser.wait_for("return location.pathname.startsWith('/runs/')")
        run_id = (await browser.url()).rsplit("/", 1)[-1]
        # Mid-stream, the server goes away and comes back; the page resumes.
        await browser.wait_for("return document.getElementById('stream-text')"
                               ".textContent.length > 200")
        assert await browser.script("return document.body.dataset.status") != "completed"
        await restart(api, tmp_path)
        summary = await api.nerve.wait(run_id, timeout=60)
        answer = summary.result["answer"]
        assert answer == _long_text(task, words)
        await browser.wait_for("return document.body.dataset.status === 'completed'"
                               " && document.body.dataset.conn === 'ended'", timeout=60)
        shown = await browser.script(
            "return document.getElementById('stream-text').textContent")
        assert shown == answer
        assert int(await browser.script("return document.body.dataset.reconnects || '0'")) >= 1
        # The history timeline is on the page too.
        await browser.wait_for("return document.querySelectorAll("
                               "'#timeline li[data-type=run_completed]').length === 1")

        # The screenshot shows the text: light glyphs on the output panel's dark ground.
        png = await browser.screenshot("#stream-text")
        (tmp_path / "stream.png").write_bytes(png)
        width, height, rows = await asyncio.to_thread(webdriver.png_pixels, png)
        assert width > 600 and height > 100
        light = sum(1 for row in rows for i in range(0, len(row), 3) if row[i] > 150)
        dark = sum(1 for row in rows for i in range(0, len(row), 3) if row[i] < 40)
        assert light > 0.01 * width * height  # glyphs
        assert dark > 0.5 * width * height  # the panel
        full = await browser.screenshot()
        (tmp_path / "page.png").write_bytes(full)
        assert len(full) > 20_000


async def test_an_approval_clicked_in_the_page_reaches_the_workflow(
        browser: webdriver.Browser, bus: Bus, tmp_path: Path) -> None:
    async with api_stack(bus, tmp_path) as api:
        out = await api.acme.request("POST", "/v1/runs", {
            "task": "compute 12 * 12", "tools": ["run"],
            "input": {"requires_approval": ["run"]}})
        run_id = out["run_id"]
        # The key handed over in the URL fragment (and wiped from the URL).
        await browser.get(f"{api.server.url}/runs/{run_id}#key={api.acme.key}")
        await browser.wait_for("return document.querySelector("
                               "'#approvals li[data-status=pending] button.approve')")
        assert "#key" not in await browser.url()
        await browser.type("#approvals li[data-status=pending] input.reason", "looks fine")
        await browser.click("#approvals li[data-status=pending] button.approve")

        async def delivered() -> SignalReceived | None:
            for ev in await api.nerve.history(run_id):
                if isinstance(ev, SignalReceived) and ev.delivered_to is not None:
                    return ev
            return None

        signal = await eventually(delivered)
        assert signal.payload == {"approved": True, "reason": "looks fine"}
        assert signal.sender.startswith("tenant:acme:")
        # The workflow went on: the approved tool call went to the sandbox.
        await eventually(lambda: _sandbox_step(api, run_id))
        await browser.wait_for("return document.querySelector("
                               "'#approvals li[data-status=approved]')")

        # Cancel from the page (it asks first).
        await browser.click("#cancel")
        await browser.accept_alert()
        assert (await api.nerve.wait(run_id, timeout=30)).status == "cancelled"
        await browser.wait_for("return document.body.dataset.status === 'cancelled'")

        # The runs list shows it, live; the kill button stops the tenant.
        await browser.get(api.server.url + "/")
        await browser.wait_for(f"return document.querySelector('tr[data-run=\"{run_id}\"] "
                               ".status-cancelled')")
        await browser.wait_for("return document.getElementById('spend').dataset.state")
        await browser.click("#kill")
        await browser.accept_alert()
        await browser.wait_for("return document.getElementById('spend').dataset.state "
                               "=== 'killed'")
        (tmp_path / "index.png").write_bytes(await browser.screenshot())
        ledger = Ledger(bus)
        try:
            assert await ledger.is_killed("acme")
        finally:
            await ledger.close()


async def _sandbox_step(api: Api, run_id: str) -> bool:
    return any(isinstance(ev, StepScheduled) and ev.kind == "sandbox"
               for ev in await api.nerve.history(run_id))
