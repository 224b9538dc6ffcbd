"""Every message on the bus as a msgspec Struct.

Incoming frames are decoded once into an envelope (`id`, `type`) and the command's arguments
are converted into the command's own Struct, which refuses unknown keys so a typo answers
`invalid` with the JSON path instead of being silently ignored. Outgoing frames are encoded
from Structs; `protocol_schema()` is their JSON Schema (`ctsd schema protocol`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ctsd import diagnose
from ctsd.errors import CtsdError
from ctsd.models import SyncEvent

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024  # a frame over 1 MiB is refused (too_large)
TOPICS = ("connections", "state", "documents", "system")

Topic = Literal["connections", "state", "documents", "system"]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of a command's arguments (everything in the frame but `id` and `type`).

    `source` says who asks, for the sync log: the CLI sends "cli"; everything else is "bus".
    `sync: "files"` asks for the answer only once the change is in the data files (not only
    durable in the journal), so the caller can read the file right after.
    """

    source: Literal["bus", "cli"] = "bus"
    sync: Literal["files"] | None = None


# --- client → server ------------------------------------------------------------------------


class Auth(Args, kw_only=True):
    token: str


class NoArgs(Args):
    pass


# A subscription's filter is held as long as it lasts: 40,000 ids in one frame held 7 MB per
# connection. (A dashboard that wants more leaves the filter out.)
MAX_FILTER_IDS = 1000
FilterId = Annotated[str, msgspec.Meta(max_length=128)]


class Subscribe(Args, kw_only=True):
    topics: list[Topic] | None = None
    since: NonNegative | None = None
    connection_ids: Annotated[list[FilterId], msgspec.Meta(max_length=MAX_FILTER_IDS)] | None = None


class SyncLogGet(Args, kw_only=True):
    since: NonNegative | None = None  # None: the newest `limit` retained entries
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000


class ConnectionsList(Args, kw_only=True):
    exchange: str | None = None
    enabled: bool | None = None
    active: bool | None = None


class ConnectionRef(Args, kw_only=True):
    connection_id: str


class ConnectionsCreate(Args, kw_only=True):
    connection: dict[str, Any]


class ConnectionsUpdate(Args, kw_only=True):
    connection_id: str
    changes: dict[str, Any]


class ConnectionsBatchUpdate(Args, kw_only=True):
    updates: list[dict[str, Any]]


class ConnectionsSetActive(Args, kw_only=True):
    connection_id: str
    active: bool


class ConnectionsSetVolume(Args, kw_only=True):
    connection_id: str
    live: float | None = None
    preset: float | None = None


class DocumentsGet(Args, kw_only=True):
    name: str


class DocumentsSet(Args, kw_only=True):
    name: str
    content: dict[str, Any]


class DataImport(Args, kw_only=True):
    data: dict[str, Any]
    mode: Literal["replace", "merge"]  # required: a default would make replacing too easy


class DataReset(Args, kw_only=True):
    confirm: bool = False


class DataRestore(Args, kw_only=True):
    file: str  # a `.restore-*.tar.gz` the CLI put in the data dir


class SecretsRekey(Args, kw_only=True):
    # The new key as a key file holds it (base64 text): the daemon cannot read the operator's
    # key file (it runs sandboxed, as its own user). Named like a secret, so never logged.
    secrets_key: str


# Command name → argument Struct. The set of names is the protocol; handlers live in commands.py.
COMMANDS: dict[str, type[Args]] = {
    "ping": NoArgs,
    "status": NoArgs,
    "snapshot": NoArgs,
    "subscribe": Subscribe,
    "unsubscribe": NoArgs,
    "sync_log.get": SyncLogGet,
    "connections.list": ConnectionsList,
    "connections.get": ConnectionRef,
    "connections.create": ConnectionsCreate,
    "connections.update": ConnectionsUpdate,
    "connections.delete": ConnectionRef,
    "connections.batch_update": ConnectionsBatchUpdate,
    "connections.set_active": ConnectionsSetActive,
    "connections.set_volume": ConnectionsSetVolume,
    "connections.heartbeat": ConnectionRef,
    "connections.test": ConnectionRef,
    "documents.list": NoArgs,
    "documents.get": DocumentsGet,
    "documents.set": DocumentsSet,
    "data.export": NoArgs,
    "data.import": DataImport,
    "data.reset": DataReset,
    "trading.test_connection": NoArgs,
    "secrets.rekey": SecretsRekey,
    "data.backup": NoArgs,
    "data.restore": DataRestore,
}


# Commands that change something (the CLI asks for each to be in the files before the answer).
WRITE_COMMANDS = frozenset(
    {
        "connections.create",
        "connections.update",
        "connections.delete",
        "connections.batch_update",
        "connections.set_active",
        "connections.set_volume",
        "documents.set",
        "data.import",
        "data.reset",
        "secrets.rekey",
        "data.restore",
    }
)


# --- server → client ------------------------------------------------------------------------


class AuthRequired(msgspec.Struct, tag="auth_required", tag_field="type"):
    version: int


class AuthOk(msgspec.Struct, tag="auth_ok", tag_field="type"):
    version: int
    revision: int


class AuthInvalid(msgspec.Struct, tag="auth_invalid", tag_field="type"):
    message: str


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    path: str | None = None
    oldest: int | None = None  # revision_compacted: the oldest retained revision
    file: str | None = None  # file_invalid: the file that blocks the change


class Ok(msgspec.Struct, tag="result", tag_field="type"):
    id: int
    success: Literal[True] = True
    result: Any = None


class Fail(msgspec.Struct, tag="result", tag_field="type"):
    id: int | None
    error: ErrorBody
    success: Literal[False] = False


class Events(msgspec.Struct, tag="events", tag_field="type"):
    events: list[SyncEvent]


class Progress(msgspec.Struct, tag="progress", tag_field="type"):
    revision: int


class Notice(msgspec.Struct, tag="notice", tag_field="type"):
    notice: Literal["file_invalid", "file_restored", "shutting_down"]
    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str | None = None
    message: str | None = None
    reason: str | None = None


ServerMessage = AuthRequired | AuthOk | AuthInvalid | Ok | Fail | Events | Progress | Notice

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def error_body(err: CtsdError) -> ErrorBody:
    extra = err.extra
    oldest = extra.get("oldest")
    file = extra.get("file")
    return ErrorBody(
        code=err.code,
        message=err.message,
        path=err.path,
        oldest=oldest if isinstance(oldest, int) else None,
        file=file if isinstance(file, str) else None,
    )


def encode_fail(msg_id: int | None, err: CtsdError) -> bytes:
    return encode(Fail(id=msg_id, error=error_body(err)))


def parse_args(kind: type[Args], frame: dict[str, Any]) -> Args:
    """The command's arguments from a decoded frame; `invalid` with a JSON path if wrong."""
    body = {k: v for k, v in frame.items() if k != "id" and k != "type"}
    try:
        return msgspec.convert(body, type=kind, strict=True)
    except msgspec.ValidationError as e:
        msg, path = diagnose.explain(str(e), kind)
        raise CtsdError("invalid", msg, path=path) from None


def _frame_schema(args: dict[str, Any], name: str, with_id: bool) -> dict[str, Any]:
    """A client frame: the command's argument object plus the envelope (`id`, `type`)."""
    envelope: dict[str, Any] = {"type": {"const": name}}
    if with_id:
        envelope["id"] = {"type": "integer", "description": "strictly increasing per connection"}
    out = dict(args)
    out["title"] = name
    out["properties"] = {**envelope, **args.get("properties", {})}
    out["required"] = [*envelope, *args.get("required", [])]
    return out


def protocol_schema() -> dict[str, Any]:
    """JSON Schema of every bus message: client frames (auth and each command, with its
    arguments) and every server frame."""
    server_kinds = list(ServerMessage.__args__)  # type: ignore[attr-defined]
    kinds = [*COMMANDS.values(), Auth, *server_kinds]
    schemas, components = msgspec.json.schema_components(kinds)
    commands = {
        name: _frame_schema(components[kind.__name__], name, True)
        for name, kind in COMMANDS.items()
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ctsd bus protocol",
        "version": PROTOCOL_VERSION,
        "client": {
            "auth": _frame_schema(components["Auth"], "auth", False),
            "commands": commands,
        },
        "server": {"anyOf": schemas[len(COMMANDS) + 1 :]},
        "$defs": components,
    }
