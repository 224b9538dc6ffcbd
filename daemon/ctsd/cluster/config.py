"""Cluster settings: `settings.json` key `cluster`, environment overrides, credentials.

Cluster mode is off unless NATS URLs are configured. The environment wins over the file:
`CTSD_CLUSTER_NATS_URLS` (comma-separated), `CTSD_CLUSTER_NAME`, `CTSD_HOST_ID` (an empty
variable counts as unset, as systemd units often write them). Credentials come only from a
file: `CTSD_CLUSTER_CREDS_FILE`, else `$CREDENTIALS_DIRECTORY/ctsd-nats-creds` (systemd
`LoadCredential=`) — never from the command line, the URLs or settings.json, and their value
is never shown (`repr` masks it, error messages name the file, not the content).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from ctsd.safefile import read_configured_file

SCHEMES = ("nats", "tls", "ws", "wss")
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
HOST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CREDS_CREDENTIAL = "ctsd-nats-creds"
CREDS_MAX_BYTES = 64 * 1024  # one line; a wrong path to a huge file is not read whole
MASK = "********"
DUPLICATE_WINDOW_S = 120.0  # the stream recognizes a retried publish this long
SNAPSHOT_EVERY_MSGS = 10_000
INT64_MAX = 2**63 - 1
MAX_AGE_S = 9_000_000_000.0  # about 285 years: still a signed 64-bit count of nanoseconds


class ClusterConfigError(ValueError):
    """A cluster setting is wrong; the message names the setting and what is expected."""


class ClusterSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`settings.json` → `cluster`: every key optional; no URLs means cluster mode is off."""

    nats_urls: list[str] | None = None
    name: str | None = None
    host_id: str | None = None
    # Replicas of the change stream (3 on a 3-node NATS cluster; 1 on a single server).
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 3
    # How much history the stream keeps; a host further behind than this needs a snapshot.
    # (NATS keeps these as signed 64-bit numbers, the age in nanoseconds)
    max_msgs: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] = 1_000_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024, le=INT64_MAX)] = 256 * 1024 * 1024
    # 0: kept until max_msgs/max_bytes
    max_age_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_AGE_S)] = 0.0
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


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """NATS client credentials read from a file: user + password, or a token."""

    kind: Literal["user_password", "token"]
    source: str  # the file they came from (shown in status; the content never is)
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        shown = f"user={self.user!r}, " if self.user is not None else ""
        return f"Credentials(kind={self.kind!r}, {shown}secret={MASK}, source={self.source!r})"

    __str__ = __repr__

    def connect_options(self) -> dict[str, str]:
        """Keyword arguments for `nats.connect`."""
        if self.kind == "token":
            return {"token": self.token or ""}
        return {"user": self.user or "", "password": self.password or ""}


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The resolved, validated cluster configuration of this host."""

    nats_urls: tuple[str, ...]
    name: str
    host_id: str
    replicas: int = 3
    max_msgs: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 0.0
    publish_timeout_s: float = 10.0
    snapshot_every_msgs: int = 10_000
    snapshot_every_s: float = 300.0
    credentials: Credentials | None = None

    @property
    def stream(self) -> str:
        """The JetStream stream of this cluster's changes."""
        return f"CTSD_{self.name}"

    @property
    def subject(self) -> str:
        """The one subject every change group of this cluster is published on."""
        return f"ctsd.{self.name}.chg"


def load_cluster_settings(
    settings: Mapping[str, Any] | None,
    env: Mapping[str, str] | None = None,
) -> ClusterSettings | None:
    """Resolve the cluster configuration; None when cluster mode is off.

    `settings` is the parsed `settings.json` object (or None). Raises ClusterConfigError with a
    message naming the setting (never a credential's value).
    """
    env = os.environ if env is None else env
    section = _section(settings)
    urls_env = env.get("CTSD_CLUSTER_NATS_URLS", "").strip()
    if urls_env:
        urls = [u.strip() for u in urls_env.split(",")]
        urls_from = "CTSD_CLUSTER_NATS_URLS"
    else:
        urls = None if section.nats_urls is None else [u.strip() for u in section.nats_urls]
        urls_from = "settings.json cluster.nats_urls"
    name = env.get("CTSD_CLUSTER_NAME", "").strip() or section.name
    name_from = "CTSD_CLUSTER_NAME" if env.get("CTSD_CLUSTER_NAME", "").strip() else "cluster.name"
    if urls is None:
        if name is not None:
            raise ClusterConfigError(
                f"{name_from} is set but no NATS URLs are: set cluster.nats_urls "
                "(or CTSD_CLUSTER_NATS_URLS), or remove the name to run on this host alone"
            )
        return None
    if not urls:
        raise ClusterConfigError(f"{urls_from} is an empty list: give at least one nats:// URL")
    checked = tuple(_check_url(u, urls_from, i) for i, u in enumerate(urls))
    if name is None:
        raise ClusterConfigError(
            "cluster.name (or CTSD_CLUSTER_NAME) is required with NATS URLs: every host of "
            "one cluster uses the same name, and it names the change stream"
        )
    if not re.fullmatch(NAME_PATTERN, name):
        raise ClusterConfigError(
            f"{name_from} {name!r} is not a valid cluster name: use 1 to 32 letters, digits, "
            "'_' or '-' (it becomes part of a JetStream stream name and subject)"
        )
    if 0 < section.max_age_s < DUPLICATE_WINDOW_S:
        raise ClusterConfigError(
            f"cluster.max_age_s {section.max_age_s:g} is too short: use 0 (no age limit) or "
            f"at least {DUPLICATE_WINDOW_S:g} s, the window in which a retried write is "
            "recognized"
        )
    every = section.snapshot_every_msgs
    if every is None:
        every = min(SNAPSHOT_EVERY_MSGS, max(1, section.max_msgs // 4))
    elif every > section.max_msgs // 2:
        raise ClusterConfigError(
            f"cluster.snapshot_every_msgs {every} is too large for cluster.max_msgs "
            f"{section.max_msgs}: use at most half of it, so that a snapshot is taken well "
            "before the stream forgets the messages after the previous one"
        )
    host_env = env.get("CTSD_HOST_ID", "").strip()
    host_id = host_env or section.host_id or socket.gethostname()
    host_from = "CTSD_HOST_ID" if host_env else ("cluster.host_id" if section.host_id else "")
    if not re.fullmatch(HOST_ID_PATTERN, host_id):
        where = host_from or "the hostname (set cluster.host_id or CTSD_HOST_ID)"
        raise ClusterConfigError(
            f"{where} {host_id!r} is not a valid host id: use 1 to 64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )
    return ClusterSettings(
        nats_urls=checked,
        name=name,
        host_id=host_id,
        replicas=section.replicas,
        max_msgs=section.max_msgs,
        max_bytes=section.max_bytes,
        max_age_s=section.max_age_s,
        publish_timeout_s=section.publish_timeout_s,
        snapshot_every_msgs=every,
        snapshot_every_s=section.snapshot_every_s,
        credentials=load_credentials(env),
    )


def _section(settings: Mapping[str, Any] | None) -> ClusterSection:
    raw = (settings or {}).get("cluster")
    if raw is None:
        return ClusterSection()
    try:
        return msgspec.convert(raw, ClusterSection)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$", "`$.cluster")
        if "`$.cluster" not in message:
            message += " - at `$.cluster`"
        raise ClusterConfigError(f"settings.json: {message}") from None


def _check_url(url: str, origin: str, index: int) -> str:
    where = f"{origin}[{index}]"
    if not url:
        raise ClusterConfigError(f"{where} is empty: give a URL like nats://host:4222")
    shown = _shown(url)  # every message shows this: a URL may hold a password by mistake
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # (its text may quote a piece of a password)
        raise ClusterConfigError(
            f"{where} {shown!r} is not a valid URL (a host, and a port from 1 to 65535)"
        ) from None
    if "@" in url:
        raise ClusterConfigError(
            f"{where} {shown!r} holds credentials: URLs are shown in status and logs, "
            f"so put credentials in CTSD_CLUSTER_CREDS_FILE or the systemd credential "
            f"{CREDS_CREDENTIAL}"
        )
    if parts.scheme not in SCHEMES:
        raise ClusterConfigError(
            f"{where} {shown!r} has scheme {parts.scheme or '(none)'!r}: use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if not parts.hostname:
        raise ClusterConfigError(f"{where} {shown!r} names no host: give nats://host:4222")
    if port == 0:
        raise ClusterConfigError(f"{where} {shown!r}: port 0 is not a port")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ClusterConfigError(
            f"{where} {shown!r} has a query or fragment: NATS takes none, and one may hold a "
            f"token; put credentials in CTSD_CLUSTER_CREDS_FILE or the systemd credential "
            f"{CREDS_CREDENTIAL}"
        )
    if parts.scheme in ("nats", "tls") and parts.path not in ("", "/"):
        raise ClusterConfigError(f"{where} {shown!r}: a {parts.scheme}:// URL has no path")
    return url


def _shown(url: str) -> str:
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


def credentials_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("CTSD_CLUSTER_CREDS_FILE", "").strip()
    if explicit:
        return Path(explicit)
    creds_dir = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if creds_dir:
        path = Path(creds_dir) / CREDS_CREDENTIAL
        if path.exists():
            return path
    return None


def load_credentials(env: Mapping[str, str]) -> Credentials | None:
    """Read the credentials file: one line, `USER:PASSWORD` or a token (no ':').

    A NATS `.creds` file (a JWT and an NKey seed, decentralized auth) is refused with a clear
    error: the user/password or token authorization of a plain nats-server config is what
    this reads.
    """
    path = credentials_path(env)
    if path is None:
        return None
    try:
        # utf-8-sig: a byte-order mark an editor put in is not part of the user name
        text = read_configured_file(path, CREDS_MAX_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise ClusterConfigError(f"credentials file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ClusterConfigError(
            f"credentials file {str(path)!r} cannot be read: it is not UTF-8 text"
        ) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ClusterConfigError(
            f"credentials file {str(path)!r} cannot be read: {reason}"
        ) from None
    if "BEGIN NATS USER JWT" in text:
        raise ClusterConfigError(
            f"credentials file {str(path)!r} is a NATS .creds (JWT) file, which is not "
            "supported: give one line USER:PASSWORD, or a token"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ClusterConfigError(
            f"credentials file {str(path)!r} must hold exactly one line, USER:PASSWORD or a "
            f"token (it has {len(lines)} non-empty lines)"
        )
    line = lines[0]
    if ":" in line:
        user, _, password = line.partition(":")
        if not user or not password:
            raise ClusterConfigError(
                f"credentials file {str(path)!r}: USER:PASSWORD needs both a user and a password"
            )
        return Credentials(kind="user_password", source=str(path), user=user, password=password)
    return Credentials(kind="token", source=str(path), token=line)
