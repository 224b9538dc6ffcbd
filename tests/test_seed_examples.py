"""The seeds' own REST requests against the real daemon, with a real HTTP client (httpx), their
example bodies unchanged, each answered as the seed's frontend expects.

Seed 000 (CTS file storage): its connection record created, listed, read back and sent back
whole, made active, its volumes set, then deleted; its batch update. Seed 003 (DayTradersPro):
its connection.json and instances.json saved through the API, the bootstrap showing no
credentials, and its backup → restore round trip run from its own curl commands.

What the routes do in general (errors, CORS, If-Match, every document name) is tested in
test_http_api and test_http; this module is the seeds' examples as a user would run them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from ctsd import bases
from tests.daemon import Daemon, sync_log, wait_until
from tests.datadir import connection
from tests.seeds import (
    ALGORITHM,
    SEED_BATCH,
    SEED_BATCH_JSON,
    SEED_CONNECTION_DOC,
    SEED_CONNECTIONS,
    SEED_CURL_EXPORT,
    SEED_CURL_IMPORT,
    SEED_INSTANCES,
    SEED_SYNC_LOG,
    SEEDS_DIR,
    write_seed_dir,
)

JSON = {"Content-Type": "application/json"}
MASK = "********"
# Fields the daemon keeps itself: a client's values are ignored (the seed's are from 2024).
SERVER_MANAGED = {"created_at", "updated_at"}
SECRETS = {"api_key", "api_secret"}  # the seed record's secrets ("..."): masked when shown
# The one record of seed 000's connections.json, as its text: the body of a create.
RECORD = SEED_CONNECTIONS.strip().removeprefix("[").removesuffix("]").strip()


def test_requests_are_verbatim() -> None:
    """The curl commands and the batch call are exactly as the seed documents give them."""
    if not SEEDS_DIR.is_dir():
        pytest.skip("set CTSD_SEEDS_DIR to the seed documents' folder to check the copies")
    text = "".join(p.read_text() for p in sorted(SEEDS_DIR.glob("*.txt")))
    for example in (SEED_CURL_EXPORT, SEED_CURL_IMPORT, SEED_BATCH):
        assert example in text, example


def the_seed_record() -> dict[str, Any]:
    return json.loads(SEED_CONNECTIONS)[0]


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    """The seeds' frontends as HTTP clients; our daemon wants the token they do not send."""
    with httpx.Client(
        base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=10
    ) as client:
        yield client


def file_of(d: Daemon, name: str) -> Any:
    return json.loads((d.data_dir / name).read_bytes())


# --- seed 000: the connection record through the connection routes ---------------------------


def test_seed_connection_created_listed_and_read_back_as_sent(
    daemon: Daemon, api: httpx.Client
) -> None:
    seed = the_seed_record()
    r = api.post("/api/settings/connections", content=RECORD, headers=JSON)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/api/settings/connections/conn_abc123"
    created = r.json()
    # Every field of the seed's record, in the seed's order, as sent: the secrets masked and
    # the timestamps the daemon's own.
    assert list(created) == list(seed)
    for key, value in seed.items():
        if key in SECRETS:
            assert created[key] == MASK, key
        elif key not in SERVER_MANAGED:
            assert created[key] == value, key
    assert created["created_at"] == created["updated_at"] != seed["created_at"]

    listed = api.get("/api/settings/connections")
    assert listed.status_code == 200 and listed.json() == [created]
    assert api.get("/api/settings/connections/conn_abc123").json() == created
    # is_active: true in the seed's record makes it one of the active connections
    assert [c["id"] for c in api.get("/api/connections/active").json()] == ["conn_abc123"]
    # the secrets are stored as given, never shown
    on_disk = wait_until(lambda: file_of(daemon, "connections.json") or None, 5, what="the file")
    assert on_disk[0]["api_key"] == "..." and on_disk[0]["api_secret"] == "..."
    assert "..." not in listed.text.replace('"********"', "")


def test_seed_record_sent_back_whole_then_deleted(daemon: Daemon, api: httpx.Client) -> None:
    """The CTS frontend's save of the seed's record as it read it (every field of the seed,
    placeholders and timestamps included) changes nothing; then its delete. (An edited field
    among the rest: test_http_api.)"""
    api.post("/api/settings/connections?sync=files", content=RECORD, headers=JSON)
    before = (daemon.data_dir / "connections.json").read_bytes()
    got = api.get("/api/settings/connections/conn_abc123").json()
    r = api.put("/api/settings/connections/conn_abc123?sync=files", json=got)
    assert r.status_code == 200 and r.json() == got, r.text
    assert (daemon.data_dir / "connections.json").read_bytes() == before
    r = api.delete("/api/settings/connections/conn_abc123")
    assert r.status_code == 200 and r.json() == {"deleted": "conn_abc123"}
    assert api.get("/api/settings/connections").json() == []
    assert api.get("/api/connections/active").json() == []


def test_seed_volume_change_logged_as_in_the_seed(daemon: Daemon, api: httpx.Client) -> None:
    """Seed 000's sync-log example: `update_volume` with live 1.5 and preset 2.0."""
    api.post("/api/settings/connections", content=RECORD, headers=JSON)
    seed_event = json.loads(SEED_SYNC_LOG)[1]
    live, preset = seed_event["data"]["live"], seed_event["data"]["preset"]
    r = api.post(
        "/api/connections/conn_abc123/volume?sync=files", json={"live": live, "preset": preset}
    )
    assert r.status_code == 200, r.text
    state = api.get("/api/connections/conn_abc123/state").json()
    assert (state["volume_factor_live"], state["volume_factor_preset"]) == (live, preset)
    event = sync_log(daemon)[-1]
    assert set(seed_event) == set(event)  # the seed's shape: id, connection_id, action, ...
    assert (event["connection_id"], event["action"]) == ("conn_abc123", seed_event["action"])
    assert set(seed_event["data"]) <= set(event["data"])  # live, preset, timestamp (+ source)
    assert (event["data"]["live"], event["data"]["preset"]) == (live, preset)
    assert event["data"]["timestamp"] == state["updated_at"]


def test_seed_batch_update(daemon: Daemon, api: httpx.Client) -> None:
    """Seed 000's `batchUpdateConnections([...])`: its argument as the batch route's body."""
    for cid in ("conn1", "conn2"):
        api.post("/api/settings/connections", json=connection(id=cid, is_enabled=False))
    r = api.post("/api/settings/connections/batch?sync=files", json=SEED_BATCH_JSON)
    assert r.status_code == 200, r.text
    got = {c["id"]: c for c in r.json()}
    assert got["conn1"]["is_enabled"] is True and got["conn2"]["volume_factor"] == 1.5
    assert {
        c["id"]: (c["is_enabled"], c["volume_factor"]) for c in file_of(daemon, "connections.json")
    } == {
        "conn1": (True, 1.0),
        "conn2": (False, 1.5),
    }
    # all or nothing: one unknown id, nothing of it applied
    r = api.post("/api/settings/connections/batch", json=[*SEED_BATCH_JSON, {"id": "conn3"}])
    assert r.status_code == 404 and r.json()["error"]["path"] == "$[2].id", r.text


# --- seed 003: its documents through /api/data ------------------------------------------------


def test_seed_connection_document_saved_and_never_shown(daemon: Daemon, api: httpx.Client) -> None:
    r = api.post("/api/data/connection?sync=files", content=SEED_CONNECTION_DOC, headers=JSON)
    assert r.status_code == 200, r.text
    shown = r.json()
    assert api.get("/api/data/connection").json() == shown
    seed = json.loads(SEED_CONNECTION_DOC)
    # everything as sent but the credentials, which no answer carries
    assert shown["server"] == seed["server"] and shown["trading"] == seed["trading"]
    px, seed_px = shown["projectX"], seed["projectX"]
    assert {k: px[k] for k in ("apiUrl", "websocketUrl", "autoConnect")} == {
        k: seed_px[k] for k in ("apiUrl", "websocketUrl", "autoConnect")
    }
    for answer in (
        r.text,
        api.get("/api/trading/connection").text,
        api.get("/api/data/export").text,
    ):
        assert seed_px["apiKey"] not in answer and seed_px["username"] not in answer
    # stored as the seed wrote it
    assert file_of(daemon, "connection.json") == seed
    # the frontend's save of what it was shown changes nothing
    before = (daemon.data_dir / "connection.json").read_bytes()
    assert api.post("/api/data/connection?sync=files", json=shown).status_code == 200
    assert (daemon.data_dir / "connection.json").read_bytes() == before


def test_seed_instances_need_their_algorithm(daemon: Daemon, api: httpx.Client) -> None:
    r = api.post("/api/data/instances", content=SEED_INSTANCES, headers=JSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid" and err["path"] == "$.instances[0].algorithmName"
    assert "Simple-MA-Crossover" in err["message"]
    r = api.post("/api/data/algorithms/Simple-MA-Crossover", content=ALGORITHM, headers=JSON)
    assert r.status_code == 200, r.text
    r = api.post("/api/data/instances?sync=files", content=SEED_INSTANCES, headers=JSON)
    assert r.status_code == 200 and r.json() == json.loads(SEED_INSTANCES), r.text
    assert api.get("/api/data/instances").json() == json.loads(SEED_INSTANCES)
    assert file_of(daemon, "instances.json") == json.loads(SEED_INSTANCES)


# --- seed 003: backup → restore with its own curl commands ------------------------------------


def curl(d: Daemon, command: str, cwd: Path) -> str:
    """Run one of the seed's curl commands with the real `curl`, through the shell, in `cwd`:
    as the seed gives it but for the token header and the test daemon's port. Its stdout."""
    assert command.startswith("curl "), command
    if shutil.which("curl") is None:  # .ci/run installs it
        pytest.skip("curl is not installed")
    line = command.replace("curl ", f"curl -sS -H 'Authorization: Bearer {d.token}' ", 1)
    line = line.replace("http://localhost:3587/", f"http://localhost:{d.port}/")
    run = subprocess.run(
        ["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert run.returncode == 0, (line, run.stderr)
    return run.stdout


def export_parts(raw: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """An export's top-level fields, and each file's content exactly as the export's bytes
    hold it."""
    top = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    files = msgspec.json.decode(top.pop("files"), type=dict[str, msgspec.Raw])
    return {k: json.loads(bytes(v)) for k, v in top.items()}, {
        k: bytes(v) for k, v in files.items()
    }


def data_files(data_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*.json"))
        if p.relative_to(data_dir).parts[0] not in ("logs", bases.DIR)
    }


@pytest.fixture
def seed_daemon(data_dir: Path) -> Iterator[Daemon]:
    """A daemon on the seeds' own data files (seed 000's tables, seed 003's documents)."""
    write_seed_dir(data_dir)
    with Daemon(data_dir) as d:
        yield d


def test_seed_backup_then_restore_round_trip(seed_daemon: Daemon, tmp_path: Path) -> None:
    """Export → import of that very body → export again: the same bytes, but for what the
    restore itself is. The restore is a change: it is logged (one `import` event), so the
    second export's `revision` is one more, its sync log has that event at the end, and its
    `exported_at` is the later time. Every data file on disk stays byte for byte as it was
    (the sync log gains the one event)."""
    d = seed_daemon
    with httpx.Client(
        base_url=d.url, headers={"Authorization": f"Bearer {d.token}"}, timeout=30
    ) as client:
        # the frontend saves its UI state first, so the backup holds a document of its own
        r = client.post("/api/data/ui-config?sync=files", json={"theme": "dark", "layout": [1, 2]})
        assert r.status_code == 200, r.text
        on_disk = data_files(d.data_dir)
        rev = int(client.get("/api/data/export").headers["x-revision"])
        curl(d, SEED_CURL_EXPORT, tmp_path)
        backup = (tmp_path / "backup.json").read_bytes()

        restored = json.loads(curl(d, SEED_CURL_IMPORT, tmp_path))
        assert restored["mode"] == "merge", restored
        second = client.get("/api/data/export")
        assert int(second.headers["x-revision"]) == rev + 1

    top1, files1 = export_parts(backup)
    top2, files2 = export_parts(second.content)
    assert set(top1) == set(top2) == {"version", "exported_at", "revision"}
    assert top2["version"] == top1["version"] == 1
    assert top2["revision"] == top1["revision"] + 1
    assert top2["exported_at"] > top1["exported_at"]
    assert list(files2) == list(files1)
    log = "connection-sync-log.json"
    assert {f: b for f, b in files2.items() if f != log} == {
        f: b for f, b in files1.items() if f != log
    }
    log1, log2 = json.loads(files1[log]), json.loads(files2[log])
    assert log2[:-1] == log1 and log2[-1]["action"] == "import", log2[-1]
    assert log2[-1]["id"] == top2["revision"] and log2[-1]["data"]["source"] == "http"
    # the seed's secrets stayed what they were (the export had them masked)
    assert b"..." not in files1["connections.json"] and b"API key token" not in backup

    events = wait_until(
        lambda: [e for e in sync_log(d) if e["id"] == top2["revision"]] or None, 5, what="import"
    )
    assert events[0]["action"] == "import"
    after = data_files(d.data_dir)
    assert {f: b for f, b in after.items() if f != log} == {
        f: b for f, b in on_disk.items() if f != log
    }
    assert json.loads(after[log])[:-1] == json.loads(on_disk[log])
    assert json.loads(after["connections.json"])[0]["api_key"] == "..."  # the seed's own
