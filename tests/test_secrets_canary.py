"""Secrets by pattern: canaries under many secret-like names, set through the bus and by hand,
at the top of a document, nested, inside `connection_settings`, in a URL's password and query,
and in Project X's section,
never come out of the daemon: not in a log line, the sync log, a bus reply or event, an
export, an HTTP response, or `ctsd watch --json`. A placeholder sent back keeps them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bus import bus
from tests.cli_helpers import Tail, ctsd, env_for
from tests.daemon import Daemon, wait_until

pytestmark = pytest.mark.anyio

PREFIX = "CANARY-PATTERN"  # every canary starts so; the tests grep outputs for it


def canary(n: int) -> str:
    return f"{PREFIX}-{n:02d}-xyzw"  # the last four ("xyzw") are all an api_key may show


PX_NAMES = ["apiToken", "secretKey", "accessToken", "privateKey", "username", "apiKey"]


def document_with_secrets(base: int) -> dict[str, Any]:
    return {
        "apiToken": canary(base),
        "theme": "dark",
        "nested": {"deep": [{"client_secret": canary(base + 1), "label": "x"}]},
        "db": {"Password": canary(base + 2), "passphrase": canary(base + 3)},
        "feed": f"wss://desk:{canary(base + 4)}@feed.example/v1",  # a URL's password
        "hook": f"https://hooks.example/x?channel=ops&api_key={canary(base + 9)}",  # its query
    }


def connection_settings(n: int) -> str:
    auth = {"accessToken": canary(n)}
    return json.dumps({"base_url": f"http://op:{canary(n + 50)}@127.0.0.1:9/", "auth": auth})


def assert_clean(where: str, text: str) -> None:
    assert PREFIX not in text, f"a canary leaked into {where}"


async def test_canaries_never_leave(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    # By hand before start, and later while running.
    px = {"projectX": {n: canary(10 + i) for i, n in enumerate(PX_NAMES)}}
    (data_dir / "connection.json").write_text(json.dumps(px, indent=2) + "\n")
    d = Daemon(data_dir, args=["--log-level", "debug"])
    tail: Tail | None = None
    try:
        d.start()
        tail = Tail(d, "--json", "--since", "0")
        async with bus(d) as b:
            await b.ok("subscribe")
            # Through the bus: documents, a connection with secrets in connection_settings.
            await b.ok("documents.set", name="ui-config", content=document_with_secrets(20))
            conn = {
                "id": "k1",
                "name": "k",
                "exchange": "fakex",
                "is_enabled": False,
                "api_key": canary(30),
                "api_secret": canary(31),
                "connection_settings": connection_settings(32),
            }
            created = await b.ok("connections.create", connection=conn)
            assert json.loads(created["connection_settings"])["auth"]["accessToken"] == "********"
            await b.ok(
                "connections.update",
                connection_id="k1",
                changes={"connection_settings": connection_settings(33), "name": "k2"},
            )
            # Settings that hold a URL with a password: one refused (its error quotes the
            # value), one taken (the bootstrap route shows the CORS origins).
            settings = await b.ok("documents.get", name="settings")
            server = settings.get("server", {})
            bad = {**settings, "server": {**server, "host": f"https://u:{canary(60)}@h"}}
            assert (await b.err("documents.set", name="settings", content=bad))["code"] == "invalid"
            origins = [f"https://u:{canary(61)}@desk.example"]
            good = {**settings, "server": {**server, "cors_origins": origins}}
            await b.ok("documents.set", name="settings", content=good)
            # By hand while running: a document and connections.json.
            (data_dir / "user-settings.json").write_text(
                json.dumps(document_with_secrets(40)) + "\n"
            )
            rows = json.loads((data_dir / "connections.json").read_text())
            rows[0]["connection_settings"] = connection_settings(44)
            rows.append({"id": "k3", "name": "hand", "exchange": "fakex", "is_enabled": False,
                         "connection_settings": connection_settings(45)})  # fmt: skip
            (data_dir / "connections.json").write_text(json.dumps(rows, indent=2) + "\n")

            def taken_in() -> bool:
                return "k3" in {c["id"] for c in d.http("/api/settings/connections")[1]}

            wait_until(taken_in, what="the hand edit of connections.json")

            def user_settings_in() -> bool:
                return d.http("/api/data/user-settings")[1].get("theme") == "dark"

            wait_until(user_settings_in, what="the hand edit of user-settings.json")

            # Everything the daemon shows, over the bus...
            replies: list[Any] = []
            for cmd, args in [
                ("snapshot", {}),
                ("connections.list", {}),
                ("connections.get", {"connection_id": "k1"}),
                ("sync_log.get", {"limit": 1000}),
                ("data.export", {}),
                ("status", {}),
                *[
                    ("documents.get", {"name": n})
                    for n in ("connection", "ui-config", "user-settings")
                ],
            ]:
                replies.append(await b.ok(cmd, **args))
            # ... placeholders sent back keep every secret ...
            shown = await b.ok("documents.get", name="connection")
            assert (
                shown["projectX"]["apiKey"] == "********"
                and shown["projectX"]["username"] == "********"
            )
            await b.ok("documents.set", name="connection", content=shown)
            shown_ui = await b.ok("documents.get", name="ui-config")
            shown_ui["theme"] = "light"
            await b.ok("documents.set", name="ui-config", content=shown_ui)
            k1 = await b.ok("connections.get", connection_id="k1")
            changes = {k: v for k, v in k1.items() if k not in ("id", "created_at", "updated_at")}
            await b.ok("connections.update", connection_id="k1", changes=changes)
            export = await b.ok("data.export")
            await b.ok("data.import", data=export, mode="replace")
            replies.append(export)
            frames = list(b.raw)
        # ... over HTTP ...
        http: list[str] = []
        for path in [
            "/api/settings/connections",
            "/api/settings/connections/k1",
            "/api/connections/state",
            "/api/sync-log?limit=1000",
            "/api/data/export",
            "/api/data/connection",
            "/api/data/ui-config",
            "/api/data/user-settings",
            "/api/trading/connection",
            "/api/trading/server-status",
            "/health",
        ]:
            code, body = d.http(path)
            assert code == 200, (path, body)
            http.append(json.dumps(body))
        # ... and through the CLI.
        cli = [ctsd(*args, env=env_for(d)) for args in (["export"], ["conn", "show", "k1"])]
        assert all(r.returncode == 0 for r in cli), [r.stderr for r in cli]
        # The secrets are still stored: the round trips kept them.
        on_disk = (data_dir / "connection.json").read_text() + (
            data_dir / "ui-config.json"
        ).read_text()
        for n in (10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24):
            assert canary(n) in on_disk, n
        stored = json.loads((data_dir / "connections.json").read_text())
        k1_disk = next(c for c in stored if c["id"] == "k1")
        assert k1_disk["api_secret"] == canary(31)
        assert canary(44) in k1_disk["connection_settings"]
        assert canary(94) in k1_disk["connection_settings"]  # the URL's password kept
        logged = json.loads((data_dir / "connection-sync-log.json").read_text())
        assert len(logged) >= 8
        seen = [json.loads(line)["id"] for line in tail.take(len(logged))]
        assert seen == [e["id"] for e in logged]  # the watcher saw every event
        assert d.stop() == 0
    finally:
        if tail is not None:
            tail.stop()
        d.close()
    outputs: dict[str, str] = {
        "bus frames": "\n".join(frames),
        "bus replies": json.dumps(replies),
        "http": "\n".join(http),
        "cli": "\n".join(r.stdout + r.stderr for r in cli),
        "watch --json": "\n".join(tail.got) + (tail.proc.stdout.read() if tail.proc.stdout else ""),
        "daemon stdout": d.stdout(),
        "daemon stderr": d.stderr(),
        "sync log": (data_dir / "connection-sync-log.json").read_text(),
    }
    for p in sorted((data_dir / "logs").iterdir()):
        outputs[f"logs/{p.name}"] = p.read_text(errors="replace")
    assert "hand_edit_taken_in" in outputs["daemon stdout"]
    for where, text in outputs.items():
        assert_clean(where, text)
