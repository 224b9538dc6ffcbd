"""The bus connection (`ws://HOST:PORT/ws`): open, authenticate, call, close.

`run` and `run_main` carry one command's conversation with the daemon and turn every failure
into one line on stderr and an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from ctsd.bus.protocol import WRITE_COMMANDS
from ctsd.client.errors import (
    EXIT_AUTH,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_REFUSED,
    EXIT_USAGE,
    BusError,
    CliError,
    FellBehind,
    fail,
)
from ctsd.client.render import dump_json, safe, short
from ctsd.client.target import Target, no_token_message, read_token
from ctsd.config import is_loopback

# The server refuses frames over 1 MiB; checking before sending gives a clear
# message instead of a closed connection.
MAX_FRAME = 1024 * 1024
# Replies (exports, snapshots) may be far larger than what the server accepts from us.
MAX_REPLY = 512 * 1024 * 1024
OPEN_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0

# What the CLI asks to be in the files before the answer: every change, and a connection
# test (its result is stored in connection-state.json).
SYNCED = WRITE_COMMANDS | {"connections.test"}


def no_daemon(target: Target, why: str = "") -> CliError:
    detail = f" ({why})" if why else ""
    return CliError(
        f"no daemon answering on {target.where}{detail} — "
        "start it with `ctsd serve` or `systemctl start ctsd`",
        EXIT_NO_DAEMON,
    )


class Bus:
    """One authenticated bus connection: numbered commands, their replies, pushed frames."""

    def __init__(
        self,
        ws: Any,
        target: Target,
        auth_ok: dict[str, Any],
        *,
        source: str | None = "cli",
        transcript: list[str | bytes] | None = None,
    ) -> None:
        self.ws = ws
        self.target = target
        self.auth_ok = auth_ok
        self.next_id = 1
        # Who the sync log names for this connection's changes; None leaves it to the daemon.
        self.source = source
        # Frames that arrived while waiting for a reply (events after subscribe, notices).
        self.pushed: list[dict[str, Any]] = []
        # Every frame received, exactly as it came, when the caller keeps one (tests do).
        self.transcript = transcript

    @property
    def revision(self) -> int | None:
        rev = self.auth_ok.get("revision")
        return rev if isinstance(rev, int) else None

    async def recv(self, timeout: float | None) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except TimeoutError:
            raise CliError(
                f"the daemon on {self.target.where} did not answer within {timeout:g} s",
                EXIT_NO_DAEMON,
            ) from None
        except ConnectionClosed as e:
            raise closed_error(self.target, e) from None
        if self.transcript is not None:
            self.transcript.append(raw)
        try:
            frame = json.loads(raw)
        except RecursionError:  # (json's own limit: a frame nested thousands deep)
            raise CliError("the daemon sent a frame nested too deeply", EXIT_REFUSED) from None
        except ValueError:
            raise CliError("the daemon sent a frame that is not JSON", EXIT_REFUSED) from None
        if not isinstance(frame, dict):
            raise CliError("the daemon sent a frame that is not a JSON object", EXIT_REFUSED)
        return frame

    def command(self, command: str, *, sync: str | None = "files", **args: Any) -> dict[str, Any]:
        """A numbered command frame. `source` attributes the change in the sync log (the CLI's
        are "cli"); a change asks to be answered once it is in the data files (`sync`), so a
        script can read the file on its next line."""
        frame: dict[str, Any] = {"id": self.next_id, "type": command}
        self.next_id += 1
        if self.source is not None:
            frame["source"] = self.source
        frame.update(args)
        if command in SYNCED and sync is not None:
            frame["sync"] = sync
        return frame

    async def send(self, frame: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        payload = dump_json(frame)
        try:
            size = len(payload.encode())
        except UnicodeEncodeError:
            # An argument (or an imported file) holding bytes that are not UTF-8 (the shell
            # passes them as they are) or a lone surrogate escape (`"\ud800"`).
            fail("an argument or a file given is not valid UTF-8 text", EXIT_USAGE)
        if size > MAX_FRAME:
            fail(
                f"too_large: the {frame.get('type')} command is {size:,} bytes; "
                f"the bus takes at most {MAX_FRAME:,} bytes per message",
                EXIT_REFUSED,
            )
        try:
            await self.ws.send(payload)
        except ConnectionClosed as e:
            raise closed_error(self.target, e) from None

    async def call(self, command: str, timeout: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        frame = self.command(command, **args)
        cid = frame["id"]
        await self.send(frame)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(0.0, deadline - loop.time()))
            if frame.get("type") == "result" and frame.get("id") == cid:
                if frame.get("success"):
                    return frame.get("result")
                error = frame.get("error")
                raise BusError(error if isinstance(error, dict) else {"code": "internal"})
            if frame.get("type") == "result" and frame.get("id") is None:
                # An envelope the server could not tie to an id (e.g. too_large).
                error = frame.get("error")
                raise BusError(error if isinstance(error, dict) else {"code": "internal"})
            self.pushed.append(frame)


_WARNED: set[str] = set()  # the targets told that the token goes unencrypted


def closed_error(target: Target, e: Exception) -> CliError:
    rcvd = getattr(e, "rcvd", None)
    code = getattr(rcvd, "code", None)
    reason = getattr(rcvd, "reason", "") or ""
    if code == 1008:
        return CliError(
            f"not authorized: {safe(reason) or 'the daemon refused the token'}", EXIT_AUTH
        )
    if code == 1001:
        return CliError(f"the daemon on {target.where} is shutting down", EXIT_NO_DAEMON)
    if code == 1009:
        return CliError("too_large: the daemon refused a message over its size limit")
    if code == 4008:
        return FellBehind("the daemon cut this client off: it fell behind", EXIT_NO_DAEMON)
    detail = f" (code {code}{': ' + safe(reason) if reason else ''})" if code else ""
    return CliError(f"the daemon on {target.where} closed the connection{detail}", EXIT_NO_DAEMON)


def bad_address(target: Target, e: Exception) -> CliError:
    # Nothing was sent: a usage error, as a bad --port is.
    return CliError(f"cannot connect to {target.where}: {safe(e)}", EXIT_USAGE)


def check_address(target: Target) -> None:
    """A host or port no URL can carry fails here, as one line, before the token warning:
    websockets raised ValueError or InvalidURI, and asyncio's resolver a UnicodeError (a
    ValueError) for a host idna cannot encode (`192.168..1`)."""
    from websockets.exceptions import InvalidURI
    from websockets.uri import parse_uri

    try:
        parse_uri(target.url)
        target.host.encode("idna")
    except (ValueError, InvalidURI) as e:
        raise bad_address(target, e) from None


def warn_unencrypted(target: Target, token: str | None) -> None:
    """ws:// and http:// are not encrypted: whoever sees the traffic sees the token. Said
    once per daemon (`watch --retry` connects again and again)."""
    if token and not is_loopback(target.host) and target.where not in _WARNED:
        _WARNED.add(target.where)
        click.echo(
            f"ctsd: warning: the bus token goes unencrypted to {target.where}; "
            "prefer an SSH tunnel to the daemon's loopback port",
            err=True,
        )


@contextlib.asynccontextmanager
async def open_bus(
    target: Target,
    *,
    token: str | None = None,
    auth_header: bool = True,
    source: str | None = "cli",
    transcript: list[str | bytes] | None = None,
    **ws_options: Any,
) -> Any:
    """An authenticated `Bus` to `target`. The token is `token`, else found as `read_token`
    finds it; it goes on the upgrade request, or (`auth_header=False`) in an `auth` message.
    `ws_options` go to websockets' `connect` (a test's socket or queue size)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidHandshake,
        InvalidStatus,
        InvalidURI,
    )

    check_address(target)
    token = token or read_token(target)
    headers = {"Authorization": f"Bearer {token}"} if token and auth_header else None
    warn_unencrypted(target, token)
    options: dict[str, Any] = {
        "compression": None,
        # The token must never go through an HTTP proxy from the environment.
        "proxy": None,
        "open_timeout": OPEN_TIMEOUT_S,
        "max_size": MAX_REPLY,
        "user_agent_header": "ctsd-cli",
        **ws_options,
    }
    try:
        ws = await connect(target.url, additional_headers=headers, **options)
    except InvalidStatus as e:
        status = e.response.status_code
        if status == 429:
            raise CliError(
                f"rate_limited: the daemon on {target.where} asks to slow down; try again later",
                EXIT_RATE_LIMITED,
            ) from None
        if status == 503:
            raise no_daemon(target, "HTTP 503: stopping, or too many connections") from None
        if status in (401, 403):
            raise CliError(
                f"not authorized: the daemon on {target.where} answered HTTP {status}", EXIT_AUTH
            ) from None
        raise no_daemon(target, f"HTTP {status} on /ws; is this ctsd?") from None
    except ConnectionRefusedError:
        raise no_daemon(target) from None
    except TimeoutError:
        raise no_daemon(target, "timed out") from None
    except (OSError, InvalidHandshake) as e:
        raise no_daemon(target, safe(getattr(e, "strerror", None) or e)) from None
    except (ValueError, InvalidURI) as e:  # (what check_address did not foresee)
        raise bad_address(target, e) from None
    try:
        bus = Bus(ws, target, {}, source=source, transcript=transcript)
        first = await bus.recv(OPEN_TIMEOUT_S * 2)
        if first.get("type") == "auth_required":
            if not token:
                fail(no_token_message(target), EXIT_AUTH)
            await ws.send(dump_json({"type": "auth", "token": token}))
            first = await bus.recv(OPEN_TIMEOUT_S * 2)
        if first.get("type") == "auth_invalid":
            message = safe(first.get("message") or "the daemon refused the token")
            fail(f"not authorized: {message}", EXIT_AUTH)
        if first.get("type") != "auth_ok":
            fail(f"unexpected first frame from the daemon: {short(first.get('type'))}")
        bus.auth_ok = first
        yield bus
    finally:
        with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
            await asyncio.wait_for(ws.close(), 2.0)


T = TypeVar("T")


def run(target: Target, body: Callable[[Bus], Awaitable[T]]) -> T:
    """Run one command's conversation with the daemon; every failure becomes exit + one line."""

    async def go() -> T:
        async with open_bus(target) as bus:
            return await body(bus)

    return run_main(go)


def run_call(target: Target, command: str, **args: Any) -> Any:
    """`run` for the common conversation: one command, its result."""

    async def body(bus: Bus) -> Any:
        return await bus.call(command, **args)

    return run(target, body)


def run_main(go: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(go())  # type: ignore[arg-type]
    except CliError as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`ctsd watch --json | head -n 5`): stop quietly, as a filter
        # does; stdout goes to /dev/null so the interpreter's final flush cannot complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OK)
