"""Every shape on disk, as msgspec Structs (field order = the seeds' order = file order).

Typed records (Connection, ConnectionState, SyncEvent, Instance) refuse unknown keys. The
sections of `connection.json`, `settings.json` and `algorithms/*.json` are typed only where the
daemon reads them; their other keys belong to the trading app and are kept as written.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from ctsd.timeutil import ID_PATTERN, TIMESTAMP_PATTERN

Timestamp = Annotated[
    str, msgspec.Meta(pattern=TIMESTAMP_PATTERN, examples=["2024-01-01T00:00:00.000Z"])
]
ConnectionId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
PositiveFactor = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
# An integer every client holds exactly (a bot in Go or Rust decoding int64, a dashboard's
# JavaScript number). Checked at the doors (`ops`), not in the type: a value an earlier
# version took must still load from a file or replay from the journal.
MAX_SAFE_INT = 2**53 - 1
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


# The largest revision: every client must hold one exactly, a dashboard's JavaScript number
# too (a sync log written by hand with a larger id is invalid, not a revision to go on from).
MAX_REVISION = MAX_SAFE_INT


class SyncEvent(Record, kw_only=True):
    """One sync-log entry; `id` is the revision (seed 000, `connection-sync-log.json`)."""

    id: Annotated[int, msgspec.Meta(ge=1, le=MAX_REVISION)]
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
    # (bounded: the bucket's arithmetic is in floats, which a number of 309 digits overflows)
    requests: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 1000
    window_s: PositiveSeconds = 900.0


_NOT_IN_A_HOST = frozenset(" /?#@[]\\")


def check_listen_host(host: str, where: str) -> str:
    """`host` if the daemon can bind it: an IP address, or a name the resolver can encode
    (its own error for a name like `a..b` is no OSError, and a start reported it as a
    traceback). Lenient beyond that: names such as `ctsd_gw` resolve on many hosts."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return host
    try:
        ok = bool(host) and host.encode("idna") is not None
    except UnicodeError:
        ok = False
    if not ok or any(c in _NOT_IN_A_HOST or not c.isprintable() for c in host):
        # (shown as a URL is: one typed with a user and password must not echo them)
        raise ValueError(f"{where} {shown_url(host)!r} is not an IP address or a host name")
    return host


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

    def __post_init__(self) -> None:
        check_listen_host(self.host, "server.host")


class WatchSettings(Section, kw_only=True):
    # inotify does not work on most network filesystems: poll there instead.
    polling: bool = False
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 300


# --- settings.json → cluster: read at start (`ctsd.cluster.config`), checked on every change -
# A hand edit or a `POST /api/data/settings` that would stop the next start is refused now, while
# the operator is there, not found at the next restart. The environment may override the
# URLs and the name, so only what the section itself says is checked here.

# Not ws:// or wss://: nats-py's websocket transport needs aiohttp, which ctsd does not ship.
NATS_SCHEMES = ("nats", "tls")
CLUSTER_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
HOST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NATS_CREDS_CREDENTIAL = "ctsd-nats-creds"
MASK = "********"
DUPLICATE_WINDOW_S = 120.0  # the stream recognizes a retried publish this long
INT64_MAX = 2**63 - 1  # NATS keeps the stream's limits as signed 64-bit numbers,
MAX_AGE_S = 9_000_000_000.0  # the age in nanoseconds: about 285 years

# The cluster engine's state, as `/health` and `/metrics` show it.
ClusterState = Literal[
    "connecting", "connected", "catching_up", "disconnected", "unavailable", "stalled", "closed"
]
CLUSTER_STATES: tuple[str, ...] = get_args(ClusterState)


def check_nats_url(url: str, where: str) -> str:
    """`url` if it is a NATS server URL ctsd connects to; raises ValueError naming `where`
    and showing the URL with anything that may be a credential masked."""
    if not url:
        raise ValueError(f"{where} is empty: give a URL like nats://host:4222")
    shown = shown_url(url)  # every message shows this: a URL may hold a password by mistake
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # (its text may quote a piece of a password)
        raise ValueError(
            f"{where} {shown!r} is not a valid URL (a host, and a port from 1 to 65535)"
        ) from None
    put_them = (
        f"put credentials in CTSD_CLUSTER_CREDS_FILE or the systemd credential "
        f"{NATS_CREDS_CREDENTIAL}"
    )
    if "@" in url:
        raise ValueError(
            f"{where} {shown!r} holds credentials: URLs are shown in status and logs, so "
            + put_them
        )
    if parts.scheme not in NATS_SCHEMES:
        raise ValueError(
            f"{where} {shown!r} has scheme {parts.scheme or '(none)'!r}: use one of "
            + ", ".join(f"{s}://" for s in NATS_SCHEMES)
            + " (the servers' client port, not their websocket port)"
        )
    if not parts.hostname:
        raise ValueError(f"{where} {shown!r} names no host: give nats://host:4222")
    if port == 0:
        raise ValueError(f"{where} {shown!r}: port 0 is not a port")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(
            f"{where} {shown!r} has a query or fragment: NATS takes none, and one may hold a "
            "token; " + put_them
        )
    if parts.path not in ("", "/"):
        raise ValueError(f"{where} {shown!r}: a {parts.scheme}:// URL has no path")
    return url


def shown_url(url: str) -> str:
    """The URL with everything that may be user info masked (for error messages): up to the
    last `@`, whatever the scheme or its typos, and any query or fragment."""
    at = url.rfind("@") + 1
    cut = min((i for i in (url.find("?", at), url.find("#", at)) if i >= 0), default=-1)
    if cut >= 0:
        url = url[: cut + 1] + MASK
    if "@" not in url:
        return url
    scheme, sep, _ = url.partition("://")
    head = f"{scheme}://" if sep and "@" not in scheme else ""
    return f"{head}{MASK}@{url.rsplit('@', 1)[1]}"


def check_cluster_name(name: str, where: str) -> str:
    return _check_id(name, where, CLUSTER_NAME_PATTERN, "cluster name", _NAME_RULE)


def check_host_id(host_id: str, where: str) -> str:
    return _check_id(host_id, where, HOST_ID_PATTERN, "host id", _HOST_RULE)


_NAME_RULE = "1 to 32 letters, digits, '_' or '-' (it becomes part of a JetStream stream name)"
_HOST_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def _check_id(value: str, where: str, pattern: str, what: str, rule: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{where} {value!r} is not a valid {what}: use {rule}")
    return value


class ClusterSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`settings.json` → `cluster`: every key optional; no URLs means cluster mode is off."""

    nats_urls: list[str] | None = None
    name: str | None = None
    host_id: str | None = None
    # Replicas of the change stream (3 on a 3-node NATS cluster; 1 on a single server).
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 3
    # How much history the stream keeps; a host further behind than this needs a snapshot.
    max_msgs: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] = 1_000_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024, le=INT64_MAX)] = 256 * 1024 * 1024
    max_age_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_AGE_S)] = 0.0  # 0: no age limit
    # How long a write may wait for the engine (a leader election, a reconnect) before
    # it is answered `unavailable`. nats-server elects a new stream leader after 4-9 s
    # without one (its raft election timeout), again when the votes split: 10 s covers
    # the usual election. At most 12 s: a write may wait about twice this (publish, then
    # another host's change to catch up with) and the CLI waits 30 s for its answer.
    publish_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=12)] = 10.0
    # How often a host puts a snapshot of the shared state in the snapshot bucket: after this
    # many stream messages (default: the lesser of 10,000 and a quarter of max_msgs, so one
    # is always there before the stream forgets), and after this many seconds with news.
    snapshot_every_msgs: Annotated[int, msgspec.Meta(ge=1)] | None = None
    snapshot_every_s: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 300.0

    def __post_init__(self) -> None:
        if self.nats_urls == []:
            raise ValueError("cluster.nats_urls is an empty list: give at least one nats:// URL")
        if self.nats_urls is not None:
            self.nats_urls = [
                check_nats_url(u.strip(), f"cluster.nats_urls[{i}]")
                for i, u in enumerate(self.nats_urls)
            ]
        if self.name is not None:
            check_cluster_name(self.name, "cluster.name")
        if self.host_id is not None:
            check_host_id(self.host_id, "cluster.host_id")
        if 0 < self.max_age_s < DUPLICATE_WINDOW_S:
            raise ValueError(
                f"cluster.max_age_s {self.max_age_s:g} is too short: use 0 (no age limit) or "
                f"at least {DUPLICATE_WINDOW_S:g} s, the window in which a retried write is "
                "recognized"
            )
        if self.max_age_s and self.snapshot_every_s > self.max_age_s / 2:
            raise ValueError(
                f"cluster.snapshot_every_s {self.snapshot_every_s:g} is too long for "
                f"cluster.max_age_s {self.max_age_s:g}: use at most half of it, so that a "
                "snapshot is taken well before the stream forgets the messages after the "
                "previous one"
            )
        every = self.snapshot_every_msgs
        if every is not None and every > self.max_msgs // 2:
            raise ValueError(
                f"cluster.snapshot_every_msgs {every} is too large for cluster.max_msgs "
                f"{self.max_msgs}: use at most half of it, so that a snapshot is taken well "
                "before the stream forgets the messages after the previous one"
            )


MIN_PERIOD_S = 0.001


class Settings(Section, kw_only=True):
    """The daemon's view of `settings.json`; every key optional, other keys kept as written."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    sync_log_limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    # Floors (1 ms): a loop run as fast as the machine goes (1e-300 s) took a whole core,
    # flipped connections between stale and active, or probed exchanges into a ban.
    heartbeat_flush_s: Annotated[float, msgspec.Meta(ge=MIN_PERIOD_S)] = 5.0
    stale_after_s: Annotated[float, msgspec.Meta(ge=MIN_PERIOD_S)] = 30.0
    sweep_interval_s: Annotated[float, msgspec.Meta(ge=MIN_PERIOD_S)] = 1.0
    test_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0  # 0: no periodic tests
    test_timeout_s: PositiveSeconds = 10.0  # (a test waits at most MAX_TEST_TIMEOUT_S)
    watch: WatchSettings = msgspec.field(default_factory=WatchSettings)
    cluster: ClusterSection | None = None

    def __post_init__(self) -> None:
        if 0 < self.test_interval_s < MIN_PERIOD_S:
            raise ValueError(
                f"test_interval_s {self.test_interval_s:g} is too short: use 0 (no periodic "
                f"tests) or at least {MIN_PERIOD_S:g} s"
            )


JSONObject = dict[str, Any]
