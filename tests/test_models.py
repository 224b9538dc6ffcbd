"""The seeds' example JSON loads unchanged; bad files get precise, non-crashing errors."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import msgspec
import pytest

from ctsd import diagnose, files, limits, ops, verify
from ctsd.core import Committed, Context, Request, apply_group
from ctsd.files import Invalid
from ctsd.guard import allowed_origins
from ctsd.models import (
    Connection,
    ConnectionDoc,
    ConnectionState,
    InstancesDoc,
    ServerSettings,
    Settings,
    SyncEvent,
)
from ctsd.store import Store
from ctsd.timeutil import TIMESTAMP_PATTERN, format_ts, now_iso, parse_ts
from tests.daemon import Daemon
from tests.seeds import (
    ALGORITHM,
    SEED_CONNECTION_DOC,
    SEED_CONNECTIONS,
    SEED_FILES,
    SEED_INSTANCES,
    SEED_STATE,
    SEED_SYNC_LOG,
    SEEDS_DIR,
    json_blocks,
    write_seed_dir,
)


def test_examples_are_verbatim() -> None:
    """Every copied example is exactly a ```json block of a seed document."""
    if not SEEDS_DIR.is_dir():
        pytest.skip("set CTSD_SEEDS_DIR to the seed documents' folder to check the copies")
    blocks = [b for p in sorted(SEEDS_DIR.glob("*.txt")) for b in json_blocks(p.read_text())]
    for name, text in SEED_FILES.items():
        assert text in blocks, f"{name} example differs from the seed"


def test_seed_examples_decode() -> None:
    conns = files.decode_file("connections.json", SEED_CONNECTIONS.encode())
    assert [type(c) for c in conns] == [Connection]
    assert conns[0].id == "conn_abc123" and conns[0].api_passphrase is None
    assert conns[0].volume_factor == 1.0 and conns[0].is_active is True
    state = files.decode_file("connection-state.json", SEED_STATE.encode())
    assert isinstance(state[0], ConnectionState)
    assert state[0].test_results is not None and state[0].test_results.latency == 45
    assert state[0].status == "inactive" and state[0].last_heartbeat_at is None  # optional
    log = files.decode_file("connection-sync-log.json", SEED_SYNC_LOG.encode())
    assert [type(e) for e in log] == [SyncEvent, SyncEvent]
    assert [e.id for e in log] == [1, 2]
    assert log[1].data == {"live": 1.5, "preset": 2.0, "timestamp": "2024-01-01T00:01:00.000Z"}
    doc = files.decode_file("connection.json", SEED_CONNECTION_DOC.encode())
    assert doc == msgspec.json.decode(SEED_CONNECTION_DOC)  # kept exactly as written
    typed = msgspec.convert(doc, ConnectionDoc)
    assert typed.trading.defaultCommission == 2.8 and typed.server.port == 3587
    inst = files.decode_file("instances.json", SEED_INSTANCES.encode())
    assert msgspec.convert(inst, InstancesDoc).instances[0].algorithmName == "Simple-MA-Crossover"
    files.check_instance_refs(inst, {"Simple-MA-Crossover"}, "instances.json", None)
    assert files.decode_file("algorithms/Simple-MA-Crossover.json", ALGORITHM.encode())


def test_store_loads_seed_dir_without_rewriting(tmp_path: Path) -> None:
    before = write_seed_dir(tmp_path)
    store = Store(tmp_path)
    store.open()
    assert store.problems == {}
    assert list(store.connections) == ["conn_abc123"]
    assert store.revision == 2
    assert store.documents["instances"]["instances"][0]["name"] == "NQ Scalper"
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


def test_daemon_serves_seed_dir_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = write_seed_dir(data)
    d = Daemon(data).start()
    try:
        status, body = d.http("/health", token=None)
        assert status == 200, body
        assert body["status"] == "ok", body
        assert body["revision"] == 2
        assert d.stop() == 0
    finally:
        d.close()
    assert {n: (data / n).read_bytes() for n in before} == before


# --- validation errors: file:line:column, JSON path, message ---------------------------------

CONN = '{"id": "a", "name": "x", "exchange": "bybit"'
BAD = [
    # (id, file, raw, line, column, path, message fragment)
    (
        "unknown-key",
        "connections.json",
        '[\n  {"id": "a", "name": "x", "exchange": "bybit", "is_enabeld": true}\n]\n',
        2, 49, "$[0]",
        "unknown field `is_enabeld` at `$[0]`; did you mean `is_enabled`?",
    ),
    (
        "unknown-key-case",  # another case or separators: the field so spelled, not `exchange`
        "connections.json",
        '[\n  {"id": "a", "name": "x", "exchange": "bybit", "exchangeId": "b"}\n]\n',
        2, 49, "$[0]",
        "unknown field `exchangeId` at `$[0]`; did you mean `exchange_id`?",
    ),
    (
        "unknown-key-upper",
        "connections.json",
        '[\n  {"id": "a", "name": "x", "exchange": "bybit", "API_KEY": "k"}\n]\n',
        2, 49, "$[0]",
        "unknown field `API_KEY` at `$[0]`; did you mean `api_key`?",
    ),
    (
        "unknown-key-a-pasted-secret",  # goes to the log, /health and the bus: shown in part
        "connections.json",
        '[\n  {"id": "a", "name": "x", "exchange": "bybit", "Xq7Lm2Pz9Rt4Wv8N": "k"}\n]\n',
        2, 49, "$[0]",
        "unknown field `…Wv8N` (a name of 16 characters, shown in part: a pasted secret?) at "
        "`$[0]`",
    ),
    (
        "enum-typo",  # which words are taken, and the one most likely meant
        "settings.json",
        '{\n  "server": {"auth": "loopbak"}\n}\n',
        2, 22, "$.server.auth",
        "invalid enum value 'loopbak' (one of `loopback`, `token`); did you mean `loopback`?",
    ),
    (
        "unknown-key-state",
        "connection-state.json",
        '[\n  {\n    "connection_id": "a",\n    "volume_factor_lve": 2\n  }\n]\n',
        4, 5, "$[0]",
        "did you mean `volume_factor_live`?",
    ),
    (
        "wrong-type",
        "connections.json",
        '[\n  {"id": "a", "name": "x", "exchange": "bybit",\n   "is_enabled": "yes"}\n]\n',
        3, 18, "$[0].is_enabled",
        "expected `bool`, got `str`",
    ),
    (
        "duplicate-id",
        "connections.json",
        f"[\n  {CONN}}},\n  {CONN}}}\n]\n",
        3, 10, "$[1].id",
        "duplicate id 'a' (first at $[0])",
    ),
    (
        "unterminated-string",
        "ui-config.json",
        '{"a": "x',
        1, 7, "$",
        "invalid JSON: this string has no closing quote",
    ),
    (
        "raw-line-break-in-string",
        "ui-config.json",
        '{"a": "x\n"}',
        1, 9, "$",
        "invalid JSON: a raw tab or line break inside a string (a missing closing quote?)",
    ),
    (
        "raw-nul-in-string",
        "ui-config.json",
        '{"a": "x\0y"}',
        1, 9, "$",
        "invalid JSON: control character U+0000 in a string; write \\u0000",
    ),
    (
        "nan-where-a-number-goes",
        "connection-state.json",
        '[{"connection_id": "a",\n  "volume_factor_live": NaN}]',
        2, 25, "$[0].volume_factor_live",
        "invalid JSON: NaN is not a JSON value (strict JSON: write a number or null)",
    ),
    (
        "out-of-range-before-nan",
        "ui-config.json",
        '{"a": 1e999,\n "b": NaN}',
        1, 7, "$.a",
        "number out of range: 1e999",
    ),
    (
        "timestamp-without-ms",
        "connections.json",
        f'[{CONN}, "created_at": "2024-01-01T00:00:00Z"}}]',
        1, 62, "$[0].created_at",
        "expected an ISO-8601 UTC timestamp like 2024-01-01T00:00:00.000Z",
    ),
    (
        "timestamp-with-offset",
        "connection-state.json",
        '[{"connection_id": "a", "updated_at": "2024-01-01T00:00:00.000+00:00"}]',
        1, 39, "$[0].updated_at",
        "expected an ISO-8601 UTC timestamp like 2024-01-01T00:00:00.000Z",
    ),
    (
        "volume-factor-zero",
        "connections.json",
        f'[{CONN}, "volume_factor": 0}}]',
        1, 65, "$[0].volume_factor",
        "> 0",
    ),
    (
        "volume-factor-negative",
        "connection-state.json",
        '[{"connection_id": "a", "volume_factor_live": -1.5}]',
        1, 47, "$[0].volume_factor_live",
        "> 0",
    ),
    (
        "connection-settings-array",
        "connections.json",
        f'[{CONN}, "connection_settings": "[1]"}}]',
        1, 71, "$[0].connection_settings",
        "JSON string holding an object",
    ),
    (
        "connection-settings-not-json",
        "connections.json",
        f'[{CONN}, "connection_settings": "{{bad"}}]',
        1, 71, "$[0].connection_settings",
        "JSON string holding an object: expected a key in double quotes (character 2 of its text)",
    ),
    (
        "connection-settings-duplicate-key",  # the key named, as in a file
        "connections.json",
        f'[{CONN}, "connection_settings": "{{\\"fee\\": 1, \\"fee\\": 2}}"}}]',
        1, 71, "$[0].connection_settings",
        "names a key twice in one object: duplicate key `fee` (first at line 1)",
    ),
    (
        "connection-settings-object-not-string",
        "connections.json",
        f'[{CONN}, "connection_settings": {{}}}}]',
        1, 71, "$[0].connection_settings",
        "expected `str`, got `object`",
    ),
    (
        "id-pattern",
        "connections.json",
        '[{"id": "a b", "name": "x", "exchange": "bybit"}]',
        1, 9, "$[0].id",
        "expected an id of 1 to 64 letters, digits, `_` or `-`",
    ),
    (
        "id-too-long",
        "connections.json",
        '[{"id": "' + "a" * 65 + '", "name": "x", "exchange": "bybit"}]',
        1, 9, "$[0].id",
        "expected an id of 1 to 64 letters, digits, `_` or `-`",
    ),
    (
        "sync-log-ids-decrease",
        "connection-sync-log.json",
        '[{"id": 2, "connection_id": null, "action": "reset", "data": {},'
        ' "created_at": "2024-01-01T00:00:00.000Z"},\n'
        ' {"id": 1, "connection_id": null, "action": "reset", "data": {},'
        ' "created_at": "2024-01-01T00:00:00.000Z"}]',
        2, 9, "$[1].id",
        "strictly increase",
    ),
    (
        "unknown-action",
        "connection-sync-log.json",
        '[{"id": 1, "connection_id": null, "action": "explode", "data": {},'
        ' "created_at": "2024-01-01T00:00:00.000Z"}]',
        1, 45, "$[0].action",
        "invalid enum value 'explode'",
    ),
    (
        "instance-unknown-key",
        "instances.json",
        '{"instances": [{"id": "x", "name": "n", "symbol": "NQ", "algoritmName": "A"}]}',
        1, 57, "$.instances[0]",
        "did you mean `algorithmName`?",
    ),
    (
        "syntax-trailing-comma",
        "settings.json",
        '{\n  "sync_log_limit": 5,\n}\n',
        3, 1, "$",
        "invalid JSON: expected a key in double quotes (a comma before `}` is not allowed)",
    ),
    (
        "syntax-trailing-comma-in-array",
        "connections.json",
        f"[\n  {CONN}}},\n]\n",
        3, 1, "$",
        "invalid JSON: expected a value (string, number, object, array, true, false or null) "
        "(a comma before `]` is not allowed)",
    ),
    (
        "syntax-trailing-comma-in-a-record",  # the record's path, not `$`
        "connection-state.json",
        '[\n  {"connection_id": "a"},\n  {"connection_id": "b",}\n]\n',
        3, 25, "$[1]",
        "invalid JSON: expected a key in double quotes (a comma before `}` is not allowed)",
    ),
    (
        "syntax-double-comma",  # not blamed on a `}` that is not there
        "settings.json",
        '{\n  "sync_log_limit": 5,,\n  "x": 1\n}\n',
        2, 23, "$",
        "invalid JSON: expected a key in double quotes (two commas in a row?)",
    ),
    (
        "syntax-cut-short",
        "connections.json",
        f"[\n  {CONN}",
        2, 47, "$",
        "invalid JSON: expected `,` between two items, or the closing bracket (the file ends "
        "here: cut short?)",
    ),
    (
        "settings-wrong-type",
        "settings.json",
        '{\n  "server": {\n    "port": "3587"\n  }\n}\n',
        3, 13, "$.server.port",
        "expected `int`, got `str`",
    ),
    (
        "document-not-object",
        "ui-config.json",
        "[1, 2]\n",
        1, 1, "$",
        "expected a JSON object",
    ),
    (
        "algorithm-without-name",
        "algorithms/X.json",
        '{"fast": 9}',
        1, 1, "$",
        "missing required field `name`",
    ),
    ("empty-file", "connections.json", "", 1, 1, "$", "file is empty"),
    ("blank-file", "settings.json", "  \n", 2, 1, "$", "file is empty"),
    # Taken by the stdlib decoder that locates syntax errors, refused by msgspec: were 1:1
    # ("Number out of range - at `$[...]`", "Input data was truncated"), then had no path.
    ("document-number-out-of-range", "settings.json",
     '{\n  "a": "1e999",\n  "stale_after_s": 1e999}', 3, 20, "$.stale_after_s",
     "number out of range: 1e999"),
    ("lone-surrogate", "ui-config.json", '{\n  "a": "ok \\ud83d\\ude00",\n  "b": "x\\ud83dy"}',
     3, 10, "$.b", "\\ud83d is half of a UTF-16 surrogate pair, written alone"),
    ("lone-low-surrogate", "connections.json", f'[{CONN}, "name": "\\\\ud83d \\ude00"}}]',
     1, 65, "$[0].name", "\\ude00 is half of a UTF-16 surrogate pair"),
    ("number-past-int-digit-limit", "ui-config.json", '{"x": [1,\n ' + "9" * 5000 + "]}",
     2, 2, "$.x[1]", "number out of range"),
    ("bom", "ui-config.json", "\ufeff{}", 1, 1, "$", "starts with a byte-order mark (BOM)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "raw", "line", "column", "path", "message"),
    [b[1:] for b in BAD],
    ids=[b[0] for b in BAD],
)
def test_invalid_file_is_located(
    file: str, raw: str, line: int, column: int, path: str, message: str
) -> None:
    with pytest.raises(Invalid) as exc:
        files.decode_file(file, raw.encode())
    p = exc.value.problem
    assert message in p.message, p
    assert (p.file, p.line, p.column, p.path) == (file, line, column, path), p
    assert p.format().startswith(f"{file}:{line}:{column}: ")


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("Xq7Lm2Pz9Rt4Wv8N", False),  # letters and digits mixed, 16 or more
        ("3f2a9c1e-8b7d-4e6f-a5c4-1b2d3e4f5a6b", False),  # a UUID (an OKX key)
        ("aGVsbG8gd29ybGQhIHNlY3JldA2==", False),  # base64
        ("x" * 65, False),  # longer than any name
        ("is_enabeld", True),
        ("volume_factor_2", True),  # (one digit)
        ("api_passphrase22", True),  # close to a field: a slip, shown
        ("exchangeConnectionSettings", True),  # no digits
    ],
)
def test_an_unknown_field_that_reads_like_a_pasted_secret_is_shown_in_part(
    key: str, shown: bool
) -> None:
    """Answered on the bus and HTTP (`explain`) and in the file's problem (log, `/health`):
    a name as typed, a pasted credential by its last 4 characters, its path the record's."""
    raw = f'[{{"id": "a", "name": "x", "exchange": "bybit", "{key}": 1}}]'.encode()
    with pytest.raises(Invalid) as exc:
        files.decode_file("connections.json", raw)
    try:
        msgspec.json.decode(raw, type=list[Connection])
    except msgspec.ValidationError as e:
        message, path = diagnose.explain(str(e), list[Connection])
    for said in (exc.value.problem.format(), message):
        assert (key in said) is shown, said
    assert path == ("$[0]." + key if shown else "$[0]")
    if not shown:
        assert f"`…{key[-4:]}`" in message


def test_invalid_utf8_is_located() -> None:
    raw = b'[\n  {"id": "a", "name": "caf\xe9", "exchange": "bybit"}\n]\n'
    with pytest.raises(Invalid) as exc:
        files.decode_file("connections.json", raw)
    p = exc.value.problem
    assert "not UTF-8" in p.message
    assert (p.line, p.column) == (2, 27), p  # the bad byte itself
    with pytest.raises(Invalid) as exc:
        files.decode_file("ui-config.json", b'{"theme": "\xff"}')
    assert "not UTF-8" in exc.value.problem.message


@pytest.mark.parametrize(
    ("file", "raw"),
    [
        ("connections.json", b"[" * 100_000 + b"]" * 100_000),
        ("ui-config.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("settings.json", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        (
            "connection-sync-log.json",
            b'[{"id": 1, "connection_id": null, "action": "reset", "created_at":'
            b' "2024-01-01T00:00:00.000Z", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]",
        ),
    ],
    ids=["table", "document", "settings", "sync-log-data"],
)
def test_deeply_nested_json_is_an_error_not_a_crash(file: str, raw: bytes) -> None:
    with pytest.raises(Invalid) as exc:
        files.decode_file(file, raw)
    assert exc.value.problem.file == file


def test_did_you_mean_for_a_nested_struct() -> None:
    raw = b'{"projectX": {"apiUrl": "https://x"}, "server": {"prot": 1}}'
    # connection.json sections keep unknown keys (they are the trading app's), so this loads.
    assert files.decode_file("connection.json", raw)["server"] == {"prot": 1}
    raw = b'[{"connection_id": "a", "test_results": {"success": true, "latency": 1,'
    raw += b' "timestamp": "2024-01-01T00:00:00.000Z", "eror": "x"}}]'
    with pytest.raises(Invalid) as exc:
        files.decode_file("connection-state.json", raw)
    assert "did you mean `error`?" in exc.value.problem.message


def test_an_instance_id_given_twice_is_an_invalid_edit(tmp_path: Path) -> None:
    inst = {"id": "i1", "name": "n", "symbol": "NQ", "algorithmName": "trend"}
    doc = {"instances": [inst, {**inst, "id": "i2"}, {**inst, "name": "again"}]}
    raw = json.dumps(doc, indent=2).encode()
    with pytest.raises(Invalid) as exc:
        files.check_instance_ids(doc, "instances.json", raw)
    p = exc.value.problem
    assert p.path == "$.instances[2].id" and p.line > 1  # located in the file
    assert p.message == "duplicate id 'i1' (first at $.instances[0])"
    files.check_instance_ids({"instances": doc["instances"][:2]}, "instances.json", raw)
    # through the door: refused, naming the place
    c = Committed()
    ctx = Context(now_iso(), {})
    (out,), change = apply_group(
        c, [Request(ops.set_document("algorithms/trend", inst), "bus")], ctx
    )
    assert out.error is None
    c.apply(change)
    (out,), change = apply_group(c, [Request(ops.set_document("instances", doc), "bus")], ctx)
    assert out.error is not None and out.error.code == "invalid" and change.empty
    assert out.error.path == "$.content.instances[2].id", out.error
    # A file that holds one from before (the rule is new) still loads at start; `verify`
    # names it.
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "algorithms" / "trend.json").write_text('{"name": "trend"}\n')
    (tmp_path / "instances.json").write_text(raw.decode() + "\n")
    store = Store(tmp_path)
    store.open()
    assert not store.problems and store.documents["instances"] == doc
    problems = verify.check_contents(
        {"instances.json": raw, "algorithms/trend.json": b'{"name": "trend"}\n'}
    )
    assert [(p.file, p.path) for p in problems] == [("instances.json", "$.instances[2].id")]


def test_dangling_algorithm_name(tmp_path: Path) -> None:
    inst = {"instances": [{"id": "i1", "name": "n", "symbol": "NQ", "algorithmName": "Simple-MA"}]}
    with pytest.raises(Invalid) as exc:
        files.check_instance_refs(inst, {"Simple-MA-Crossover"}, "instances.json", None)
    p = exc.value.problem
    assert p.path == "$.instances[0].algorithmName"
    assert "names no file in algorithms/; did you mean 'Simple-MA-Crossover'?" in p.message
    # At start: instances.json is reported invalid, left as written, the rest loads.
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "instances.json").write_text(SEED_INSTANCES)
    store = Store(tmp_path)
    store.open()
    assert set(store.problems) == {"instances.json"}
    assert store.problems["instances.json"].path == "$.instances[0].algorithmName"
    assert (tmp_path / "instances.json").read_text() == SEED_INSTANCES


def test_unreadable_files_at_start_are_reported(tmp_path: Path) -> None:
    (tmp_path / "connections.json").mkdir()
    (tmp_path / "ui-config.json").write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    (tmp_path / "watchlists.json").write_bytes(b'{"main": ["\xff"]}')
    big = tmp_path / "settings.json"
    with open(big, "wb") as fh:  # sparse: no real disk used
        fh.truncate(limits.MAX_FILE_BYTES + 1)
    store = Store(tmp_path)
    store.open()
    assert "is a directory" in store.problems["connections.json"].message
    assert "the limit is" in store.problems["settings.json"].message
    deep = store.problems["ui-config.json"]
    assert f"nested deeper than {limits.MAX_DEPTH} levels" in deep.message
    assert (deep.line, deep.column) == (1, 7 + limits.MAX_DEPTH - 1)  # the first bracket past it
    assert "not UTF-8" in store.problems["watchlists.json"].message
    assert (tmp_path / "connections.json").is_dir()
    assert big.stat().st_size == limits.MAX_FILE_BYTES + 1
    with pytest.raises(Invalid) as exc:
        files.decode_file("ui-config.json", b" " * (limits.MAX_FILE_BYTES + 1))
    assert "the limit is" in exc.value.problem.message


def test_secret_value_never_in_an_error_message() -> None:
    canary = "CANARY-SECRET-7f3a9c"
    for raw in (
        f'[{CONN}, "api_key": 12, "api_secret": "{canary}", "is_enabeld": 1}}]',
        f'[{CONN}, "api_secret": ["{canary}"]}}]',
    ):
        with pytest.raises(Invalid) as exc:
            files.decode_file("connections.json", raw.encode())
        assert canary not in exc.value.problem.format()


# --- timestamps -----------------------------------------------------------------------------


def test_timestamps_are_utc_with_ms_and_z() -> None:
    ts = now_iso()
    assert re.fullmatch(TIMESTAMP_PATTERN, ts), ts
    paris = dt.timezone(dt.timedelta(hours=2))
    assert format_ts(dt.datetime(2024, 8, 2, 8, 45, 0, 123456, paris)) == "2024-08-02T06:45:00.123Z"
    assert parse_ts("2024-08-02T06:45:00.123Z") == dt.datetime(2024, 8, 2, 6, 45, 0, 123000, dt.UTC)


def test_encoding_is_two_space_indent_with_trailing_newline() -> None:
    conns = files.decode_file("connections.json", SEED_CONNECTIONS.encode())
    body = files.encode_table(conns)
    assert body.endswith(b"\n]\n") and body.startswith(b'[\n  {\n    "id"')
    assert msgspec.json.decode(body) == msgspec.json.decode(SEED_CONNECTIONS)
    assert body == msgspec.json.format(msgspec.json.encode(conns), indent=2) + b"\n"
    assert files.encode_table([]) == b"[]\n"


@pytest.mark.parametrize("count", [0, 1, 2, 3, 500, 5000])
def test_a_table_body_is_made_in_chunks_of_a_few_hundred_kilobytes(count: int) -> None:
    # Records of uneven sizes (growing): the records per chunk are guessed from a few.
    frags = [b"  {" + b"x" * (7 * k % 3001) + b"}" for k in range(count)]
    body = files.TableBody(frags)
    chunks = list(body)
    assert list(body) == chunks  # iterated again (a copy in cluster mode): the same bytes
    whole = b"".join(chunks)
    assert whole == (b"[\n" + b",\n".join(frags) + b"\n]\n" if frags else b"[]\n")
    assert msgspec.json.decode(whole.replace(b"x", b"")) == [{}] * count
    assert abs(body.nbytes - len(whole)) <= len(whole) // 4 + 8  # about: it paces the writer
    if count == 5000:  # ~7.5 MB: a few dozen chunks, not one per record
        assert 10 <= len(chunks) <= 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "abc\n"),
        ("created_at", "2024-01-01T00:00:00.000Z\n"),
        # Timestamps compare as strings: another script's digits, or a month 13, sorted
        # after every real one (a heartbeat never again newer than it).
        ("created_at", "٢٠٢٤-01-01T00:00:00.000Z"),
        ("created_at", "2024-13-01T00:00:00.000Z"),
        ("created_at", "2024-01-32T00:00:00.000Z"),
        ("created_at", "2024-01-01T24:00:00.000Z"),
        ("created_at", "2024-01-01T00:60:00.000Z"),
        ("created_at", "2024-01-01T00:00:00.٠٠٠Z"),
    ],
)
def test_ids_and_timestamps_match_exactly(field: str, value: str) -> None:
    # `$` in a pattern also matches before a trailing newline: ids and timestamps must not.
    record = {"id": "abc", "name": "n", "exchange": "bybit", field: value}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(record, Connection)
    if field == "created_at":  # while the seeds' own pass
        assert msgspec.convert({**record, field: "2024-12-31T23:59:59.999Z"}, Connection)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"server": {"host": "192.168..1"}}, "server.host '192.168..1' is not an IP address"),
        ({"server": {"host": ""}}, "server.host '' is not an IP address"),
        ({"server": {"host": "a b"}}, "server.host 'a b' is not an IP address"),
        ({"sweep_interval_s": 1e-300}, ">= 0.001"),
        ({"heartbeat_flush_s": 0.0001}, ">= 0.001"),
        ({"stale_after_s": 0}, ">= 0.001"),
        ({"test_interval_s": 1e-9}, "use 0 (no periodic tests) or at least 0.001 s"),
    ],
)
def test_settings_a_daemon_cannot_run_with_are_refused(settings: dict, says: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(says)):
        msgspec.convert(settings, Settings)


def test_settings_a_daemon_can_run_with_are_taken() -> None:
    """Beyond what cannot work at all, what an earlier version took is taken still: a file
    refused at start would put every setting back to its default."""
    ok = {
        "server": {"host": "::1", "cors_origins": ["null", "*", "http://localhost:5173/"]},
        "test_interval_s": 0,
        "sweep_interval_s": 0.05,
        "stale_after_s": 0.05,
        "test_timeout_s": 300,
    }
    assert msgspec.convert(ok, Settings).server.host == "::1"
    for host in ("0.0.0.0", "localhost", "trading-1.desk.lan", "trading-1.desk.lan.", "ctsd_gw"):
        msgspec.convert({"server": {"host": host}}, Settings)


def test_cors_origins_let_in_what_browsers_send_and_never_null() -> None:
    entries = ["http://localhost:5173/", "null", "*", "app://desk", "HTTP://Host:8080", "h/x"]
    server = msgspec.convert({"cors_origins": entries}, ServerSettings)
    assert allowed_origins(server) == {"http://localhost:5173", "app://desk", "http://host:8080"}
    # A desktop shell's packaged pages (Electron) send `file://`: listed, it is let in.
    for listed in ("file://", "FILE:///"):
        server = msgspec.convert({"cors_origins": [listed]}, ServerSettings)
        assert allowed_origins(server) == {"file://"}
