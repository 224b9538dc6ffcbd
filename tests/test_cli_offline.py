"""The CLI without a daemon: `verify`, `schema`, argument checking, and no daemon answering.

Every test runs the real `ctsd` console script as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ctsd import limits, models
from tests.cli_helpers import CANARY, CTSD, clean_env, closed, ctsd, without_dac
from tests.daemon import free_port

# --- verify ---------------------------------------------------------------------------------

VALID_CONNECTIONS = """[
  {
    "id": "conn_abc123",
    "name": "Bybit Main",
    "exchange": "bybit",
    "volume_factor": 1.0,
    "connection_settings": "{}"
  }
]
"""


def where(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first `needle` in `text`."""
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def test_verify_valid_dir(tmp_path: Path) -> None:
    (tmp_path / "connections.json").write_text(VALID_CONNECTIONS)
    (tmp_path / "settings.json").write_text('{"server": {"port": 4000}, "theme": "dark"}\n')
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "algorithms" / "trend.json").write_text('{"name": "trend", "window": 5}\n')
    (tmp_path / "instances.json").write_text(
        '{"instances": [{"id": "i1", "name": "x", "symbol": "ES", "algorithmName": "trend"}]}\n'
    )
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: 4 file(s) valid")


def test_verify_takes_the_data_dir_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "connections.json").write_text("[1")
    r = ctsd("verify", env=clean_env(CTSD_DATA_DIR=str(tmp_path)))
    assert r.returncode == 1
    assert f"{tmp_path}/connections.json:1:" in r.stdout


# (file, content, the text where the problem is located, words the message must carry)
PROBLEMS: list[tuple[str, str, str, list[str]]] = [
    ("connections.json", '[\n  {"id": "a", "name": "A",, }\n]\n', ", }", ["invalid JSON"]),
    (
        "connections.json",
        '[\n  {"id": "a", "name": "A", "exchange": "x", "is_enabeld": true}\n]\n',
        '"is_enabeld"',
        ["unknown field `is_enabeld`", "did you mean `is_enabled`"],
    ),
    (
        "connections.json",
        '[\n  {"id": "a", "name": "A", "exchange": "x", "volume_factor": "big"}\n]\n',
        '"big"',
        ["expected `float`"],
    ),
    (
        "connections.json",
        '[\n  {"id": "a", "name": "A", "exchange": "x"},\n'
        '  {"id": "a", "name": "B", "exchange": "y"}\n]\n',
        '"a", "name": "B"',
        ["duplicate"],
    ),
    ("settings.json", '{"server": {"port": 70000}}\n', "70000", ["65535"]),
    (
        "instances.json",
        '{"instances": [{"id": "i", "name": "n", "symbol": "ES", "algorithmName": "ghost"}]}\n',
        '"ghost"',
        ["ghost", "algorithms/"],
    ),
    (
        "connections.json",
        '[\n  {"id": "a", "name": "A", "exchange": "x", "api_key": "enc:v1:0123abcd:%%"}\n]\n',
        '"enc:v1',
        ["api_key", "not base64", "(id a)"],
    ),
    (
        "connection.json",
        '{"projectX": {"username": "u", "apiKey": "enc:v2:whatever"}}\n',
        '"enc:v2',
        ["apiKey", "`enc:v1:KEYID:DATA`"],
    ),
    (
        "connections.json",
        '[\n  {"id": "a", "name": "A", "exchange": "x", "api_secret": "********"}\n]\n',
        '"********"',
        ["`api_secret` holds the masked placeholder"],
    ),
    ("ui-config.json", "[1, 2]\n", "[", ["expected a JSON object"]),
    ("algorithms/no-name.json", '{"window": 3}\n', "{", ["name"]),
]


@pytest.mark.parametrize(("file", "content", "at", "words"), PROBLEMS)
def test_verify_reports_each_problem_with_its_location(
    tmp_path: Path, file: str, content: str, at: str, words: list[str]
) -> None:
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1, r.stdout
    line, col = where(content, at)
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(f"{path}:{line}:{col}: "), (lines[0], line, col)
    for word in words:
        assert word in lines[0]
    assert "1 problem(s)" in r.stderr


def test_verify_names_every_bad_record_of_a_table_in_one_run(tmp_path: Path) -> None:
    """It named one problem a file per run: three runs to find three typos (review)."""
    (tmp_path / "connections.json").write_text(
        "[\n"
        '  {"id": "a", "name": "A", "exchange": "x", "is_enabeld": true},\n'
        '  {"id": "b", "name": "B", "exchange": "x", "volume_factr": 2},\n'
        '  {"id": "a", "name": "C", "exchange": "x"},\n'
        '  {"id": "d", "name": 5, "exchange": "x"},\n'
        '  {"id": "e", "name": "E", "exchange": "x"}\n'
        "]\n"
    )
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "4 problem(s) in 1 file(s)" in r.stderr, r.stderr
    where = f"{tmp_path}/connections.json"
    assert r.stdout.splitlines() == [
        f"{where}:2:45: unknown field `is_enabeld` at `$[0]`; did you mean `is_enabled`?",
        f"{where}:3:45: unknown field `volume_factr` at `$[1]`; did you mean `volume_factor`?",
        f"{where}:4:10: duplicate id 'a' (first at $[0]) (at $[2].id)",
        f"{where}:5:23: expected `str`, got `int` (at $[3].name)",
    ]


def test_a_large_import_to_a_port_that_is_no_ctsd_says_so(tmp_path: Path) -> None:
    """An export over one bus message goes over HTTP: an answer no ctsd gives (here a plain
    file server's 501) is named so, exit 3, not read as the daemon's refusal."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        big = tmp_path / "big.json"
        conns = [{"id": f"b{i}", "name": "n" * 150, "exchange": "x"} for i in range(6000)]
        big.write_text(json.dumps({"files": {"connections.json": conns}}))
        env = clean_env(CTSD_PORT=str(server.server_address[1]), CTSD_TOKEN="t")
        r = ctsd("import", str(big), "--data-dir", str(tmp_path), env=env)
        assert r.returncode == 3 and "is this ctsd?" in r.stderr, r.stderr
    finally:
        server.shutdown()


def test_an_empty_output_path_is_named_so(tmp_path: Path) -> None:
    """`-o ""` (an unset shell variable) said "is a directory": Path("") is the current one."""
    r = ctsd("export", "-o", "", "--data-dir", str(tmp_path), "--port", "1")
    assert r.returncode == 1 and "the output path is empty" in r.stderr, r.stderr


def test_verify_names_a_state_record_for_no_connection(tmp_path: Path) -> None:
    """What a running daemon refuses in a hand edit (and a restore through it refuses), and
    a start drops: `verify` said nothing of it (review)."""
    (tmp_path / "connections.json").write_text('[{"id": "ghost1", "name": "A", "exchange": "x"}]')
    state = '[\n  {"connection_id": "ghost1"},\n  {"connection_id": "ghost"}\n]\n'
    (tmp_path / "connection-state.json").write_text(state)
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.stdout.splitlines()[0] == (
        f"{tmp_path}/connection-state.json:3:21: connection_id 'ghost' names no connection in "
        "connections.json; did you mean 'ghost1'?; a daemon refuses it in an edit (one made "
        "while it was stopped included) and drops it at its start only from a file it wrote "
        "itself (at $[1].connection_id)"
    )
    # a note, not a problem: a stopped daemon's file may hold one it dropped, and its
    # backup must still be made
    assert r.returncode == 0, r.stderr


def test_verify_reports_every_bad_file_not_just_the_first(tmp_path: Path) -> None:
    (tmp_path / "connections.json").write_text("[")
    (tmp_path / "watchlists.json").mkdir()
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "algorithms" / "..x.json").write_text("{}")
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    out = r.stdout
    assert f"{tmp_path}/connections.json:1:" in out
    assert f"{tmp_path}/watchlists.json:1:1: is a directory" in out
    assert f"{tmp_path}/algorithms/..x.json:1:1: algorithm file name not allowed" in out, out
    assert "3 problem(s)" in r.stderr


def test_verify_never_prints_a_terminal_escape_from_the_data(tmp_path: Path) -> None:
    """A key (or an algorithm's file name) holding escape sequences is shown escaped: printed
    raw it would retitle or clear the operator's terminal."""
    key = "\x1b]0;PWNED\x07\x1b[2J"
    (tmp_path / "connections.json").write_text(json.dumps([{"id": "c1", key: 1}]))
    (tmp_path / "connections.json").chmod(0o600)
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "\x1b" not in r.stdout + r.stderr, r.stdout
    assert "unknown field `\\x1b]0;PWNED\\x07\\x1b[2J`" in r.stdout, r.stdout


def test_verify_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    r = ctsd("verify", "--data-dir", str(missing))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip() == f"ctsd: {missing}: data dir does not exist or is not a directory"
    assert not missing.exists(), "verify must not create the data dir"


@pytest.mark.parametrize("command", [["verify"], ["serve"], ["backup", "-o", "-"]])
def test_a_home_of_an_unknown_user_is_one_line(command: list[str]) -> None:
    r = ctsd(*command, "--data-dir", "~no-such-user-here/data")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        "ctsd: data dir '~no-such-user-here/data': no user's home to put for its ~"
    )


@pytest.mark.parametrize(
    "command", [["verify"], ["secrets", "status"], ["backup", "-o", "out.tar.gz"]]
)
@pytest.mark.parametrize("closed_one", ["parent", "dir"])
def test_a_data_dir_this_user_cannot_enter_is_one_line(
    command: list[str], closed_one: str, tmp_path: Path
) -> None:
    """Path.is_dir() raises EACCES on Python 3.11 (a parent we cannot search); a dir we
    cannot enter failed later, on a file in it: tracebacks, or a line naming another file."""
    data = tmp_path / "parent" / "data"
    data.mkdir(parents=True, mode=0o700)
    (data / "connections.json").write_text("[]\n")
    (data / "connections.json").chmod(0o600)
    with closed(data.parent if closed_one == "parent" else data):
        r = ctsd(*command, "--data-dir", str(data), cwd=tmp_path, prefix=without_dac())
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"ctsd: cannot access {data}: Permission denied\n"
    assert not (tmp_path / "out.tar.gz").exists()


def test_backup_of_a_data_dir_it_cannot_lock_names_the_lock(tmp_path: Path) -> None:
    """A read-only data dir (no .lock can be made) was reported as the archive not written."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with closed(data, 0o500):
        r = ctsd(
            "backup", "-o", "out.tar.gz", "--data-dir", str(data), cwd=tmp_path,
            prefix=without_dac(),
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        f"ctsd: backup failed: {data}/.lock: Permission denied; nothing was written\n"
    )
    assert not (tmp_path / "out.tar.gz").exists()


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_lock_that_is_no_file_is_named(command: str, tmp_path: Path) -> None:
    """A FIFO at DATA/.lock: the tools named the archive ("Invalid argument"), not it."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.mkfifo(data / ".lock")
    args = ["-o", "out.tar.gz"] if command == "backup" else ["out.tar.gz"]
    r = ctsd(command, *args, "--data-dir", str(data), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert f"{data}/.lock" in r.stderr and "not a regular file" in r.stderr, r.stderr


def test_verify_touches_nothing(tmp_path: Path) -> None:
    bad = '[{"id": "a", "name": "A", "exchange": "x", "api_key": "' + CANARY + '", "oops": 1}]'
    (tmp_path / "connections.json").write_text(bad)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert (tmp_path / "connections.json").read_text() == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert CANARY not in r.stdout + r.stderr


# --- schema ---------------------------------------------------------------------------------

JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def check_schema(node: Any, root: dict[str, Any], path: str = "$") -> int:
    """Structural JSON Schema check: types, refs resolve, required ⊆ properties. Returns #refs."""
    refs = 0
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/$defs/"), (path, ref)
            assert ref.removeprefix("#/$defs/") in root.get("$defs", {}), (path, ref)
            refs += 1
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            assert set(types) <= JSON_TYPES, (path, types)
        if "properties" in node:
            assert isinstance(node["properties"], dict), path
            for req in node.get("required", []):
                assert req in node["properties"], (path, req)
        for key in ("anyOf", "allOf", "oneOf"):
            if key in node:
                assert isinstance(node[key], list) and node[key], (path, key)
        for k, v in node.items():
            if k in ("properties", "$defs", "patternProperties") and isinstance(v, dict):
                # A map of names to schemas: the names are not keywords.
                for name, sub in v.items():
                    refs += check_schema(sub, root, f"{path}.{k}.{name}")
            elif k not in ("const", "enum", "default", "examples"):
                refs += check_schema(v, root, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            refs += check_schema(v, root, f"{path}[{i}]")
    return refs


def test_schema_lists_every_name() -> None:
    r = ctsd("schema")
    assert r.returncode == 0
    names = r.stdout.split()
    expected = {"connections", "connection-state", "connection-sync-log", "settings"}
    expected |= {"connection", "instances", "algorithm", "protocol"}
    expected |= {"main-indications", "common-indications", "ui-config", "user-settings"}
    expected |= {"watchlists"}
    assert set(names) == expected


@pytest.mark.parametrize(
    "name",
    [
        "connections",
        "connection-state",
        "connection-sync-log",
        "settings",
        "connection",
        "instances",
        "algorithm",
        "protocol",
    ],
)
def test_schema_is_valid_json_schema(name: str) -> None:
    r = ctsd("schema", name)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert out["title"]
    assert check_schema(out, out) > 0
    try:
        import jsonschema  # optional: the full meta-schema check where it is installed
    except ImportError:
        pass
    else:
        jsonschema.Draft202012Validator.check_schema(out)


def test_schema_connections_has_exactly_the_connection_fields() -> None:
    out = json.loads(ctsd("schema", "connections").stdout)
    conn = out["$defs"]["Connection"]
    assert list(conn["properties"]) == [f.name for f in msgspec.structs.fields(models.Connection)]
    assert conn.get("additionalProperties") is False  # unknown keys are an error
    assert conn["properties"]["id"]["pattern"] == r"^[A-Za-z0-9_-]{1,64}(?!\n)$"


def test_schema_accepts_file_names() -> None:
    by_name = ctsd("schema", "connections").stdout
    assert ctsd("schema", "connections.json").stdout == by_name
    algo = json.loads(ctsd("schema", "algorithms/connections.json").stdout)
    assert algo["title"] == "ctsd algorithm"


def test_schema_protocol_names_the_bus_commands() -> None:
    out = json.loads(ctsd("schema", "protocol").stdout)
    text = json.dumps(out)
    for command in ("subscribe", "connections.update", "data.import", "snapshot"):
        assert command in text


def test_schema_unknown_name_is_a_usage_error() -> None:
    r = ctsd("schema", "nope")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "no schema 'nope'; one of: algorithm," in r.stderr


# --- the client without a daemon ------------------------------------------------------------

CLIENT_COMMANDS: list[list[str]] = [
    ["status"],
    ["conn", "list"],
    ["conn", "show", "x"],
    ["conn", "add", "--name", "n", "--exchange", "e"],
    ["conn", "set", "x", "name=y"],
    ["conn", "rm", "x"],
    ["conn", "enable", "x"],
    ["conn", "disable", "x"],
    ["conn", "activate", "x"],
    ["conn", "deactivate", "x"],
    ["conn", "volume", "x", "--live", "2"],
    ["conn", "test", "x"],
    ["watch"],
    ["export"],
    ["reset", "--yes"],
]


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_no_daemon_answering_is_one_clear_line(args: list[str], tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    r = ctsd(*args, env=clean_env(CTSD_PORT=str(port), CTSD_TOKEN="t"), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    assert r.stderr == (
        f"ctsd: no daemon answering on 127.0.0.1:{port} — "
        "start it with `ctsd serve` or `systemctl start ctsd`\n"
    )


def test_import_with_no_daemon_answering(tmp_path: Path) -> None:
    (tmp_path / "export.json").write_text('{"version": 1, "files": {"connections.json": []}}')
    port = free_port()
    r = ctsd(
        "import", "export.json", env=clean_env(CTSD_PORT=str(port), CTSD_TOKEN="t"), cwd=tmp_path
    )
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"ctsd: no daemon answering on 127.0.0.1:{port} — ")


def test_no_daemon_default_address(tmp_path: Path) -> None:
    r = ctsd("status", "--port", "3587", cwd=tmp_path)
    if r.returncode == 3:  # unless a real daemon runs on this machine
        assert "no daemon answering on 127.0.0.1:3587 — start it with `ctsd serve`" in r.stderr


def test_import_missing_and_invalid_files_are_usage_errors(tmp_path: Path) -> None:
    env = clean_env(CTSD_PORT=str(free_port()), CTSD_TOKEN="t")
    r = ctsd("import", str(tmp_path / "missing.json"), env=env)
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "missing.json" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "files": {,\n}')
    r = ctsd("import", str(bad), env=env)
    assert r.returncode == 2
    assert f"{bad}:2:13: not valid JSON" in r.stderr
    notexport = tmp_path / "list.json"
    notexport.write_text("[1, 2]")
    r = ctsd("import", str(notexport), env=env)
    assert r.returncode == 2
    assert "is not a ctsd export" in r.stderr
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    r = ctsd("import", str(binary), env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    huge = tmp_path / "huge.json"  # (sparse: no disk taken)
    with open(huge, "wb") as f:
        f.truncate(2 * limits.MAX_FILE_BYTES + 1)
    r = ctsd("import", str(huge), env=env)
    assert r.returncode == 2 and "is larger than" in r.stderr, r.stderr
    half = tmp_path / "half.json"  # (half a surrogate pair: JSON, but no UTF-8 can say it)
    half.write_text('{"files": {"ui-config.json": {"note": "\\ud800"}}}')
    r = ctsd("import", str(half), env=env)
    assert r.returncode == 2 and "holds text that is not valid UTF-8" in r.stderr, r.stderr
    utf16 = tmp_path / "utf16.json"  # (json takes UTF-16 by its byte-order mark)
    utf16.write_bytes('{"files": {}}'.encode("utf-16"))
    r = ctsd("import", str(utf16), env=env)
    assert r.returncode == 2 and "is not UTF-8" in r.stderr, r.stderr
    nan = tmp_path / "nan.json"  # json takes it; the daemon would not
    nan.write_text('{"files": {"ui-config.json": {"zoom": NaN}}}')
    r = ctsd("import", str(nan), env=env)
    assert r.returncode == 2 and "NaN is not a JSON number" in r.stderr, r.stderr


ADD = ["conn", "add", "--name", "a", "--exchange", "e"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["conn", "set", "x", "novalue"], "give FIELD=VALUE"),
        (["conn", "set", "x", "=1"], "expected field=value"),
        (["conn", "set", "x", "is_enabeld=true"], "did you mean `is_enabled`"),
        (["conn", "set", "x", "bogus=1"], "unknown field `bogus`"),
        (["conn", "set", "x", "volume_factor=abc"], "is not a JSON value"),
        (["conn", "set", "x", "id=y"], "set by the daemon"),
        (["conn", "set", "x"], "nothing to change"),
        (["conn", "set", "x", f"api_key={CANARY}"], "not taken from the command line"),
        (["conn", "set", "x", f"api_secret={CANARY}"], "not taken from the command line"),
        (["conn", "add", "--exchange", "e"], "Missing option '--name'"),
        (["conn", "add", "--name", "n", "--exchange", "e", "--settings", "[1]"], "JSON object"),
        (["conn", "add", "--name", "n", "--exchange", "e", "--volume-factor", "0"], "> 0"),
        (["conn", "add", "--name", "n", "--exchange", "e", "--api-key-env", "NOPE_X"], "not set"),
        # An option and its FIELD=VALUE twin: one of them silently won
        ([*ADD, "name=zzz"], "name given twice"),
        ([*ADD, "--enabled", "is_enabled=false"], "is_enabled given twice: by --enabled/"),
        ([*ADD, "--volume-factor", "2", "volume_factor=5"], "volume_factor given twice"),
        (["conn", "volume", "x", "--live", "-1"], "--live"),
        (["conn", "volume", "x", "--preset", "nan"], "--preset"),
        (["conn", "rm"], "Missing argument"),
        (["watch", "--since", "-1"], "--since"),
        (["watch", "--topic", "nope"], "--topic"),
        (["reset"], "--yes"),
        (["status", "--port", "70000"], "--port"),
        # Thousands deep: json's RecursionError was a traceback.
        (["conn", "set", "x", "exchange_id=" + "[" * 5000], "is nested too deeply"),
        (["conn", "add", "--name", "n", "--exchange", "e", "--settings", "[" * 5000], "deeply"),
        # json takes these, and sent them on as no JSON (the daemon named a byte of the frame)
        (["conn", "set", "x", "volume_factor=1e999"], "1e999 is out of range"),
        (["conn", "set", "x", "is_enabled=NaN"], "NaN is not a JSON number"),
        (["conn", "add", "--name", "n", "--exchange", "e", "user_id=-Infinity"], "-Infinity"),
        # `--data-dir "$DIR"` with DIR unset: not ./data (a fresh token, a restore into it)
        (["serve", "--data-dir", ""], "--data-dir is empty"),
        (["restore", "x.tar.gz", "--data-dir", ""], "--data-dir is empty"),
        (["status", "--data-dir", " "], "--data-dir is empty"),
        (["status", "--host", ""], "'' is not a host name"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    # A port nothing listens on: proves the error comes before any connection is tried.
    r = ctsd(*args, env=clean_env(CTSD_PORT=str(free_port()), CTSD_TOKEN="t"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert CANARY not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["backup", "-o", "/tmp/" + "x" * 300],  # (a name longer than the system takes)
        ["migrate", "--dry-run", "--from", "sqlite:////tmp/" + "x" * 300],
    ],
    ids=["backup", "migrate"],
)
def test_a_path_the_system_refuses_is_one_line(args: list[str], tmp_path: Path) -> None:
    r = ctsd(*args, "--data-dir", str(tmp_path / "data"), env=clean_env())
    assert r.returncode == 1 and "File name too long" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["export", "-o", "LOOP"],
        ["backup", "-o", "LOOP"],
        ["backup", "-o", "x.tgz", "--data-dir", "LOOP"],
        ["restore", "x.tgz", "--data-dir", "LOOP"],
    ],
)
def test_a_symlink_loop_is_one_line(args: list[str], tmp_path: Path) -> None:
    """Python 3.11's `Path.resolve` raises RuntimeError on a loop, which was a traceback."""
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    args = [str(tmp_path / "l1") if a == "LOOP" else a for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(tmp_path / "data")]
    r = ctsd(*args, env=clean_env(CTSD_PORT=str(free_port()), CTSD_TOKEN="t"), cwd=tmp_path)
    assert r.returncode == 1 and "symbolic links" in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args", [["schema", "protocol"], ["--help"], ["verify", "--data-dir", "DATA"]]
)
def test_output_that_cannot_be_written_is_one_line(args: list[str], tmp_path: Path) -> None:
    """stdout on a full disk (`ctsd export > /mnt/full/backup.json`): one line, exit 1."""
    (tmp_path / "connections.json").write_text(VALID_CONNECTIONS)
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [str(CTSD), *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr == "ctsd: cannot write the output: No space left on device\n", r.stderr


def test_a_command_run_with_stdout_closed_is_no_traceback(tmp_path: Path) -> None:
    """From cron or a supervisor, `ctsd … >&-`: Python has no sys.stdout at all."""
    (tmp_path / "connections.json").write_text(VALID_CONNECTIONS)
    r = subprocess.run(
        [str(CTSD), "verify", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_hostile_field_names_are_escaped_and_shortened() -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07" + "x" * 5000
    r = ctsd("conn", "set", "x", f"{hostile}=1", env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 2
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert len(r.stderr) < 2000


def test_bad_port_in_environment() -> None:
    r = ctsd("status", env=clean_env(CTSD_PORT="abc"))
    assert r.returncode == 2
    assert "CTSD_PORT must be a port number" in r.stderr


@pytest.mark.parametrize("port", [70000, -1, 0])
def test_a_bad_port_in_settings_is_one_line(port: int, tmp_path: Path) -> None:
    """server.port out of range in DATA/settings.json was a traceback from the URL parser."""
    (tmp_path / "settings.json").write_text(json.dumps({"server": {"port": port}}))
    r = ctsd("status", "--data-dir", str(tmp_path), env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        f"ctsd: {tmp_path}/settings.json server.port {port} is out of range (1-65535)\n"
    )
    # A port given on the command line is used: the settings' one does not matter then.
    free = free_port()
    r = ctsd("status", "--data-dir", str(tmp_path), "--port", str(free),
             env=clean_env(CTSD_TOKEN="t"))  # fmt: skip
    assert r.returncode == 3 and f"no daemon answering on 127.0.0.1:{free}" in r.stderr


@pytest.mark.parametrize(
    ("host", "message"),
    [
        # (idna refuses them: an empty label, one over 63 characters)
        ("192.168..1", "cannot connect to 192.168..1:{port}: "),
        ("a" * 64, f"cannot connect to {'a' * 64}:{{port}}: "),
        ("127.0.0.1/x", "--host: '127.0.0.1/x' is not a host name or IP address"),
        ("127.0.0.1?x", "--host: '127.0.0.1?x' is not a host name or IP address"),
        ("user@127.0.0.1", "--host: 'user@127.0.0.1' is not a host name or IP address"),
        ("[::1", "--host: '[::1' is not a host name or IP address"),
        ("[[::1]]", "--host: '[::1]' is not a host name or IP address"),
        ("a b", "--host: 'a b' is not a host name or IP address"),
    ],
)
def test_a_bad_host_is_one_line(host: str, message: str) -> None:
    """A host no URL can carry was a ValueError traceback; one that held a `/` or a `?` sent
    the token to port 80 (`ws://127.0.0.1/x:3587/ws`)."""
    port = free_port()
    r = ctsd("status", "--host", host, "--port", str(port), env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("ctsd: " + message.format(port=port)), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # (not even the unencrypted-token warning)


def test_a_bad_host_names_where_it_came_from(tmp_path: Path) -> None:
    r = ctsd("status", "--data-dir", str(tmp_path), env=clean_env(CTSD_TOKEN="t", CTSD_HOST="a/b"))
    assert (
        r.returncode == 2
        and r.stderr == "ctsd: CTSD_HOST: 'a/b' is not a host name or IP address\n"
    )
    (tmp_path / "settings.json").write_text('{"server": {"host": "x?y"}}')
    r = ctsd("status", "--data-dir", str(tmp_path), env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        f"ctsd: {tmp_path}/settings.json server.host: 'x?y' is not a host name or IP address\n"
    )


@pytest.mark.parametrize("host", ["[::1]", "::1"])
def test_an_ipv6_host_in_brackets_or_not(host: str, tmp_path: Path) -> None:
    """`--host [::1]` came out as ws://[[::1]]:PORT/ws, a ValueError traceback."""
    port = free_port()
    r = ctsd("status", "--host", host, "--port", str(port), env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"ctsd: no daemon answering on [::1]:{port}"), r.stderr
    # In settings.json too, as an operator may write it.
    (tmp_path / "settings.json").write_text(json.dumps({"server": {"host": host, "port": port}}))
    r = ctsd("status", "--data-dir", str(tmp_path), env=clean_env(CTSD_TOKEN="t"))
    assert r.returncode == 3 and f"on [::1]:{port}" in r.stderr, r.stderr


def test_help_documents_the_exit_codes() -> None:
    for args in (["--help"], ["status", "--help"], ["conn", "set", "--help"], ["watch", "-h"]):
        r = ctsd(*args)
        assert r.returncode == 0
        assert "Exit codes:" in r.stdout
        assert "3  no daemon answering" in r.stdout


def test_token_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CTSD_TOKEN > $CREDENTIALS_DIRECTORY > DATA/.token > the systemd unit's token file."""
    from ctsd.client import Target, read_token

    for name in ("CTSD_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    system = tmp_path / "etc-token"
    target = Target("127.0.0.1", 3587, data)
    assert read_token(target, system) is None
    system.write_text("from-etc\n")
    assert read_token(target, system) == "from-etc"
    (data / ".token").write_text("from-data\n")
    assert read_token(target, system) == "from-data"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ctsd-token").write_text("from-creds\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_token(target, system) == "from-creds"
    monkeypatch.setenv("CTSD_TOKEN", "from-env")
    assert read_token(target, system) == "from-env"


def test_a_system_token_dir_this_user_cannot_enter_is_named(tmp_path: Path) -> None:
    """/etc/ctsd closed to this user: is_file() on its token raises EACCES, and the line
    named DATA/.token, a file that was not the problem. (In a process of its own, run
    without root's reading of every directory.)"""
    data = tmp_path / "data"
    data.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "token").write_text("from-etc\n")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ctsd.client import CliError, Target, read_token\n"
        "try:\n"
        f"    target = Target('127.0.0.1', 3587, Path({str(data)!r}))\n"
        f"    read_token(target, Path({str(etc)!r}) / 'token')\n"
        "except CliError as e:\n"
        "    print(e.exit_code, e.message)\n"
    )
    with closed(etc):
        r = subprocess.run(
            [*without_dac(), sys.executable, "-c", code],
            env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    from ctsd.client import EXIT_AUTH

    assert r.stdout.startswith(
        f"{EXIT_AUTH} cannot read the bus token {etc}/token: Permission denied; set CTSD_TOKEN"
    ), r.stdout + r.stderr


# --- serve ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("CTSD_LOG_LEVEL", "verbose", "debug, info, warning, error"),
        ("CTSD_LOG_FORMAT", "xml", "json, console"),
    ],
)
def test_serve_with_a_bad_log_setting_in_the_environment(
    name: str, value: str, accepted: str, tmp_path: Path
) -> None:
    """A start failure: exit 1 and one line naming the variable, before anything starts;
    click's usage block and exit 2 are for a bad flag."""
    data = tmp_path / "data"
    r = subprocess.run(
        [sys.executable, "-m", "ctsd", "serve", "--data-dir", str(data), "--port", "0"],
        env=clean_env(**{name: value}),
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"ctsd: {name}='{value}' is not one of: {accepted}\n"
    assert r.stdout == "" and not data.exists()
    flag = "--" + name.removeprefix("CTSD_").lower().replace("_", "-")
    r = ctsd("serve", "--data-dir", str(data), flag, value)
    assert r.returncode == 2 and f"Invalid value for '{flag}'" in r.stderr, r.stderr
    assert not data.exists()


def _journal_with_changes(data_dir: Path, n: int) -> Path:
    """A real journal (the daemon's own writer) holding `n` change groups not yet in the
    files, as a daemon killed before its checkpoint leaves it."""
    from ctsd.core import Committed, Context, Request, apply_group
    from ctsd.journal import Journal
    from ctsd.ops import create

    committed = Committed()
    j = Journal(data_dir)
    j.open(0)
    for i in range(n):
        op = create({"id": f"c{i}", "name": f"C{i}", "exchange": "bybit"})
        _, change = apply_group(
            committed, [Request(op, "cli")], Context(f"2026-01-01T00:00:0{i}.000Z")
        )
        j.append(change)
        committed.apply(change)
    j.close()
    return data_dir / ".journal"


def test_backup_and_rekey_refuse_changes_still_only_in_the_journal(tmp_path: Path) -> None:
    """The data files alone miss what a crash left in the journal: a backup of them would
    lose acknowledged changes, a rekey leave them under the old key for the replay. Both
    refuse, change nothing, and say what to do; a file too large is a clear refusal too."""
    from tests.secrets_helpers import make_key

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    _journal_with_changes(data, 1)

    def files() -> dict[str, bytes]:  # (the lock file left out: taking it writes a pid)
        return {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"}

    before = files()
    out = tmp_path / "b.tar.gz"
    key = tmp_path / "new.key"
    make_key(key)
    for args in (("backup", "-o", str(out)), ("secrets", "rekey", "--new-key", str(key))):
        r = ctsd(*args, "--data-dir", str(data))
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "1 acknowledged change group(s) not yet in the data files" in r.stderr, r.stderr
        assert "start the daemon once" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert files() == before
    (data / ".journal").unlink()
    with (data / "connections.json").open("wb") as f:
        f.truncate(limits.MAX_FILE_BYTES + 1)
    (data / "connections.json").chmod(0o600)
    for args in (("backup", "-o", str(out)), ("secrets", "rekey", "--new-key", str(key))):
        r = ctsd(*args, "--data-dir", str(data))
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "connections.json:1:1: file is 67108865 bytes; the limit is" in r.stderr, r.stderr


def test_verify_notes_changes_waiting_in_the_journal_and_a_torn_tail(tmp_path: Path) -> None:
    path = _journal_with_changes(tmp_path, 2)
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{tmp_path}/.journal: 2 change group(s) not yet in the data files" in r.stdout
    with path.open("ab") as f:
        f.write(b"\x10\x00\x00\x00abc")  # a frame header a crash cut short
    size = path.stat().st_size
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a torn tail of 7 bytes" in r.stdout
    assert path.stat().st_size == size, "verify must not cut the journal"


def test_a_journal_larger_than_a_data_file_may_be_is_still_read_offline(tmp_path: Path) -> None:
    """The daemon reads its journal whole at start, whatever its size: so do verify and the
    restore (whose revision goes on from the journal's, never giving an id twice). A loose
    mode, a link or a FIFO in its place is named (a FIFO never waited on)."""
    from ctsd.backup import ArchiveError, revision_before

    path = _journal_with_changes(tmp_path, 2)
    os.truncate(path, limits.MAX_FILE_BYTES + 4096)  # zeros ahead, as the daemon keeps room
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{tmp_path}/.journal: 2 change group(s) not yet in the data files" in r.stdout
    assert revision_before(tmp_path) == 2
    path.chmod(0o644)  # (it holds what the data files hold)
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "lets other users read it" in r.stdout, r.stdout + r.stderr
    path.rename(tmp_path / "elsewhere")
    path.symlink_to(tmp_path / "elsewhere")
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and ".journal is a symlink" in r.stdout, r.stdout + r.stderr
    path.unlink()
    os.mkfifo(path)  # never opened: reading it would wait for a writer forever
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and ".journal is a FIFO" in r.stdout, r.stdout + r.stderr
    with pytest.raises(ArchiveError, match=r"is a FIFO.*move .* aside"):
        revision_before(tmp_path)  # (the restore stops: ids could be given twice)


def test_verify_refuses_a_damaged_or_foreign_journal(tmp_path: Path) -> None:
    path = _journal_with_changes(tmp_path, 3)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside a record with good records after it
    path.write_bytes(bytes(raw))
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert ".journal" in r.stdout and "damaged at byte" in r.stdout

    path.write_bytes(b"not a journal at all\n")
    r = ctsd("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert "is not a ctsd journal" in r.stdout


def test_table_cells_show_whole_floats_short() -> None:
    """`conn volume c1 --live 1e308` printed a 309-digit number in `conn list`."""
    from ctsd.client.render import cell

    assert [cell(v) for v in (1.0, 2.5, 1e308, -1e20, None, True)] == [
        "1",
        "2.5",
        "1e+308",
        "-1e+20",
        "-",
        "yes",
    ]


def test_an_ipv6_target_is_shown_bracketed() -> None:
    from ctsd.client.target import Target

    t = Target("::1", 3587, Path("."))
    assert (t.where, t.url) == ("[::1]:3587", "ws://[::1]:3587/ws")
    assert Target("127.0.0.1", 1, Path(".")).where == "127.0.0.1:1"


def test_status_says_a_journal_refusing_changes_in_words() -> None:
    from ctsd.client.status import _failing

    check = {"ok": False, "journal_error": "Input/output error", "unwritten_files": []}
    assert _failing("checkpoint", check) == "the journal refuses changes: Input/output error"
    lagging = {"ok": False, "journal_error": None, "unwritten_files": ["connections.json"]}
    assert _failing("checkpoint", {**lagging, "checkpoint_lag_s": 6.0}).startswith(
        "changes not reaching connections.json"
    )
