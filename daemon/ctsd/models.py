"""Every shape on disk, as msgspec Structs (field order = the seeds' order = file order).

Typed records (Connection, ConnectionState, SyncEvent, Instance) refuse unknown keys. The
sections of `connection.json`, `settings.json` and `algorithms/*.json` are typed only where the
daemon reads them; their other keys belong to the trading app and are kept as written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ctsd.timeutil import ID_PATTERN, TIMESTAMP_PATTERN

Timestamp = Annotated[
    str, msgspec.Meta(pattern=TIMESTAMP_PATTERN, examples=["2024-01-01T00:00:00.000Z"])
]
ConnectionId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
PositiveFactor = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class Record(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of the typed records: unknown keys are an error that names the nearest key."""


class Connection(Record, kw_only=True):
    """One exchange connection (seed 000, `connections.json`)."""

    id: ConnectionId
    user_id: int = 1
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    exchange: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    exchange_id: int | None = None
    api_type: str = "perpetual_futures"
    connection_method: str = "rest"
    connection_library: str = "rest"
    api_key: str | None = None
    api_secret: str | None = None
    api_passphrase: str | None = None
    margin_type: str = "cross"
    position_mode: str = "hedge"
    is_testnet: bool = False
    is_enabled: bool = True
    is_live_trade: bool = False
    is_preset_trade: bool = False
    is_active: bool = False
    is_predefined: bool = False
    volume_factor: PositiveFactor = 1.0
    connection_settings: str = "{}"
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None


class TestResult(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    __test__ = False  # not a pytest class

    success: bool
    latency: int | float | None
    timestamp: Timestamp
    error: str | None = None


Status = Literal["active", "stale", "inactive"]


class ConnectionState(Record, kw_only=True):
    """Runtime state of one connection (seed 000, `connection-state.json`)."""

    connection_id: ConnectionId
    is_active: bool = False
    volume_factor_live: PositiveFactor = 1.0
    volume_factor_preset: PositiveFactor = 1.0
    test_results: TestResult | None = None
    last_sync_at: Timestamp | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    last_heartbeat_at: Timestamp | None = None
    status: Status = "inactive"


Action = Literal[
    "create",
    "update",
    "delete",
    "set_active",
    "update_volume",
    "stale",
    "recovered",
    "test",
    "document_update",
    "import",
    "reset",
]
Source = Literal["bus", "http", "cli", "file", "sweep", "probe"]


class SyncEvent(Record, kw_only=True):
    """One sync-log entry; `id` is the revision (seed 000, `connection-sync-log.json`)."""

    id: Annotated[int, msgspec.Meta(ge=1)]
    connection_id: str | None
    action: Action
    data: dict[str, Any]
    created_at: Timestamp


# --- seed 003: connection.json -------------------------------------------------------------


class Section(msgspec.Struct, kw_only=True):
    """A section typed only where the daemon reads it; unknown keys are kept in the file."""


class ProjectX(Section, kw_only=True):
    apiUrl: str = "https://api.topstepx.com"
    websocketUrl: str = "wss://rtc.topstepx.com"
    username: str | None = None
    apiKey: str | None = None
    autoConnect: bool = False


class ServerSection(Section, kw_only=True):
    port: Port = 3587
    corsOrigins: list[str] = msgspec.field(
        default_factory=lambda: ["http://localhost:5173", "http://localhost:5174"]
    )


class TradingSection(Section, kw_only=True):
    defaultCommission: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    simulationMode: bool = True


class ConnectionDoc(Section, kw_only=True):
    """`connection.json`: Project X credentials, server and trading settings (seed 003)."""

    projectX: ProjectX = msgspec.field(default_factory=ProjectX)
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    trading: TradingSection = msgspec.field(default_factory=TradingSection)


class Instance(Record, kw_only=True):
    """One trading instance (seed 003, `instances.json`)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    name: str
    symbol: str
    algorithmName: str
    simulationMode: bool = True


class InstancesDoc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    instances: list[Instance] = msgspec.field(default_factory=list)
    lastSaved: Timestamp | None = None


class Algorithm(Section, kw_only=True):
    """`algorithms/NAME.json`: a free-form strategy object that must carry a `name`."""

    name: Annotated[str, msgspec.Meta(min_length=1)]


# --- settings.json: the keys the daemon reads ---------------------------------


class RateLimit(Section, kw_only=True):
    requests: Annotated[int, msgspec.Meta(ge=1)] = 1000
    window_s: PositiveSeconds = 900.0


class ServerSettings(Section, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 3587
    cors_origins: list[str] = msgspec.field(
        default_factory=lambda: ["http://localhost:5173", "http://localhost:5174"]
    )
    rate_limit: RateLimit = msgspec.field(default_factory=RateLimit)
    # "token": every request but /health needs the bearer token. "loopback": a request from
    # this host (loopback peer, loopback Host, no foreign Origin) needs none.
    auth: Literal["token", "loopback"] = "token"
    # Open connections (HTTP and bus) and bus connections not yet authenticated; both well
    # below the unit's LimitNOFILE, so a flood of sockets never starves the daemon's files.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1024
    max_unauthenticated: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 64


class WatchSettings(Section, kw_only=True):
    # inotify does not work on most network filesystems: poll there instead.
    polling: bool = False
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 300


class Settings(Section, kw_only=True):
    """The daemon's view of `settings.json`; every key optional, other keys kept as written."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    sync_log_limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    heartbeat_flush_s: PositiveSeconds = 5.0
    stale_after_s: PositiveSeconds = 30.0
    sweep_interval_s: PositiveSeconds = 1.0
    test_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    test_timeout_s: PositiveSeconds = 10.0
    watch: WatchSettings = msgspec.field(default_factory=WatchSettings)


JSONObject = dict[str, Any]
