"""The REST API: every route is a thin adapter over the command the bus runs for the same thing.

A route turns its path, query and JSON body into the command's argument Struct, runs the same
handler as the bus (`ctsd.bus.commands`) with source `http`, and answers its result as JSON.
The table `ENDPOINTS` is the API: the Starlette routes and the OpenAPI document are both made
from it.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import msgspec
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctsd import __version__, files
from ctsd.bus import protocol as p
from ctsd.bus import views
from ctsd.bus.commands import HANDLERS, Call
from ctsd.errors import CtsdError
from ctsd.guard import SOURCE_HEADER, well_formed_host
from ctsd.health import health
from ctsd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ctsd.models import Connection, ConnectionState, SyncEvent, TestResult
from ctsd.probes import PROJECTX_DEFAULT_URL, display_url
from ctsd.redact import mask
from ctsd.web import openapi
from ctsd.web import schemas as s
from ctsd.web.body import MAX_BODY_BYTES, MAX_IMPORT_BODY_BYTES, read_json
from ctsd.web.endpoint import Context, Endpoint, Query

if TYPE_CHECKING:
    from ctsd.services import Services

# HTTP status of each error code (the bus codes, plus the refusals only HTTP has).
STATUS_OF: dict[str, int] = {
    "invalid_format": 400,
    "invalid": 400,
    "id_reuse": 400,
    "unknown_command": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "file_invalid": 409,
    "revision_compacted": 409,
    "precondition_failed": 412,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "io_error": 503,
    "internal": 503,
    "unavailable": 503,
}
_encoder = msgspec.json.Encoder()
CUT_AT_STOP = (
    "the daemon stopped before this request finished: a change it made may or may not have "
    "been stored (read it again once the daemon is back); a connection test's result was not"
)


def error_body(err: CtsdError) -> bytes:
    return _encoder.encode({"error": p.error_body(err)})


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(err: CtsdError, headers: dict[str, str] | None = None) -> Response:
    return json_response(STATUS_OF.get(err.code, 503), error_body(err), headers)


async def command(
    ctx: Context, name: str, args: dict[str, Any], body_arg: str | None = None
) -> Any:
    """Run bus command `name` with `args`; a body error's path is given relative to the body."""
    try:
        parsed = p.parse_args(p.COMMANDS[name], args)
        return await HANDLERS[name](ctx.call, parsed)
    except CtsdError as e:
        prefix = f"$.{body_arg}" if body_arg else None
        if (
            prefix
            and e.path is not None
            and (e.path == prefix or e.path.startswith((prefix + ".", prefix + "[")))
        ):
            e.path = "$" + e.path[len(prefix) :]
        raise


def _connection_body(ctx: Context) -> dict[str, Any]:
    if not isinstance(ctx.body, dict):
        raise CtsdError("invalid", "the body must be a JSON object (a connection)", path="$")
    return ctx.body


# --- routes -----------------------------------------------------------------------------------


async def get_health(ctx: Context) -> Any:
    return health(ctx.svc)


async def get_openapi(ctx: Context) -> Any:
    return openapi.document(ENDPOINTS)


async def get_metrics(ctx: Context) -> Any:
    return Response(ctx.svc.render_metrics(), media_type=METRICS_CONTENT_TYPE)


async def bootstrap(ctx: Context) -> Any:
    svc = ctx.svc
    server = svc.store.settings.server
    host = ctx.request.headers.get("host", "")
    if not well_formed_host(host):  # (echoed into a URL: only a host and a port)
        listen = svc.listen.host
        host = f"[{listen}]:{svc.listen.port}" if ":" in listen else f"{listen}:{svc.listen.port}"
    px = svc.prober.projectx_config()  # (as stored: its secrets are not opened)
    # (settings as typed: a CORS origin written with a password shows it masked)
    return mask(
        {
            "version": __version__,
            "protocol_version": p.PROTOCOL_VERSION,
            "bus_url": f"ws://{host}/ws",
            "server": {
                "host": svc.listen.host,
                "port": svc.listen.port,
                "cors_origins": server.cors_origins,
                "rate_limit": msgspec.to_builtins(server.rate_limit),
                "auth": server.auth,
            },
            "capabilities": {
                "commands": sorted(p.COMMANDS),
                "topics": list(p.TOPICS),
                "max_frame_bytes": p.MAX_FRAME_BYTES,
                "max_body_bytes": MAX_BODY_BYTES,
                "max_import_body_bytes": MAX_IMPORT_BODY_BYTES,
                "documents": sorted(svc.store.documents),
            },
            # What seed 003's client bootstraps from `connection.json` ("without sensitive
            # data"): its Project X endpoints and trading settings.
            "projectX": msgspec.to_builtins(
                s.BootstrapProjectX(
                    # (an empty one: the default the daemon uses; shown empty, not `://?`)
                    apiUrl=display_url(px.projectX.apiUrl or PROJECTX_DEFAULT_URL),
                    websocketUrl=display_url(px.projectX.websocketUrl)
                    if px.projectX.websocketUrl
                    else "",
                    autoConnect=px.projectX.autoConnect,
                    credentialsSet=bool(px.projectX.username and px.projectX.apiKey),
                )
            ),
            "trading": msgspec.to_builtins(px.trading),
        }
    )


async def server_status(ctx: Context) -> Any:
    return await command(ctx, "status", {})


async def test_projectx(ctx: Context) -> Any:
    return await command(ctx, "trading.test_connection", {})


async def list_connections(ctx: Context) -> Any:
    return await command(ctx, "connections.list", ctx.query)


async def create_connection(ctx: Context) -> Any:
    conn = await command(
        ctx, "connections.create", {"connection": _connection_body(ctx)}, "connection"
    )
    ctx.status = 201
    ctx.headers["Location"] = f"/api/settings/connections/{conn['id']}"
    return conn


async def get_connection(ctx: Context) -> Any:
    return await command(ctx, "connections.get", {"connection_id": ctx.connection_id()})


async def update_connection(ctx: Context) -> Any:
    cid = ctx.connection_id()
    return await command(
        ctx,
        "connections.update",
        {"connection_id": cid, "changes": _connection_body(ctx)},
        "changes",
    )


async def delete_connection(ctx: Context) -> Any:
    return await command(ctx, "connections.delete", {"connection_id": ctx.connection_id()})


async def batch_update(ctx: Context) -> Any:
    if not isinstance(ctx.body, list):
        raise CtsdError("invalid", 'the body must be an array of {"id", ...changes}', path="$")
    return await command(ctx, "connections.batch_update", {"updates": ctx.body}, "updates")


async def active_connections(ctx: Context) -> Any:
    return await command(ctx, "connections.list", {"active": True})


async def all_state(ctx: Context) -> Any:
    return views.state(ctx.svc.store)


async def one_state(ctx: Context) -> Any:
    return views.state_of(ctx.svc.store, ctx.connection_id())


async def set_active(ctx: Context) -> Any:
    body: s.ActiveBody = ctx.body
    return await command(
        ctx, "connections.set_active", {"connection_id": ctx.connection_id(), "active": body.active}
    )


async def set_volume(ctx: Context) -> Any:
    body: s.VolumeBody = ctx.body
    args: dict[str, Any] = {"connection_id": ctx.connection_id()}
    args.update({k: v for k, v in (("live", body.live), ("preset", body.preset)) if v is not None})
    return await command(ctx, "connections.set_volume", args)


async def heartbeat(ctx: Context) -> Any:
    return await command(ctx, "connections.heartbeat", {"connection_id": ctx.connection_id()})


async def test_connection(ctx: Context) -> Any:
    return await command(ctx, "connections.test", {"connection_id": ctx.connection_id()})


async def sync_log(ctx: Context) -> Any:
    return await command(ctx, "sync_log.get", ctx.query)


def _document_name(ctx: Context) -> str:
    name = ctx.path["name"]
    try:
        files.document_file(name)
    except KeyError:
        known = ", ".join([*files.DOCUMENTS, "algorithms/NAME"])
        raise CtsdError(
            "not_found", f"no document {name!r}; documents: {known}", path="$.name"
        ) from None
    return name


async def get_document(ctx: Context) -> Any:
    return await command(ctx, "documents.get", {"name": _document_name(ctx)})


async def set_document(ctx: Context) -> Any:
    return await command(
        ctx, "documents.set", {"name": _document_name(ctx), "content": ctx.body}, "content"
    )


async def export(ctx: Context) -> Any:
    return await command(ctx, "data.export", {})


async def import_data(ctx: Context) -> Any:
    if not isinstance(ctx.body, dict):
        raise CtsdError("invalid", "the body must be an export (a JSON object)", path="$")
    mode = ctx.query.get("mode", "merge")
    out = await command(ctx, "data.import", {"data": ctx.body, "mode": mode}, "data")
    # (paths into the body, as an error's are)
    out["secrets_unset"] = ["$" + u.removeprefix("$.data") for u in out["secrets_unset"]]
    return out


async def reset(ctx: Context) -> Any:
    if ctx.query.get("confirm") != "yes":
        raise CtsdError("invalid", "DELETE /api/data/reset needs ?confirm=yes", path="$.confirm")
    return await command(ctx, "data.reset", {"confirm": True})


def _arg_type(args: type[msgspec.Struct], name: str) -> Any:
    """The type a command gives one of its arguments: a query parameter that fills it is
    documented as the command checks it."""
    return next(f.type for f in msgspec.structs.fields(args) if f.name == name)


def _base(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


_CONN = "/api/settings/connections"
_QUERY_FILTERS = (
    Query("exchange", str, "only connections of this exchange"),
    Query("enabled", bool, "only enabled (true) or disabled (false) connections"),
    Query("active", bool, "only active (enabled and is_active) connections, or only the others"),
)
_CONN_ERRORS = (400, 404, 409, 412, 413, 415)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/health",
        "Health of the daemon and its data files",
        get_health,
        s.Health,
        auth=False,
        tag="system",
    ),
    Endpoint("GET", "/openapi.json", "This document", get_openapi, dict[str, Any], tag="system"),
    Endpoint("GET", "/metrics", "Prometheus metrics (text format)", get_metrics, tag="system"),
    Endpoint(
        "GET",
        "/api/trading/connection",
        "Bootstrap: bus URL, server settings, capabilities, Project X endpoints (no "
        "credentials), trading settings",
        bootstrap,
        s.Bootstrap,
        tag="trading",
    ),
    Endpoint(
        "GET",
        "/api/trading/server-status",
        "Status: counts, bus, Project X connection",
        server_status,
        s.ServerStatus,
        tag="trading",
    ),
    Endpoint(
        "POST",
        "/api/trading/test-connection",
        "Test the Project X connection now",
        test_projectx,
        TestResult,
        tag="trading",
    ),
    Endpoint(
        "GET",
        _CONN,
        "All connections (secrets masked)",
        list_connections,
        list[Connection],
        queries=_QUERY_FILTERS,
        tag="connections",
    ),
    Endpoint(
        "POST",
        _CONN,
        "Create a connection (`id` optional)",
        create_connection,
        Connection,
        status=201,
        body=dict[str, Any],
        write=True,
        tag="connections",
        errors=_CONN_ERRORS,
        notes="create",
    ),
    Endpoint(
        "POST",
        _CONN + "/batch",
        "Update several connections, all or nothing",
        batch_update,
        list[Connection],
        body=list[dict[str, Any]],
        write=True,
        tag="connections",
        errors=_CONN_ERRORS,
        notes="batch",
    ),
    Endpoint(
        "GET",
        _CONN + "/{id}",
        "One connection (secrets masked)",
        get_connection,
        Connection,
        tag="connections",
        errors=(404,),
    ),
    Endpoint(
        "PUT",
        _CONN + "/{id}",
        "Update a connection with the fields given",
        update_connection,
        Connection,
        body=dict[str, Any],
        write=True,
        tag="connections",
        errors=_CONN_ERRORS,
        notes="update",
    ),
    Endpoint(
        "PATCH",
        _CONN + "/{id}",
        "Update a connection with the fields given",
        update_connection,
        Connection,
        body=dict[str, Any],
        write=True,
        tag="connections",
        errors=_CONN_ERRORS,
        notes="update",
    ),
    Endpoint(
        "DELETE",
        _CONN + "/{id}",
        "Delete a connection",
        delete_connection,
        s.Deleted,
        write=True,
        tag="connections",
        errors=(404, 409, 412),
    ),
    Endpoint(
        "GET",
        "/api/connections/active",
        "Active connections (enabled and is_active)",
        active_connections,
        list[Connection],
        tag="connections",
    ),
    Endpoint(
        "GET",
        "/api/connections/state",
        "Runtime state of every connection",
        all_state,
        list[ConnectionState],
        tag="state",
    ),
    Endpoint(
        "GET",
        "/api/connections/{id}/state",
        "Runtime state of one connection",
        one_state,
        ConnectionState,
        tag="state",
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/api/connections/{id}/active",
        "Switch a connection active or inactive",
        set_active,
        Connection,
        body=s.ActiveBody,
        typed_body=True,
        write=True,
        tag="state",
        errors=_CONN_ERRORS,
    ),
    Endpoint(
        "POST",
        "/api/connections/{id}/volume",
        "Set the live and/or preset volume factor",
        set_volume,
        Connection,
        body=s.VolumeBody,
        typed_body=True,
        write=True,
        tag="state",
        errors=_CONN_ERRORS,
    ),
    Endpoint(
        "POST",
        "/api/connections/{id}/heartbeat",
        "Heartbeat (no body; no disk write)",
        heartbeat,
        s.Heartbeat,
        tag="state",
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/api/connections/{id}/test",
        "Test the connection now",
        test_connection,
        TestResult,
        stores=True,
        tag="state",
        errors=(404, 409),  # 409: connection-state.json, where the result goes, is invalid
    ),
    Endpoint(
        "GET",
        "/api/sync-log",
        "Sync-log entries, oldest first",
        sync_log,
        list[SyncEvent],
        queries=(
            Query(
                "since", p.NonNegative, "entries after this revision (default: the newest `limit`)"
            ),
            Query(
                "limit",
                _arg_type(p.SyncLogGet, "limit"),
                "at most this many entries (1-100000, default 1000)",
            ),
        ),
        tag="sync log",
        errors=(400, 409),
    ),
    Endpoint(
        "GET", "/api/data/export", "Every data file, secrets masked", export, s.Export, tag="data"
    ),
    Endpoint(
        "POST",
        "/api/data/import",
        "Import an export (merge or replace)",
        import_data,
        s.ImportResult,
        body=s.ImportBody,
        max_body=MAX_IMPORT_BODY_BYTES,
        write=True,
        queries=(Query("mode", _arg_type(p.DataImport, "mode"), "merge (default) or replace"),),
        tag="data",
        errors=(400, 409, 412, 413, 415),
    ),
    Endpoint(
        "DELETE",
        "/api/data/reset",
        "Empty connections and state, documents to defaults",
        reset,
        s.ResetResult,
        write=True,
        queries=(Query("confirm", Literal["yes"], "must be `yes`", required=True),),
        tag="data",
        errors=(400, 409, 412),
    ),
    Endpoint(
        "GET",
        "/api/data/{name:docname}",
        "A document",
        get_document,
        dict[str, Any],
        tag="documents",
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/api/data/{name:docname}",
        "Replace a document",
        set_document,
        dict[str, Any],
        body=dict[str, Any],
        write=True,
        tag="documents",
        errors=(400, 404, 409, 412, 413, 415),
    ),
    Endpoint(
        "PUT",
        "/api/data/{name:docname}",
        "Replace a document",
        set_document,
        dict[str, Any],
        body=dict[str, Any],
        write=True,
        tag="documents",
        errors=(400, 404, 409, 412, 413, 415),
    ),
)

IF_MATCH_HEADER = "If-Match"
# The ASGI scope key under which a change's route leaves the revision right after it.
REVISION_SCOPE = "ctsd.revision"


def _parse_query(ep: Endpoint, request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {q.name: q for q in ep.queries}
    for name in request.query_params:
        # `sync` is taken by every route that may change something (a no-op where nothing is)
        if name not in known and not (ep.method != "GET" and name == "sync"):
            raise CtsdError("invalid", f"unknown query parameter {name!r}", path=f"$.{name}")
    for q in ep.queries:
        values = request.query_params.getlist(q.name)
        if not values:
            continue
        text = values[-1]
        out[q.arg or q.name] = _convert_query(q, text)
    return out


def _convert_query(q: Query, text: str) -> Any:
    if q.type is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise CtsdError("invalid", f"?{q.name} must be true or false", path=f"$.{q.name}")
    if _base(q.type) is int:  # the command checks the range
        # As written in a URL: ASCII digits (`int` takes "٣", "1_0", "+5" and spaces too).
        if _QUERY_INT.fullmatch(text) is None:
            raise CtsdError(
                "invalid", f"?{q.name} must be an integer (up to 18 digits)", path=f"$.{q.name}"
            )
        return int(text)
    return text


_QUERY_INT = re.compile(r"-?[0-9]{1,18}")


def _if_match(request: Request) -> int | None:
    value = request.headers.get(IF_MATCH_HEADER)
    if value is None:
        return None
    tag = value.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"')
    if not (tag.isascii() and tag.isdigit()) or len(tag) > 18:  # (`isdigit` takes "²" too)
        raise CtsdError("invalid", 'If-Match must be a revision in quotes, like "42"', path="$")
    return int(tag)


def _sync(ep: Endpoint, request: Request) -> str | None:
    value = request.query_params.get("sync")
    if value is None or ep.method == "GET":  # (a read takes none: an unknown parameter)
        return None
    if value != "files":  # (a value it ignored passed for one it took)
        raise CtsdError("invalid", "?sync must be `files`", path="$.sync")
    return value if ep.write or ep.stores else None  # (storing nothing: nothing to wait for)


def make_route(svc: Services, path: str, eps: list[Endpoint]) -> Route:
    """One Starlette route per path, dispatching on the method (so a 405 names every method
    the path has in `Allow`)."""
    by_method = {ep.method: ep for ep in eps}
    if "GET" in by_method:
        by_method.setdefault("HEAD", by_method["GET"])

    async def endpoint(request: Request) -> Response:
        ep = by_method[request.method]
        try:
            call = Call(
                svc,
                "cli" if request.headers.get(SOURCE_HEADER) == "cli" else "http",
                sync=_sync(ep, request),
                if_match=_if_match(request) if ep.write else None,
            )
            ctx = Context(svc, request, call, dict(request.path_params), _parse_query(ep, request))
            if ep.body is not None:
                ctx.body = await read_json(request, required=True, limit=ep.max_body)
                if ep.typed_body:
                    ctx.body = _validate_body(ep.body, ctx.body)
            else:
                await read_json(request, required=False)  # size and type limits apply anyway
            result = await ep.run(ctx)
            if call.revision is not None:  # X-Revision: this change's, not a later one's
                request.scope[REVISION_SCOPE] = call.revision
        except CtsdError as e:
            headers = {"Connection": "close"} if e.code == "too_large" else None
            return error_response(e, headers)
        except asyncio.CancelledError:
            # The HTTP server cancels what still runs when the daemon's stop grace ends (a
            # connection test waiting on a slow exchange): its caller gets this JSON answer,
            # not the server's plain-text 500. Only that one cancellation is taken back.
            task = asyncio.current_task()
            if task is None or task.uncancel() > 0:
                raise
            return error_response(CtsdError("io_error", CUT_AT_STOP))
        if isinstance(result, Response):
            return result
        return json_response(ctx.status or ep.status, _encoder.encode(result), ctx.headers)

    return Route(path, endpoint, methods=list(by_method), name=path)


def _validate_body(kind: Any, body: Any) -> Any:
    from ctsd import diagnose

    try:
        return msgspec.convert(body, kind, strict=True)
    except msgspec.ValidationError as e:
        msg, path = diagnose.explain(str(e), kind)
        raise CtsdError("invalid", msg, path=path) from None


def endpoints_by_path() -> dict[str, list[Endpoint]]:
    """The table grouped by path, in the table's order (specific paths before `{name}`)."""
    out: dict[str, list[Endpoint]] = {}
    for ep in ENDPOINTS:
        out.setdefault(ep.path, []).append(ep)
    return out


class DocName(Convertor[str]):
    """A document name in a path: anything (algorithms/NAME has a slash) but the names of the
    data routes beside it, so `POST /api/data/export` is a 405, not a document called export."""

    # [\s\S], not `.`: a name ending in a newline must reach the name check whole (with `.`
    # the route's `$` matched before the newline and `x%0A` became the document `x`).
    regex = r"(?!(?:export|import|reset)\Z)[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("docname", DocName())


def routes(svc: Services) -> list[Route]:
    return [make_route(svc, path, eps) for path, eps in endpoints_by_path().items()]
