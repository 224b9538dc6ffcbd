"""Where each setting comes from: flag > environment > settings.json > default."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import click

from ctsd.models import Settings, check_listen_host


def env_data_dir() -> str | None:
    for name in ("CTSD_DATA_DIR", "DATA_DIR", "DATA_PATH"):
        value = os.environ.get(name)
        if value:
            return value
    return None


def resolve_data_dir(flag: str | None) -> Path:
    """The data dir a command works on (the CLI's: a bad one ends it with one line, exit 1)."""
    if flag is not None and not flag.strip():
        # `--data-dir "$DIR"` with DIR unset: not the default dir (a fresh token, a restore
        # into ./data), a usage error.
        raise click.UsageError("--data-dir is empty (an unset variable?)")
    raw = flag or env_data_dir() or "./data"
    try:
        return Path(raw).expanduser().absolute()
    except RuntimeError:  # `~name` of a user this host does not know
        raise SystemExit(f"ctsd: data dir {raw!r}: no user's home to put for its ~") from None


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def resolve_listen(host_flag: str | None, port_flag: int | None, settings: Settings) -> Listen:
    if host_flag is not None:
        host = check_listen_host(host_flag, "--host")
    elif os.environ.get("CTSD_HOST"):
        host = check_listen_host(os.environ["CTSD_HOST"], "CTSD_HOST")
    else:
        host = settings.server.host  # checked with the settings
    port_env = os.environ.get("CTSD_PORT")
    if port_flag is not None:
        port = port_flag
    elif port_env:
        try:
            port = int(port_env)
        except ValueError:
            raise ValueError(f"CTSD_PORT must be a port number, not {port_env!r}") from None
    else:
        port = settings.server.port
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return Listen(host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
