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
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from ctsd.models import (
    MASK,
    NATS_CREDS_CREDENTIAL,
    ClusterSection,
    check_cluster_name,
    check_host_id,
    check_nats_url,
)
from ctsd.safefile import read_configured_file

CREDS_MAX_BYTES = 64 * 1024  # one line; a wrong path to a huge file is not read whole
SNAPSHOT_EVERY_MSGS = 10_000


class ClusterConfigError(ValueError):
    """A cluster setting is wrong; the message names the setting and what is expected."""


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


def env_settings(
    env: Mapping[str, str] | None = None,
) -> tuple[list[str] | None, str | None, str | None]:
    """The NATS URLs, cluster name and host id the environment sets (None: unset), checked
    (the host id only with the URLs: a host on its own needs none). Called alone before the
    data dir is read, so a mistyped one leaves it as it was. Raises ClusterConfigError
    naming the variable."""
    env = os.environ if env is None else env
    urls = env.get("CTSD_CLUSTER_NATS_URLS", "").strip()
    name = env.get("CTSD_CLUSTER_NAME", "").strip()
    host = env.get("CTSD_HOST_ID", "").strip()
    try:
        return (
            [
                check_nats_url(u.strip(), f"CTSD_CLUSTER_NATS_URLS[{i}]")
                for i, u in enumerate(urls.split(","))
            ]
            if urls
            else None,
            check_cluster_name(name, "CTSD_CLUSTER_NAME") if name else None,
            (check_host_id(host, "CTSD_HOST_ID") if urls else host) if host else None,
        )
    except ValueError as exc:
        raise ClusterConfigError(str(exc)) from None


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
    urls_env, name_env, host_env = env_settings(env)
    urls = urls_env or section.nats_urls  # (the section's checked with it)
    name = name_env or section.name
    if urls is None:
        if name is not None:
            raise ClusterConfigError(
                f"{'CTSD_CLUSTER_NAME' if name_env else 'cluster.name'} is set but no NATS URLs "
                "are: set cluster.nats_urls (or CTSD_CLUSTER_NATS_URLS), or remove the name to "
                "run on this host alone"
            )
        return None
    if name is None:
        raise ClusterConfigError(
            "cluster.name (or CTSD_CLUSTER_NAME) is required with NATS URLs: every host of "
            "one cluster uses the same name, and it names the change stream"
        )
    try:  # (only now: a host on its own needs no host id)
        where = "the hostname (set cluster.host_id or CTSD_HOST_ID)"
        if host_env:
            host_id = check_host_id(host_env, "CTSD_HOST_ID")
        else:
            host_id = section.host_id or check_host_id(socket.gethostname(), where)
    except ValueError as exc:
        raise ClusterConfigError(str(exc)) from None
    every = section.snapshot_every_msgs
    if every is None:
        every = min(SNAPSHOT_EVERY_MSGS, max(1, section.max_msgs // 4))
    return ClusterSettings(
        nats_urls=tuple(urls),
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


def credentials_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("CTSD_CLUSTER_CREDS_FILE", "").strip()
    if explicit:
        return Path(explicit)
    creds_dir = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if creds_dir:
        path = Path(creds_dir) / NATS_CREDS_CREDENTIAL
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
