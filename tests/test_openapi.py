"""GET /openapi.json as its users take it: a real OpenAPI 3.1 validator and the route table
the project promises, against the running daemon.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

from tests.daemon import Daemon, free_port
from tests.test_bus import CANARY, conn_body

# The routes of the HTTP API as promised to its users, written out here by hand so the test
# does not read the daemon's own table: path → methods.
PROMISED_ROUTES: dict[str, set[str]] = {
    "/health": {"get"},
    "/api/trading/connection": {"get"},
    "/api/trading/server-status": {"get"},
    "/api/trading/test-connection": {"post"},
    "/api/settings/connections": {"get", "post"},
    "/api/settings/connections/{id}": {"get", "put", "patch", "delete"},
    "/api/settings/connections/batch": {"post"},
    "/api/connections/active": {"get"},
    "/api/connections/state": {"get"},
    "/api/connections/{id}/state": {"get"},
    "/api/connections/{id}/active": {"post"},
    "/api/connections/{id}/volume": {"post"},
    "/api/connections/{id}/heartbeat": {"post"},
    "/api/connections/{id}/test": {"post"},
    "/api/sync-log": {"get"},
    "/api/data/{name}": {"get", "post", "put"},
    "/api/data/export": {"get"},
    "/api/data/import": {"post"},
    "/api/data/reset": {"delete"},
    "/metrics": {"get"},
    "/openapi.json": {"get"},
}
# Query parameters the promise names, per (path, method).
PROMISED_QUERIES: dict[tuple[str, str], set[str]] = {
    ("/api/settings/connections", "get"): {"exchange", "enabled", "active"},
    ("/api/sync-log", "get"): {"since", "limit"},
    ("/api/data/import", "post"): {"mode"},
    ("/api/data/reset", "delete"): {"confirm"},
}


def _auth(d: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {d.token}"}


def _dead_url() -> str:
    """A local URL nothing listens on: connection tests fail at once, never leave the host."""
    return f"http://127.0.0.1:{free_port()}"


def _seed_connections(d: Daemon, client: httpx.Client, dead: str) -> None:
    present = {c["id"] for c in client.get("/api/settings/connections").json()}
    settings_ = json.dumps({"base_url": dead})
    bodies = [
        conn_body("one", id="c1", api_key=CANARY, api_secret=CANARY, connection_settings=settings_),
        conn_body("two", id="c2", exchange="okx", connection_settings=settings_),
        conn_body("three", id="c3", is_enabled=False, connection_settings=settings_),
    ]
    for body in bodies:
        if body["id"] not in present:
            r = client.post("/api/settings/connections", json=body)
            assert r.status_code == 201, r.text


def _seed(d: Daemon, dead: str) -> None:
    with httpx.Client(base_url=d.url, headers=_auth(d), timeout=30) as client:
        _seed_connections(d, client, dead)
        assert client.post("/api/connections/c2/active", json={"active": True}).status_code == 200
        docs: dict[str, Any] = {
            "ui-config": {"theme": "dark", "panels": ["chart", "orders"]},
            "watchlists": {"lists": [{"name": "main", "symbols": ["ES", "NQ"]}]},
            "algorithms/alpha": {"name": "alpha", "params": {"fast": 5, "slow": 20}},
            "instances": {
                "instances": [{"id": "i1", "name": "es", "symbol": "ES", "algorithmName": "alpha"}]
            },
            "connection": {"projectX": {"apiUrl": dead, "username": "u", "apiKey": CANARY}},
        }
        for name, content in docs.items():
            r = client.post(f"/api/data/{name}", json=content)
            assert r.status_code == 200, (name, r.text)


class Target:
    """The daemon under test (seeded)."""

    def __init__(self, daemon: Daemon, dead: str) -> None:
        self.daemon = daemon
        self.dead = dead


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    d = Daemon(tmp_path_factory.mktemp("openapi") / "data").start()
    try:
        dead = _dead_url()
        _seed(d, dead)
        yield Target(d, dead)
    finally:
        d.close()


@pytest.fixture(scope="module")
def openapi_document(target: Target) -> dict[str, Any]:
    d = target.daemon
    r = httpx.get(f"{d.url}/openapi.json", headers=_auth(d), timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-revision"].isdigit()
    return r.json()


def test_document_is_valid_openapi_3_1(openapi_document: dict[str, Any]) -> None:
    assert openapi_document["openapi"].startswith("3.1.")
    validate(openapi_document, cls=OpenAPIV31SpecValidator)  # raises on any violation


def test_document_names_every_promised_route(openapi_document: dict[str, Any]) -> None:
    paths = openapi_document["paths"]
    documented = {
        path: {m for m in ops if m in {"get", "post", "put", "patch", "delete"}}
        for path, ops in paths.items()
    }
    assert documented == PROMISED_ROUTES
    for (path, method), names in PROMISED_QUERIES.items():
        params = paths[path][method].get("parameters", [])
        assert names <= {p["name"] for p in params if p["in"] == "query"}, (path, method)


def test_document_says_what_needs_the_token(openapi_document: dict[str, Any]) -> None:
    schemes = openapi_document["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if s == {"type": "http", "scheme": "bearer"}]
    assert len(bearer) == 1
    for path, ops in openapi_document["paths"].items():
        for method, op in ops.items():
            security = op.get("security", openapi_document.get("security"))
            if path == "/health":
                assert security == [], "/health needs no token"
            else:
                assert security == [{bearer[0]: []}], (method, path)
                assert "401" in op["responses"], (method, path)


def test_document_create_is_201_with_location(openapi_document: dict[str, Any]) -> None:
    created = openapi_document["paths"]["/api/settings/connections"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    assert "X-Revision" in created["headers"]


def test_document_needs_the_token(target: Target) -> None:
    code, body = target.daemon.http("/openapi.json", token=None)
    assert code == 401 and body["error"]["code"] == "unauthorized"


def _query(doc: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    params = doc["paths"][path][method]["parameters"]
    return next(p for p in params if p["in"] == "query" and p["name"] == name)


def test_document_states_the_query_rules_the_daemon_applies(
    target: Target, openapi_document: dict[str, Any]
) -> None:
    doc = openapi_document
    assert set(_query(doc, "/api/data/import", "post", "mode")["schema"]["enum"]) == {
        "merge",
        "replace",
    }
    confirm = _query(doc, "/api/data/reset", "delete", "confirm")
    assert confirm["required"] is True and confirm["schema"]["enum"] == ["yes"]
    limit = _query(doc, "/api/sync-log", "get", "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 100_000)
    assert _query(doc, "/api/sync-log", "get", "since")["schema"]["minimum"] == 0

    d = target.daemon
    for query, code in [
        ("limit=0", 400),
        ("limit=1", 200),
        ("limit=100000", 200),
        ("limit=100001", 400),
        ("since=-1", 400),
        ("since=0", 200),
    ]:
        assert d.http(f"/api/sync-log?{query}")[0] == code, query
    with httpx.Client(base_url=d.url, headers=_auth(d), timeout=10) as client:
        r = client.post("/api/data/import?mode=other", json={"files": {}})
        assert r.status_code == 400 and r.json()["error"]["path"] == "$.mode"
        r = client.delete("/api/data/reset")
        assert r.status_code == 400 and r.json()["error"]["path"] == "$.confirm"


def test_timestamps_a_client_sends_are_ignored_as_documented(
    target: Target, openapi_document: dict[str, Any]
) -> None:
    schemas = openapi_document["components"]["schemas"]
    for shape in ("ConnectionInput", "ConnectionChanges", "ConnectionBatchItem"):
        for name in ("created_at", "updated_at"):
            field = schemas[shape]["properties"][name]
            assert not {"type", "anyOf", "pattern"} & set(field), (shape, name, field)
    d = target.daemon
    with httpx.Client(base_url=d.url, headers=_auth(d), timeout=10) as client:
        before = client.get("/api/settings/connections/c3").json()
        r = client.put(
            "/api/settings/connections/c3",
            json={"name": "three again", "updated_at": "AAA", "created_at": 5},
        )
        assert r.status_code == 200, r.text
        after = r.json()
    assert after["name"] == "three again"
    assert after["created_at"] == before["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", after["updated_at"])


def test_batch_items_need_an_id_as_documented(
    target: Target, openapi_document: dict[str, Any]
) -> None:
    body = openapi_document["paths"]["/api/settings/connections/batch"]["post"]["requestBody"]
    items = body["content"]["application/json"]["schema"]["items"]
    item = openapi_document["components"]["schemas"][items["$ref"].rsplit("/", 1)[1]]
    assert item["required"] == ["id"]
    d = target.daemon
    r = httpx.post(f"{d.url}/api/settings/connections/batch", json=[{}], headers=_auth(d))
    assert r.status_code == 400 and r.json()["error"]["path"] == "$[0].id"
