"""`ctsd migrate`: connections, their state and settings from a database, into the daemon.

Reads three tables shaped like the records of the data files — the column names are the JSON
field names — from SQLite (`sqlite:///PATH`, read-only) or PostgreSQL (`postgresql://…`, a
read-only transaction, so the three tables are one snapshot):

- `connections`: one Connection per row (unknown columns are an error naming them);
- `connection_state`: one ConnectionState per row, for a connection of the first table;
- `settings`: key/value rows (`key`, `value`; other columns ignored); a value is a JSON
  value (json/jsonb, or text holding JSON), or a plain string when the text is not JSON.

Database types are converted carefully (0/1 and true/false to booleans, integral numbers to
ints, numerics to floats, timestamps to ISO-8601 UTC with milliseconds and `Z` — a timestamp
without a zone is taken as UTC — and json/jsonb/text settings to the JSON string the model
wants), then every row is validated with the daemon's own models. A bad row is reported with
its table and key, never with a value. The result is the payload of the daemon's
`data.import` (merge).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from ctsd import diagnose, files
from ctsd.files import CONNECTIONS, SETTINGS, STATE, Invalid
from ctsd.models import Connection, ConnectionState
from ctsd.redact import is_placeholder, mask_url_secrets
from ctsd.secretfields import CONNECTION_SECRETS
from ctsd.timeutil import TIMESTAMP_PATTERN, format_ts

ROLES = ("connections", "connection_state", "settings")
ROLE_ALIASES = {"state": "connection_state", "connection-state": "connection_state"}
CONNECT_TIMEOUT_S = 10
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_INT_TEXT = re.compile(r"^[+-]?\d{1,18}$")
_TRUE = {"true", "t", "1", "yes", "y"}
_FALSE = {"false", "f", "0", "no", "n"}
# Epoch numbers above this are milliseconds (1e11 seconds is the year 5138).
_EPOCH_MS_ABOVE = 1e11
# Fields holding a JSON object as text (the model wants the string).
JSON_TEXT_FIELDS = frozenset({"connection_settings"})


class MigrateError(Exception):
    """The migration cannot run at all (URL, connection, a missing table, unknown columns)."""


# --- the source -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # "sqlite" | "postgresql"
    target: str  # a file path, or the URL as given
    shown: str  # for messages: the password replaced by ***


def shown_url(url: str) -> str:
    """The URL without its password (and without a password query parameter)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = urllib.parse.urlencode(
        [
            (k, "***" if k.lower() in ("password", "passfile", "sslpassword") else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _userinfo_ambiguous(url: str) -> bool:
    """Would libpq read another user info (user and password) from `url` than urlsplit, or
    put an `@` in the database name? libpq takes the user info up to the first `@` before a
    `/` (past `?` and `#`); urlsplit up to the last `@` before a `/`, `?` or `#`. Where they
    differ, the password is not masked in what is shown (libpq names part of it as the
    host it could not reach, `shown_url` shows it whole)."""
    rest = url.split("://", 1)[-1]
    slash = rest.find("/")
    at = rest.find("@")
    theirs = rest[:at] if at >= 0 and (slash < 0 or at < slash) else None
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    ours = netloc.rsplit("@", 1)[0] if "@" in netloc else None
    path = rest[slash:].split("?", 1)[0] if slash >= 0 else ""
    return theirs != ours or "@" in path


def _url_secrets(url: str) -> list[str]:
    """The password of `url` (in its user info or query), as written and decoded, longest
    first: what a message quoting the URL's parts must not show."""
    parts = urllib.parse.urlsplit(url)
    found: set[str] = set()
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    if ":" in userinfo:
        found.add(userinfo.split(":", 1)[1])
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if urllib.parse.unquote(key).lower() in ("password", "sslpassword"):
            found.add(value)
    found |= {urllib.parse.unquote(x) for x in found}
    return sorted((x for x in found if x), key=len, reverse=True)


def parse_url(url: str) -> Source:
    """`sqlite:///relative/path`, `sqlite:////absolute/path`, `postgresql://…`."""
    _check_utf8(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise MigrateError(
                "a SQLite URL is sqlite:///PATH (relative) or sqlite:////PATH (absolute)"
            )
        rest = urllib.parse.unquote(url[len("sqlite:///") :].split("?", 1)[0])
        if not rest:
            raise MigrateError("the SQLite URL names no file: sqlite:///PATH")
        path = Path(rest).absolute()
        return Source("sqlite", str(path), f"sqlite:///{rest}")
    if scheme in ("postgresql", "postgres"):
        if _userinfo_ambiguous(url):
            raise MigrateError(
                "the user, password or database name holds a raw @, ?, # or /: write them "
                "percent-encoded (@ as %40, ? as %3F, # as %23, / as %2F)"
            )
        try:
            return Source("postgresql", url, shown_url(url))
        except ValueError as e:  # (urlsplit: `[::1` with no `]`, a port that is no number)
            raise MigrateError(f"not a PostgreSQL URL ({e}): postgresql://USER@HOST/DB") from None
    if not re.fullmatch(r"[a-z][a-z0-9+.-]{0,31}", scheme):
        # Not a scheme (a libpq "host=… password=…" string, say): never quoted, as what
        # comes before its first colon may be a password.
        raise MigrateError(
            "not a database URL (a libpq key=value string is not taken either): "
            "use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    raise MigrateError(
        f"unsupported database URL scheme {scheme!r}: "
        "use sqlite:///PATH or postgresql://USER@HOST/DB"
    )


def _check_utf8(url: str) -> None:
    """A URL whose bytes, or whose percent-encoded parts, are not UTF-8 (an argument typed in
    another encoding, a `%ff`): no driver takes it (they raised a traceback); never quoted,
    as it may hold a password."""
    try:
        url.encode()
        urllib.parse.unquote(url, errors="strict")
    except UnicodeError:
        raise MigrateError(
            "the database URL is not UTF-8 (as typed, or once its %XX escapes are decoded)"
        ) from None


def parse_map(text: str | None) -> dict[str, str]:
    """`connections=T1,settings=T2` → table per role (defaults: the role names)."""
    tables = {role: role for role in ROLES}
    if not text:
        return tables
    for item in text.split(","):
        role, sep, table = item.strip().partition("=")
        role = ROLE_ALIASES.get(role.strip(), role.strip())
        table = table.strip()
        if not sep or role not in ROLES:
            raise MigrateError(
                f"--map takes ROLE=TABLE pairs, ROLE one of {', '.join(ROLES)}; got {item!r}"
            )
        if not _IDENT.match(table):
            raise MigrateError(f"--map {role}: {table!r} is not a table name (or schema.table)")
        tables[role] = table
    return tables


@dataclass
class TableData:
    name: str
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _key_column(role: str) -> str:
    return {"connections": "id", "connection_state": "connection_id", "settings": "key"}[role]


def read_sqlite(source: Source, tables: dict[str, str]) -> dict[str, TableData | None]:
    path = Path(source.target)
    try:
        is_file = path.is_file()
    except OSError as e:  # (a name too long, a directory not searchable)
        raise MigrateError(f"cannot read {path}: {e.strerror or e}") from None
    if not is_file:
        hint = (
            f"; for an absolute path write sqlite:///{path} with four slashes"
            if not source.shown.startswith("sqlite:////")
            else ""
        )
        raise MigrateError(f"no SQLite database at {path}{hint}")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise MigrateError(f"cannot open {path}: {e}") from None
    db.text_factory = _sqlite_text
    try:
        out: dict[str, TableData | None] = {}
        for role, table in tables.items():
            schema, _, name = table.rpartition(".")
            master = f'"{schema}".sqlite_master' if schema else "sqlite_master"
            try:
                found = db.execute(
                    f"SELECT 1 FROM {master} WHERE type IN ('table', 'view') AND name = ?",
                    (name,),
                ).fetchone()
            except sqlite3.Error as e:
                raise MigrateError(f"{path}: cannot read table {table}: {e}") from None
            if not found:
                out[role] = None
                continue
            quoted = ".".join(f'"{p}"' for p in table.split("."))
            try:
                cur = db.execute(f"SELECT * FROM {quoted} LIMIT 0")
                columns = [d[0] for d in cur.description]
                key = _key_column(role)
                order = f' ORDER BY "{key}"' if key in columns else ""
                rows = db.execute(f"SELECT * FROM {quoted}{order}").fetchall()
            except sqlite3.Error as e:
                raise MigrateError(f"{path}: cannot read table {table}: {e}") from None
            out[role] = TableData(table, columns, rows)
        return out
    finally:
        db.close()


def _sqlite_text(raw: bytes) -> str | bytes:
    """TEXT as str. Bytes that are not UTF-8 stay bytes, refused per field (row and column,
    never the value): sqlite's own decode error quotes the text, an api secret say."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def read_postgresql(source: Source, tables: dict[str, str]) -> dict[str, TableData | None]:
    import psycopg
    from psycopg import sql

    try:
        conn = psycopg.connect(source.target, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as e:
        # psycopg's messages name host, port, user and database; libpq's URL parser quotes
        # the token it cannot read, the password too ("invalid percent-encoded token").
        message = _pg_message(e)
        for secret in _url_secrets(source.target):
            message = message.replace(secret, "***")
        raise MigrateError(f"cannot connect to {source.shown}: {message}") from None
    try:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot
        out: dict[str, TableData | None] = {}
        with conn.transaction():
            for role, table in tables.items():
                schema, _, name = table.rpartition(".")
                found = conn.execute(
                    "SELECT 1 FROM information_schema.tables WHERE table_name = %s AND "
                    "table_schema = COALESCE(%s, current_schema())",
                    (name, schema or None),
                ).fetchone()
                if not found:
                    out[role] = None
                    continue
                ident = sql.Identifier(*table.split("."))
                cur = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(ident))
                columns = [d.name for d in cur.description or []]
                key = _key_column(role)
                query = sql.SQL("SELECT * FROM {}").format(ident)
                if key in columns:
                    query = sql.SQL("{} ORDER BY {}").format(query, sql.Identifier(key))
                rows = conn.execute(query).fetchall()
                out[role] = TableData(table, columns, rows)
        return out
    except psycopg.Error as e:
        raise MigrateError(f"{source.shown}: {_pg_message(e)}") from None
    finally:
        conn.close()


def _pg_message(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_tables(source: Source, tables: dict[str, str]) -> dict[str, TableData | None]:
    """Every role's table (None when the database has no such table)."""
    if source.kind == "sqlite":
        return read_sqlite(source, tables)
    return read_postgresql(source, tables)


# --- converting rows --------------------------------------------------------------------------


class _Bad(Exception):
    """One field of one row cannot be converted; the message never holds the value."""


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        decimal.Decimal: "a number",
        str: "text",
        bytes: "binary data",
        dict: "a JSON object",
        list: "a JSON array",
    }.get(type(value), type(value).__name__)


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | decimal.Decimal) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Bad(f"expected a boolean (true/false or 0/1), got {_type_name(value)}")


def to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float | decimal.Decimal) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        return int(value)
    raise _Bad(f"expected an integer, got {_type_name(value)}")


def to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Bad("expected a number, got a boolean")
    if isinstance(value, int | float | decimal.Decimal):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _Bad("expected a number, got text that is not one") from None
    else:
        raise _Bad(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(number):
        raise _Bad("expected a finite number")
    return number


def to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise _Bad("expected text, got binary data that is not UTF-8") from None
    raise _Bad(f"expected text, got {_type_name(value)}")


def to_timestamp(value: Any) -> str:
    """ISO-8601 UTC with milliseconds and Z; a time without a zone is taken as UTC."""
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise _Bad("expected a timestamp, got a number that is not finite")
        if abs(seconds) > _EPOCH_MS_ABOVE:
            seconds /= 1000
        try:
            when = dt.datetime.fromtimestamp(seconds, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise _Bad("expected a timestamp, got a number out of range") from None
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Bad("expected an ISO-8601 timestamp, got text that is not one") from None
    else:
        raise _Bad(f"expected a timestamp, got {_type_name(value)}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return format_ts(when)
    except OverflowError:  # (year 9999 west of UTC, year 1 east of it: no UTC time)
        raise _Bad("expected a timestamp, got one out of range") from None


def to_json_object_text(value: Any) -> str:
    if isinstance(value, dict):  # (msgspec would write a NaN or infinity as null)
        return msgspec.json.encode(_finite_only(value, "a JSON object")).decode()
    if isinstance(value, list | bool | int | float | decimal.Decimal):  # json/jsonb, not text
        raise _Bad(f"expected a JSON object, got {_type_name(value)}")
    text = to_text(value)
    parsed = _json(text, "a JSON object")
    if not isinstance(parsed, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(parsed)}")
    return text


def _finite_only(value: Any, what: str) -> Any:
    """`value` (JSON decoded by the database driver) if it holds no NaN or infinity."""
    work = [value]
    while work:
        item = work.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise _Bad(f"expected {what}, got a number that is not finite")
        if isinstance(item, dict):
            work.extend(item.values())
        elif isinstance(item, list):
            work.extend(item)
    return value


def to_object(value: Any) -> Any:
    if isinstance(value, dict | list):
        return _finite_only(value, "JSON")
    return _json(to_text(value), "JSON")


def _json(text: str, what: str) -> Any:
    """`text` decoded as JSON, finite numbers only (the files are strict JSON)."""

    def refuse(constant: str) -> Any:
        raise _Bad(f"expected {what}, got text holding {constant}")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # (1e400)
            refuse("a number out of range")
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except RecursionError:
        raise _Bad(f"expected {what}, got JSON nested too deeply") from None
    except ValueError:  # (an integer past the digit limit too)
        raise _Bad(f"expected {what}, got text that is not JSON") from None


def _unwrap(t: Any) -> Any:
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        inner = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(inner) == 1:
            return _unwrap(inner[0])
    return t


def _converter(name: str, t: Any) -> Callable[[Any], Any]:
    if name in JSON_TEXT_FIELDS:
        return to_json_object_text
    t = _unwrap(t)
    if isinstance(t, mi.BoolType):
        return to_bool
    if isinstance(t, mi.IntType):
        return to_int
    if isinstance(t, mi.FloatType):
        return to_float
    if isinstance(t, mi.StrType):
        return to_timestamp if t.pattern == TIMESTAMP_PATTERN else to_text
    if isinstance(t, mi.LiteralType):
        return to_text
    if isinstance(t, mi.StructType):
        return _struct_object(t)
    return lambda v: v  # msgspec validates whatever is left


def _struct_object(t: mi.StructType) -> Callable[[Any], Any]:
    inner = {f.encode_name: _converter(f.encode_name, f.type) for f in t.fields}

    def convert(value: Any) -> Any:
        obj = to_object(value)
        if not isinstance(obj, dict):
            raise _Bad(f"expected a JSON object, got {_type_name(obj)}")
        out = dict(obj)
        for key, conv in inner.items():
            if out.get(key) is not None:
                try:
                    out[key] = conv(out[key])
                except _Bad as e:
                    raise _Bad(f"`{key}`: {e}") from None
        return out

    return convert


def _converters(kind: Any) -> dict[str, Callable[[Any], Any]]:
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    return {f.encode_name: _converter(f.encode_name, f.type) for f in info.fields}


# --- the migration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    table: str
    key: str  # "row 3 (id 'conn_x')", "key 'theme'"
    message: str

    def __post_init__(self) -> None:
        # (it may quote a value as the database holds it: a URL's password never shows)
        object.__setattr__(self, "message", mask_url_secrets(self.message))

    def format(self) -> str:
        return f"{self.table} {self.key}: {self.message}"


@dataclass
class Migration:
    connections: list[dict[str, Any]] = field(default_factory=list)  # as sent to the import
    states: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    bad: list[BadRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_settings_table: bool = False
    rows: dict[str, int] = field(default_factory=dict)  # role → rows read

    def payload(self) -> dict[str, Any]:
        """The `data` of a `data.import` (mode merge)."""
        out: dict[str, Any] = {CONNECTIONS: self.connections}
        if self.states:
            out[STATE] = self.states
        if self.settings:
            out[SETTINGS] = self.settings
        return {"files": out}

    def payload_parts(self, max_bytes: int) -> list[dict[str, Any]]:
        """The payload split so each part's JSON stays under `max_bytes` (a bus message has
        a size limit): each connection travels with its state, settings with the first."""
        states = {s["connection_id"]: s for s in self.states}
        parts: list[dict[str, Any]] = []
        current: dict[str, Any] = {CONNECTIONS: [], STATE: []}
        if self.settings:
            current[SETTINGS] = self.settings
        size = len(json.dumps(current))
        for conn in self.connections:
            state = states.get(conn["id"])
            add = len(json.dumps(conn)) + (len(json.dumps(state)) if state else 0) + 4
            if current[CONNECTIONS] and size + add > max_bytes:
                parts.append(current)
                current = {CONNECTIONS: [], STATE: []}
                size = len(json.dumps(current))
            current[CONNECTIONS].append(conn)
            if state:
                current[STATE].append(state)
            size += add
        parts.append(current)
        return [{"files": {k: v for k, v in p.items() if v or k == CONNECTIONS}} for p in parts]


def _row_label(index: int, key_name: str, key: Any) -> str:
    shown = repr(key)[:80] if isinstance(key, str) else None
    return f"row {index}" + (f" ({key_name} {shown})" if shown else "")


def _convert_row(
    columns: list[str], row: tuple[Any, ...], converters: dict[str, Callable[[Any], Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in zip(columns, row, strict=True):
        if value is None:
            continue  # NULL: the model's default (a secret left out keeps the stored one)
        try:
            out[name] = converters[name](value)
        except _Bad as e:
            raise _Bad(f"`{name}`: {e}") from None
    return out


def _validate(body: dict[str, Any], kind: Any) -> Any:
    try:
        return msgspec.convert(body, type=kind, strict=True)
    except msgspec.ValidationError as e:
        msg, path = diagnose.explain(str(e), kind)
        msg = msg[:1].lower() + msg[1:]
        field_name = diagnose.parse_path(path)[0] if path != "$" else None
        raise _Bad(f"`{field_name}`: {msg}" if field_name else msg) from None


def _unknown_columns(table: TableData, kind: Any) -> None:
    known = [f for f in kind.__struct_fields__]
    unknown = [c for c in table.columns if c not in known]
    if unknown:
        hints = []
        for col in unknown:
            near = diagnose.nearest(col, known)
            hints.append(f"`{col}`" + (f" (did you mean `{near}`?)" if near else ""))
        raise MigrateError(
            f"table {table.name}: column(s) {', '.join(hints)} are not fields of a "
            f"{kind.__name__}; rename or drop them (a view with the right names works too)"
        )


def _convert_records(
    table: TableData,
    kind: Any,
    key_name: str,
    check: Callable[[Any, dict[str, Any]], None],
    bad: list[BadRow],
) -> list[dict[str, Any]]:
    """The good rows of a table of typed records, as sent to the import; each bad one goes
    to `bad` (`check` raises _Bad for what the model alone does not catch)."""
    _unknown_columns(table, kind)
    converters = _converters(kind)
    seen: dict[str, int] = {}
    good: list[dict[str, Any]] = []
    key_at = table.columns.index(key_name) if key_name in table.columns else None
    for i, row in enumerate(table.rows, 1):
        label = _row_label(i, key_name, row[key_at] if key_at is not None else None)
        try:
            body = _convert_row(table.columns, row, converters)
            record = _validate(body, kind)
            key = getattr(record, key_name)
            if key in seen:
                raise _Bad(f"duplicate {key_name} (first at row {seen[key]})")
            check(record, body)
        except _Bad as e:
            bad.append(BadRow(table.name, label, str(e)))
            continue
        seen[key] = i
        good.append(body)
    return good


def convert_connections(table: TableData, m: Migration) -> None:
    def check(conn: Connection, body: dict[str, Any]) -> None:
        for name in CONNECTION_SECRETS:
            if is_placeholder(body.get(name)):
                raise _Bad(f"`{name}`: holds the masked placeholder, not a secret")
        problem = files.connection_settings_problem(conn.connection_settings, strict=True)
        if problem:
            raise _Bad(f"`connection_settings`: {problem}")

    m.connections = _convert_records(table, Connection, "id", check, m.bad)


def convert_states(table: TableData, m: Migration, rows_of_connections: set[str]) -> None:
    good = {c["id"] for c in m.connections}

    def check(state: ConnectionState, _body: dict[str, Any]) -> None:
        if state.connection_id not in good:
            raise _Bad(
                "its connection's row is bad (skipped)"
                if state.connection_id in rows_of_connections
                else "no connection with this id in the connections table"
            )

    m.states = _convert_records(table, ConnectionState, "connection_id", check, m.bad)


def convert_settings(table: TableData, m: Migration) -> None:
    for col in ("key", "value"):
        if col not in table.columns:
            raise MigrateError(
                f"table {table.name}: no `{col}` column; settings are key/value rows"
            )
    others = [c for c in table.columns if c not in ("key", "value")]
    if others:
        m.notes.append(f"table {table.name}: column(s) {', '.join(others)} ignored")
    k_at, v_at = table.columns.index("key"), table.columns.index("value")
    seen: dict[str, int] = {}
    for i, row in enumerate(table.rows, 1):
        key, raw = row[k_at], row[v_at]
        label = _row_label(i, "key", key)
        try:
            if not isinstance(key, str) or not key:
                raise _Bad("`key`: expected non-empty text")
            if key in seen:
                raise _Bad(f"duplicate key (first at row {seen[key]})")
            if raw is None:  # NULL: not given, as in the other tables (the stored value stays)
                seen[key] = i
                m.notes.append(f"table {table.name}: {label}: NULL, left as it is")
                continue
            value = settings_value(raw)
            try:
                files.validate_document("settings", {key: value})
            except Invalid as e:
                raise _Bad(e.problem.message) from None
        except _Bad as e:
            m.bad.append(BadRow(table.name, label, str(e)))
            continue
        seen[key] = i
        m.settings[key] = value


def settings_value(raw: Any) -> Any:
    """A settings value: JSON from json/jsonb as it is, text holding JSON parsed, other text
    kept as a string, numbers as numbers."""
    if isinstance(raw, float | decimal.Decimal) and not math.isfinite(raw):
        raise _Bad("expected a value, got a number that is not finite")
    if raw is None or isinstance(raw, bool | int | float | dict | list):
        return _finite_only(raw, "a value")
    if isinstance(raw, decimal.Decimal):
        return int(raw) if raw == int(raw) else float(raw)
    text = to_text(raw)
    if text.strip() in ("NaN", "Infinity", "-Infinity"):
        return text  # (a word, kept as a string like any text that is not JSON)
    try:
        return _json(text, "a value")
    except _Bad as e:
        if "not JSON" in str(e):
            return text  # (plain text kept as a string)
        raise


def convert(data: dict[str, TableData | None]) -> Migration:
    """Every row of the tables read, converted and validated (pure)."""
    m = Migration()
    m.rows = {role: len(t.rows) for role, t in data.items() if t is not None}
    conns = data.get("connections")
    if conns is None:
        raise MigrateError("the database has no connections table (see --map)")
    convert_connections(conns, m)
    states = data.get("connection_state")
    if states is None:
        m.notes.append("no connection_state table: state is left as it is")
    else:
        at = conns.columns.index("id") if "id" in conns.columns else None
        ids = {r[at] for r in conns.rows if isinstance(r[at], str)} if at is not None else set()
        convert_states(states, m, ids)
    settings = data.get("settings")
    m.has_settings_table = settings is not None
    if settings is None:
        m.notes.append("no settings table: settings are left as they are")
    else:
        convert_settings(settings, m)
    return m


def migrate(url: str, tables: dict[str, str]) -> tuple[Source, Migration]:
    source = parse_url(url)
    return source, convert(read_tables(source, tables))


# --- what would change ------------------------------------------------------------------------


@dataclass
class Change:
    action: str  # "create" | "update" | "unchanged"
    key: str
    fields: list[str] = field(default_factory=list)


def _changes(
    new: dict[str, dict[str, Any]],
    old: dict[str, Any],
    kind: Any,
    same_secret: Callable[[str, str, Any, Any], bool | None],
) -> Iterator[Change]:
    for key, body in new.items():
        record = msgspec.convert(body, type=kind, strict=True)
        current = old.get(key)
        if current is None:
            yield Change("create", key)
            continue
        changed = []
        for name in kind.__struct_fields__:
            if name not in body or name == "updated_at":
                continue  # left out (NULL, no column): the import keeps it; the daemon stamps
            if name in CONNECTION_SECRETS and kind is Connection:
                same = same_secret(key, name, getattr(current, name), body[name])
                if same is False or same is None:
                    changed.append(name)
                continue
            if getattr(record, name) != getattr(current, name):
                changed.append(name)
        yield Change("update" if changed else "unchanged", key, changed)


def plan(
    m: Migration,
    current: dict[str, Any],
    same_secret: Callable[[str, str, Any, Any], bool | None],
) -> dict[str, list[Change]]:
    """What the import would create or change in the decoded data files `current`
    (CONNECTIONS/STATE: typed records, SETTINGS: the object). `same_secret(id, field,
    stored, new)` compares a secret (None: cannot tell, counted as a change)."""
    conns = {c.id: c for c in current.get(CONNECTIONS, [])}
    states = {s.connection_id: s for s in current.get(STATE, [])}
    settings = current.get(SETTINGS, {})
    new_conns = {c["id"]: c for c in m.connections}
    new_states = {s["connection_id"]: s for s in m.states}
    return {
        CONNECTIONS: list(_changes(new_conns, conns, Connection, same_secret)),
        STATE: list(_changes(new_states, states, ConnectionState, same_secret)),
        SETTINGS: [
            Change(
                "create" if k not in settings else "update" if settings[k] != v else "unchanged",
                k,
            )
            for k, v in m.settings.items()
        ],
    }
