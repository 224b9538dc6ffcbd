"""Plain HTTP on the bus port against the real daemon process."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctsd.guard import SummaryLog
from tests.bus import bus
from tests.daemon import Daemon, wait_until
from tests.datadir import CANARY, connection, write_settings

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
        await b.ok("connections.create", connection=connection(id="c1", api_secret=CANARY))
        await b.ok("connections.create", connection=connection(name="two", id="c2", exchange="okx"))
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
    # seed 003's client reads connection.json's settings here, never its credentials
    assert boot["projectX"] == {
        "apiUrl": "https://api.topstepx.com",
        "websocketUrl": "wss://rtc.topstepx.com",
        "autoConnect": False,
        "credentialsSet": False,
    }
    assert boot["trading"] == {"defaultCommission": 0.0, "simulationMode": True}

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
    assert 'ctsd_group_fill_wait_seconds_count{filled="false"} 0.0' in text  # no load, no wait

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
    # (numbers as a URL writes them: `int` would take an Arabic-Indic 3, "1_0", "+5", " 5")
    for since in ("abc", "%D9%A3", "1_0", "%2B5", "%205", "9" * 19):
        code, body = daemon.http(f"/api/sync-log?since={since}")
        assert code == 400 and body["error"]["code"] == "invalid", (since, body)
        assert body["error"]["message"] == "?since must be an integer (up to 18 digits)", body
    code, body = daemon.http("/api/sync-log?limit=0")
    assert code == 400
    # ?sync on a write that stores nothing (a heartbeat): `files` holds at once, anything
    # else is refused (it was ignored); a read takes none
    code, body = daemon.http("/api/connections/x/heartbeat?sync=whenever", method="POST")
    assert code == 400 and body["error"]["path"] == "$.sync", body
    code, body = daemon.http("/api/settings/connections?sync=files")
    assert code == 400 and "unknown query parameter" in body["error"]["message"], body


def test_method_not_allowed(daemon: Daemon) -> None:
    for method, path, allow in [
        ("DELETE", "/api/settings/connections", "GET, HEAD, POST"),
        ("POST", "/api/connections/state", "GET, HEAD"),
        ("GET", "/api/data/reset", "DELETE"),
        ("POST", "/api/data/export", "GET, HEAD"),
        ("GET", "/api/data/import", "POST"),
        ("DELETE", "/api/data/ui-config", "GET, HEAD, POST, PUT"),
        ("GET", "/api/connections/c1/heartbeat", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
    ]:
        req = urllib.request.Request(
            daemon.url + path, method=method, headers={"Authorization": f"Bearer {daemon.token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405, (method, path)
        assert json.loads(e.value.read())["error"]["code"] == "method_not_allowed"
        assert sorted(e.value.headers["Allow"].split(", ")) == allow.split(", "), (method, path)


def test_foreign_origin_403(daemon: Daemon) -> None:
    code, body = daemon.http("/api/settings/connections", headers={"Origin": "http://evil.example"})
    assert code == 403 and body["error"]["code"] == "forbidden"
    # named: its page's developer sees only "a CORS error" in the browser
    assert "'http://evil.example'" in body["error"]["message"]
    code, _ = daemon.http("/api/settings/connections", headers={"Origin": "http://localhost:5173"})
    assert code == 200


def test_the_bootstrap_shows_no_url_for_an_empty_one(daemon: Daemon) -> None:
    """connection.json with `"apiUrl": ""` (the daemon then uses the default) was handed to
    the client as `://?`."""
    path = daemon.data_dir / "connection.json"
    doc = json.loads(path.read_text())
    doc["projectX"].update(apiUrl="", websocketUrl="")
    path.write_text(json.dumps(doc))
    wait_until(lambda: daemon.http("/api/trading/connection")[1]["projectX"]["websocketUrl"] == "")
    px = daemon.http("/api/trading/connection")[1]["projectX"]
    assert px["apiUrl"] == "https://api.topstepx.com", px


def test_a_desktop_shells_file_origin_is_let_in_once_listed(daemon: Daemon) -> None:
    """The DayTradersPro client packaged in Electron sends `Origin: file://`: refused however
    `server.cors_origins` listed it. Listed now, it is let in (requests and preflights)."""
    shell = {"Origin": "file://"}
    code, body = daemon.http("/api/data/ui-config", headers=shell)
    assert code == 403 and "'file://'" in body["error"]["message"]
    write_settings(daemon.data_dir, {"server": {"cors_origins": ["file://"]}})
    wait_until(lambda: daemon.http("/api/data/ui-config", headers=shell)[0] == 200, 10)
    pre = {
        **shell,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(daemon.url + "/api/data/ui-config", headers=pre)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "file://"


def test_refusals_in_a_loop_are_logged_in_summary(daemon: Daemon) -> None:
    """Any web page can make the trader's browser send requests in a loop: each refusal
    was a log line with the path (up to 8 KiB), and a few thousand rotated the log away. Now
    one line a minute per reason and path, and at most 60 a minute in all."""
    evil = {"Origin": "http://evil.example"}
    with httpx.Client(base_url=daemon.url, headers=evil) as page:
        for _ in range(50):
            assert page.get("/api/data/ui-config").status_code == 403
        for i in range(100):
            assert page.get(f"/api/scan/{i}/{'x' * 4000}").status_code == 403

    def refused() -> list[dict[str, Any]]:
        return [e for e in daemon.log_events() if e.get("event") == "http_refused"]

    wait_until(lambda: len(refused()) >= 60, 10)
    lines = refused()
    assert len(lines) == 60, len(lines)
    assert lines[0]["path"] == "/api/data/ui-config" and lines[0]["count"] == 1
    assert all(len(e["path"]) <= 200 for e in lines)


def test_a_summary_log_stays_small_under_a_scan() -> None:
    """Keys never logged (past the 60 lines a minute) kept a count each: a scan of ever new
    paths grew the daemon's memory without bound."""
    summary = SummaryLog("http_refused")
    for i in range(30_000):
        summary.note(f"origin not allowed /scan/{i}", path=f"/scan/{i}")
    assert len(summary.counts) <= 10_000 and len(summary.logged_at) <= 10_000
    assert summary.total == 30_000


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
        code, body = d.http("/api/data/reset?confirm=yes&sync=files", method="DELETE")
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
    assert "ctsd_cluster_" not in text  # one host: no cluster
    assert 'ctsd_hand_edits_total{result="refused"} 1.0' in text


def test_http_rate_limit_429_per_keep_alive_connection(data_dir: Path) -> None:
    # Every local client shares 127.0.0.1, so a local client is its keep-alive connection: a
    # chatty one is limited, the others are not.
    write_settings(data_dir, {"server": {"rate_limit": {"requests": 5, "window_s": 900}}})
    d = Daemon(data_dir).start()
    auth = {"Authorization": f"Bearer {d.token}"}
    try:
        with httpx.Client(base_url=d.url, headers=auth) as chatty:
            codes = [chatty.get("/api/connections/state").status_code for _ in range(8)]
            assert codes == [200] * 5 + [429] * 3
            r = chatty.get("/api/connections/state")
            assert r.json()["error"]["code"] == "rate_limited" and "x-revision" in r.headers
            # when to retry: one request's refill, 900 s / 5 = 180 s, in whole seconds
            assert 170 <= int(r.headers["retry-after"]) <= 180, r.headers
            assert chatty.get("/health").status_code == 200  # health is never limited
            hb = chatty.post("/api/connections/none/heartbeat")  # heartbeats are exempt
            assert hb.status_code == 404
            # ... only they: an algorithm named "heartbeat" is a write like any other
            algo = chatty.post("/api/data/algorithms/heartbeat", json={"name": "heartbeat"})
            assert algo.status_code == 429, algo.text
            with httpx.Client(base_url=d.url, headers=auth) as other:
                assert other.get("/api/connections/state").status_code == 200
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
    preflight = {
        **origin,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization, content-type, if-match",
    }
    req = urllib.request.Request(
        daemon.url + "/api/settings/connections/c1", method="OPTIONS", headers=preflight
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # a preflight carries no token
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5174"
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
        assert {"authorization", "content-type", "if-match"} <= set(allowed.split(", "))
        assert "PUT" in resp.headers["Access-Control-Allow-Methods"]
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
    # An origin sent in capitals is the same origin.
    r = httpx.get(
        daemon.url + "/api/connections/state",
        headers={"Origin": "HTTP://LOCALHOST:5174", "Authorization": f"Bearer {daemon.token}"},
    )
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"]
    # Refused before the routes (a wrong token): the frontend can still read why.
    r = httpx.get(
        daemon.url + "/api/connections/state", headers={**origin, "Authorization": "Bearer no"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5174"
    assert "X-Revision" in r.headers["Access-Control-Expose-Headers"]
    assert r.headers["Vary"] == "Origin" and r.headers["WWW-Authenticate"] == "Bearer"
    exposed = r.headers["Access-Control-Expose-Headers"].split(", ")
    assert {"Retry-After", "WWW-Authenticate", "Allow"} <= set(exposed)  # (429, 401, 405)
    # A page of the origin served from a public or LAN address (Chrome's Private Network
    # Access preflight): refused, every call of that page failed.
    pna = {**preflight, "Access-Control-Request-Private-Network": "true"}
    r = httpx.options(daemon.url + "/api/settings/connections/c1", headers=pna)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Private-Network"] == "true"
    r = httpx.get(daemon.url + "/api/connections/state", headers={"Authorization": "Bearer no"})
    assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers


# The only statuses an HTTP error may have.
ERROR_STATUSES = {400, 401, 403, 404, 405, 409, 412, 413, 415, 429, 503}


def test_every_error_code_maps_to_an_allowed_status() -> None:
    from typing import get_args

    from ctsd.errors import ErrorCode
    from ctsd.web.api import STATUS_OF

    assert set(get_args(ErrorCode)) <= set(STATUS_OF)
    assert set(STATUS_OF.values()) <= ERROR_STATUSES
    assert {STATUS_OF[c] for c in ("io_error", "internal")} == {503}
