"""The data files: names, defaults, and how each is decoded, validated and encoded.

Tables (`connections.json`, `connection-state.json`, the sync log) are arrays of typed records,
encoded record by record so that a change re-encodes only the records it touched. Documents
are JSON objects kept exactly as written (key order and unknown keys), validated against
the typed view of the keys the daemon reads.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ctsd import diagnose, limits
from ctsd.diagnose import FileProblem
from ctsd.limits import MAX_DEPTH, MAX_FILE_BYTES
from ctsd.models import (
    Algorithm,
    Connection,
    ConnectionDoc,
    ConnectionState,
    InstancesDoc,
    ProjectX,
    ServerSection,
    ServerSettings,
    Settings,
    SyncEvent,
    TradingSection,
    WatchSettings,
)

CONNECTIONS = "connections.json"
STATE = "connection-state.json"
SYNC_LOG = "connection-sync-log.json"
SETTINGS = "settings.json"
ALGORITHMS_DIR = "algorithms"
CLUSTER_BOOTS = ".cluster-boots"  # a cluster host's starts (`cluster.boots`): its mark too
CLUSTER_STREAM = ".cluster-stream"  # the stream its seqs count in (`cluster.streamid`)

# Document name (as on the bus) → file, and the typed view it must satisfy.
DOCUMENTS: dict[str, tuple[str, Any]] = {
    "settings": (SETTINGS, Settings),
    "main-indications": ("main-indications.json", dict[str, Any]),
    "common-indications": ("common-indications.json", dict[str, Any]),
    "connection": ("connection.json", ConnectionDoc),
    "instances": ("instances.json", InstancesDoc),
    "ui-config": ("ui-config.json", dict[str, Any]),
    "user-settings": ("user-settings.json", dict[str, Any]),
    "watchlists": ("watchlists.json", dict[str, Any]),
}
TABLES: dict[str, Any] = {
    CONNECTIONS: Connection,
    STATE: ConnectionState,
    SYNC_LOG: SyncEvent,
}
# Matched with fullmatch: `$` would also match before a trailing newline ("x\n").
_ALGO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,127}")
ALGORITHM_NAME_RULE = (
    "algorithm file name not allowed, so the daemon ignores the file: a name is up to 128 "
    "ASCII letters, digits, spaces, `.`, `_` or `-`, starting with a letter or digit"
)

# An editor's delete-then-write (or `mv f f.bak; cp f.bak f`) is back well within this; a
# deleted file is written back from memory only after it (restoring early would race them).
DELETE_GRACE_S = 0.25


def default_document(name: str) -> dict[str, Any]:
    if name == "connection":
        return msgspec.to_builtins(ConnectionDoc())
    if name == "instances":
        return {"instances": [], "lastSaved": None}
    return {}


def algorithm_name_ok(name: str) -> bool:
    return bool(_ALGO_NAME.fullmatch(name)) and ".." not in name


def document_file(name: str) -> str:
    """The file of a document name; raises KeyError for an unknown name."""
    if name.startswith(f"{ALGORITHMS_DIR}/"):
        algo = name.split("/", 1)[1]
        if not algorithm_name_ok(algo):
            raise KeyError(name)
        return f"{ALGORITHMS_DIR}/{algo}.json"
    return DOCUMENTS[name][0]


def document_type(name: str) -> Any:
    return Algorithm if name.startswith(f"{ALGORITHMS_DIR}/") else DOCUMENTS[name][1]


def document_name(file: str) -> str | None:
    """The document name of a file, or None for tables and non-data files."""
    for name, (f, _) in DOCUMENTS.items():
        if f == file:
            return name
    if file.startswith(f"{ALGORITHMS_DIR}/") and file.endswith(".json"):
        algo = file[len(ALGORITHMS_DIR) + 1 : -5]
        return f"{ALGORITHMS_DIR}/{algo}" if algorithm_name_ok(algo) else None
    return None


def is_data_file(file: str) -> bool:
    return file in TABLES or document_name(file) is not None


# --- encoding --------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode_record(record: msgspec.Struct) -> bytes:
    """One array element, indented as it sits inside the file's top-level array."""
    body = msgspec.json.format(_encoder.encode(record), indent=2)
    return b"  " + body.replace(b"\n", b"\n  ")


# About the size a table file's body is made in (`TableBody`): a join this long holds the GIL
# a fraction of a millisecond; the writer's pieces are about as long (`atomic.PACE_MAX`).
CHUNK_BYTES = 256 << 10
_SAMPLE = 16


class TableBody:
    """A table file's body: its records' encodings, joined a chunk of about CHUNK_BYTES at a
    time as it is iterated, never whole. Each chunk is one C join of consecutive records
    with their separators. A paced write makes each when it comes to it and drops it once
    written (an unpaced one, and a cluster copy, make them all first): a join holds the GIL
    a fraction of a millisecond, where making a 10 MB table at once in fresh memory
    page-faults for milliseconds with the GIL held. The records per chunk come from the size
    of a few spread over the table: no pass over them all."""

    __slots__ = ("fragments", "nbytes", "per")

    def __init__(self, fragments: Sequence[bytes]) -> None:
        self.fragments = fragments
        n = len(fragments)
        sample = fragments[:: max(1, n // _SAMPLE)]
        mean = sum(map(len, sample)) // max(1, len(sample)) + 2
        self.per = max(1, CHUNK_BYTES // mean)
        self.nbytes = mean * n + 1  # about: paces the writer

    def __iter__(self) -> Iterator[bytes]:
        fragments, per = self.fragments, self.per
        n = len(fragments)
        if not n:
            yield b"[]\n"
            return
        for start in range(0, n, per):
            part = list(fragments[start : start + per])
            if not start:
                part[0] = b"[\n" + part[0]
            if start + per >= n:
                part[-1] += b"\n]\n"
            else:
                part.append(b"")  # the separator after the chunk's last record
            yield b",\n".join(part)


def encode_document(content: Any) -> bytes:
    return msgspec.json.format(_encoder.encode(content), indent=2) + b"\n"


def encode_table(records: Iterable[msgspec.Struct]) -> bytes:
    return b"".join(TableBody([encode_record(r) for r in records]))


# --- decoding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invalid(Exception):
    problem: FileProblem
    # The name holds nothing readable as a data file (a FIFO, a link, loose permissions):
    # waiting for a writer to finish will not change that, so it is reported at once.
    lasting: bool = False


def check_size(file: str, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise Invalid(
            FileProblem(file, 1, 1, "$", f"file is {size} bytes; the limit is {MAX_FILE_BYTES}")
        )


_TOO_DEEP = limits.depth_message(MAX_DEPTH)


def _structure(file: str, raw: bytes, fallback: str) -> FileProblem:
    """The located depth or duplicate-key problem of `raw` (`fallback` if none is found)."""
    found = diagnose.structure_file_problem(file, raw, MAX_DEPTH, _TOO_DEEP)
    return found or FileProblem(file, 1, 1, "$", fallback)


def _unreadable(file: str, raw: bytes, error: Exception) -> FileProblem:
    # msgspec raises these (not DecodeError) for invalid UTF-8 inside strings and for nesting
    # past its depth limit: they must become a file problem, never crash the load.
    if isinstance(error, UnicodeDecodeError):
        found = diagnose.syntax_problem(file, raw)
        if found is not None:
            return found
        return FileProblem(file, 1, 1, "$", "not UTF-8")
    return _structure(file, raw, _TOO_DEEP)


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey
    return d


def has_duplicate_keys(raw: bytes | str) -> bool:
    """Does any object in this JSON text name a key twice? (msgspec keeps the last of the
    two, other readers the first: the file would mean different things to different tools.)
    Only the stdlib decoder lets us see an object's pairs; numbers are not converted, which
    roughly halves its cost."""
    try:
        json.loads(
            raw,
            object_pairs_hook=_unique_pairs,
            parse_int=len,
            parse_float=len,
            parse_constant=len,
        )
    except _DuplicateKey:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON: the decoder that ran first says why
    return False


def check_structure(file: str, raw: bytes, deep: bool) -> None:
    """Refuse decoded bytes that nest past the limit (`deep`: the decoded value does) or
    name a key twice in one object; raises Invalid located at the first such place."""
    if deep or has_duplicate_keys(raw):
        raise Invalid(_structure(file, raw, "duplicate key or nesting past the limit"))


def decode_table(file: str, raw: bytes) -> list[Any]:
    """Typed records of a table file; raises Invalid with a precise problem."""
    check_size(file, len(raw))
    kind = TABLES[file]
    try:
        records = msgspec.json.decode(raw, type=list[kind])
    except msgspec.ValidationError as e:
        raise Invalid(diagnose.from_validation(file, raw, str(e), list[kind])) from None
    except msgspec.DecodeError as e:
        raise Invalid(diagnose.from_decode_error(file, raw, str(e))) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise Invalid(_unreadable(file, raw, e)) from None
    # Only a sync-log entry's `data` is free-form; the other fields are typed and shallow.
    # It sits two levels down (the array, the record).
    deep = kind is SyncEvent and any(
        limits.check_depth(r.data, MAX_DEPTH - 2) is not None for r in records
    )
    check_structure(file, raw, deep)
    key = "id" if kind is not ConnectionState else "connection_id"
    seen: dict[Any, int] = {}
    for i, rec in enumerate(records):
        rid = getattr(rec, key)
        if rid in seen:
            raise Invalid(
                diagnose.at_path(
                    file, raw, [i, key], f"duplicate {key} {rid!r} (first at $[{seen[rid]}])"
                )
            )
        seen[rid] = i
        if kind is Connection:
            problem = connection_settings_problem(rec.connection_settings)
            if problem:
                raise Invalid(diagnose.at_path(file, raw, [i, "connection_settings"], problem))
    if kind is SyncEvent:
        for i in range(1, len(records)):
            if records[i].id <= records[i - 1].id:
                raise Invalid(
                    diagnose.at_path(file, raw, [i, "id"], "sync-log ids must strictly increase")
                )
    return records


MAX_PROBLEMS = 100  # per file, for `ctsd verify`: enough to fix a file in one pass


def table_problems(file: str, raw: bytes, first: FileProblem) -> list[FileProblem]:
    """Every record's problem in a table file that `decode_table` refused with `first` (for
    `ctsd verify`: one run names them all, not one per run). Each record is checked on its
    own, then the ids across them; `[first]` when the file as a whole is what is wrong (not
    JSON, not an array), or what is wrong is no record's own (a sync log out of order)."""
    kind = TABLES[file]
    try:
        items = msgspec.json.decode(raw, type=list[msgspec.Raw])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return [first]
    key = "id" if kind is not ConnectionState else "connection_id"
    problems: list[FileProblem] = []
    ids: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        try:
            record = msgspec.json.decode(item)
            if isinstance(record, dict) and isinstance(record.get(key), str | int):
                ids.append((i, record[key]))
            msgspec.json.decode(item, type=kind)
        except msgspec.ValidationError as e:
            # (msgspec names the place inside the record: `$.name` is `$[i].name` here)
            said = str(e) if " - at `$" in str(e) else f"{e} - at `$`"
            said = said.replace(" - at `$", f" - at `$[{i}]", 1)
            problems.append(diagnose.from_validation(file, raw, said, list[kind]))
        except (msgspec.DecodeError, RecursionError):
            return [first]
        if len(problems) >= MAX_PROBLEMS:
            return problems
    seen: dict[Any, int] = {}
    for i, rid in ids:
        if rid in seen:
            message = f"duplicate {key} {rid!r} (first at $[{seen[rid]}])"
            problems.append(diagnose.at_path(file, raw, [i, key], message))
        seen.setdefault(rid, i)
    problems.sort(key=lambda p: (p.line, p.column))
    return problems[:MAX_PROBLEMS] or [first]


MAX_SETTINGS_CHARS = 64 * 1024  # a connection's settings as a door takes them


@functools.lru_cache(maxsize=65_536)  # a pure function of the string; most repeat per file
def connection_settings_problem(text: str, strict: bool = False, sized: bool = True) -> str | None:
    """Why `text` is no `connection_settings` value, or None. `strict` (a change sent
    through a door): also what the daemon's own readers (masking, probes) cannot decode,
    NaN, Infinity, 1e999, and (`sized`: not a hand edit, whose file was read whatever its
    size) a value over MAX_SETTINGS_CHARS. A file holding one (an earlier version stored
    them) still loads: refusing it would leave every connection unserved."""
    try:
        value = json.loads(text)
    except ValueError as e:
        msg = _inner_problem(text) or getattr(e, "msg", None) or "not JSON"
        return f"connection_settings must be a JSON string holding an object: {msg}"
    except RecursionError:
        value = None  # refused below for its depth
    else:
        if not isinstance(value, dict):
            return "connection_settings must be a JSON string holding an object"
    if value is None or limits.check_depth(value) is not None:
        return f"connection_settings is {_TOO_DEEP}"
    if has_duplicate_keys(text):
        found = diagnose.structure_problem(text, MAX_DEPTH + 1, "")
        said = f": {found[2]}, in its text" if found is not None and found[2] else ""
        return f"connection_settings names a key twice in one object{said}"
    if strict:
        if sized and len(text) > MAX_SETTINGS_CHARS:
            return (
                f"connection_settings is {len(text)} characters; the limit is "
                f"{MAX_SETTINGS_CHARS} (every answer and event about the connection holds it)"
            )
        try:
            msgspec.json.decode(text)
        except msgspec.DecodeError as e:
            msg = _inner_problem(text) or str(e)
            return f"connection_settings must be a JSON string holding an object: {msg}"
    if "base_url" in value and not (
        isinstance(value["base_url"], str) and value["base_url"].startswith(("http://", "https://"))
    ):
        return "connection_settings.base_url must be an http:// or https:// URL"
    return None


def _inner_problem(text: str) -> str | None:
    """What is wrong in a `connection_settings` text, in the words a file's problem gets
    (NaN, a trailing comma), placed in that text (it sits on one line of the file)."""
    p = diagnose.syntax_problem("connection_settings", text.encode("utf-8", "replace"))
    if p is None:
        return None
    message = p.message.removeprefix("invalid JSON: ")
    where = f"line {p.line}, column {p.column}" if "\n" in text else f"character {p.column}"
    return f"{message} ({where} of its text)"


def validate_document(
    name: str, content: Any, file: str | None = None, raw: bytes | None = None
) -> None:
    """Check a document against its typed view; raises Invalid (positions when `raw` given)."""
    file = file or document_file(name)
    if not isinstance(content, dict):
        raise Invalid(FileProblem(file, 1, 1, "$", "expected a JSON object"))
    deep = limits.check_depth(content)
    if deep is not None:  # first: encoding or validating it would recurse that deep
        if raw is not None:
            raise Invalid(_structure(file, raw, _TOO_DEEP))
        raise Invalid(FileProblem(file, 1, 1, deep, _TOO_DEEP))
    raw = raw if raw is not None else encode_document(content)
    kind = document_type(name)
    try:
        msgspec.convert(content, type=kind, strict=True)
    except msgspec.ValidationError as e:
        raise Invalid(diagnose.from_validation(file, raw, str(e), kind)) from None


def decode_document(name: str, raw: bytes) -> dict[str, Any]:
    file = document_file(name)
    check_size(file, len(raw))
    try:
        content = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise Invalid(diagnose.from_decode_error(file, raw, str(e))) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise Invalid(_unreadable(file, raw, e)) from None
    check_structure(file, raw, False)  # duplicate keys; the depth is validate_document's
    validate_document(name, content, file, raw)
    return content


def check_instance_ids(instances: Any, file: str, raw: bytes | None) -> None:
    """Each instance's `id` once: an edit (a hand edit, `documents.set`, `verify`) that gives
    one twice is invalid. Not judged at load or in what another cluster host made: a file
    or a stream written before this rule must not stop a start or stall a host."""
    seen: dict[str, int] = {}
    for i, inst in enumerate(instances.get("instances") or []):
        iid = inst.get("id")
        if not isinstance(iid, str):
            continue
        if iid in seen:
            msg = f"duplicate id {iid!r} (first at $.instances[{seen[iid]}])"
            raw = raw if raw is not None else encode_document(instances)
            raise Invalid(diagnose.at_path(file, raw, ["instances", i, "id"], msg))
        seen[iid] = i


def orphan_message(cid: str, ids: list[str]) -> str:
    """Why a state record for no connection is invalid (a dangling reference)."""
    hint = diagnose.nearest(cid, ids)
    return f"connection_id {cid!r} names no connection in {CONNECTIONS}" + (
        f"; did you mean {hint!r}?" if hint else ""
    )


def check_instance_refs(
    instances: Any,
    algorithms: set[str],
    file: str,
    raw: bytes | None,
    invalid: Collection[str] = (),
) -> None:
    """`algorithmName` must name a file in `algorithms/` (a dangling reference is invalid).
    `invalid`: the data files invalid on disk: one named is there, but not usable yet."""
    for i, inst in enumerate(instances.get("instances") or []):
        algo = inst.get("algorithmName")
        if algo not in algorithms:
            hint = diagnose.nearest(str(algo), sorted(algorithms))
            named = f"{ALGORITHMS_DIR}/{algo}.json"
            msg = (
                f"algorithmName {algo!r} names {named}, which is invalid on disk (its own "
                "error says why); this file is judged again once it is fixed"
                if named in invalid
                else f"algorithmName {algo!r} names no file in algorithms/"
                + (f"; did you mean {hint!r}?" if hint else "")
            )
            raw = raw if raw is not None else encode_document(instances)
            raise Invalid(diagnose.at_path(file, raw, ["instances", i, "algorithmName"], msg))


def decode_file(file: str, raw: bytes) -> Any:
    """Decode and validate one file's bytes (no cross-file checks); raises Invalid."""
    if file in TABLES:
        return decode_table(file, raw)
    name = document_name(file)
    if name is None:
        raise Invalid(FileProblem(file, 1, 1, "$", "not a ctsd data file"))
    return decode_document(name, raw)


# The files whose typed keys sit beside keys of the app's own, each with its sections.
_TYPED_KEYS: dict[str, tuple[Any, tuple[tuple[str, Any], ...]]] = {
    SETTINGS: (Settings, (("server", ServerSettings), ("watch", WatchSettings))),
    "connection.json": (
        ConnectionDoc,
        (("projectX", ProjectX), ("server", ServerSection), ("trading", TradingSection)),
    ),
}


def key_typos(file: str, content: Any) -> list[tuple[str, str]]:
    """Keys of settings.json or connection.json close to one the daemon reads but not it
    (`server.prot`, `stale_after`, `projectX.autoconnect`), as (key, the daemon's key): kept,
    as every key the daemon does not read is (the trading app's own), but the daemon never
    reads them. Only close matches: the app's keys are no typos."""
    if file not in _TYPED_KEYS or not isinstance(content, dict):
        return []
    top, named = _TYPED_KEYS[file]
    out: list[tuple[str, str]] = []
    sections: list[tuple[str, Any, Any]] = [("", content, top)]
    for name, kind in named:
        if isinstance(content.get(name), dict):
            sections.append((f"{name}.", content[name], kind))
    for prefix, table, kind in sections:
        known = list(kind.__struct_fields__)
        for key in table:
            if isinstance(key, str) and key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
                if close:
                    out.append((prefix + key, prefix + close[0]))
    return out
