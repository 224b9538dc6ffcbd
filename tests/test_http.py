"""Plain HTTP on the bus port (CONTRACT §5) against the real daemon process."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctsd.errors import CtsdError
from tests.daemon import Daemon, wait_until
from tests.test_bus import CANARY, bus, conn_body, write_settings

ROUTES = [
    "/api/trading/connection",
    "/api/trading/server-status",
    "/api/settings/connections",
    "/api/settings/connections/c1",
    "/api/connections/active",
    "/api/connections/state",
    "/api/sync-log",
    "/api/data/settings",
    "/api/data/export",
    "/metrics",
]


async def _seed(d: Daemon) -> None:
    async with bus(d) as b:
        await b.ok("connections.create", connection=conn_body(id="c1", api_secret=CANARY))
        await b.ok("connections.create", connection=conn_body("two", id="c2", exchange="okx"))
        await b.ok("connections.set_active", connection_id="c1", active=True)


def test_health_needs_no_token(daemon: Daemon) -> None:
    code, body = daemon.http("/health", token=None)
    assert code == 200
    assert body["status"] == "ok" and body["revision"] == 0 and "checks" in body
    assert set(body) >= {"status", "version", "revision", "uptime_s", "checks"}


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_needs_the_token(daemon: Daemon, path: str) -> None:
    code, body = daemon.http(path, token=None)
    assert code == 401 and body["error"]["code"] == "unauthorized"
    code, body = daemon.http(path, token="wrong")
    assert code == 401 and body["error"]["code"] == "unauthorized"


@pytest.mark.anyio
async def test_routes_answer(daemon: Daemon) -> None:
    d = daemon
    await _seed(d)
    code, boot = d.http("/api/trading/connection")
    assert code == 200
    assert boot["bus_url"] == f"ws://127.0.0.1:{d.port}/ws"
    assert "connections.update" in boot["capabilities"]["commands"]
    assert boot["server"]["cors_origins"] == ["http://localhost:5173", "http://localhost:5174"]

    code, st = d.http("/api/trading/server-status")
    assert code == 200 and st["counts"]["connections"] == 2 and "projectx" in st
    assert st["bus"]["subscribers"] == 0

    code, conns = d.http("/api/settings/connections")
    assert code == 200 and [c["id"] for c in conns] == ["c1", "c2"]
    assert conns[0]["api_secret"] == "********" and conns[1]["api_secret"] is None
    code, conns = d.http("/api/settings/connections?exchange=okx")
    assert [c["id"] for c in conns] == ["c2"]
    code, one = d.http("/api/settings/connections/c1")
    assert code == 200 and one["id"] == "c1" and one["api_secret"] == "********"

    code, active = d.http("/api/connections/active")
    assert code == 200 and [c["id"] for c in active] == ["c1"]
    code, state = d.http("/api/connections/state")
    assert code == 200 and {s["connection_id"]: s["status"] for s in state} == {
        "c1": "active",
        "c2": "inactive",
    }

    code, log = d.http("/api/sync-log?since=1&limit=1")
    assert code == 200 and [e["id"] for e in log] == [2]
    code, log = d.http("/api/sync-log")
    assert [e["action"] for e in log] == ["create", "create", "set_active"]

    code, doc = d.http("/api/data/connection")
    assert code == 200 and "projectX" in doc
    code, exp = d.http("/api/data/export")
    assert code == 200 and exp["version"] == 1 and exp["revision"] == 3
    assert len(exp["files"]["connections.json"]) == 2

    code, text = d.http("/metrics")
    assert code == 200 and isinstance(text, str)
    assert 'ctsd_connections{status="active"} 1.0' in text
    # our three changes at least (the sweeps and the watcher may commit their own)
    assert float(re.search(r"^ctsd_changes_total (\S+)$", text, re.M)[1]) >= 3
    assert "ctsd_write_seconds_count" in text
    assert "ctsd_bus_clients 0.0" in text
    for name in ("ctsd_bus_events_sent_total", "ctsd_hand_edits_total", "ctsd_invalid_files"):
        assert name in text
    families = {f.name for f in text_string_to_metric_families(text)}  # parses, or raises
    assert {"ctsd_connections", "ctsd_write_seconds", "ctsd_errors", "ctsd_bus_subscribers"} <= (
        families
    )

    for body in (boot, st, conns, one, active, state, log, doc, exp, text):
        assert CANARY not in json.dumps(body)


def test_not_found_and_bad_queries(daemon: Daemon) -> None:
    code, body = daemon.http("/ws")  # a plain GET of the bus: JSON, like every route
    assert code == 400 and body["error"]["code"] == "invalid_format"
    code, body = daemon.http("/api/nothing")
    assert code == 404 and body["error"]["code"] == "not_found"
    code, body = daemon.http("/api/settings/connections/missing")
    assert code == 404 and body["error"]["code"] == "not_found"
    code, body = daemon.http("/api/data/nope")
    assert code == 404
    code, body = daemon.http("/api/sync-log?since=abc")
    assert code == 400 and body["error"]["code"] == "invalid"
    code, body = daemon.http("/api/sync-log?limit=0")
    assert code == 400


def test_method_not_allowed(daemon: Daemon) -> None:
    for method, path in [
        ("POST", "/api/settings/connections"),
        ("DELETE", "/api/connections/state"),
        ("PUT", "/api/settings/connections/c1"),
        ("GET", "/api/data/reset"),
        ("DELETE", "/api/data/export"),
        ("POST", "/health"),
        ("DELETE", "/metrics"),
    ]:
        code, body = daemon.http(path, method=method)
        assert code == 405, (method, path, code, body)
        assert body["error"]["code"] == "method_not_allowed"


def test_foreign_origin_403(daemon: Daemon) -> None:
    code, body = daemon.http("/api/settings/connections", headers={"Origin": "http://evil.example"})
    assert code == 403 and body["error"]["code"] == "forbidden"
    code, _ = daemon.http("/api/settings/connections", headers={"Origin": "http://localhost:5173"})
    assert code == 200


@pytest.mark.anyio
async def test_delete_connection_and_reset(daemon: Daemon) -> None:
    d = daemon
    await _seed(d)
    async with bus(d) as watcher:
        await watcher.ok("subscribe")
        code, body = d.http("/api/settings/connections/c2", method="DELETE")
        assert code == 200 and body == {"deleted": "c2"}
        code, body = d.http("/api/settings/connections/c2", method="DELETE")
        assert code == 404
        code, body = d.http("/api/data/reset", method="DELETE")
        assert code == 400 and body["error"]["code"] == "invalid"
        code, body = d.http("/api/data/reset?confirm=yes", method="DELETE")
        assert code == 200 and "connections.json" in body["reset"]
        events = await watcher.events_until(5)
        assert [(e["action"], e["data"]["source"]) for e in events] == [
            ("delete", "http"),
            ("reset", "http"),
        ]
    assert json.loads((d.data_dir / "connections.json").read_text()) == []


def test_file_invalid_is_409(daemon: Daemon) -> None:
    (daemon.data_dir / "connections.json").write_text('[{"id": "x",}]\n')
    wait_until(lambda: daemon.http("/health", token=None)[1]["status"] == "degraded", 10, 0.05)
    code, body = daemon.http("/api/data/reset?confirm=yes", method="DELETE")
    assert code == 409 and body["error"]["code"] == "file_invalid"
    code, text = daemon.http("/metrics")
    assert "ctsd_invalid_files 1.0" in text
    assert 'ctsd_hand_edits_total{result="refused"} 1.0' in text


def test_http_rate_limit_429(data_dir: Path) -> None:
    write_settings(data_dir, {"server": {"rate_limit": {"requests": 5, "window_s": 900}}})
    d = Daemon(data_dir).start()
    try:
        codes = [d.http("/api/connections/state")[0] for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        assert d.http("/api/connections/state")[1]["error"]["code"] == "rate_limited"
        assert d.http("/health", token=None)[0] == 200  # health is never limited
    finally:
        d.close()


def test_metrics_count_hand_edits_taken_in(daemon: Daemon) -> None:
    (daemon.data_dir / "watchlists.json").write_text('{"lists": []}\n')

    def taken() -> bool:
        text = daemon.http("/metrics")[1]
        return 'ctsd_hand_edits_total{result="taken_in"} 1.0' in text

    wait_until(taken, 10, interval=0.05, what="the hand edit counted")
    code, doc = daemon.http("/api/data/watchlists")
    assert code == 200 and doc == {"lists": []}


def test_cors_for_listed_origins(daemon: Daemon) -> None:
    origin = {"Origin": "http://localhost:5174"}
    req = urllib.request.Request(
        daemon.url + "/api/settings/connections", method="OPTIONS", headers=origin
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # a preflight carries no token
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5174"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    req = urllib.request.Request(
        daemon.url + "/api/connections/state",
        headers={**origin, "Authorization": f"Bearer {daemon.token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5174"
    # no Origin (a script): no CORS headers, still served
    with urllib.request.urlopen(
        urllib.request.Request(
            daemon.url + "/api/connections/state",
            headers={"Authorization": f"Bearer {daemon.token}"},
        ),
        timeout=10,
    ) as resp:
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


# CONTRACT §5: the only statuses an HTTP error may have.
CONTRACT_STATUSES = {400, 401, 403, 404, 405, 409, 429, 503}


class _FailingStore:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def state_views(self) -> list[Any]:
        raise self.exc


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (CtsdError("internal", "a bug"), "internal"),
        (CtsdError("io_error", "disk gone"), "io_error"),
        (RuntimeError("an unexpected bug"), "internal"),
    ],
)
async def test_internal_and_io_errors_are_503(exc: Exception, code: str) -> None:
    from types import SimpleNamespace

    from websockets.datastructures import Headers
    from websockets.http11 import Request

    from ctsd.bus.http import Routes
    from ctsd.bus.ratelimit import AuthFailures

    app = SimpleNamespace(token="tok", store=_FailingStore(exc))
    server = SimpleNamespace(
        origin_ok=lambda request: True,
        remote=lambda conn: "127.0.0.1",
        auth_failures=AuthFailures(),
        http_limiter=SimpleNamespace(allow=lambda addr: True),
        count_error=lambda code: None,
    )
    routes = Routes(app, server)  # type: ignore[arg-type]
    request = Request("/api/connections/state", Headers({"Authorization": "Bearer tok"}))
    resp = await routes.handle(None, request)  # type: ignore[arg-type]
    assert resp.status_code == 503
    assert json.loads(resp.body)["error"]["code"] == code


def test_every_error_code_maps_to_a_contract_status() -> None:
    from ctsd.bus.http import STATUS_OF

    codes = {"invalid_format", "invalid", "not_found", "conflict", "file_invalid", "id_reuse"}
    codes |= {"unknown_command", "unauthorized", "rate_limited", "too_large"}
    codes |= {"revision_compacted", "io_error", "internal"}
    assert codes <= set(STATUS_OF)
    assert set(STATUS_OF.values()) <= CONTRACT_STATUSES
