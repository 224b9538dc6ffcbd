"""Where the daemon is (host, port, data dir) and the bus token to reach it with."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

from ctsd.client.errors import EXIT_AUTH, EXIT_USAGE, fail
from ctsd.client.render import short
from ctsd.config import resolve_data_dir
from ctsd.limits import MAX_FILE_BYTES
from ctsd.lock import running_listen
from ctsd.safefile import read_text_file
from ctsd.tokenfile import BadToken, checked, load_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3587


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"ws://{self.where}/ws"

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6: [::1]:3587
        return f"{host}:{self.port}"


def _settings_listen(data_dir: Path) -> tuple[str | None, int | None]:
    """server.host/port from DATA/settings.json, as the daemon binds them; best effort."""
    try:
        # As the daemon reads it: a FIFO or a link there must not hang or mislead the CLI.
        raw = json.loads(read_text_file(data_dir / "settings.json", MAX_FILE_BYTES)[0])
        server = raw.get("server") if isinstance(raw, dict) else None
        if not isinstance(server, dict):
            return None, None
        host, port = server.get("host"), server.get("port")
        return (
            host if isinstance(host, str) and host else None,
            port if isinstance(port, int) and not isinstance(port, bool) else None,
        )
    except (OSError, ValueError, RecursionError):
        return None, None


def resolve_target(data_dir: str | None, host: str | None, port: int | None) -> Target:
    """Flag > environment > where the data dir's running daemon listens > its settings.json
    > default, as `ctsd serve` binds (settings.json changed since the daemon started names
    where the next start will listen, not where this one does)."""
    directory = resolve_data_dir(data_dir)
    running = running_listen(directory)
    s_host, s_port = running if running is not None else _settings_listen(directory)
    chosen_host = _checked_host(*_pick_host(host, s_host, directory))
    if port is None:
        env_port = os.environ.get("CTSD_PORT")
        if env_port:
            try:
                port = int(env_port)
            except ValueError:
                raise click.UsageError(
                    f"CTSD_PORT must be a port number, not {env_port!r}"
                ) from None
            if not 0 < port < 65536:
                raise click.UsageError(f"CTSD_PORT {port} is out of range")
        else:
            port = _settings_port(directory, s_port)
    # A daemon bound to every address is reached on loopback.
    if chosen_host == "0.0.0.0":
        chosen_host = "127.0.0.1"
    elif chosen_host == "::":
        chosen_host = "::1"
    return Target(chosen_host, port, directory)


# Characters that would make `ws://HOST:PORT/ws` name another port, a path or a user: with
# `--host 127.0.0.1/x` the token went to port 80.
_NOT_IN_A_HOST = frozenset("/?#@[]\\")


def _pick_host(host: str | None, s_host: str | None, directory: Path) -> tuple[str, str]:
    """(host, where it came from): flag > environment > settings.json > default."""
    env_host = os.environ.get("CTSD_HOST")
    if host is not None:  # (an empty one is refused, not taken for none)
        return host, "--host"
    if env_host:
        return env_host, "CTSD_HOST"
    if s_host:
        return s_host, f"{directory}/settings.json server.host"
    return DEFAULT_HOST, "the default host"


def _checked_host(host: str, source: str) -> str:
    """`host` without the brackets of an IPv6 literal (`[::1]`: Target.url adds its own), or
    a one-line usage error naming where it came from."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in _NOT_IN_A_HOST or not c.isprintable() or c.isspace() for c in host):
        fail(f"{source}: {short(host)!r} is not a host name or IP address", EXIT_USAGE)
    return host


def _settings_port(directory: Path, port: int | None) -> int:
    """The settings' server.port, range-checked as CTSD_PORT is (the daemon would refuse to
    start with it; without the check it came out as a traceback from the URL parser)."""
    if port is None:
        return DEFAULT_PORT
    if not 0 < port < 65536:
        fail(
            f"{directory}/settings.json server.port {port} is out of range (1-65535)",
            EXIT_USAGE,
        )
    return port


# Where systemd/ctsd.service loads the token from (LoadCredential=ctsd-token:/etc/ctsd/token):
# on a server, `ctsd status` as root then works with no CTSD_TOKEN.
SYSTEM_TOKEN = Path("/etc/ctsd/token")


def no_token_message(target: Target) -> str:
    """Why no token was found, and where it was looked for (an empty DATA/.token named so:
    it read as a file that is not there)."""
    path = target.data_dir / ".token"
    try:
        empty = path.is_file() and not path.read_text(errors="replace").strip()
    except OSError:
        empty = False
    why = f"{path} is empty" if empty else f"looked in {path} and {SYSTEM_TOKEN}"
    return (
        "no bus token: set CTSD_TOKEN, or point --data-dir (or CTSD_DATA_DIR) at the daemon's "
        f"data dir ({why})"
    )


def read_token(target: Target, system_token: Path = SYSTEM_TOKEN) -> str | None:
    """CTSD_TOKEN, $CREDENTIALS_DIRECTORY/ctsd-token, DATA/.token, then the unit's token."""
    path = target.data_dir / ".token"
    try:
        token = load_token(target.data_dir, create=False, strict=False)
        if token is not None:
            return token
        # Named before is_file(): a /etc/ctsd this user cannot enter makes it raise EACCES.
        path = system_token
        token = system_token.read_text().strip() if system_token.is_file() else None
        return checked(token, str(system_token)) if token else None
    except BadToken as e:
        fail(str(e), EXIT_AUTH)
    except (OSError, ValueError) as e:
        # Under systemd the token files belong to root or the daemon's user.
        fail(
            f"cannot read the bus token {path}: {getattr(e, 'strerror', None) or e}; "
            "set CTSD_TOKEN or run as the daemon's user",
            EXIT_AUTH,
        )
