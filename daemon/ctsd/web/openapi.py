"""`GET /openapi.json`: an OpenAPI 3.1 description of every route, made from the route table
(`ctsd.web.api.ENDPOINTS`, handed to `document`) and the msgspec models that validate the
requests and shape the answers, so the document cannot drift from what the daemon does."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import msgspec

from ctsd import __version__
from ctsd.bus.ratelimit import http_limited
from ctsd.web import schemas as s
from ctsd.web.endpoint import SYNC_QUERY, Endpoint

REF = "#/components/schemas/{name}"
_ERROR_TEXT = {
    400: "Malformed or invalid input (`invalid_format`, `invalid`)",
    401: "No token, or a wrong one (`unauthorized`)",
    403: "Origin or Host not allowed (`forbidden`)",
    404: "No such record, document or route (`not_found`)",
    405: "The path has no such method (`method_not_allowed`; see `Allow`)",
    409: "Refused: `conflict`, `file_invalid` (the file is invalid on disk), `revision_compacted`",
    412: "`If-Match` failed: what the change touches moved past that revision",
    415: "Body not JSON (`unsupported_media_type`)",
    429: "Rate limited (`rate_limited`)",
    503: (
        "`io_error`, `internal` or `unavailable`: retry later. Nothing was changed, except "
        "for an `unavailable` that says the outcome is unknown (cluster mode): that change "
        "may still reach every host"
    ),
}
_REVISION_HEADER = {
    "X-Revision": {
        "description": "the revision after the request",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def _openapi_path(path: str) -> str:
    return path.replace("{name:docname}", "{name}")


def _parameters(ep: Endpoint) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    path = _openapi_path(ep.path)
    if "{id}" in path:
        out.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "description": "a connection id",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            }
        )
    if "{name}" in path:
        out.append(
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "settings, main-indications, common-indications, connection, "
                "instances, ui-config, user-settings, watchlists, or algorithms/NAME",
                "schema": {"type": "string", "minLength": 1},
            }
        )
    for q in ep.queries:
        out.append(
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "description": q.description,
                "schema": msgspec.json.schema(q.type),
            }
        )
    if ep.method != "GET":
        # (taken by every route that may write, so a client may send it with each; a no-op
        # where nothing reaches the files at once)
        out.append(
            {
                "name": "sync",
                "in": "query",
                "required": False,
                "description": SYNC_QUERY.description
                if ep.write or ep.stores
                else "`files` is taken and changes nothing: this route writes nothing to the "
                "data files at once"
                + (
                    " (a heartbeat reaches connection-state.json every `heartbeat_flush_s`)"
                    if ep.path.endswith("/heartbeat")
                    else ""
                ),
                "schema": {"type": "string", "enum": ["files"]},
            }
        )
    if ep.write:
        out.append(
            {
                "name": "If-Match",
                "in": "header",
                "required": False,
                "description": 'refuse with 412 if what this changes moved past revision N ("N")',
                "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]{1,18}"?$'},
            }
        )
    return out


def _body_schema(ep: Endpoint, schema: dict[str, Any]) -> dict[str, Any]:
    if ep.notes == "create":
        return {"$ref": REF.format(name="ConnectionInput")}
    if ep.notes == "update":
        return {"$ref": REF.format(name="ConnectionChanges")}
    if ep.notes == "batch":
        return {"type": "array", "items": {"$ref": REF.format(name="ConnectionBatchItem")}}
    return schema


@functools.cache
def document(endpoints: tuple[Endpoint, ...]) -> dict[str, Any]:
    kinds: list[Any] = [s.ErrorResponse]
    for ep in endpoints:
        kinds.append(ep.response if ep.response is not None else str)
        kinds.append(ep.body if ep.body is not None else str)
    schemas, components = msgspec.json.schema_components(kinds, ref_template=REF)
    conn = components["Connection"]
    create = copy.deepcopy(conn)
    create["title"] = "ConnectionInput"
    create["description"] = (
        "A new connection: `id` is optional (conn_ + 12 hex digits when left out, null or "
        "empty); "
        "`created_at`/`updated_at` are set by the daemon (sent ones are ignored)."
    )
    create["required"] = [k for k in conn.get("required", []) if k != "id"]
    # A form's empty id field (null or "") is an id left out: one is made.
    create["properties"]["id"] = {
        "anyOf": [conn["properties"]["id"], {"type": "null"}, {"const": ""}],
        "description": "left out, null or empty: conn_ + 12 hex digits",
    }
    changes = copy.deepcopy(conn)
    changes["title"] = "ConnectionChanges"
    changes["description"] = (
        "The fields to change; a whole record read back (masked secrets, timestamps and all) "
        "is valid: a masked secret keeps the stored one, timestamps are ignored, and `id` "
        "must be the record's own."
    )
    changes.pop("required", None)
    for shape in (create, changes):
        for name in ("created_at", "updated_at"):  # any value: the daemon sets them
            shape["properties"][name] = {
                "description": "set by the daemon; a value sent is ignored"
            }
    batch_item = copy.deepcopy(changes)
    batch_item["title"] = "ConnectionBatchItem"
    batch_item["description"] = "The `id` of a connection and the fields to change."
    batch_item["required"] = ["id"]
    components["ConnectionInput"] = create
    components["ConnectionChanges"] = changes
    components["ConnectionBatchItem"] = batch_item
    error_ref = schemas[0]
    paths: dict[str, dict[str, Any]] = {}
    for i, ep in enumerate(endpoints):
        response_schema = schemas[1 + 2 * i] if ep.response is not None else None
        body_schema = schemas[2 + 2 * i] if ep.body is not None else None
        op: dict[str, Any] = {
            "summary": ep.summary,
            # (from the path as documented: `{name}`, not the route's `{name:docname}`)
            "operationId": re.sub(
                r"[^A-Za-z0-9]+", "_", f"{ep.method.lower()}_{_openapi_path(ep.path)}"
            ).strip("_"),
            "tags": [ep.tag],
            "parameters": _parameters(ep),
        }
        if ep.auth:
            op["security"] = [{"bearer": []}]
        else:
            op["security"] = []
        if body_schema is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _body_schema(ep, body_schema)}},
            }
        ok: dict[str, Any] = {"description": "OK", "headers": _REVISION_HEADER}
        if response_schema is not None:
            ok["content"] = {"application/json": {"schema": response_schema}}
        else:
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        responses: dict[str, Any] = {str(ep.status): ok}
        if ep.notes == "create":
            ok["headers"] = {
                **_REVISION_HEADER,
                "Location": {"description": "the new record", "schema": {"type": "string"}},
            }
        # 405: another method on the path; 413/415: a body too large or not JSON, sent
        # where one is taken or not (it is read and judged either way).
        codes = set(ep.errors) | {400, 403, 405, 413, 415, 503}
        if http_limited(ep.method, ep.path):
            codes.add(429)
        if ep.auth:
            codes.add(401)
        for code in sorted(codes):
            responses[str(code)] = {
                "description": (
                    f"Body over {ep.max_body // (1024 * 1024)} MiB (`too_large`)"
                    if code == 413
                    else _ERROR_TEXT[code]
                ),
                "headers": _REVISION_HEADER,
                "content": {"application/json": {"schema": error_ref}},
            }
        op["responses"] = responses
        paths.setdefault(_openapi_path(ep.path), {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ctsd",
            "version": __version__,
            "description": (
                "The REST API of ctsd: exchange connections, their state, the sync log and "
                "the trading app's documents. Every change goes through the same door as the "
                "websocket bus at /ws and is answered once durable. Send "
                "`Authorization: Bearer TOKEN` (all but /health), JSON bodies up to 1 MiB (an "
                "import: 64 MiB)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
