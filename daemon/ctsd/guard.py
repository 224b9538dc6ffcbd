"""Who may talk to the daemon: one policy for every HTTP request and the bus upgrade.

- Host: bound to a loopback address, the daemon answers only requests whose `Host` names a
  loopback host (a DNS-rebinding page would send its own name).
- Origin: no `Origin` header (scripts, the CLI, bots) is allowed; a browser's must be listed in
  `server.cors_origins`, else 403 before anything else happens.
- Token: `Authorization: Bearer TOKEN`, compared in constant time. A wrong token is answered
  (401, or `auth_invalid` on the bus) and counted for a summary in the log; it never slows or
  blocks anybody, because every local client shares 127.0.0.1 and the token (32 random bytes)
  cannot be guessed anyway.
- `server.auth: "loopback"` (opt-in, a single-user desktop): a request from a loopback peer,
  with a loopback Host and no foreign Origin, needs no token.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ctsd.errors import CtsdError
from ctsd.models import ServerSettings

log = structlog.get_logger("ctsd.web")

SUMMARY_EVERY_S = 60.0  # a repeated warning's key logged at most this often
SUMMARY_BURST = 60  # and at most so many lines of one warning a minute in all


_ORIGINS: tuple[list[str], frozenset[str]] | None = None  # (the list read, what it allows)


def allowed_origins(server: ServerSettings) -> frozenset[str]:
    """The origins `server.cors_origins` lets in, as browsers send them: an entry with a
    trailing slash (`http://localhost:5173/`) or in capitals is the origin without it, in
    lower case. `*` and `null` let nothing in: `null` is what sandboxed pages of any site
    send, no frontend's own. `file://` is what a desktop shell's packaged pages send
    (Electron, the DayTradersPro client): listed, it lets them in (browsers send `null` for
    a local file, never it). An entry that can never match (a path, no scheme) is logged."""
    global _ORIGINS
    listed = server.cors_origins
    if _ORIGINS is None or _ORIGINS[0] is not listed:  # once per settings change
        usable = set()
        for entry in listed:
            origin = entry.lower()
            origin = FILE_ORIGIN if origin in (FILE_ORIGIN, "file:///") else origin.rstrip("/")
            if origin == FILE_ORIGIN or _ORIGIN.fullmatch(origin):
                usable.add(origin)
            else:
                log.warning(
                    "cors_origin_never_matches",
                    origin=entry,
                    message="an origin is scheme://host[:port], as a browser sends it "
                    "(or file://, as a desktop shell's packaged pages send it)",
                )
        _ORIGINS = (listed, frozenset(usable))
    return _ORIGINS[1]


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+")
FILE_ORIGIN = "file://"


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Every value of one header (ASGI headers: lower-case names, latin-1 values)."""
    return [v.decode("latin-1") for k, v in headers if k == name]


def is_loopback_host(host: str) -> bool:
    # Host names are case-insensitive, and `localhost.` (fully qualified) is localhost too.
    host = host.lower().removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# A Host header as RFC 9110 has it: a name or an IP literal, and a port (nothing else: no
# user, path or query riding along, `localhost:80@evil.com`).
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{0,5})?")


def host_of(value: str) -> str:
    """The host part of a Host header (`[::1]:3587` → `::1`, `localhost:80` → `localhost`); ""
    for a malformed one (no host, so never taken for loopback)."""
    m = _HOST_HEADER.fullmatch(value)
    if m is None:
        return ""
    host = m.group(1)
    return host[1:-1] if host.startswith("[") else host


def well_formed_host(value: str) -> bool:
    return _HOST_HEADER.fullmatch(value) is not None


# The header a request names its sender in for the sync log's `source`: `cli` (the CLI's
# large imports), as the bus's frames may; anything else is `http`. Self-declared, as on the
# bus: it says who asked, it grants nothing.
SOURCE_HEADER = "X-Ctsd-Source"


def bearer(values: list[str]) -> str | None:
    """The token of one `Authorization: Bearer` header, '' for a malformed one, None when no
    bearer token is presented (no header, or one of another scheme: a proxy's Basic login
    leaves the bus's `auth` frame to the client)."""
    schemes = [v.partition(" ")[0].lower() for v in values]
    if "bearer" not in schemes:
        return None
    if len(values) > 1:
        return ""
    return values[0].partition(" ")[2].strip()


def token_ok(given: str, expected: str) -> bool:
    # (A token has no spaces: one read from its file keeps the newline, as clients read it.)
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@dataclass
class SummaryLog:
    """A warning a client can repeat in a loop (a wrong token, a web page's requests from a
    foreign origin, a scan), logged in summary, else it would flood the log and push the
    real lines out: each key's first at once, then at most one line a minute per key with
    its count since; and at most SUMMARY_BURST lines a minute in all (a scan of ever new
    keys), what they would have counted told by the next one (`left_out_before`)."""

    event: str
    count_field: str = "count"
    counts: dict[str, int] = field(default_factory=dict)
    logged_at: dict[str, float] = field(default_factory=dict)
    total: int = 0
    _window: float = -SUMMARY_EVERY_S
    _lines: int = 0
    _left_out: int = 0

    def note(self, key: str, **fields: Any) -> None:
        self.total += 1
        now = time.monotonic()
        last = self.logged_at.get(key)
        if last is not None and now - last < SUMMARY_EVERY_S:
            self.counts[key] = self.counts.get(key, 0) + 1  # (only a key with a line counts)
            return
        if now - self._window >= SUMMARY_EVERY_S:
            self._window, self._lines = now, 0
        if self._lines >= SUMMARY_BURST:
            # This one and its key's since its last line, counted in the next line instead
            # (the key keeps nothing: memory stays bounded by the keys with a line)
            self._left_out += 1 + self.counts.pop(key, 0)
            return
        self._lines += 1
        if self._left_out:
            fields["left_out_before"] = self._left_out
            self._left_out = 0
        log.warning(self.event, **fields, **{self.count_field: self.counts.pop(key, 0) + 1})
        self.logged_at[key] = now
        if len(self.logged_at) > 10_000:  # a scan of many keys: forget the oldest
            for old in sorted(self.logged_at, key=self.logged_at.__getitem__)[:5_000]:
                self.logged_at.pop(old, None)
                self.counts.pop(old, None)


@dataclass
class Guard:
    token: str
    bound_loopback: bool
    # Failed token checks by address; refusals (Host, Origin) by reason and path.
    auth_log: SummaryLog = field(default_factory=lambda: SummaryLog("auth_failed", "failures"))
    http_refused: SummaryLog = field(default_factory=lambda: SummaryLog("http_refused"))
    bus_refused: SummaryLog = field(default_factory=lambda: SummaryLog("bus_refused"))

    def check_host(self, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.bound_loopback:
            return
        hosts = header(headers, b"host")
        if hosts and not (len(hosts) == 1 and is_loopback_host(host_of(hosts[0]))):
            raise CtsdError(
                "forbidden", "this daemon answers only requests for a loopback host name"
            )

    def check_origin(self, headers: list[tuple[bytes, bytes]], server: ServerSettings) -> None:
        origins = header(headers, b"origin")
        if origins and not (len(origins) == 1 and origins[0].lower() in allowed_origins(server)):
            # Named (the browser shows its developer only "a CORS error"), as sent, cut short.
            shown = ascii(", ".join(origins)[:120])
            raise CtsdError("forbidden", f"origin {shown} not allowed (see server.cors_origins)")

    def token_state(self, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """None when no token is presented, True for the right one, False otherwise."""
        given = bearer(header(headers, b"authorization"))
        if given is None:
            return None
        return bool(given) and token_ok(given, self.token)

    def loopback_exempt(
        self,
        client: tuple[str, int] | None,
        headers: list[tuple[bytes, bytes]],
        server: ServerSettings,
    ) -> bool:
        """`server.auth: "loopback"`: a local request needs no token (Host and Origin were
        checked already; the Host must be loopback even when bound elsewhere)."""
        if server.auth != "loopback" or client is None or not is_loopback_host(client[0]):
            return False
        hosts = header(headers, b"host")
        return len(hosts) == 1 and is_loopback_host(host_of(hosts[0]))

    def require_token(
        self,
        client: tuple[str, int] | None,
        headers: list[tuple[bytes, bytes]],
        server: ServerSettings,
    ) -> None:
        state = self.token_state(headers)
        if state:
            return
        if state is None:
            if self.loopback_exempt(client, headers, server):
                return
            raise CtsdError("unauthorized", "Authorization: Bearer TOKEN required")
        addr = client[0] if client else "?"
        why = "invalid token"
        self.auth_log.note(addr, remote=addr, where="http", reason=why)  # (as the bus's)
        raise CtsdError("unauthorized", why)


def rate_key(client: tuple[str, int] | None) -> object:
    """The rate-limit key of an HTTP request: the keep-alive connection for a loopback peer
    (every local client shares the address), the address for others."""
    if client is None:
        return "?"
    return client if is_loopback_host(client[0]) else client[0]
