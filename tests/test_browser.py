"""A real browser against the real daemon: headless Chromium (Debian's, driven by Playwright)
loads a page from an allowed origin that bootstraps like a trading frontend, and the same page
from a foreign origin, which must be refused at every step.

The page (tests/browser/index.html) is served by a local static server; its origin is put in
the daemon's `server.cors_origins`. The foreign origin is a second static server on another
port. Every wait is for a condition (in the page or here), never a fixed sleep.

Without Chromium the test set-up installs it (`apt-get install -y chromium`, as root); if that
is impossible the tests are skipped, unless CTSD_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright

from tests.bus import bus
from tests.daemon import Daemon, http_server, wait_until_async
from tests.datadir import write_settings

pytestmark = pytest.mark.anyio

CHROMIUM = "/usr/bin/chromium"
PAGE_DIR = Path(__file__).parent / "browser"
# As for a root sandbox: no setuid sandbox, no GPU, nothing that reaches the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _install_chromium() -> str | None:
    """Install Debian's chromium when missing and possible; why not, else None."""
    if os.path.exists(CHROMIUM):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing (install the `chromium` package)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]  # another test worker may hold the lock
    for cmd in ([*apt, "update", "-qq"], [*apt, "install", "-y", "-qq", "chromium"]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {run.stderr.strip()[-500:]}"
    return None if os.path.exists(CHROMIUM) else f"{CHROMIUM} still missing after apt-get"


@pytest.fixture(scope="session")
def chromium() -> str:
    why_not = _install_chromium()
    if why_not is not None:
        if os.environ.get("CTSD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser tests must run here: {why_not}")
        pytest.skip(why_not)
    return CHROMIUM


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def static_site() -> contextlib.AbstractContextManager[str]:
    """Serve tests/browser/ on a free local port; yields its origin."""
    return http_server(functools.partial(_QuietHandler, directory=str(PAGE_DIR)))


@pytest.fixture
def origins() -> Iterator[tuple[str, str]]:
    """(allowed origin, foreign origin): two static servers of the same page."""
    with static_site() as allowed, static_site() as foreign:
        yield allowed, foreign


@pytest.fixture
def browser_daemon(data_dir: Path, origins: tuple[str, str]) -> Iterator[Daemon]:
    allowed, _ = origins
    write_settings(data_dir, {"server": {"cors_origins": [allowed]}})
    d = Daemon(data_dir).start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
async def browser(chromium: str, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user data dir
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            await context.close()


class Recorder:
    """What the browser did on the network (preflights included, which pages never see) and
    what it printed to its console, via the DevTools protocol."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}
        self.console: list[str] = []

    async def attach(self, context: BrowserContext, page: Page) -> None:
        cdp = await context.new_cdp_session(page)
        cdp.on("Network.requestWillBeSent", self._request)
        cdp.on("Network.responseReceived", self._response)
        await cdp.send("Network.enable")
        page.on("console", lambda msg: self.console.append(msg.text))

    def _request(self, ev: dict[str, Any]) -> None:
        req = ev["request"]
        self.requests[ev["requestId"]] = {
            "method": req["method"],
            "url": req["url"],
            "type": ev.get("type"),
            "status": None,
        }

    def _response(self, ev: dict[str, Any]) -> None:
        entry = self.requests.setdefault(ev["requestId"], {"type": ev.get("type")})
        entry["status"] = ev["response"]["status"]

    def preflights(self, path: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.requests.values()
            if r.get("method") == "OPTIONS" and r.get("url", "").endswith(path)
        ]


async def _open(context: BrowserContext, origin: str) -> tuple[Page, Recorder]:
    page = await context.new_page()
    recorder = Recorder()
    await recorder.attach(context, page)
    await page.goto(f"{origin}/index.html")
    return page, recorder


async def _bootstrap(page: Page, d: Daemon, ui_config: dict[str, Any]) -> dict[str, Any]:
    """Run the page's bootstrap with the daemon's URL and token (injected, as a frontend gets
    them from its own config); every step inside has its own timeout, this is the backstop."""
    cfg = {"api": d.url, "token": d.token, "uiConfig": ui_config}
    with anyio.fail_after(60):
        return await page.evaluate("cfg => bootstrap(cfg)", cfg)


async def test_allowed_origin_bootstraps_and_sees_its_own_change(
    browser: BrowserContext, browser_daemon: Daemon, origins: tuple[str, str]
) -> None:
    d = browser_daemon
    allowed, _ = origins
    ui_config = {"theme": "dark", "layout": {"panels": ["chart", "orders"]}}
    page, recorder = await _open(browser, allowed)
    out = await _bootstrap(page, d, ui_config)
    assert "error" not in out, out

    assert out["health"]["status"] == 200 and out["health"]["body"]["status"] == "ok"
    boot = out["bootstrap"]
    assert boot["status"] == 200, boot
    assert boot["body"]["bus_url"] == f"ws://127.0.0.1:{d.port}/ws"
    assert boot["revision"] is not None, "X-Revision is exposed to the page"
    assert d.token not in json.dumps(boot["body"])

    assert out["busFirst"] == {"type": "auth_required", "version": 1}
    assert out["busAuth"]["type"] == "auth_ok"
    assert out["subscribe"]["success"] is True
    since = out["subscribe"]["result"]["revision"]

    assert out["save"]["status"] == 200, out["save"]
    assert out["save"]["body"] == ui_config
    # The JSON POST with a token was preflighted, and the preflight was answered 204.
    assert [p["status"] for p in recorder.preflights("/api/data/ui-config")] == [204]
    # The simple POST without a token was refused (the page cannot read it: opaque, status 0).
    assert out["simpleSave"] == {"ok": True, "status": 0, "revision": None, "body": ""}
    assert any("status of 401" in line for line in recorder.console), recorder.console

    event = out["event"]
    assert event["action"] == "document_update" and event["id"] > since
    assert event["connection_id"] is None
    assert event["data"]["source"] == "http" and event["data"]["file"] == "ui-config.json"
    on_disk = d.data_dir / "ui-config.json"
    await wait_until_async(lambda: json.loads(on_disk.read_text()) == ui_config, 5, 0.02)


async def test_foreign_origin_is_refused_at_every_step(
    browser: BrowserContext, browser_daemon: Daemon, origins: tuple[str, str]
) -> None:
    d = browser_daemon
    _, foreign = origins
    on_disk = d.data_dir / "ui-config.json"
    before = on_disk.read_bytes()
    async with bus(d) as watcher:
        revision = (await watcher.ok("subscribe"))["revision"]
        page, recorder = await _open(browser, foreign)
        # even with the token, a page from another origin gets nowhere
        out = await _bootstrap(page, d, {"theme": "evil"})
        assert "error" not in out, out

        # fetches fail as CORS errors: the page reads nothing of any answer
        for step in ("health", "bootstrap", "save"):
            assert out[step]["ok"] is False and "TypeError" in out[step]["error"], (step, out)
        # the simple POST reached the daemon and changed nothing (checked below)
        assert out["simpleSave"]["ok"] is True and out["simpleSave"]["status"] == 0
        # the bus upgrade was refused before any frame
        assert "busFirst" not in out and out["busState"]["opened"] is False, out
        assert out["busState"]["closed"]["code"] == 1006

        # what the daemon answered: 403 to the preflights and the upgrade
        assert [p["status"] for p in recorder.preflights("/api/trading/connection")] == [403]
        assert [p["status"] for p in recorder.preflights("/api/data/ui-config")] == [403]
        console = "\n".join(recorder.console)
        assert "Unexpected response code: 403" in console, console
        assert "blocked by CORS policy" in console, console

        # the daemon's side: it refused each request and the upgrade for the origin
        def refused() -> list[dict[str, Any]]:
            return [e for e in d.log_events() if e.get("event") in ("http_refused", "bus_refused")]

        await wait_until_async(lambda: len(refused()) >= 4, 10, 0.02, "the refusals logged")
        paths = collections.Counter(e.get("path") for e in refused())
        assert paths == {
            "/health": 1,
            "/api/trading/connection": 1,  # its preflight
            # the preflight of the JSON POST, and the simple POST: one line a minute
            "/api/data/ui-config": 1,
            None: 1,  # the bus upgrade
        }, refused()
        assert all("origin" in e["reason"] for e in refused()), refused()

        # nothing changed: the next event is the watcher's own marker change, right after
        # the revision it subscribed at
        async with bus(d) as writer:
            await writer.ok("documents.set", name="watchlists", content={"marker": True})
        events = await watcher.events_until(revision + 1)
        assert [(e["id"], e["data"].get("name")) for e in events] == [(revision + 1, "watchlists")]
    assert on_disk.read_bytes() == before
