"""The client commands of CONTRACT §6: `status`, `conn …`, `watch`, `export`, `import`, `reset`.

Each command opens one bus connection (`ws://HOST:PORT/ws`, CONTRACT §4), sends its commands
with `"source": "cli"` so the sync log says the change came from the CLI, prints the reply and
exits with a code from `EXIT_CODES`. Secrets: the daemon masks every record it returns; the
only secrets this module ever holds are the ones read for `conn add`/`conn set` (environment
or a prompt without echo, never argv: argv is visible in `ps`), and they are only ever sent,
never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import json
import math
import os
import re
import sys
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import msgspec

from ctsd import models
from ctsd.config import is_loopback, resolve_data_dir
from ctsd.redact import SECRET_FIELDS, is_placeholder
from ctsd.tokenfile import load_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3587
# The server refuses frames over 1 MiB (CONTRACT §4); checking before sending gives a clear
# message instead of a closed connection.
MAX_FRAME = 1024 * 1024
# Replies (exports, snapshots) may be far larger than what the server accepts from us.
MAX_REPLY = 512 * 1024 * 1024
OPEN_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0
# A connection test may take `test_timeout_s` (default 10 s, configurable) on the daemon.
TEST_TIMEOUT_S = 180.0

# Exit codes. Scripts rely on them: append, never renumber.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2  # click's own code for usage errors
EXIT_NO_DAEMON = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_RATE_LIMITED = 7
EXIT_COMPACTED = 8
EXIT_TEST_FAILED = 9

ERROR_EXIT: dict[str, int] = {
    "unauthorized": EXIT_AUTH,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "file_invalid": EXIT_CONFLICT,
    "rate_limited": EXIT_RATE_LIMITED,
    "revision_compacted": EXIT_COMPACTED,
}

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  the daemon refused the command (invalid, io_error, internal, ...)
  2  bad usage or arguments (nothing was sent)
  3  no daemon answering, or the connection was lost
  4  not authorized: no token, or a wrong one
  5  not found
  6  conflict, or a data file is invalid on disk (file_invalid)
  7  rate limited
  8  revision compacted (watch --since too old)
  9  a connection test ran and failed"""

CONNECTION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in msgspec.structs.fields(models.Connection)
)
# Set by the daemon, never by a client.
READ_ONLY_FIELDS = frozenset({"id", "created_at", "updated_at"})
SECRET_CONNECTION_FIELDS: tuple[str, ...] = tuple(
    f for f in CONNECTION_FIELDS if f in SECRET_FIELDS
)
# Fields whose type is plain text: `name=My Binance` must not need JSON quotes.
_TEXT_FIELDS = frozenset(
    f.name
    for f in msgspec.inspect.type_info(models.Connection).fields  # type: ignore[attr-defined]
    if isinstance(f.type, msgspec.inspect.StrType)
)


# --- errors ---------------------------------------------------------------------------------


class CliError(click.ClickException):
    """A failure to report as one line on stderr and an exit code (click shows it)."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"ctsd: {safe(self.message)}", err=True)


class BusError(CliError):
    """The daemon answered a command with `success: false`."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        self.code = str(error.get("code", "internal"))
        message = str(error.get("message", "")) or self.code
        path = error.get("path")
        text = f"{self.code}: {message}"
        if path and f"`{path}`" not in message:
            text += f" (at {path})"
        super().__init__(text, ERROR_EXIT.get(self.code, EXIT_REFUSED))


class FellBehind(CliError):
    """Closed with 4008: a subscriber too slow for the daemon's queue; it may resume."""


def fail(message: str, exit_code: int = EXIT_REFUSED) -> NoReturn:
    raise CliError(message, exit_code)


# --- safe output ----------------------------------------------------------------------------

# Characters that are valid in JSON strings but act on a terminal (C1 controls such as CSI
# \x9b, DEL) or reorder text (bidi overrides): escaped even in --json output.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(value: Any) -> str:
    """Text for a terminal: a name typed by another client may carry escape sequences."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable() or (ch == " ")
        else ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch)[0] in "CZ"
        else ch
        for ch in text
    )


def dump_json(value: Any, indent: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def echo_json(value: Any, indent: int | None = 2) -> None:
    click.echo(dump_json(value, indent))


def short(value: Any, width: int = 40) -> str:
    text = safe(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return short(value)


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def key_values(obj: dict[str, Any], indent: int = 0) -> list[str]:
    """A nested mapping as aligned `key: value` lines."""
    pad = " " * indent
    width = max((len(safe(k)) for k in obj), default=0)
    out: list[str] = []
    for k, v in obj.items():
        label = f"{pad}{safe(k)}:".ljust(width + indent + 2)
        if isinstance(v, dict) and v:
            out.append(f"{pad}{safe(k)}:")
            out.extend(key_values(v, indent + 2))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{pad}{safe(k)}: ({len(v)})")
            for item in v:
                out.extend(key_values(item, indent + 2))
                out.append("")
        elif isinstance(v, list):
            out.append(f"{label}{', '.join(safe(x) for x in v) if v else '[]'}")
        else:
            text = (safe(v) or '""') if isinstance(v, str) else cell(v)
            out.append(f"{label}{text}")
    return out


# --- where the daemon is --------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/ws"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _settings_listen(data_dir: Path) -> tuple[str | None, int | None]:
    """server.host/port from DATA/settings.json, as the daemon binds them; best effort."""
    try:
        raw = json.loads((data_dir / "settings.json").read_bytes())
        server = raw.get("server") if isinstance(raw, dict) else None
        if not isinstance(server, dict):
            return None, None
        host, port = server.get("host"), server.get("port")
        return (
            host if isinstance(host, str) and host else None,
            port if isinstance(port, int) and not isinstance(port, bool) else None,
        )
    except (OSError, ValueError):
        return None, None


def resolve_target(data_dir: str | None, host: str | None, port: int | None) -> Target:
    """Flag > environment > the data dir's settings.json > default, as `ctsd serve` binds."""
    directory = resolve_data_dir(data_dir)
    s_host, s_port = _settings_listen(directory)
    chosen_host = host or os.environ.get("CTSD_HOST") or s_host or DEFAULT_HOST
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
            port = s_port or DEFAULT_PORT
    # A daemon bound to every address is reached on loopback.
    if chosen_host in ("0.0.0.0", ""):
        chosen_host = "127.0.0.1"
    elif chosen_host == "::":
        chosen_host = "::1"
    return Target(chosen_host, port, directory)


# Where systemd/ctsd.service loads the token from (LoadCredential=ctsd-token:/etc/ctsd/token):
# on a server, `ctsd status` as root then works with no CTSD_TOKEN.
SYSTEM_TOKEN = Path("/etc/ctsd/token")


def read_token(target: Target, system_token: Path = SYSTEM_TOKEN) -> str | None:
    """CTSD_TOKEN, $CREDENTIALS_DIRECTORY/ctsd-token, DATA/.token, then the unit's token."""
    path = target.data_dir / ".token"
    try:
        token = load_token(target.data_dir, create=False)
        if token is None and system_token.is_file():
            path = system_token
            token = system_token.read_text().strip() or None
        return token
    except OSError as e:
        # Under systemd the token files belong to root or the daemon's user.
        fail(
            f"cannot read the bus token {path}: {e.strerror or e}; "
            "set CTSD_TOKEN or run as the daemon's user",
            EXIT_AUTH,
        )


def no_daemon(target: Target, why: str = "") -> CliError:
    detail = f" ({why})" if why else ""
    return CliError(
        f"no daemon answering on {target.where}{detail} — "
        "start it with `ctsd serve` or `systemctl start ctsd`",
        EXIT_NO_DAEMON,
    )


# --- the bus --------------------------------------------------------------------------------


class Bus:
    """One authenticated bus connection: numbered commands, their replies, pushed frames."""

    def __init__(self, ws: Any, target: Target, auth_ok: dict[str, Any]) -> None:
        self.ws = ws
        self.target = target
        self.auth_ok = auth_ok
        self.next_id = 1
        # Frames that arrived while waiting for a reply (events after subscribe, notices).
        self.pushed: list[dict[str, Any]] = []

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
        try:
            frame = json.loads(raw)
        except ValueError:
            raise CliError("the daemon sent a frame that is not JSON", EXIT_REFUSED) from None
        if not isinstance(frame, dict):
            raise CliError("the daemon sent a frame that is not a JSON object", EXIT_REFUSED)
        return frame

    async def call(self, command: str, timeout: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        from websockets.exceptions import ConnectionClosed

        cid = self.next_id
        self.next_id += 1
        # `source` attributes the change to the CLI in the sync log (CONTRACT §2 sources).
        frame: dict[str, Any] = {"id": cid, "type": command, "source": "cli", **args}
        payload = dump_json(frame)
        size = len(payload.encode())
        if size > MAX_FRAME:
            fail(
                f"too_large: the {command} command is {size:,} bytes; "
                f"the bus takes at most {MAX_FRAME:,} bytes per message",
                EXIT_REFUSED,
            )
        try:
            await self.ws.send(payload)
        except ConnectionClosed as e:
            raise closed_error(self.target, e) from None
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


@contextlib.asynccontextmanager
async def open_bus(target: Target) -> Any:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    token = read_token(target)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token and not is_loopback(target.host):
        # ws:// is not encrypted: whoever sees the traffic sees the token.
        click.echo(
            f"ctsd: warning: the bus token goes unencrypted to {target.where}; "
            "prefer an SSH tunnel to the daemon's loopback port",
            err=True,
        )
    try:
        ws = await connect(
            target.url,
            additional_headers=headers,
            compression=None,
            # The token must never go through an HTTP proxy from the environment.
            proxy=None,
            open_timeout=OPEN_TIMEOUT_S,
            max_size=MAX_REPLY,
            user_agent_header="ctsd-cli",
        )
    except InvalidStatus as e:
        status = e.response.status_code
        if status == 429:
            raise CliError(
                f"rate_limited: the daemon on {target.where} refuses this address for now "
                "(too many failed attempts); try again later",
                EXIT_RATE_LIMITED,
            ) from None
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
    try:
        bus = Bus(ws, target, {})
        first = await bus.recv(OPEN_TIMEOUT_S * 2)
        if first.get("type") == "auth_required":
            if not token:
                fail(
                    "no bus token: set CTSD_TOKEN, or point --data-dir (or CTSD_DATA_DIR) at the "
                    f"daemon's data dir (looked in {target.data_dir}/.token and {SYSTEM_TOKEN})",
                    EXIT_AUTH,
                )
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


def run_main(go: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(go())  # type: ignore[arg-type]
    except CliError as e:
        click.echo(f"ctsd: {safe(e.message)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`ctsd watch --json | head -n 5`): stop quietly, as a filter
        # does; stdout goes to /dev/null so the interpreter's final flush cannot complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OK)


# --- options shared by every client command ---------------------------------------------------


def bus_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--data-dir, --host, --port; the wrapped function receives `target`."""

    @click.option(
        "--data-dir",
        help="the daemon's data dir, for the token and port [env CTSD_DATA_DIR, DATA_DIR, "
        "DATA_PATH; ./data]",
    )
    @click.option("--host", help=f"daemon address [env CTSD_HOST; settings; {DEFAULT_HOST}]")
    @click.option(
        "--port", type=click.IntRange(1, 65535), help=f"[env CTSD_PORT; settings; {DEFAULT_PORT}]"
    )
    @functools.wraps(func)
    def wrapper(data_dir: str | None, host: str | None, port: int | None, **kw: Any) -> Any:
        return func(resolve_target(data_dir, host, port), **kw)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")

CMD = {"epilog": EXIT_CODES_HELP}


# --- status ---------------------------------------------------------------------------------


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def render_status(result: Any, target: Target) -> str:
    """The daemon's `status` reply as a few readable lines; unknown parts shown as they are."""
    if not isinstance(result, dict):
        return f"ctsd daemon on {target.where}: {safe(result)}"
    rest = dict(result)
    version = rest.pop("version", "?")
    lines = [
        f"ctsd {safe(version)} on {target.where}: up {_duration(rest.pop('uptime_s', None))}, "
        f"revision {safe(rest.pop('revision', '?'))}"
    ]
    counts = rest.pop("counts", None)
    if isinstance(counts, dict):
        lines.append(
            f"connections  {cell(counts.get('connections'))}: {cell(counts.get('enabled'))} "
            f"enabled, {cell(counts.get('active'))} active (observed: "
            f"{cell(counts.get('status_active'))} active, {cell(counts.get('status_stale'))} "
            f"stale, {cell(counts.get('status_inactive'))} inactive)"
        )
    if "invalid_files" in rest:
        invalid = rest.pop("invalid_files") or []
        lines.append(
            "files        all valid"
            if not invalid
            else f"files        INVALID: {', '.join(safe(f) for f in invalid)} "
            "(changes to them are refused; `ctsd verify` shows where)"
        )
    bus = rest.pop("bus", None)
    if isinstance(bus, dict):
        lines.append(
            f"bus          {cell(bus.get('clients'))} client(s), "
            f"{cell(bus.get('subscribers'))} subscriber(s), "
            f"{cell(bus.get('events_sent'))} event(s) sent"
        )
    px = rest.pop("projectx", None)
    if isinstance(px, dict):
        text = ", ".join(
            f"{safe(k)} {cell(v)}" for k, v in px.items() if not isinstance(v, dict | list)
        )
        lines.append(f"projectx     {text}")
    if rest:
        lines.extend(key_values(rest))
    return "\n".join(lines)


def _status_cmd(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @json_option
    def status(target: Target, as_json: bool) -> None:
        """A summary of the running daemon: revision, connections, clients, files.

        Exits 6 when a data file is invalid on disk (the daemon serves its last valid
        content and refuses changes to it).
        """

        async def body(bus: Bus) -> Any:
            return await bus.call("status")

        result = run(target, body)
        if as_json:
            echo_json(result)
            return
        click.echo(render_status(result, target))
        if isinstance(result, dict) and result.get("invalid_files"):
            sys.exit(EXIT_CONFLICT)


# --- conn -----------------------------------------------------------------------------------


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean `{near[0]}`?" if near else ""


def parse_assignments(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`field=value` arguments → changes; values are JSON, except plain text in text fields."""
    changes: dict[str, Any] = {}
    settable = [f for f in CONNECTION_FIELDS if f not in READ_ONLY_FIELDS]
    for pair in pairs:
        field, eq, text = pair.partition("=")
        field = field.strip()
        if not eq or not field:
            raise click.BadParameter(
                f"expected field=value, got {short(pair)!r}", param_hint="'FIELD=VALUE'"
            )
        if field in SECRET_CONNECTION_FIELDS:
            raise click.BadParameter(
                f"secrets are not taken from the command line (it is visible in `ps`); use "
                f"--{field.replace('_', '-')}-env NAME or --ask-secrets",
                param_hint="'FIELD=VALUE'",
            )
        if field in READ_ONLY_FIELDS:
            raise click.BadParameter(
                f"`{short(field)}` is set by the daemon", param_hint="'FIELD=VALUE'"
            )
        if field not in settable:
            raise click.BadParameter(
                f"unknown field `{short(field)}`{_did_you_mean(field, settable)}",
                param_hint="'FIELD=VALUE'",
            )
        if field in _TEXT_FIELDS and not text.startswith('"'):
            value: Any = text
        else:
            try:
                value = json.loads(text)
            except ValueError:
                raise click.BadParameter(
                    f'{field}={short(text)!r} is not a JSON value (e.g. true, 2.5, null, "text")',
                    param_hint="'FIELD=VALUE'",
                ) from None
        changes[field] = value
    return changes


class PositiveFactor(click.ParamType):
    """A volume factor: a finite number > 0 (FloatRange lets nan and inf through)."""

    name = "number>0"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{short(value)!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{short(value)!r} is not a finite number > 0", param, ctx)
        return number


def secret_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Secrets come from the environment or a prompt without echo; never from argv."""
    for field in reversed(SECRET_CONNECTION_FIELDS):
        flag = field.replace("_", "-")
        func = click.option(
            f"--{flag}-env",
            f"{field}_env",
            metavar="NAME",
            help=f"read {field} from environment variable NAME",
        )(func)
    return click.option(
        "--ask-secrets",
        is_flag=True,
        help="prompt (without echo) for the secrets not given by --*-env; empty = leave unset",
    )(func)


def read_secrets(env_names: dict[str, str | None], ask: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for field in SECRET_CONNECTION_FIELDS:
        name = env_names.get(f"{field}_env")
        if name:
            value = os.environ.get(name)
            if value is None or value == "":
                raise click.BadParameter(
                    f"environment variable {short(name)} is not set",
                    param_hint=f"'--{field.replace('_', '-')}-env'",
                )
            out[field] = value
        elif ask:
            value = click.prompt(
                f"{field} (hidden, empty to skip)",
                default="",
                show_default=False,
                hide_input=True,
                err=True,
            )
            if value:
                out[field] = value
    return out


def _pop_secret_envs(kw: dict[str, Any]) -> dict[str, str | None]:
    return {f"{f}_env": kw.pop(f"{f}_env", None) for f in SECRET_CONNECTION_FIELDS}


def _state_of(snapshot: Any, cid: str) -> dict[str, Any] | None:
    if not isinstance(snapshot, dict):
        return None
    for st in snapshot.get("state") or []:
        if isinstance(st, dict) and st.get("connection_id") == cid:
            return st
    return None


def _print_connection(conn: Any, state: dict[str, Any] | None = None) -> None:
    if not isinstance(conn, dict):
        click.echo(safe(conn))
        return
    click.echo("\n".join(key_values(conn)))
    if state:
        click.echo("state:")
        click.echo("\n".join(key_values({k: v for k, v in state.items()}, 2)))


def _summary(conn: Any) -> str:
    if not isinstance(conn, dict):
        return safe(conn)
    return f"{safe(conn.get('id'))} ({short(conn.get('name'))}, {short(conn.get('exchange'))})"


def _conn_group(main: click.Group) -> None:
    @main.group(**CMD)
    def conn() -> None:
        """Exchange connections: list, show, add, change, remove, switch, test."""

    @conn.command("list", **CMD)
    @bus_options
    @json_option
    @click.option("--exchange", help="only this exchange")
    @click.option("--enabled/--disabled", default=None, help="only enabled / disabled ones")
    @click.option("--active/--inactive", default=None, help="only active / inactive ones")
    def list_(
        target: Target,
        as_json: bool,
        exchange: str | None,
        enabled: bool | None,
        active: bool | None,
    ) -> None:
        """List connections (secrets masked)."""
        args: dict[str, Any] = {}
        if exchange is not None:
            args["exchange"] = exchange
        if enabled is not None:
            args["enabled"] = enabled
        if active is not None:
            args["active"] = active

        async def body(bus: Bus) -> tuple[Any, Any]:
            conns = await bus.call("connections.list", **args)
            snap = None if as_json else await bus.call("snapshot")
            return conns, snap

        conns, snap = run(target, body)
        if as_json:
            echo_json(conns)
            return
        rows = []
        for c in conns or []:
            st = _state_of(snap, c.get("id")) or {}
            test = st.get("test_results") or {}
            last_test = (
                "-"
                if not test
                else ("ok" if test.get("success") else "failed")
                + (f" {test.get('latency')}ms" if test.get("latency") is not None else "")
            )
            rows.append(
                [
                    cell(c.get("id")),
                    cell(c.get("name")),
                    cell(c.get("exchange")),
                    cell(c.get("is_enabled")),
                    cell(c.get("is_active")),
                    cell(st.get("status")),
                    cell(c.get("volume_factor")),
                    cell(c.get("is_testnet")),
                    last_test,
                ]
            )
        headers = ["ID", "NAME", "EXCHANGE", "ENABLED", "ACTIVE", "STATUS", "VOLUME", "TESTNET"]
        click.echo(table([*headers, "LAST TEST"], rows))
        click.echo(f"{len(rows)} connection(s)", err=True)

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.argument("connection_id")
    def show(target: Target, as_json: bool, connection_id: str) -> None:
        """Show one connection and its state (secrets masked)."""

        async def body(bus: Bus) -> tuple[Any, Any]:
            c = await bus.call("connections.get", connection_id=connection_id)
            return c, await bus.call("snapshot")

        c, snap = run(target, body)
        state = _state_of(snap, connection_id)
        if as_json:
            echo_json({"connection": c, "state": state})
            return
        _print_connection(c, state)

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.option("--name", required=True, help="display name")
    @click.option("--exchange", required=True, help="exchange, e.g. binance, bybit")
    @click.option("--id", "cid", help="connection id [default: conn_ + 12 hex digits]")
    @click.option("--api-type", help="e.g. perpetual_futures, spot")
    @click.option("--testnet/--mainnet", default=None, help="testnet or the real exchange")
    @click.option("--enabled/--disabled", default=None)
    @click.option("--volume-factor", type=PositiveFactor())
    @click.option(
        "--settings",
        "settings_json",
        metavar="JSON",
        help='connection_settings, a JSON object, e.g. \'{"base_url": "http://…"}\'',
    )
    @click.argument("assignments", nargs=-1, metavar="[FIELD=VALUE]...")
    @secret_options
    def add(
        target: Target,
        as_json: bool,
        name: str,
        exchange: str,
        cid: str | None,
        api_type: str | None,
        testnet: bool | None,
        enabled: bool | None,
        volume_factor: float | None,
        settings_json: str | None,
        assignments: tuple[str, ...],
        ask_secrets: bool,
        **kw: Any,
    ) -> None:
        """Create a connection. Other fields as FIELD=VALUE (JSON values).

        Secrets are read from the environment (--api-key-env NAME, ...) or prompted for
        without echo (--ask-secrets), never from the command line.
        """
        record: dict[str, Any] = parse_assignments(assignments)
        record.update({"name": name, "exchange": exchange})
        if cid is not None:
            record["id"] = cid
        if api_type is not None:
            record["api_type"] = api_type
        if testnet is not None:
            record["is_testnet"] = testnet
        if enabled is not None:
            record["is_enabled"] = enabled
        if volume_factor is not None:
            record["volume_factor"] = volume_factor
        if settings_json is not None:
            try:
                parsed = json.loads(settings_json)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise click.BadParameter("must be a JSON object", param_hint="'--settings'")
            record["connection_settings"] = settings_json
        record.update(read_secrets(_pop_secret_envs(kw), ask_secrets))

        async def body(bus: Bus) -> Any:
            return await bus.call("connections.create", connection=record)

        created = run(target, body)
        if as_json:
            echo_json(created)
            return
        click.echo(f"created {_summary(created)}")

    @conn.command("set", **CMD)
    @bus_options
    @json_option
    @click.argument("connection_id")
    @click.argument("assignments", nargs=-1, metavar="FIELD=VALUE...")
    @secret_options
    def set_(
        target: Target,
        as_json: bool,
        connection_id: str,
        assignments: tuple[str, ...],
        ask_secrets: bool,
        **kw: Any,
    ) -> None:
        """Change fields of a connection (FIELD=VALUE...).

        Example: ctsd conn set conn_abc123 name="Main account" volume_factor=2 is_testnet=false

        Values are JSON (true, 2.5, null, "text"); text fields also take plain text.
        Secrets: --api-key-env NAME, ... or --ask-secrets, never on the command line.
        """
        changes = parse_assignments(assignments)
        changes.update(read_secrets(_pop_secret_envs(kw), ask_secrets))
        if not changes:
            raise click.UsageError("nothing to change: give FIELD=VALUE or a secret option")

        async def body(bus: Bus) -> Any:
            return await bus.call(
                "connections.update", connection_id=connection_id, changes=changes
            )

        updated = run(target, body)
        if as_json:
            echo_json(updated)
            return
        click.echo(f"updated {_summary(updated)}: {', '.join(sorted(changes))}")

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.argument("connection_ids", nargs=-1, required=True, metavar="ID...")
    def rm(target: Target, as_json: bool, connection_ids: tuple[str, ...]) -> None:
        """Delete connections (in order; stops at the first failure)."""
        done: list[Any] = []

        async def body(bus: Bus) -> None:
            for cid in connection_ids:
                done.append(await bus.call("connections.delete", connection_id=cid))
                if not as_json:
                    click.echo(f"deleted {safe(cid)}")

        run(target, body)
        if as_json:
            echo_json(done)

    def switch(name: str, doc: str, command: str, field: str, value: bool, verb: str) -> None:
        @conn.command(name, help=doc, **CMD)
        @bus_options
        @json_option
        @click.argument("connection_id")
        def cmd(target: Target, as_json: bool, connection_id: str) -> None:
            async def body(bus: Bus) -> Any:
                if command == "connections.set_active":
                    return await bus.call(command, connection_id=connection_id, active=value)
                return await bus.call(command, connection_id=connection_id, changes={field: value})

            result = run(target, body)
            if as_json:
                echo_json(result)
                return
            click.echo(f"{verb} {_summary(result)}")

    switch("enable", "Enable a connection.", "connections.update", "is_enabled", True, "enabled")
    switch(
        "disable", "Disable a connection.", "connections.update", "is_enabled", False, "disabled"
    )
    switch(
        "activate",
        "Switch a connection active (is_active = true).",
        "connections.set_active",
        "is_active",
        True,
        "activated",
    )
    switch(
        "deactivate",
        "Switch a connection inactive (is_active = false).",
        "connections.set_active",
        "is_active",
        False,
        "deactivated",
    )

    positive = PositiveFactor()

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.argument("connection_id")
    @click.option("--live", type=positive, help="live volume factor")
    @click.option("--preset", type=positive, help="preset volume factor")
    def volume(
        target: Target,
        as_json: bool,
        connection_id: str,
        live: float | None,
        preset: float | None,
    ) -> None:
        """Set the live and/or preset volume factor; without options, show them."""
        args: dict[str, Any] = {}
        if live is not None:
            args["live"] = live
        if preset is not None:
            args["preset"] = preset

        async def body(bus: Bus) -> dict[str, Any] | None:
            if args:
                await bus.call("connections.set_volume", connection_id=connection_id, **args)
            else:
                await bus.call("connections.get", connection_id=connection_id)
            return _state_of(await bus.call("snapshot"), connection_id)

        state = run(target, body) or {}
        values = {
            "connection_id": connection_id,
            "live": state.get("volume_factor_live"),
            "preset": state.get("volume_factor_preset"),
        }
        if as_json:
            echo_json(values)
            return
        prefix = "set" if args else "volume of"
        click.echo(
            f"{prefix} {safe(connection_id)}: live {cell(values['live'])}, "
            f"preset {cell(values['preset'])}"
        )

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.argument("connection_id")
    def test(target: Target, as_json: bool, connection_id: str) -> None:
        """Test a connection against its exchange now (exit 9 when the test fails)."""

        async def body(bus: Bus) -> Any:
            return await bus.call(
                "connections.test", timeout=TEST_TIMEOUT_S, connection_id=connection_id
            )

        result = run(target, body)
        ok = isinstance(result, dict) and bool(result.get("success"))
        if as_json:
            echo_json(result)
        elif ok:
            latency = result.get("latency")
            took = f" in {cell(latency)} ms" if latency is not None else ""
            click.echo(f"ok: {safe(connection_id)} answered{took}")
        else:
            error = result.get("error") if isinstance(result, dict) else None
            click.echo(f"failed: {safe(connection_id)}: {safe(error or 'no answer')}")
        if not ok:
            sys.exit(EXIT_TEST_FAILED)


# --- watch ----------------------------------------------------------------------------------

TOPICS = click.Choice(["connections", "state", "documents", "system"])


def format_event(ev: dict[str, Any]) -> str:
    """One readable line: `#12 TIME update c1 (cli) name="Main" volume_factor=2`."""
    raw = ev.get("data")
    data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    target = ev.get("connection_id") or data.get("file") or "-"
    parts = [
        f"#{ev.get('id')}",
        safe(ev.get("created_at", "")),
        safe(ev.get("action", "?")),
        safe(target),
    ]
    source = data.pop("source", None)
    if source:
        parts.append(f"({safe(source)})")
    data.pop("file", None)
    fields = data.pop("fields", None)
    values = data.pop("values", None)
    if ev.get("action") == "create" and isinstance(values, dict):
        # A create lists every field; its name and exchange say which record it is.
        values = {k: values[k] for k in ("name", "exchange") if k in values}
    if isinstance(values, dict) and values:
        parts.append(" ".join(f"{safe(k)}={short(dump_json(v), 40)}" for k, v in values.items()))
    elif isinstance(fields, list) and fields:
        parts.append("fields=" + ",".join(safe(f) for f in fields))
    if data:
        parts.append(dump_json(data))
    return short(" ".join(parts), 240)


def format_notice(frame: dict[str, Any]) -> str:
    rest = {k: v for k, v in frame.items() if k not in ("type", "notice")}
    where = ""
    if rest.get("file"):
        where = f" {safe(rest.pop('file'))}"
        if rest.get("line") is not None:
            where += f":{rest.pop('line')}:{rest.pop('column', 1)}"
    message = rest.pop("message", None)
    text = f"! {safe(frame.get('notice', 'notice'))}{where}"
    if message:
        text += f": {safe(message)}"
    if rest:
        text += " " + short(dump_json(rest), 120)
    return text


def _compacted_message(since: int, error: dict[str, Any]) -> str:
    oldest = error.get("oldest")
    if oldest is None and isinstance(error.get("data"), dict):
        oldest = error["data"].get("oldest")
    if isinstance(oldest, int):
        return (
            f"revision_compacted: events after revision {since} are no longer kept (the oldest "
            f"kept is {oldest}); run `ctsd watch --since {oldest - 1}` to replay what is "
            "kept, or `ctsd export` for the whole current state"
        )
    return (
        f"revision_compacted: events after revision {since} are no longer kept; "
        "`ctsd export` gives the whole current state"
    )


@dataclass
class WatchState:
    last: int | None
    seen: int = 0


def _watch_cmd(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @click.option(
        "--since",
        type=click.IntRange(0),
        help="replay every event after revision N first (resume where you stopped)",
    )
    @click.option(
        "--topic", "topics", type=TOPICS, multiple=True, help="only this topic (repeatable)"
    )
    @click.option(
        "--connection",
        "connection_ids",
        multiple=True,
        metavar="ID",
        help="only this connection's events (repeatable)",
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="one JSON object per line (events, notices)"
    )
    @click.option("-n", "--count", type=click.IntRange(1), help="exit after N events")
    def watch(
        target: Target,
        since: int | None,
        topics: tuple[str, ...],
        connection_ids: tuple[str, ...],
        as_json: bool,
        count: int | None,
    ) -> None:
        """Follow the sync log live, as the daemon broadcasts it.

        With --json each event is one line (the SyncEvent as in the sync log); notices are
        lines with "type": "notice". A subscriber that falls behind is cut off by the daemon;
        watch then resumes from the last event it printed, without gap or duplicate.
        """
        st = WatchState(since)

        def emit(frame: dict[str, Any]) -> bool:
            """Print one pushed frame; True when --count is reached."""
            kind = frame.get("type")
            if kind == "events":
                for ev in frame.get("events") or []:
                    if not isinstance(ev, dict):
                        continue
                    rev = ev.get("id")
                    # A resumed subscription must not print an event twice.
                    if isinstance(rev, int) and st.last is not None and rev <= st.last:
                        continue
                    click.echo(dump_json(ev) if as_json else format_event(ev))
                    if isinstance(rev, int):
                        st.last = rev
                    st.seen += 1
                    if count is not None and st.seen >= count:
                        return True
            elif kind == "notice":
                click.echo(dump_json(frame) if as_json else format_notice(frame))
            return False

        async def subscribe(bus: Bus) -> bool:
            args: dict[str, Any] = {}
            if topics:
                args["topics"] = list(topics)
            if connection_ids:
                args["connection_ids"] = list(connection_ids)
            if st.last is not None:
                args["since"] = st.last
            try:
                result = await bus.call("subscribe", **args)
            except BusError as e:
                if e.code == "revision_compacted":
                    raise CliError(
                        _compacted_message(st.last or 0, e.error), EXIT_COMPACTED
                    ) from None
                raise
            if st.last is None and isinstance(result, dict):
                # From here on, resuming after a cut-off must continue from this revision.
                rev = result.get("revision")
                st.last = rev if isinstance(rev, int) else None
            if not as_json and st.seen == 0 and since is None:
                click.echo(
                    f"watching {target.where} from revision {st.last} (Ctrl-C stops)", err=True
                )
            for frame in bus.pushed:
                if emit(frame):
                    return True
            bus.pushed.clear()
            while True:
                if emit(await bus.recv(None)):
                    return True

        async def go() -> None:
            while True:
                try:
                    async with open_bus(target) as bus:
                        if await subscribe(bus):
                            return
                except FellBehind:
                    # The daemon dropped us rather than stall the others; a fresh connection
                    # from the last revision printed loses nothing.
                    click.echo("ctsd: fell behind; resuming from the last event printed", err=True)

        run_main(go)


# --- export / import / reset ----------------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: an export holds the whole configuration."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def drop_placeholders(obj: Any) -> int:
    """Remove secret fields that hold the mask (an export never has the real values).

    The daemon refuses a placeholder sent back as a value; leaving the field out keeps the
    stored secret, which is what restoring an export of the same daemon means.
    """
    count = 0
    if isinstance(obj, dict):
        for key in [k for k, v in obj.items() if k in SECRET_FIELDS and is_placeholder(v)]:
            del obj[key]
            count += 1
        for v in obj.values():
            count += drop_placeholders(v)
    elif isinstance(obj, list):
        for v in obj:
            count += drop_placeholders(v)
    return count


def placeholder_paths(obj: Any, path: str) -> list[str]:
    """JSON paths of secret fields that hold the mask."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in SECRET_FIELDS and is_placeholder(v):
                out.append(f"{path}.{k}")
            else:
                out.extend(placeholder_paths(v, f"{path}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(placeholder_paths(v, f"{path}[{i}]"))
    return out


def _data_cmds(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @click.option(
        "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="file; - = stdout"
    )
    def export(target: Target, output: str | None) -> None:
        """Export every file of the daemon as one JSON document (secrets masked)."""

        async def body(bus: Bus) -> Any:
            return await bus.call("data.export")

        result = run(target, body)
        text = dump_json(result, 2) + "\n"
        if output is None or output == "-":
            click.echo(text, nl=False)
            return
        try:
            write_private(Path(output), text)
        except OSError as e:
            fail(f"cannot write {safe(output)}: {e.strerror or e}")
        files = result.get("files") if isinstance(result, dict) else None
        revision = result.get("revision") if isinstance(result, dict) else None
        click.echo(
            f"exported {len(files or {})} file(s) at revision {revision} to {safe(output)}",
            err=True,
        )

    @main.command("import", **CMD)
    @bus_options
    @json_option
    @click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
    @click.option("--merge", is_flag=True, help="merge into the current data instead of replacing")
    def import_(target: Target, as_json: bool, file: str, merge: bool) -> None:
        """Import a `ctsd export` document: replace everything, or --merge into it."""
        try:
            raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as e:
            raise click.BadParameter(
                f"cannot read {safe(file)}: {e.strerror or e}", param_hint="'FILE'"
            ) from None
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise click.BadParameter(f"{safe(file)} is not UTF-8", param_hint="'FILE'") from None
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{safe(file)}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}", param_hint="'FILE'"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise click.BadParameter(
                f'{safe(file)} is not a ctsd export (expected an object with "files")',
                param_hint="'FILE'",
            )

        dropped = 0
        conns = data["files"].get("connections.json")
        if merge and isinstance(conns, list):
            # A merge keeps the stored secrets of a connection whose import leaves them out.
            dropped = drop_placeholders(conns)
        masked = placeholder_paths(data["files"], "$.files")
        if masked:
            # Anywhere else the daemon would store the absence: the real secret would be lost.
            more = f" (and {len(masked) - 1} more)" if len(masked) > 1 else ""
            hint = "" if merge else "; --merge keeps the stored secrets of connections"
            raise click.BadParameter(
                f"{safe(file)} holds a masked secret at {safe(masked[0])}{more}: an export "
                "never carries secrets, and importing it as it is would lose the stored one; "
                f"put the real value there, or leave that file out of the import{hint}",
                param_hint="'FILE'",
            )
        if dropped:
            click.echo(
                f"ctsd: {dropped} masked secret(s) in {safe(file)} left out: "
                "the daemon keeps the stored values",
                err=True,
            )

        async def body(bus: Bus) -> Any:
            return await bus.call("data.import", data=data, mode="merge" if merge else "replace")

        result = run(target, body)
        if as_json:
            echo_json(result)
            return
        click.echo(f"imported {safe(file)} ({'merge' if merge else 'replace'})")
        if isinstance(result, dict) and result:
            click.echo("\n".join(key_values(result, 2)))

    @main.command(**CMD)
    @bus_options
    @json_option
    @click.option("--yes", is_flag=True, help="really reset: every connection and document")
    def reset(target: Target, as_json: bool, yes: bool) -> None:
        """Reset all data to the defaults (needs --yes)."""
        if not yes:
            raise click.UsageError(
                "reset deletes every connection and resets every document; "
                "run `ctsd reset --yes` to do it (`ctsd export -o FILE` first keeps a copy)"
            )

        async def body(bus: Bus) -> Any:
            return await bus.call("data.reset", confirm=True)

        result = run(target, body)
        if as_json:
            echo_json(result)
            return
        click.echo("reset: every connection deleted, every document back to its default")


def register(main: click.Group) -> None:
    """Add the client commands to the `ctsd` group."""
    _status_cmd(main)
    _conn_group(main)
    _watch_cmd(main)
    _data_cmds(main)
    main.epilog = EXIT_CODES_HELP
