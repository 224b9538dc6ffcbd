"""The REST API's writes and its door, against the real daemon, with a real HTTP client
(httpx: keep-alive, chunked bodies) and real websockets subscribers."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bus import bus
from tests.daemon import Daemon, wait_until
from tests.datadir import CANARY, connection, write_settings

JSON = {"Content-Type": "application/json"}


def _in_the_files(request: httpx.Request) -> None:
    # A change is answered once it is in the data files (as the CLI asks), so a test can
    # read them next; a test of the journal's own answer leaves `sync` out.
    if request.method != "GET" and "sync" not in request.url.params:
        request.url = request.url.copy_merge_params({"sync": "files"})


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=daemon.url,
        headers={"Authorization": f"Bearer {daemon.token}"},
        timeout=10,
        event_hooks={"request": [_in_the_files]},
    ) as client:
        yield client


def on_disk(d: Daemon, file: str) -> Any:
    return json.loads((d.data_dir / file).read_text())


def _error(r: httpx.Response, status: int, code: str, path: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    if path is not None:
        assert err.get("path") == path, err
    return err


def test_create_get_update_delete(daemon: Daemon, api: httpx.Client) -> None:
    r = api.post("/api/settings/connections", json=connection(id="c1", api_secret=CANARY))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/api/settings/connections/c1"
    assert int(r.headers["x-revision"]) == 1
    created = r.json()
    assert created["id"] == "c1" and created["api_secret"] == "********"
    # an id is made when none is given
    r = api.post("/api/settings/connections", json=connection(name="two"))
    assert r.status_code == 201 and r.json()["id"].startswith("conn_")
    assert r.headers["location"].endswith(r.json()["id"])

    r = api.put("/api/settings/connections/c1", json={"name": "renamed"})
    assert r.status_code == 200 and r.json()["name"] == "renamed"
    r = api.patch("/api/settings/connections/c1", json={"volume_factor": 2.5})
    assert r.status_code == 200 and r.json()["volume_factor"] == 2.5
    assert r.json()["name"] == "renamed"  # PATCH and PUT both change only the fields given
    assert api.get("/api/settings/connections/c1").json()["volume_factor"] == 2.5
    stored = {c["id"]: c for c in on_disk(daemon, "connections.json")}
    assert stored["c1"]["name"] == "renamed" and stored["c1"]["api_secret"] == CANARY

    r = api.delete("/api/settings/connections/c1")
    assert r.status_code == 200 and r.json() == {"deleted": "c1"}
    _error(api.get("/api/settings/connections/c1"), 404, "not_found")
    _error(api.delete("/api/settings/connections/c1"), 404, "not_found")
    sources = {e["data"]["source"] for e in on_disk(daemon, "connection-sync-log.json")}
    assert sources == {"http"}
    assert CANARY not in (daemon.data_dir / "connection-sync-log.json").read_text()


def test_server_managed_fields_are_ignored_and_id_is_fixed(api: httpx.Client) -> None:
    sent = connection(id="c1", created_at="2001-01-01T00:00:00.000Z", updated_at="x")
    r = api.post("/api/settings/connections", json=sent)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["created_at"] != "2001-01-01T00:00:00.000Z"
    assert created["updated_at"] == created["created_at"]
    r = api.put(
        "/api/settings/connections/c1",
        json={"created_at": "2001-01-01T00:00:00.000Z", "id": "c1", "name": "n2"},
    )
    assert r.status_code == 200 and r.json()["created_at"] == created["created_at"]
    _error(api.put("/api/settings/connections/c1", json={"id": "other"}), 400, "invalid", "$.id")


def test_a_record_read_and_sent_back_whole_changes_only_what_the_user_changed(
    daemon: Daemon, api: httpx.Client
) -> None:
    secrets = {"api_key": "KEY-" + CANARY, "api_secret": "SECRET-" + CANARY}
    r = api.post("/api/settings/connections", json=connection(id="w1", **secrets))
    assert r.status_code == 201, r.text
    before = (daemon.data_dir / "connections.json").read_bytes()
    record = api.get("/api/settings/connections/w1").json()
    assert CANARY not in json.dumps(record)  # shown masked
    # sent back untouched: nothing changes, no event, the file keeps its bytes
    r = api.put("/api/settings/connections/w1", json=record)
    assert r.status_code == 200, r.text
    assert r.headers["X-Revision"] == "1"
    assert (daemon.data_dir / "connections.json").read_bytes() == before
    # one field edited in the read record: only that field changes, the secrets stay
    r = api.put("/api/settings/connections/w1", json={**record, "name": "renamed"})
    assert r.status_code == 200 and r.headers["X-Revision"] == "2"
    event = api.get("/api/sync-log").json()[-1]
    assert event["action"] == "update" and event["data"]["fields"] == ["name"], event
    stored = on_disk(daemon, "connections.json")[0]
    assert stored["name"] == "renamed"
    assert {k: stored[k] for k in secrets} == secrets


def test_per_connection_routes(daemon: Daemon, api: httpx.Client) -> None:
    api.post("/api/settings/connections", json=connection(id="c1"))
    r = api.post("/api/connections/c1/active", json={"active": True})
    assert r.status_code == 200 and r.json()["is_active"] is True
    assert api.get("/api/connections/c1/state").json()["is_active"] is True
    assert [c["id"] for c in api.get("/api/connections/active").json()] == ["c1"]
    r = api.post("/api/connections/c1/volume", json={"live": 2.0})
    assert r.status_code == 200
    st = api.get("/api/connections/c1/state").json()
    assert st["volume_factor_live"] == 2.0 and st["volume_factor_preset"] == 1.0
    # a heartbeat: no body, answered without a disk write
    before = (daemon.data_dir / "connection-state.json").stat().st_mtime_ns
    r = api.post("/api/connections/c1/heartbeat")
    assert r.status_code == 200 and r.json()["connection_id"] == "c1"
    assert api.get("/api/connections/c1/state").json()["last_heartbeat_at"] == r.json()["timestamp"]
    assert (daemon.data_dir / "connection-state.json").stat().st_mtime_ns == before
    # a test of a connection whose base_url goes nowhere: a failed result, never an error
    api.put(
        "/api/settings/connections/c1",
        json={
            "connection_settings": json.dumps({"base_url": f"http://127.0.0.1:{_closed_port()}"})
        },
    )
    r = api.post("/api/connections/c1/test")
    assert r.status_code == 200 and r.json()["success"] is False and r.json()["error"]
    r = api.post("/api/trading/test-connection")
    assert r.status_code == 200 and r.json()["success"] is False
    _error(
        api.post("/api/connections/c1/active", json={"active": "yes"}), 400, "invalid", "$.active"
    )
    _error(
        api.post("/api/connections/c1/active", json={"active": True, "nope": 1}),
        400,
        "invalid",
        "$.nope",
    )
    _error(api.post("/api/connections/c1/volume", json={"live": 0}), 400, "invalid", "$.live")
    _error(api.post("/api/connections/missing/active", json={"active": True}), 404, "not_found")
    _error(api.get("/api/connections/missing/state"), 404, "not_found")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_all_or_nothing(daemon: Daemon, api: httpx.Client) -> None:
    for cid in ("a", "b"):
        api.post("/api/settings/connections", json=connection(id=cid))
    r = api.post(
        "/api/settings/connections/batch", json=[{"id": "a", "name": "A"}, {"id": "b", "name": "B"}]
    )
    assert r.status_code == 200 and [c["name"] for c in r.json()] == ["A", "B"]
    rev = int(r.headers["x-revision"])
    err = _error(
        api.post(
            "/api/settings/connections/batch",
            json=[{"id": "a", "name": "AA"}, {"id": "b", "volume_factor": -1}],
        ),
        400,
        "invalid",
    )
    assert err["path"] == "$[1].volume_factor"
    assert [c["name"] for c in on_disk(daemon, "connections.json")] == ["A", "B"]
    assert int(api.get("/health").headers["x-revision"]) == rev
    _error(api.post("/api/settings/connections/batch", json={"id": "a"}), 400, "invalid", "$")


@pytest.mark.parametrize(
    "name",
    [
        "settings",
        "main-indications",
        "common-indications",
        "connection",
        "instances",
        "ui-config",
        "user-settings",
        "watchlists",
        "algorithms/momentum",
    ],
)
def test_documents_post_and_put(daemon: Daemon, api: httpx.Client, name: str) -> None:
    content = {
        "settings": {"theme": "dark"},
        "connection": {"trading": {"simulationMode": False}},
        "instances": {"instances": [], "lastSaved": "2024-08-02T06:45:00.000Z"},
        "algorithms/momentum": {"name": "momentum", "period": 14},
    }.get(name, {"layout": [1, 2, 3]})
    for method in ("POST", "PUT"):
        r = api.request(method, f"/api/data/{name}", json=content)
        assert r.status_code == 200, (method, r.text)
        got = api.get(f"/api/data/{name}").json()
        for key, value in content.items():
            assert got[key] == value
    file = "algorithms/momentum.json" if name.startswith("algorithms/") else f"{name}.json"
    for key, value in content.items():
        assert on_disk(daemon, file)[key] == value


def test_project_x_credentials_never_follow_a_moved_api_url(
    daemon: Daemon, api: httpx.Client
) -> None:
    """The document read back with `projectX.apiUrl` pointed elsewhere: the placeholders do
    not keep the credentials (the login test would send them there); sent again, they do."""
    px = {"apiUrl": "https://api.topstepx.com", "username": "desk", "apiKey": "K" * 20}
    assert api.post("/api/data/connection", json={"projectX": px}).status_code == 200
    shown = api.get("/api/data/connection").json()
    assert shown["projectX"]["apiKey"] == "********"
    shown["projectX"]["apiUrl"] = "http://127.0.0.1:9"
    err = _error(api.post("/api/data/connection", json=shown), 400, "invalid")
    assert err["path"].startswith("$.projectX.") and "apiUrl" in err["message"]
    assert on_disk(daemon, "connection.json")["projectX"]["apiUrl"] == px["apiUrl"]
    shown["projectX"].update(username="desk", apiKey="N" * 20)
    assert api.post("/api/data/connection", json=shown).status_code == 200


def test_document_errors(daemon: Daemon, api: httpx.Client) -> None:
    _error(api.post("/api/data/ui-config", json=[1, 2]), 400, "invalid", "$")
    err = _error(
        api.post("/api/data/settings", json={"sync_log_limit": "many"}),
        400,
        "invalid",
        "$.sync_log_limit",
    )
    assert "int" in err["message"]
    # a cluster section the next start would refuse is refused now, its secret not echoed
    bad_cluster = {"cluster": {"nats_urls": ["wss://a/x?auth_token=canary-77e1"], "name": "d"}}
    err = _error(api.post("/api/data/settings", json=bad_cluster), 400, "invalid", "$.cluster")
    assert "cluster.nats_urls[0]" in err["message"] and "canary-77e1" not in err["message"]
    err = _error(
        api.post("/api/data/instances", json={"instances": [], "lastSavd": None}), 400, "invalid"
    )
    assert "lastSaved" in err["message"] and err["path"] == "$.lastSavd"
    bads = ("nope", "..%2F..%2Fetc%2Fpasswd", "algorithms/..", "algorithms/a%00b", "x" * 300)
    for bad in (*bads, "algorithms/b%0A", "ui-config%0A"):
        _error(api.get(f"/api/data/{bad}"), 404, "not_found")
        _error(api.post(f"/api/data/{bad}", json={"name": "x"}), 404, "not_found")
    assert not (daemon.data_dir / "nope.json").exists()
    assert not (daemon.data_dir / "algorithms" / "b.json").exists()
    assert on_disk(daemon, "ui-config.json") == {}


def test_export_import_round_trip_and_modes(daemon: Daemon, api: httpx.Client) -> None:
    api.post("/api/settings/connections", json=connection(id="c1"))
    api.post("/api/data/ui-config", json={"layout": "wide"})
    export = api.get("/api/data/export").json()
    assert export["version"] == 1 and "connections.json" in export["files"]
    api.post("/api/settings/connections", json=connection(id="c2"))
    r = api.post("/api/data/import?mode=replace", json=export)
    assert r.status_code == 200 and r.json()["mode"] == "replace"
    assert [c["id"] for c in on_disk(daemon, "connections.json")] == ["c1"]
    r = api.post("/api/data/import", json={"files": {"ui-config.json": {"zoom": 2}}})
    assert r.status_code == 200 and r.json()["mode"] == "merge"  # merge is the default
    assert on_disk(daemon, "ui-config.json") == {"layout": "wide", "zoom": 2}
    _error(api.post("/api/data/import?mode=both", json=export), 400, "invalid", "$.mode")
    _error(api.post("/api/data/import", json=[1]), 400, "invalid", "$")


def test_an_export_imports_back_after_its_connection_was_deleted_its_secrets_unset(
    daemon: Daemon, api: httpx.Client
) -> None:
    """The seeds' backup and restore: the export holds secrets masked, and the connection
    was deleted since. The whole import was refused for its placeholders, so nothing came
    back; now the rest comes back, those secrets unset and named, never a placeholder."""
    keys = {"api_key": "KEY-" + CANARY, "api_secret": "SECRET-" + CANARY}
    api.post("/api/settings/connections", json=connection(id="k1", **keys))
    api.post("/api/settings/connections", json=connection(id="k2", **keys))
    api.post("/api/data/ui-config", json={"theme": "backed-up"})
    export = api.get("/api/data/export").json()
    api.delete("/api/settings/connections/k1")
    api.post("/api/data/ui-config", json={"theme": "changed-later"})
    r = api.post("/api/data/import?mode=replace", json=export)
    assert r.status_code == 200, r.text
    assert r.json()["secrets_unset"] == [
        "$.files.connections.json[0].api_key",
        "$.files.connections.json[0].api_secret",
    ]
    rows = {c["id"]: c for c in on_disk(daemon, "connections.json")}
    assert (rows["k1"]["api_key"], rows["k1"]["api_secret"]) == (None, None)
    assert {k: rows["k2"][k] for k in keys} == keys  # (stored: kept)
    assert on_disk(daemon, "ui-config.json") == {"theme": "backed-up"}
    # An update naming a placeholder where nothing is stored is still refused.
    _error(api.put("/api/settings/connections/k1", json={"api_key": "********"}), 400, "invalid")


def test_an_export_over_a_mib_imports_back(daemon: Daemon, api: httpx.Client) -> None:
    """The seed's backup and restore (export, then POST it to import) with an export larger
    than other bodies may be (its sync log, never imported, is most of it at a few hundred
    connections); an import over its own limit is refused from its Content-Length, unread."""
    pad = json.dumps({"note": "x" * 60_000})
    for i in range(12):
        r = api.post(
            "/api/settings/connections", json=connection(id=f"big{i}", connection_settings=pad)
        )
        assert r.status_code == 201, r.text
    exported = api.get("/api/data/export").content
    assert len(exported) > 1024 * 1024
    api.delete("/api/settings/connections/big0")
    r = api.post("/api/data/import?mode=replace", content=exported, headers=JSON)
    assert r.status_code == 200, r.text
    assert on_disk(daemon, "connections.json") == json.loads(exported)["files"]["connections.json"]
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.putrequest("POST", "/api/data/import")
        for name, value in {**api.headers, **JSON}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(64 * 1024 * 1024 + 1))
        conn.endheaders()
        res = conn.getresponse()
        assert res.status == 413 and json.loads(res.read())["error"]["code"] == "too_large"
    finally:
        conn.close()


def test_reset_needs_confirm(daemon: Daemon, api: httpx.Client) -> None:
    api.post("/api/settings/connections", json=connection(id="c1"))
    _error(api.delete("/api/data/reset"), 400, "invalid")
    _error(api.delete("/api/data/reset?confirm=no"), 400, "invalid")
    assert api.delete("/api/data/reset?confirm=yes").status_code == 200
    assert on_disk(daemon, "connections.json") == []


def test_every_response_carries_x_revision(daemon: Daemon, api: httpx.Client) -> None:
    for r in (
        api.get("/health"),
        api.get("/api/nope"),
        api.get("/api/settings/connections", headers={"Authorization": "Bearer wrong"}),
        api.post("/api/settings/connections", content=b"{", headers=JSON),
        api.get("/metrics"),
        api.get("/openapi.json"),
    ):
        assert r.headers["x-revision"].isdigit(), r
        assert r.headers["cache-control"] == "no-store"


def test_a_writes_x_revision_is_its_own_change_even_when_others_commit_meanwhile(
    daemon: Daemon, api: httpx.Client
) -> None:
    """`?sync=files` answers once the files hold the change; other writes commit meanwhile.
    X-Revision was the daemon's revision when the answer started: later than the write, so an
    If-Match with it passed over a change made to the record in between. A connection test
    is a change too (its result is stored): the same holds for it."""
    # (nothing listens on port 1: the test fails at once, and its result is stored)
    api.post("/api/settings/connections", json=connection(id="c1", base_url="http://127.0.0.1:1"))
    api.post("/api/settings/connections", json=connection(id="c2"))
    stop = threading.Event()

    def others() -> None:  # (at most 300: far inside the rate limit and the kept log)
        with httpx.Client(base_url=daemon.url, headers=api.headers, timeout=10) as other:
            for i in range(300):
                if stop.is_set():
                    break
                other.put("/api/settings/connections/c2", json={"name": f"other {i}"})

    worker = threading.Thread(target=others)
    worker.start()
    try:
        revisions, tests = [], []
        for i in range(20):
            r = api.put("/api/settings/connections/c1?sync=files", json={"name": f"mine {i}"})
            assert r.status_code == 200, r.text
            revisions.append((f"mine {i}", int(r.headers["x-revision"])))
            r = api.post("/api/connections/c1/test")
            assert r.status_code == 200, r.text
            tests.append((r.json()["timestamp"], int(r.headers["x-revision"])))
    finally:
        stop.set()
        worker.join()
    log = api.get("/api/sync-log?limit=1000").json()
    events = log["events"] if isinstance(log, dict) else log
    mine = {
        e["data"]["values"]["name"]: e["id"]
        for e in events
        if e["connection_id"] == "c1" and "name" in e["data"].get("values", {})
    }
    assert [(name, mine[name]) for name, _ in revisions] == revisions
    tested = {e["data"]["timestamp"]: e["id"] for e in events if e["action"] == "test"}
    assert [(ts, tested[ts]) for ts, _ in tests] == tests


def test_if_match_refuses_a_stale_write_with_412(daemon: Daemon, api: httpx.Client) -> None:
    api.post("/api/settings/connections", json=connection(id="c1"))
    api.post("/api/settings/connections", json=connection(id="c2"))
    r = api.get("/api/settings/connections/c1")
    seen = r.headers["x-revision"]
    api.put("/api/settings/connections/c1", json={"name": "by someone else"})
    err = _error(
        api.put(
            "/api/settings/connections/c1", json={"name": "mine"}, headers={"If-Match": f'"{seen}"'}
        ),
        412,
        "precondition_failed",
    )
    assert "c1" in err["message"]
    assert api.get("/api/settings/connections/c1").json()["name"] == "by someone else"
    # another record did not move: the same If-Match passes there
    r = api.put(
        "/api/settings/connections/c2", json={"name": "ok"}, headers={"If-Match": f'"{seen}"'}
    )
    assert r.status_code == 200
    current = r.headers["x-revision"]
    r = api.put(
        "/api/settings/connections/c1", json={"name": "mine"}, headers={"If-Match": f'"{current}"'}
    )
    assert r.status_code == 200 and r.json()["name"] == "mine"
    api.post("/api/data/ui-config", json={"a": 1})
    _error(
        api.post("/api/data/ui-config", json={"a": 2}, headers={"If-Match": f'"{seen}"'}),
        412,
        "precondition_failed",
    )
    _error(
        api.put("/api/settings/connections/c1", json={}, headers={"If-Match": "soon"}),
        400,
        "invalid",
    )
    # digits Python reads as such but `int` does not ("²"), and more than any revision has
    for tag in ('"\xb2"'.encode("latin-1"), b'"' + b"9" * 5000 + b'"'):
        r = api.put("/api/settings/connections/c1", json={}, headers={"If-Match": tag})
        _error(r, 400, "invalid")


def test_sync_files_answers_with_the_change_in_the_file(daemon: Daemon, api: httpx.Client) -> None:
    r = api.post("/api/settings/connections?sync=files", json=connection(id="c1"))
    assert r.status_code == 201
    assert [c["id"] for c in on_disk(daemon, "connections.json")] == ["c1"]
    # a test stores its result: with ?sync=files, it is in connection-state.json (nothing
    # listens on port 9: the test fails at once)
    cs = json.dumps({"base_url": "http://127.0.0.1:9"})
    api.put("/api/settings/connections/c1", json={"connection_settings": cs})
    for _ in range(3):
        r = api.post("/api/connections/c1/test?sync=files")
        assert r.status_code == 200, r.text
        (state,) = on_disk(daemon, "connection-state.json")
        assert state["test_results"]["timestamp"] == r.json()["timestamp"], state
    # logged as a change made over HTTP (the periodic tests' source is `probe`)
    last = on_disk(daemon, "connection-sync-log.json")[-1]
    assert (last["action"], last["data"]["source"]) == ("test", "http"), last
    _error(api.post("/api/data/ui-config?sync=later", json={}), 400, "invalid", "$.sync")
    _error(api.get("/api/settings/connections?bogus=1"), 400, "invalid", "$.bogus")


def test_bodies_bad_input(daemon: Daemon, api: httpx.Client) -> None:
    url = "/api/settings/connections"
    _error(api.post(url, content=b'{"name": "x",', headers=JSON), 400, "invalid_format")
    _error(api.post(url, content=b"\xff\xfe", headers=JSON), 400, "invalid_format")
    _error(api.post(url), 400, "invalid", "$")  # no body
    _error(api.post(url, content=b"   ", headers=JSON), 400, "invalid", "$")
    _error(api.post(url, json=[]), 400, "invalid", "$")
    _error(api.post(url, json="x"), 400, "invalid", "$")
    err = _error(
        api.post(url, json={"name": "n", "exchange": "e", "is_enabeld": True}), 400, "invalid"
    )
    assert err["path"] == "$.is_enabeld" and "is_enabled" in err["message"]
    _error(api.post(url, json={"name": 5, "exchange": "e"}), 400, "invalid", "$.name")
    _error(
        api.post(url, content=b'{"name":"n"}', headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    _error(
        api.post(url, content=b'{"name":"n"}', headers={"Content-Type": ""}),
        415,
        "unsupported_media_type",
    )
    big = b'{"name": "' + b"x" * (1024 * 1024) + b'", "exchange": "e"}'
    r = api.post(url, content=big, headers=JSON)
    _error(r, 413, "too_large")
    assert r.headers.get("connection") == "close"
    deep = b"[" * 5000 + b"]" * 5000
    err = _error(
        api.post("/api/data/ui-config", content=b'{"a":' + deep + b"}", headers=JSON),
        400,
        "invalid_format",
    )
    assert "deeper than 72 levels" in err["message"]  # names the limit
    for cid in ("a b", "x" * 65, "..", "%00"):
        _error(api.get(f"/api/settings/connections/{cid}"), 404, "not_found")
    assert on_disk(daemon, "connections.json") == []
    assert api.get("/health").json()["status"] == "ok"


def test_hostile_numbers_and_nesting_are_clear_errors(daemon: Daemon, api: httpx.Client) -> None:
    # A body deeper than a message may be, on a route whose body holds no record that checks
    # it (1,000 levels decoded, then a crash deeper still): refused as the limit says.
    deep = b"[" * 100 + b"]" * 100
    err = _error(
        api.post("/api/connections/x/active", content=b'{"active":' + deep + b"}", headers=JSON),
        400,
        "invalid_format",
    )
    assert "deeper than 72 levels" in err["message"]
    # A Content-Length of 5,000 digits: Python reads no such number (was a 503 `internal`).
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(
            b"POST /api/data/ui-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nAuthorization: Bearer " + daemon.token.encode() + b"\r\n"
            b"Content-Length: " + b"0" * 4998 + b"2\r\n\r\n{}"
        )
        answer = b""
        while b'"}}' not in answer and (chunk := s.recv(4096)):  # (the body's end)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"invalid_format"' in answer
    # A rate limit the bucket's float arithmetic cannot hold: refused, never stored (stored,
    # every request after it was a 500 until the file was edited by hand).
    huge = {"server": {"rate_limit": {"requests": 10**400, "window_s": 1}}}
    _error(api.post("/api/data/settings", json=huge), 400, "invalid")
    assert api.get("/api/settings/connections").status_code == 200


def test_chunked_body_and_keep_alive(daemon: Daemon, api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "chunked", '
        yield b'"exchange": "bybit", "id": "ch"}'

    r = api.post("/api/settings/connections", content=chunks(), headers=JSON)
    assert r.status_code == 201, r.text
    assert r.request.headers.get("transfer-encoding") == "chunked"

    def too_big() -> Iterator[bytes]:
        yield b'{"a": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    _error(api.post("/api/data/ui-config", content=too_big(), headers=JSON), 413, "too_large")
    # one client, many requests: keep-alive works
    ports = set()
    with httpx.Client(base_url=daemon.url, headers=api.headers) as one:
        for _ in range(5):
            r = one.get("/api/settings/connections", extensions={"trace": None})
            assert r.status_code == 200
        ports.add(len(one._transport._pool.connections))  # type: ignore[attr-defined]
    assert ports == {1}


def test_http_writes_are_broadcast_with_source_http(daemon: Daemon, api: httpx.Client) -> None:
    import anyio

    async def run() -> None:
        async with bus(daemon) as watcher:
            await watcher.ok("subscribe")
            r = api.post("/api/settings/connections", json=connection(id="c1"))
            rev = int(r.headers["x-revision"])
            events = await watcher.events_until(rev)
            assert [(e["action"], e["data"]["source"]) for e in events] == [("create", "http")]

    anyio.run(run)


def test_foreign_origin_and_preflight(daemon: Daemon, api: httpx.Client) -> None:
    evil = {"Origin": "http://evil.example"}
    r = api.get("/api/settings/connections", headers=evil)
    _error(r, 403, "forbidden")
    assert not any(k.lower().startswith("access-control") for k in r.headers)
    pre = {
        **evil,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = api.options("/api/data/ui-config", headers=pre)
    _error(r, 403, "forbidden")
    assert not any(k.lower().startswith("access-control") for k in r.headers)
    r = api.post("/api/data/ui-config", json={"x": 1}, headers=evil)
    _error(r, 403, "forbidden")
    assert on_disk(daemon, "ui-config.json") == {}
    # an allowed origin: the preflight names the methods and headers a frontend uses
    ok = {
        "Origin": "http://localhost:5173",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    r = httpx.options(daemon.url + "/api/data/ui-config", headers=ok)
    assert r.status_code == 204
    # the headers HTTP libraries add (axios, jQuery, a no-cache fetch) and HEAD pass too
    extra = {**ok, "Access-Control-Request-Headers": "x-requested-with, cache-control, pragma"}
    r2 = httpx.options(daemon.url + "/api/data/ui-config", headers=extra)
    assert r2.status_code == 204, r2.text
    assert "x-requested-with" in r2.headers["access-control-allow-headers"].lower()
    # a page that sends credentials (axios's withCredentials) is let through
    assert r2.headers["access-control-allow-credentials"] == "true"
    head = {**ok, "Access-Control-Request-Method": "HEAD"}
    assert httpx.options(daemon.url + "/api/data/ui-config", headers=head).status_code == 204
    # a method no route has is refused as the method, not sent to the origins setting
    trace = {**ok, "Access-Control-Request-Method": "TRACE"}
    r2 = httpx.options(daemon.url + "/api/data/ui-config", headers=trace)
    _error(r2, 403, "forbidden")
    assert "method" in r2.json()["error"]["message"]
    assert "cors_origins" not in r2.json()["error"]["message"]
    # without an origin it is no preflight: the token is asked for as on any request
    no_origin = {k: v for k, v in ok.items() if k != "Origin"}
    _error(
        httpx.options(daemon.url + "/api/data/ui-config", headers=no_origin), 401, "unauthorized"
    )
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "content-length" not in r.headers and "content-type" not in r.headers
    # the connection stays open for the request the preflight was for, and nothing is logged
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    try:
        for method in ("OPTIONS", "GET"):
            conn.request(method, "/api/data/ui-config", headers={**ok, **api.headers})
            reply = conn.getresponse()
            reply.read()
            assert reply.status == (204 if method == "OPTIONS" else 200)
    finally:
        conn.close()
    assert not [e for e in daemon.log_events() if e.get("level") == "error"]
    r = api.post("/api/data/ui-config", json={"x": 1}, headers={"Origin": "http://localhost:5173"})
    assert (
        r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    )
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "X-Revision" in r.headers["access-control-expose-headers"]


def test_a_host_header_is_a_host_and_a_port_only() -> None:
    """What the bootstrap echoes into `bus_url` (bound beyond loopback, no Host check), and
    what the loopback check reads: a host and a port, nothing riding along."""
    from ctsd.guard import host_of, well_formed_host

    for ok, host in (
        ("localhost", "localhost:80"),
        ("localhost", "localhost:"),  # (an empty port, as RFC 3986 allows)
        ("::1", "[::1]:3587"),
        ("a.b", "a.b"),
    ):
        assert well_formed_host(host) and host_of(host) == ok, host
    for bad in (
        "localhost:80@evil.com",
        "evil.com:80@a.localhost",  # (not a loopback name for ending in one)
        "evil.com/x.localhost",
        "localhost:1/x?y",
        "h:1:2",
        "",
        "a b",
        "[::1",
    ):
        assert not well_formed_host(bad) and host_of(bad) == "", bad


def test_dns_rebinding_host_refused(daemon: Daemon, api: httpx.Client) -> None:
    # (and a loopback name with more riding along: a user, a path, a query)
    for host in (
        "evil.example",
        "evil.example:3587",
        "127.0.0.1.nip.io",
        f"localhost:{daemon.port}@evil.example",
        f"localhost:{daemon.port}/x?y",
    ):
        r = api.get("/api/settings/connections", headers={"Host": host})
        _error(r, 403, "forbidden")
    # (host names are case-insensitive; `localhost.` is the same name, fully qualified)
    for host in (
        "localhost",
        f"localhost:{daemon.port}",
        f"127.0.0.1:{daemon.port}",
        "[::1]:1",
        f"LOCALHOST:{daemon.port}",
        "Localhost",
        f"localhost.:{daemon.port}",
    ):
        assert api.get("/api/settings/connections", headers={"Host": host}).status_code == 200
    # the bus upgrade too: refused before the handshake, as JSON
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **api.headers,
    }
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    try:
        conn.putrequest("GET", "/ws", skip_host=True)
        for k, v in {**upgrade, "Host": "evil.example"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 403 and reply.getheader("X-Revision", "").isdigit()
        assert json.loads(reply.read())["error"]["code"] == "forbidden"
    finally:
        conn.close()
    # an upgrade websockets itself refuses (no key; another version): JSON too, not text
    for drop, extra in (("Sec-WebSocket-Key", {}), ("", {"Sec-WebSocket-Version": "8"})):
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
        try:
            conn.putrequest("GET", "/ws", skip_host=True)
            headers = {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
                **extra,
                "Authorization": api.headers["Authorization"],
                "Host": "localhost",
            }
            for k, v in headers.items():
                if k != drop:
                    conn.putheader(k, v)
            conn.endheaders()
            reply = conn.getresponse()
            assert reply.status == 400 and reply.getheader("X-Revision", "").isdigit()
            assert reply.getheader("Content-Type") == "application/json"
            error = json.loads(reply.read())["error"]
            assert error["code"] == "invalid" and "Sec-WebSocket" in error["message"], error
        finally:
            conn.close()
    # one its parser refuses before that (a header line over 8 KiB: a big cookie): JSON too
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as raw:
        raw.sendall(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n"
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"\r\nx-revision: " in head, head
    assert json.loads(body)["error"]["code"] == "invalid", body


def test_loopback_auth_is_opt_in(data_dir: Path) -> None:
    d = Daemon(data_dir).start()
    try:
        assert httpx.get(d.url + "/api/settings/connections").status_code == 401
    finally:
        d.close()
    write_settings(data_dir, {"server": {"auth": "loopback"}})
    d = Daemon(data_dir).start()
    try:
        assert httpx.get(d.url + "/api/settings/connections").status_code == 200
        r = httpx.post(
            d.url + "/api/data/ui-config",
            json={"x": 1},
            headers={"Origin": "http://localhost:5173"},
        )
        assert r.status_code == 200
        # a foreign Origin or a non-loopback Host still gets nothing
        assert (
            httpx.get(
                d.url + "/api/settings/connections", headers={"Origin": "http://evil.example"}
            ).status_code
            == 403
        )
        assert (
            httpx.get(
                d.url + "/api/settings/connections", headers={"Host": "evil.example"}
            ).status_code
            == 403
        )
        # a wrong token is still wrong
        r = httpx.get(d.url + "/api/settings/connections", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401

        import anyio
        from websockets.asyncio.client import connect

        async def bus_without_token() -> None:
            async with connect(d.ws_url) as ws:
                assert json.loads(await ws.recv())["type"] == "auth_ok"
                # ... but not a re-key, which a page could make to a key only it knows
                key = base64.b64encode(os.urandom(32)).decode()
                await ws.send(json.dumps({"id": 1, "type": "secrets.rekey", "secrets_key": key}))
                reply = json.loads(await ws.recv())
                assert reply["error"]["code"] == "unauthorized", reply

        anyio.run(bus_without_token)

        # `ctsd import` of an export too large for one bus message goes over HTTP: with no
        # token to be found, it sends none, as the bus needs none here
        from tests.cli_helpers import clean_env, ctsd

        big = d.data_dir.parent / "big-export.json"
        conns = [{"id": f"b{i}", "name": "n" * 150, "exchange": "x"} for i in range(6000)]
        big.write_text(json.dumps({"files": {"connections.json": conns}}))
        elsewhere = d.data_dir.parent / "no-token-here"
        elsewhere.mkdir()
        env = clean_env(CTSD_PORT=str(d.port))
        r = ctsd("import", str(big), "--data-dir", str(elsewhere), env=env)
        assert r.returncode == 0 and "(replace)" in r.stdout, r.stderr
        assert len(httpx.get(d.url + "/api/settings/connections").json()) == 6000
    finally:
        d.close()


def test_plain_get_of_the_bus_and_unknown_websocket_paths(
    daemon: Daemon, api: httpx.Client
) -> None:
    _error(api.get("/ws"), 400, "invalid_format")
    import anyio
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def run() -> None:
        with pytest.raises(InvalidStatus) as e:
            async with connect(daemon.url.replace("http", "ws") + "/elsewhere"):
                pass
        assert e.value.response.status_code == 404

    anyio.run(run)


def test_openapi_document_lists_every_route(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert "/api/settings/connections/{id}" in doc["paths"]
    assert set(doc["paths"]["/api/data/{name}"]) == {"get", "post", "put"}
    assert doc["components"]["schemas"]["Connection"]["properties"]["api_key"]


def test_health_and_metrics_after_abuse(daemon: Daemon) -> None:
    # a socket that never sends a request is closed after the header deadline; a busy
    # daemon keeps serving everyone else meanwhile
    s = socket.create_connection(("127.0.0.1", daemon.port))
    try:
        assert httpx.get(daemon.url + "/health").status_code == 200
    finally:
        s.close()
    wait_until(lambda: httpx.get(daemon.url + "/health").status_code == 200, 5)
