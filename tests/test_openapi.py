"""GET /openapi.json as its users take it: a real OpenAPI 3.1 validator, the route table the
project promises, and schemathesis fuzzing every route of the running daemon from the live
document.

The fuzz checks every response: no 5xx, the status code, content type, headers and body each
as the document declares them, malformed input refused with a 4xx, auth enforced, no secret in
any answer. Afterwards every data file still decodes, the daemon still answers on HTTP and the
bus, and a restart serves exactly what it served before.

`CTSD_FUZZ_EXAMPLES` sets the examples per operation (default 50, about half a minute); see
README "Development" for the long run.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.bus import bus
from tests.daemon import Daemon, free_port
from tests.datadir import CANARY, connection

FUZZ_EXAMPLES = int(os.environ.get("CTSD_FUZZ_EXAMPLES") or 50)
ANSWER_WITHIN_S = 15.0

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
DOCUMENT_NAMES = [
    "ui-config",
    "user-settings",
    "watchlists",
    "settings",
    "main-indications",
    "common-indications",
    "instances",
    "connection",
    "algorithms/alpha",
    "algorithms/beta",
]
SEED_IDS = ["c1", "c2", "c3"]

# Every response check but `positive_data_acceptance`: that one expects a 2xx for any body the
# schema admits, and some refusals are rules a JSON schema cannot say (an update naming another
# id, a masked placeholder on a new record, If-Match behind the revision).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    ignored_auth,
]


def _auth(d: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {d.token}"}


def _dead_url() -> str:
    """A local URL nothing listens on: connection tests fail at once, never leave the host."""
    return f"http://127.0.0.1:{free_port()}"


def _seed_connections(d: Daemon, client: httpx.Client, dead: str) -> None:
    present = {c["id"] for c in client.get("/api/settings/connections").json()}
    settings_ = json.dumps({"base_url": dead})
    bodies = [
        connection(
            name="one", id="c1", api_key=CANARY, api_secret=CANARY, connection_settings=settings_
        ),
        connection(name="two", id="c2", exchange="okx", connection_settings=settings_),
        connection(name="three", id="c3", is_enabled=False, connection_settings=settings_),
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
    """The daemon under test (seeded), and what the fuzz saw of it."""

    def __init__(self, daemon: Daemon, dead: str) -> None:
        self.daemon = daemon
        self.dead = dead
        self.statuses: collections.Counter[int] = collections.Counter()
        self.cases = 0
        self.by_op: collections.defaultdict[str, collections.Counter[int]] = (
            collections.defaultdict(collections.Counter)
        )

    def restore_seed(self) -> None:
        """Bring the seeded connections back after a delete, reset or import removed them, so
        the id routes keep meeting real records."""
        with httpx.Client(base_url=self.daemon.url, headers=_auth(self.daemon)) as client:
            _seed_connections(self.daemon, client, self.dead)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    d = Daemon(tmp_path_factory.mktemp("openapi") / "data").start()
    try:
        dead = _dead_url()
        _seed(d, dead)
        yield Target(d, dead)
    finally:
        d.close()


_VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _real_records(params: dict[str, Any] | None) -> Any:
    """Path parameters as generated, or (as often) a seeded connection id and a document name
    in their place. Only a valid value is swapped: an invalid one is what a negative case is
    about, and must stay."""
    if not params:
        return st.just(params)
    cid = params.get("id")
    name = params.get("name")
    if not (isinstance(cid, str) and _VALID_ID.fullmatch(cid)) and not (
        isinstance(name, str) and name
    ):
        return st.just(params)

    def swap(real_id: str, real_name: str) -> dict[str, Any]:
        out = dict(params)
        if "id" in out:
            out["id"] = real_id
        if "name" in out:
            out["name"] = real_name
        return out

    real = st.builds(swap, st.sampled_from(SEED_IDS), st.sampled_from(DOCUMENT_NAMES))
    return st.just(params) | real


@pytest.fixture(scope="module")
def api_schema(target: Target) -> Any:
    d = target.daemon
    schema = schemathesis.openapi.from_url(f"{d.url}/openapi.json", headers=_auth(d), timeout=10)

    # The token as schemathesis' own auth (not a fixed header), so `ignored_auth` knows it is
    # the real one and checks that requests without it or with a wrong one are refused.
    @schema.auth()
    class Token:
        def get(self, case: Any, context: Any) -> str | None:
            return d.token

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    @schema.hook
    def flatmap_path_parameters(context: Any, params: dict[str, Any] | None) -> Any:
        return _real_records(params)

    return schema


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


def test_document_names_operations_for_code_generators_and_the_real_429s(
    openapi_document: dict[str, Any],
) -> None:
    """operationIds are identifiers (they held the route's `{name:docname}`), and only the
    routes the rate limit counts say 429 (not /health, not a heartbeat)."""
    ops = [
        (path, method, op)
        for path, methods in openapi_document["paths"].items()
        for method, op in methods.items()
    ]
    ids = [op["operationId"] for _, _, op in ops]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", i) for i in ids), ids
    exempt = {(p, m) for p, m, op in ops if "429" not in op["responses"]}
    assert exempt == {("/health", "get"), ("/api/connections/{id}/heartbeat", "post")}


def test_every_route_that_stores_says_409() -> None:
    """A route that stores anything answers 409 `file_invalid` while the file it would write
    is invalid on disk (a connection test stores its result in connection-state.json)."""
    from ctsd.web.api import ENDPOINTS

    silent = [
        (e.method, e.path) for e in ENDPOINTS if (e.write or e.stores) and 409 not in e.errors
    ]
    assert silent == []


def test_document_create_is_201_with_location(openapi_document: dict[str, Any]) -> None:
    created = openapi_document["paths"]["/api/settings/connections"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    assert "X-Revision" in created["headers"]


def test_the_codes_a_body_or_method_slip_gets_are_documented_on_every_route(
    target: Target, openapi_document: dict[str, Any]
) -> None:
    """A body not JSON, or too large, sent to a route that takes none, and a method the path
    lacks, are answered 415, 413 and 405: each operation lists them (a generated client or a
    contract check took them for undocumented)."""
    import httpx

    d = target.daemon
    auth = {"Authorization": f"Bearer {d.token}"}
    cases = [
        ("post", "/api/connections/{id}/heartbeat", "/api/connections/x/heartbeat", "x", 415),
        ("get", "/api/settings/connections", "/api/settings/connections", "x" * (2 << 20), 413),
        ("put", "/api/data/{name}", "/api/data/ui-config", None, 405),
    ]
    for method, templ, path, body, status in cases:
        got = httpx.request(
            "DELETE" if status == 405 else method.upper(),
            d.url + path,
            content=body,
            headers={**auth, "Content-Type": "text/plain"},
        ).status_code
        assert got == status, (path, got)
        assert str(status) in openapi_document["paths"][templ][method]["responses"], templ
    for ops_ in openapi_document["paths"].values():
        for op in ops_.values():
            assert {"405", "413", "415"} <= set(op["responses"]), op["operationId"]


def test_document_says_sync_on_a_heartbeat_is_taken_and_changes_nothing(
    openapi_document: dict[str, Any],
) -> None:
    """A client sending `?sync=files` with every write gets it taken on a heartbeat too
    (answered at once): the document lists it there, and says it writes nothing at once."""
    beat = _query(openapi_document, "/api/connections/{id}/heartbeat", "post", "sync")
    assert "heartbeat_flush_s" in beat["description"]


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


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz(case: Any, target: Target) -> None:
    # No shared session: each request is its own keep-alive connection, so the per-connection
    # rate limit never locks the fuzz out (the settings document is fuzzed like any other, and
    # a write of it resets the limit to its default); a 429 fails the run afterwards.
    response = case.call_and_validate(checks=CHECKS, timeout=60)
    # The slowest route is a connection test, bounded by test_timeout_s (10 s by default).
    assert response.elapsed < ANSWER_WITHIN_S, f"{case.method} {case.formatted_path} was slow"
    target.cases += 1
    target.statuses[response.status_code] += 1
    target.by_op[f"{case.method} {case.path}"][response.status_code] += 1
    assert CANARY not in response.text, f"secret in {case.method} {case.formatted_path}"
    if 200 <= response.status_code < 300 and (
        case.method == "DELETE" or case.path == "/api/data/import"
    ):
        target.restore_seed()


def _export(d: Daemon) -> dict[str, Any]:
    r = httpx.get(f"{d.url}/api/data/export", headers=_auth(d), timeout=10)
    assert r.status_code == 200
    out = r.json()
    out.pop("exported_at")
    return out


def _verify(data_dir: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ctsd", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.anyio
async def test_after_the_fuzz_data_intact_and_daemon_serves(target: Target) -> None:
    if target.cases == 0:
        pytest.skip("checks what test_fuzz left behind: run the module, not this test alone")
    d = target.daemon
    assert target.statuses[429] == 0, "the fuzz was rate limited: routes went untested"
    # Every operation was reached past its refusals at least once (schemathesis leaves out the
    # one that served the document itself; the document tests above fetch that one).
    succeeded = {op for op, counts in target.by_op.items() if any(c < 300 for c in counts)}
    promised = {f"{m.upper()} {path}" for path, ms in PROMISED_ROUTES.items() for m in ms}
    promised.discard("GET /openapi.json")
    assert promised - succeeded == set(), {op: target.by_op[op] for op in promised}
    code, health = d.http("/health", token=None)
    assert code == 200 and health["status"] in ("ok", "degraded"), health
    async with bus(d) as b:
        assert (await b.call("ping"))["success"] is True
    assert d.http("/api/settings/connections")[0] == 200
    _verify(d.data_dir)  # while running: every write was atomic

    before = _export(d)
    assert d.stop() == 0, d.stderr()
    _verify(d.data_dir)
    out = d.stdout() + d.stderr()
    assert CANARY not in out
    logs = [p for p in (d.data_dir / "logs").rglob("*") if p.is_file()]
    for path in [d.data_dir / "connection-sync-log.json", *logs]:
        assert CANARY not in path.read_text(errors="replace"), path
    assert "Traceback" not in out
    failed = [e for e in d.log_events() if e.get("event") == "http_route_failed"]
    assert failed == []

    again = Daemon(d.data_dir).start()
    try:
        assert _export(again) == before, "a restart serves what was served before it"
    finally:
        again.close()
