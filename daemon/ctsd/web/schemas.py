"""Shapes only HTTP has: bodies of the per-connection routes and the answers that are not a
record of the data files. The records themselves (Connection, ConnectionState, SyncEvent,
TestResult) are the models of `ctsd.models`; `ctsd.web.openapi` builds the API's schemas from
both."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ctsd.models import PositiveFactor, Timestamp, TradingSection


class ActiveBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    active: bool


class VolumeBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    live: PositiveFactor | None = None
    preset: PositiveFactor | None = None


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    path: str | None = None
    oldest: int | None = None
    file: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class Deleted(msgspec.Struct, kw_only=True):
    deleted: str


class Heartbeat(msgspec.Struct, kw_only=True):
    connection_id: str
    timestamp: Timestamp


class ImportResult(msgspec.Struct, kw_only=True):
    imported: list[str]
    mode: Literal["replace", "merge"]
    # Secrets the export held masked where nothing is stored (a connection deleted since):
    # imported unset, to be set again. JSON paths into the request.
    secrets_unset: list[str]


class ResetResult(msgspec.Struct, kw_only=True):
    reset: list[str]


class Export(msgspec.Struct, kw_only=True):
    version: int
    exported_at: Timestamp
    revision: int
    files: dict[str, Any]


class ImportBody(msgspec.Struct, kw_only=True):
    """An export of this daemon (`files` is what is imported), or a bare {FILE: CONTENT}."""

    files: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET  # absent in the bare form, never null
    version: int | None = None
    exported_at: str | None = None
    revision: int | None = None


class SecretsAtRest(msgspec.Struct, kw_only=True):
    encrypted: bool  # false: no key configured, secrets stored as plain text
    key_id: str | None  # 8 hex digits naming the key (never the key itself)


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    version: str
    revision: int
    uptime_s: float
    # Each {"ok": bool, ...}; `secrets` {"ok": true, "encrypted", "key_id"} (8 hex digits
    # naming the key, never the key; plain text is a supported mode, not a failed check).
    checks: dict[str, Any]


class BootstrapProjectX(msgspec.Struct, kw_only=True):
    """`connection.json`'s `projectX` without its credentials (seed 003: the client never
    receives them): whether they are set instead."""

    apiUrl: str
    websocketUrl: str
    autoConnect: bool
    credentialsSet: bool


class Bootstrap(msgspec.Struct, kw_only=True):
    version: str
    protocol_version: int
    bus_url: str
    server: dict[str, Any]
    capabilities: dict[str, Any]
    projectX: BootstrapProjectX
    trading: TradingSection  # `connection.json`'s `trading`, as the daemon reads it


class ServerStatus(msgspec.Struct, kw_only=True):
    version: str
    revision: int
    uptime_s: float
    counts: dict[str, int]
    invalid_files: list[str]
    store: dict[str, Any]  # the journal and the checkpoint lag
    bus: dict[str, Any]
    projectx: dict[str, Any]
    secrets: SecretsAtRest
    health: dict[str, Any]  # /health's `status`, and its checks that fail (`failing`)
