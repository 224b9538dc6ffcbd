"""The client commands end to end: the real `ctsd` console script against a real daemon.

Most tests share one daemon (module scope) and use their own connection ids; the ones that
reset data or need special settings start their own.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctsd.client.bus import Bus
from ctsd.client.target import Target
from tests.cli_helpers import CANARY, Tail, clean_env, cli, ctsd, env_for, through_fifo
from tests.daemon import Daemon, http_server, sync_log, wait_until

# The harness token, and a few bytes of the canary that must not leak either.


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("cli") / "data").start()
    try:
        yield d
    finally:
        d.close()


def ok(d: Daemon, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = cli(d, *args, **kw)
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    return r


def jout(d: Daemon, *args: str, **kw: Any) -> Any:
    return json.loads(ok(d, *args, "--json", **kw).stdout)


def add(d: Daemon, cid: str, *extra: str, **env: str) -> dict[str, Any]:
    return jout(d, "conn", "add", "--id", cid, "--name", f"name {cid}", "--exchange", "fakex",
                *extra, **env)  # fmt: skip


def revision(d: Daemon) -> int:
    return int(jout(d, "status")["revision"])


# --- status, auth, token --------------------------------------------------------------------


def test_status_readable_and_json(shared: Daemon) -> None:
    r = ok(shared, "status")
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"ctsd 0.1.0 on 127.0.0.1:{shared.port}: up ")
    assert "revision" in first
    assert "connections" in r.stdout and "files        all valid" in r.stdout
    status = jout(shared, "status")
    assert isinstance(status["revision"], int)
    assert status["invalid_files"] == []


def test_status_says_what_health_finds_and_exits_11(data_dir: Path) -> None:
    """/health degraded for a reason of its own (here the data dir's mode: its file names
    readable by other users) is on a line of its own and in the exit code: an admin's
    `ctsd status` said all was well."""
    d = Daemon(data_dir).start()
    try:
        assert "health       ok" in ok(d, "status").stdout
        data_dir.chmod(0o755)
        r = cli(d, "status")
        assert r.returncode == 11, (r.returncode, r.stdout, r.stderr)
        (line,) = [x for x in r.stdout.splitlines() if x.startswith("health")]
        assert line.startswith("health       DEGRADED: ") and "755" in line, line
        status = jout(d, "status")  # (with --json: 0, the JSON says it)
        assert (
            status["health"]["status"] == "degraded" and "data_dir" in status["health"]["failing"]
        )
    finally:
        data_dir.chmod(0o700)
        d.close()


def test_wrong_token_is_refused(shared: Daemon) -> None:
    r = ctsd("status", env=env_for(shared, CTSD_TOKEN="wrong-token"))
    assert r.returncode == 4
    assert r.stdout == ""
    assert r.stderr.startswith("ctsd: not authorized")
    assert len(r.stderr.splitlines()) == 1
    assert "wrong-token" not in r.stderr


def test_a_token_no_header_can_carry_is_named_never_shown(shared: Daemon, tmp_path: Path) -> None:
    """A token file with a second line (an old token kept below), or a pasted line break:
    exit 4 naming where it came from; the websocket library's error would have printed the
    whole header, token included."""
    (tmp_path / ".token").write_text("SecretTok1\n# old: SecretTok0\n")
    (tmp_path / ".token").chmod(0o600)
    env = clean_env(CTSD_PORT=str(shared.port))
    r = ctsd("status", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 4, r.stderr
    assert f"the bus token in {tmp_path / '.token'} holds" in r.stderr, r.stderr
    assert "SecretTok" not in r.stdout + r.stderr
    r = ctsd("status", env=env_for(shared, CTSD_TOKEN="SecretTok1\nSecretTok0"))
    assert r.returncode == 4 and "the bus token in CTSD_TOKEN holds" in r.stderr, r.stderr
    assert "SecretTok" not in r.stdout + r.stderr
    r = ctsd("status", env=env_for(shared, CTSD_TOKEN="SecretTok" * 11_000))
    assert r.returncode == 4 and "is 99000 characters; a token is at most" in r.stderr, r.stderr
    assert "SecretTok" not in r.stdout + r.stderr
    # one of printable text, a space in it too, goes (to be refused as wrong: exit 4)
    r = ctsd("status", env=env_for(shared, CTSD_TOKEN="Secret Tok1"))
    assert r.returncode == 4 and r.stderr.startswith("ctsd: not authorized"), r.stderr


def test_no_token_anywhere(shared: Daemon, tmp_path: Path) -> None:
    env = clean_env(CTSD_PORT=str(shared.port))
    r = ctsd("conn", "list", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 4
    assert "no bus token: set CTSD_TOKEN" in r.stderr
    assert str(tmp_path / ".token") in r.stderr
    # an empty one is named as empty, not as a file that is not there
    (tmp_path / ".token").write_text("\n")
    r = ctsd("conn", "list", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 4 and f"({tmp_path / '.token'} is empty)" in r.stderr, r.stderr


def test_token_and_port_from_the_data_dir(tmp_path: Path) -> None:
    """No CTSD_TOKEN: the CLI reads DATA/.token and the port from DATA/settings.json."""
    data = tmp_path / "data"
    d = Daemon(data, token=None)
    data.mkdir(mode=0o700)
    (data / "settings.json").write_text(json.dumps({"server": {"port": d.port}}) + "\n")
    d.start()
    try:
        assert (data / ".token").is_file()
        r = ctsd("status", "--data-dir", str(data), env=clean_env())
        assert r.returncode == 0, r.stderr
        assert f"127.0.0.1:{d.port}" in r.stdout
        # The same through the environment, as `ctsd serve` resolves it.
        r = ctsd("conn", "list", env=clean_env(CTSD_DATA_DIR=str(data)))
        assert r.returncode == 0, r.stderr
        token = (data / ".token").read_text().strip()
        assert token not in r.stdout + r.stderr
        # settings.json's port changed by hand: the next start listens there, this daemon
        # still where it started, and the CLI finds it there.
        (data / "settings.json").write_text(json.dumps({"server": {"port": 1}}) + "\n")
        wait_until(lambda: d.http("/api/data/settings", token=token)[1]["server"]["port"] == 1)
        r = ctsd("status", "--data-dir", str(data), env=clean_env())
        assert r.returncode == 0, r.stderr
        assert f"127.0.0.1:{d.port}" in r.stdout
    finally:
        d.close()
    # Once it has stopped, settings.json says where the next one will be.
    r = ctsd("status", "--data-dir", str(data), env=clean_env())
    assert r.returncode == 3 and "127.0.0.1:1" in r.stderr, r.stderr


# --- conn: add, show, list ------------------------------------------------------------------


def test_add_with_secret_from_environment_never_prints_it(shared: Daemon) -> None:
    created = add(shared, "env1", "--api-key-env", "MY_KEY", "--api-secret-env", "MY_SECRET",
                  MY_KEY=CANARY + "-key", MY_SECRET=CANARY)  # fmt: skip
    assert created["id"] == "env1"
    assert created["api_key"] == "…-key"  # the daemon's mask, last 4 characters
    assert created["api_secret"] == "********"
    # It reached the daemon: on disk in connections.json.
    on_disk = json.loads((shared.data_dir / "connections.json").read_text())
    stored = next(c for c in on_disk if c["id"] == "env1")
    assert stored["api_secret"] == CANARY
    for args in (["conn", "show", "env1"], ["conn", "list"], ["export"], ["watch", "--since",
                 "0", "-n", "1"]):  # fmt: skip
        ok(shared, *args)  # cli() asserts the canary is in no output


def test_add_with_prompted_secrets(shared: Daemon) -> None:
    r = ok(shared, "conn", "add", "--id", "prompt1", "--name", "p", "--exchange", "fakex",
           "--ask-secrets", input=f"{CANARY}-abcd\n\n{CANARY}\n")  # fmt: skip
    assert "created prompt1" in r.stdout
    shown = jout(shared, "conn", "show", "prompt1")["connection"]
    assert shown["api_key"] == "…abcd"
    assert shown["api_secret"] is None  # an empty answer leaves it unset
    assert shown["api_passphrase"] == "********"
    # Input that ends before the last answer: nothing sent, a usage error (was "Aborted!",
    # exit 1, and getpass's warning that the input may be echoed).
    r = cli(shared, "conn", "add", "--id", "prompt2", "--name", "p", "--exchange", "fakex",
            "--ask-secrets", input=f"{CANARY}-abcd\n")  # fmt: skip
    assert r.returncode == 2 and "no answer for api_secret" in r.stderr, r.stderr
    assert "echoed" not in r.stderr
    assert cli(shared, "conn", "show", "prompt2").returncode == 5  # not found


def test_add_generates_an_id_and_types_options(shared: Daemon) -> None:
    created = jout(shared, "conn", "add", "--name", "Gen", "--exchange", "bybit", "--testnet",
                   "--disabled", "--volume-factor", "2.5", "--api-type", "spot",
                   "--settings", '{"base_url": "http://127.0.0.1:9"}', "exchange_id=7",
                   "margin_type=isolated")  # fmt: skip
    assert created["id"].startswith("conn_") and len(created["id"]) == 17
    assert created["is_testnet"] is True and created["is_enabled"] is False
    assert created["volume_factor"] == 2.5 and created["api_type"] == "spot"
    assert created["exchange_id"] == 7 and created["margin_type"] == "isolated"
    assert json.loads(created["connection_settings"]) == {"base_url": "http://127.0.0.1:9"}
    r = ok(shared, "conn", "add", "--name", "Human", "--exchange", "okx")
    assert r.stdout.startswith("created conn_") and "(Human, okx)" in r.stdout


def test_add_errors(shared: Daemon) -> None:
    add(shared, "dup1")
    r = cli(shared, "conn", "add", "--id", "dup1", "--name", "n", "--exchange", "e")
    assert r.returncode == 6
    assert r.stderr.startswith("ctsd: conflict: ") and "dup1" in r.stderr
    r = cli(shared, "conn", "add", "--id", "bad id!", "--name", "n", "--exchange", "e")
    assert r.returncode == 1
    assert r.stderr.startswith("ctsd: invalid: ") and "$.connection.id" in r.stderr
    r = cli(shared, "conn", "add", "--name", "x" * 100_000, "--exchange", "e")
    assert r.returncode == 1 and "invalid" in r.stderr
    assert len(r.stderr) < 2000  # the hostile value is not echoed back whole
    r = cli(shared, "conn", "add", "--name", "n", "--exchange", "e", 'exchange_id="seven"')
    assert r.returncode == 1 and "exchange_id" in r.stderr


def test_show_and_list(shared: Daemon) -> None:
    add(shared, "show1", "--api-key-env", "K", K=CANARY)
    shown = jout(shared, "conn", "show", "show1")
    assert shown["connection"]["id"] == "show1"
    assert shown["state"]["connection_id"] == "show1"
    r = ok(shared, "conn", "show", "show1")
    assert "name:" in r.stdout and "name show1" in r.stdout and "state:" in r.stdout
    assert "api_key:             …3a9c" in r.stdout  # the daemon's mask: the last 4 only
    r = ok(shared, "conn", "list")
    header = r.stdout.splitlines()[0].split()
    assert header[:3] == ["ID", "NAME", "EXCHANGE"] and "STATUS" in header
    assert any(line.startswith("show1 ") for line in r.stdout.splitlines())
    listed = jout(shared, "conn", "list", "--exchange", "fakex", "--enabled")
    assert "show1" in {c["id"] for c in listed}
    assert all(c["exchange"] == "fakex" and c["is_enabled"] for c in listed)
    r = cli(shared, "conn", "show", "nope-404")
    assert r.returncode == 5 and r.stderr.startswith("ctsd: not_found: ")


def test_hostile_names_do_not_reach_the_terminal_raw(shared: Daemon) -> None:
    evil = "\x1b[2J\x1b]0;owned\x07\u202eevil\x9b31m"
    add(shared, "evil1", "--disabled")
    before = revision(shared)
    ok(shared, "conn", "set", "evil1", f"name={evil}")
    for args in (
        ["conn", "list"],
        ["conn", "show", "evil1"],
        ["watch", "--since", str(before), "-n", "1", "--connection", "evil1"],
        ["conn", "show", "evil1", "--json"],
        ["watch", "--since", str(before), "-n", "1", "--json", "--connection", "evil1"],
    ):
        out = ok(shared, *args).stdout
        assert "evil" in out
        for ch in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert ch not in out, (args, out)
    # --json escapes them but keeps the value exactly.
    assert jout(shared, "conn", "show", "evil1")["connection"]["name"] == evil


# --- conn: set, switches, volume, rm --------------------------------------------------------


def test_set_json_typed_values(shared: Daemon) -> None:
    add(shared, "set1")
    out = jout(shared, "conn", "set", "set1", "name=Main account", "volume_factor=2.5",
               "is_testnet=true", "exchange_id=null", 'margin_type="isolated"',
               'connection_settings={"base_url": "http://127.0.0.1:9"}')  # fmt: skip
    assert out["name"] == "Main account" and out["volume_factor"] == 2.5
    assert out["is_testnet"] is True and out["exchange_id"] is None
    assert out["margin_type"] == "isolated"
    assert json.loads(out["connection_settings"]) == {"base_url": "http://127.0.0.1:9"}
    r = ok(shared, "conn", "set", "set1", "name=n2")
    assert r.stdout.strip() == "updated set1 (n2, fakex): name"


def test_set_secret_from_environment(shared: Daemon) -> None:
    add(shared, "set2")
    out = jout(shared, "conn", "set", "set2", "--api-secret-env", "S", S=CANARY)
    assert out["api_secret"] == "********"


def test_a_secret_inside_connection_settings_never_comes_from_argv(shared: Daemon) -> None:
    """`--settings` or `connection_settings=` holding a secret (a passphrase, a token) is
    refused before anything is sent: argv shows in `ps`. `--settings-env NAME` takes it."""
    settings = json.dumps({"base_url": "http://127.0.0.1:9", "auth": {"Pass_Phrase": CANARY}})
    for args in (
        ["conn", "add", "--id", "argv1", "--name", "a", "--exchange", "x", "--settings", settings],
        ["conn", "set", "argv1", f"connection_settings={settings}"],
    ):
        r = cli(shared, *args)
        assert r.returncode == 2 and "`auth.Pass_Phrase` holds a secret" in r.stderr, r.stderr
        assert "--settings-env" in r.stderr
    assert cli(shared, "conn", "show", "argv1").returncode == 5  # nothing was sent
    created = add(shared, "argv1", "--settings-env", "S", S=settings)
    assert CANARY not in created["connection_settings"]
    on_disk = json.loads((shared.data_dir / "connections.json").read_text())
    stored = next(c for c in on_disk if c["id"] == "argv1")
    assert json.loads(stored["connection_settings"])["auth"]["Pass_Phrase"] == CANARY
    # What the daemon shows as no secret is no secret here: a boolean, an object under a
    # secret-looking key, a placeholder sent back as shown (the stored
    # secret kept).
    harmless = {**json.loads(settings), "auth": {"Pass_Phrase": "********"}}
    harmless.update(savePassword=True, credentials={})
    ok(shared, "conn", "set", "argv1", f"connection_settings={json.dumps(harmless)}")
    no_secret = json.dumps({"base_url": "http://127.0.0.1:8"})
    out = jout(shared, "conn", "set", "argv1", "--settings-env", "S", S=no_secret)
    assert json.loads(out["connection_settings"]) == {"base_url": "http://127.0.0.1:8"}
    r = cli(shared, "conn", "set", "argv1", "connection_settings={}", "--settings-env", "S", S="{}")
    assert r.returncode == 2 and "given twice" in r.stderr
    r = cli(shared, "conn", "add", "--id", "a2", "--name", "a", "--exchange", "x",
            "--settings", "{}", "connection_settings={}")  # fmt: skip
    assert r.returncode == 2 and "given twice" in r.stderr
    r = cli(shared, "conn", "set", "argv1", "--settings-env", "S", S="[1]")
    assert r.returncode == 2 and "must be a JSON object" in r.stderr
    # A password in a URL is a secret too; text that is no JSON is not echoed (cli() checks
    # every output for the canary).
    for value in (
        json.dumps({"base_url": f"https://u:{CANARY}@127.0.0.1:9"}),
        '{"passphrase": "' + CANARY + '",',
    ):
        r = cli(shared, "conn", "set", "argv1", f"connection_settings={value}")
        assert r.returncode == 2, r.stderr


def test_set_errors(shared: Daemon) -> None:
    add(shared, "set3")
    r = cli(shared, "conn", "set", "set3", "volume_factor=-1")
    assert r.returncode == 1
    assert r.stderr.startswith("ctsd: invalid: ") and "$.changes.volume_factor" in r.stderr
    r = cli(shared, "conn", "set", "set3", 'is_enabled="yes"')
    assert r.returncode == 1 and "is_enabled" in r.stderr
    r = cli(shared, "conn", "set", "nope-404", "name=x")
    assert r.returncode == 5
    r = cli(shared, "conn", "set", "set3", "is_enabeld=false")
    assert r.returncode == 2 and "did you mean `is_enabled`" in r.stderr
    r = cli(shared, "conn", "set", "set3", "volume_factor=")
    assert r.returncode == 2 and "not a JSON value" in r.stderr
    # Bytes that are not UTF-8, as a shell passes them, and a lone surrogate in JSON
    for value in ("name=a\udcffb", 'connection_settings="\\ud800"'):
        r = cli(shared, "conn", "set", "set3", value)
        assert r.returncode == 2 and "not valid UTF-8" in r.stderr, (value, r.stderr)
    assert jout(shared, "conn", "show", "set3")["connection"]["volume_factor"] == 1.0


@pytest.mark.parametrize(
    ("command", "field", "value"),
    [
        ("disable", "is_enabled", False),
        ("enable", "is_enabled", True),
        ("activate", "is_active", True),
        ("deactivate", "is_active", False),
    ],
)
def test_switches(shared: Daemon, command: str, field: str, value: bool) -> None:
    cid = f"sw-{command}"
    add(shared, cid, "--disabled" if value else "--enabled")
    if command == "deactivate":
        ok(shared, "conn", "activate", cid)
    r = ok(shared, "conn", command, cid)
    assert r.stdout.startswith(f"{command}d {cid} (")
    shown = jout(shared, "conn", "show", cid)
    assert shown["connection"][field] is value
    if field == "is_active":
        assert shown["state"]["is_active"] is value  # the state mirrors the switch
    r = cli(shared, "conn", command, "nope-404")
    assert r.returncode == 5 and "not_found" in r.stderr


def test_every_per_connection_command_takes_several_ids(shared: Daemon) -> None:
    for cid in ("many1", "many2"):
        add(shared, cid)
    r = ok(shared, "conn", "activate", "many1", "many2")
    assert r.stdout.splitlines()[0].startswith("activated many1 (")
    assert r.stdout.splitlines()[1].startswith("activated many2 (")
    shown = jout(shared, "conn", "show", "many1", "many2")
    assert [s["connection"]["is_active"] for s in shown] == [True, True]
    ok(shared, "conn", "set", "many1", "many2", "volume_factor=2")
    # a write is answered once it is in the data files: a script reads them on the next line
    on_disk = {c["id"]: c for c in json.loads((shared.data_dir / "connections.json").read_text())}
    assert on_disk["many1"]["volume_factor"] == on_disk["many2"]["volume_factor"] == 2
    vols = jout(shared, "conn", "volume", "many1", "many2", "--live", "3")
    assert [v["live"] for v in vols] == [3, 3]
    for command in ("deactivate", "disable", "enable"):
        assert len(jout(shared, "conn", command, "many1", "many2")) == 2
    # A mistyped id among several changes none of them (it changed those before it, and the
    # --json output then said nothing of them).
    for command in ("disable", "deactivate"):
        r = cli(shared, "conn", command, "many1", "nope-404", "many2")
        assert r.returncode == 5 and r.stdout == "" and "nope-404" in r.stderr, r
    r = cli(shared, "conn", "set", "many1", "nope-404", "many2", "volume_factor=4", "--json")
    assert r.returncode == 5 and r.stdout == "", r
    assert cli(shared, "conn", "volume", "many1", "nope-404", "--live", "5").returncode == 5
    shown = [s["connection"] for s in jout(shared, "conn", "show", "many1", "many2")]
    assert [(c["is_enabled"], c["is_active"], c["volume_factor"]) for c in shown] == [
        (True, False, 2),
        (True, False, 2),
    ]
    assert [v["live"] for v in jout(shared, "conn", "volume", "many1", "many2")] == [3, 3]
    # An id given twice is changed once; the output is a list, as for several ids.
    assert len(jout(shared, "conn", "set", "many1", "many1", "volume_factor=2")) == 1
    assert len(jout(shared, "conn", "activate", "many1", "many1")) == 1


def test_volume(shared: Daemon) -> None:
    add(shared, "vol1")
    r = ok(shared, "conn", "volume", "vol1", "--live", "2.5", "--preset", "0.5")
    assert r.stdout.strip() == "set vol1: live 2.5, preset 0.5"
    assert jout(shared, "conn", "volume", "vol1") == {
        "connection_id": "vol1",
        "live": 2.5,
        "preset": 0.5,
    }
    ok(shared, "conn", "volume", "vol1", "--live", "3")
    assert jout(shared, "conn", "volume", "vol1")["preset"] == 0.5  # untouched
    r = cli(shared, "conn", "volume", "nope-404", "--live", "2")
    assert r.returncode == 5
    r = cli(shared, "conn", "volume", "vol1", "--live", "inf")
    assert r.returncode == 2


def test_rm(shared: Daemon) -> None:
    add(shared, "rm1")
    add(shared, "rm2")
    r = ok(shared, "conn", "rm", "rm1", "rm2")
    assert r.stdout.splitlines() == ["deleted rm1", "deleted rm2"]
    r = cli(shared, "conn", "rm", "rm1")
    assert r.returncode == 5 and "not_found" in r.stderr
    assert "rm1" not in {c["id"] for c in jout(shared, "conn", "list")}
    # A mistyped id among several deletes none of them.
    add(shared, "rm3")
    r = cli(shared, "conn", "rm", "rm3", "rm-nope")
    assert r.returncode == 5 and r.stdout == "" and "rm-nope" in r.stderr, r
    assert jout(shared, "conn", "rm", "rm3") == [{"deleted": "rm3"}]


# --- conn test against a local fake exchange -------------------------------------------------


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def fake_exchange() -> Iterator[str]:
    with http_server(_Ok) as origin:
        yield origin


def test_conn_test_success_and_failure(shared: Daemon, fake_exchange: str) -> None:
    add(shared, "t-ok", "--settings", json.dumps({"base_url": fake_exchange}))
    r = ok(shared, "conn", "test", "t-ok")
    assert r.stdout.startswith("ok: t-ok answered in ")
    result = jout(shared, "conn", "test", "t-ok")
    assert result["success"] is True and isinstance(result["latency"], int | float)
    # Nothing listens on port 9 of loopback here: the test runs and fails.
    add(shared, "t-bad", "--settings", '{"base_url": "http://127.0.0.1:9"}')
    r = cli(shared, "conn", "test", "t-bad")
    assert r.returncode == 9
    assert r.stdout.startswith("failed: t-bad: ")
    # its result is in connection-state.json as the command ends (as every change's)
    states = json.loads((shared.data_dir / "connection-state.json").read_text())
    (state,) = [s for s in states if s["connection_id"] == "t-bad"]
    assert state["test_results"]["success"] is False, state
    # ... because it asks for it (the files follow within milliseconds anyway)
    frame = Bus(None, Target("127.0.0.1", 1, shared.data_dir), {}).command(
        "connections.test", connection_id="t-bad"
    )
    assert frame["sync"] == "files"
    r = cli(shared, "conn", "test", "t-bad", "--json")
    assert r.returncode == 9 and json.loads(r.stdout)["success"] is False
    r = cli(shared, "conn", "test", "nope-404")
    assert r.returncode == 5


# --- watch ----------------------------------------------------------------------------------


def events(lines: list[str]) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in lines]
    for ev in out:
        assert set(ev) == {"id", "connection_id", "action", "data", "created_at"}, ev
    return out


def test_watch_json_since_resumes_without_gap_or_duplicate(shared: Daemon) -> None:
    # Disabled: no periodic connection test adds events of its own. Other tests' connections
    # may still log events meanwhile, so the stream is filtered to this connection and
    # compared with the sync log on disk (written before each command is answered).
    add(shared, "w1", "--disabled")
    start = revision(shared)

    def logged(after: int) -> list[int]:
        return [e["id"] for e in sync_log(shared) if e["connection_id"] == "w1" and e["id"] > after]

    tail = Tail(shared, "--json", "--since", str(start), "--connection", "w1")
    try:
        for i in range(5):
            ok(shared, "conn", "set", "w1", f"volume_factor={i + 2}")
        first = events(tail.take(5))
    finally:
        tail.stop()
    ids = [e["id"] for e in first]
    assert ids == logged(start), ids
    assert [e["data"]["values"]["volume_factor"] for e in first] == [2, 3, 4, 5, 6]
    # Changes while nobody watches, then resume from the last id seen.
    for i in range(5):
        ok(shared, "conn", "set", "w1", f"name=gap {i}")
    tail = Tail(shared, "--json", "--since", str(ids[-1]), "--connection", "w1")
    try:
        replayed = events(tail.take(5))
        ok(shared, "conn", "set", "w1", "name=live")
        live = events(tail.take(1))
    finally:
        tail.stop()
    assert [e["data"]["values"]["name"] for e in replayed] == [f"gap {i}" for i in range(5)]
    assert [e["id"] for e in replayed + live] == logged(ids[-1])
    assert live[0]["data"]["values"] == {"name": "live"}


def test_watch_since_replays_everything_in_order(shared: Daemon) -> None:
    """Unfiltered, --since replays exactly the sync log from there: no gap, no duplicate."""
    add(shared, "w0", "--disabled")
    start = revision(shared)
    for i in range(4):
        ok(shared, "conn", "set", "w0", f"volume_factor={i + 2}")
    expected = [e["id"] for e in sync_log(shared) if e["id"] > start]
    r = ok(shared, "watch", "--json", "--since", str(start), "-n", str(len(expected)))
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == expected
    assert expected == list(range(start + 1, start + 1 + len(expected)))


def test_watch_replay_while_changes_stream(shared: Daemon) -> None:
    """Replay from `since` and live events meet without gap or duplicate."""
    add(shared, "w2", "--disabled")
    start = revision(shared)
    n = 12

    def writer() -> None:
        for i in range(n):
            # Each a real change (w2 starts at 1.0; setting it again would emit nothing).
            ctsd("conn", "set", "w2", f"volume_factor={i + 2}", env=env_for(shared))

    thread = threading.Thread(target=writer)
    thread.start()
    tail = Tail(shared, "--json", "--since", str(start), "--topic", "connections",
                "--connection", "w2")  # fmt: skip
    try:
        got = events(tail.take(n, timeout=60))
    finally:
        thread.join(60)
        tail.stop()
    assert [e["id"] for e in got] == sorted({e["id"] for e in got})  # ordered, no duplicate
    assert [e["data"]["values"]["volume_factor"] for e in got] == list(range(2, n + 2))
    assert all(e["connection_id"] == "w2" for e in got)


def test_watch_count_and_readable_lines(shared: Daemon) -> None:
    add(shared, "w3", "--disabled")
    start = revision(shared)
    ok(shared, "conn", "set", "w3", "name=Readable", "is_testnet=true")
    r = ok(shared, "watch", "--since", str(start), "-n", "1", "--connection", "w3")
    line = r.stdout.strip()
    first = next(e for e in sync_log(shared) if e["connection_id"] == "w3" and e["id"] > start)
    assert line.startswith(f"#{first['id']} ")
    assert " update w3 (" in line and 'name="Readable"' in line and "is_testnet=true" in line


def test_watch_live_without_since(shared: Daemon) -> None:
    add(shared, "w4", "--disabled")
    tail = Tail(shared, "--json", "--connection", "w4")
    try:
        # The live tail prints nothing before the first change and says nothing when it is
        # subscribed: make changes until one arrives.
        names = iter(range(1000))

        def arrived() -> bool:
            ok(shared, "conn", "set", "w4", f"name=ping {next(names)}")
            try:
                tail.got.append(tail.lines.get(timeout=0.5))
            except queue.Empty:
                return False
            return True

        wait_until(arrived, 15, what="a live event")
        ev = json.loads(tail.got[0])
        assert ev["connection_id"] == "w4" and ev["action"] == "update"
        assert ev["data"]["values"]["name"].startswith("ping ")
    finally:
        tail.stop()


def test_watch_compacted_revision(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "settings.json").write_text('{"sync_log_limit": 3}\n')
    d = Daemon(data).start()
    try:
        add(d, "c1")
        for i in range(6):
            ok(d, "conn", "set", "c1", f"volume_factor={i + 1}")
        oldest = sync_log(d)[0]["id"]
        assert oldest > 2
        r = cli(d, "watch", "--since", "1")
        assert r.returncode == 8, r.stderr
        assert r.stderr.startswith("ctsd: revision_compacted: events after revision 1")
        assert f"oldest kept is {oldest}" in r.stderr
        assert f"ctsd watch --since {oldest - 1}" in r.stderr
        # The advice works.
        r = ok(d, "watch", "--json", "--since", str(oldest - 1), "-n", "1")
        assert json.loads(r.stdout)["id"] == oldest
    finally:
        d.close()


def test_watch_daemon_going_away(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data").start()
    tail = Tail(d, "--json")
    try:
        wait_until(lambda: jout(d, "status")["bus"]["subscribers"] >= 1, 15, interval=0.1)
        d.stop()
        assert tail.proc.wait(10) == 3
        assert tail.proc.stderr is not None
        assert "shutting down" in tail.proc.stderr.read()
    finally:
        tail.stop()
        d.close()


def test_watch_retry_resumes_across_a_restart_and_a_kill(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data").start()
    tail = Tail(d, "--json", "--retry")
    try:
        wait_until(lambda: jout(d, "status")["bus"]["subscribers"] >= 1, 15, interval=0.1)
        add(d, "r1")
        (first,) = (json.loads(line) for line in tail.take(1))
        assert first["connection_id"] == "r1"
        d.stop()
        # Made while no daemon runs: taken in at the next start, an event watch must not miss.
        conns = json.loads((d.data_dir / "connections.json").read_text())
        (d.data_dir / "connections.json").write_text(json.dumps([*conns, {**conns[0], "id": "r2"}]))
        d.start()
        wait_until(lambda: jout(d, "status")["bus"]["subscribers"] >= 1, 15, interval=0.1)
        d.kill()  # (1006: no close frame)
        d.start()
        add(d, "r3")
        lines = [json.loads(line) for line in tail.take(3)]
        assert lines[0] == {"type": "notice", "notice": "shutting_down"}
        events = lines[1:]
        assert [e["connection_id"] for e in events] == ["r2", "r3"]
        assert [e["id"] for e in events] == [first["id"] + 1, first["id"] + 2]
        assert tail.proc.poll() is None
    finally:
        tail.stop()
        d.close()
    assert tail.proc.stderr is not None
    err = tail.proc.stderr.read()
    assert "shutting down; reconnecting (Ctrl-C stops)" in err
    # Before a first connection nothing is retried: a wrong port is told at once.
    r = cli(d, "watch", "--retry")
    assert r.returncode == 3 and "no daemon answering" in r.stderr, (r.returncode, r.stderr)
    assert "closed the connection; reconnecting" in err and f"resuming after {first['id']}" in err


# --- export / import / reset ----------------------------------------------------------------


def test_export_stdout_and_file(shared: Daemon, tmp_path: Path) -> None:
    add(shared, "exp1", "--api-key-env", "K", K=CANARY + "-exp1")
    out = json.loads(ok(shared, "export").stdout)
    assert out["version"] == 1 and isinstance(out["revision"], int)
    conns = {c["id"]: c for c in out["files"]["connections.json"]}
    assert conns["exp1"]["api_key"] == "…exp1"
    target = tmp_path / "backup.json"
    r = ok(shared, "export", "-o", str(target))
    assert r.stdout == "" and f"to {target}" in r.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert json.loads(target.read_text())["files"].keys() == out["files"].keys()
    r = cli(shared, "export", "-o", str(tmp_path / "no" / "such" / "dir.json"))
    assert r.returncode != 0 and "cannot write" in r.stderr
    # A pipe is written through, never replaced by a file (nor /dev/null, as root)...
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = through_fifo(fifo, lambda: ok(shared, "export", "-o", str(fifo)))
    assert json.loads(got)["files"].keys() == out["files"].keys()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # ... a link to a file writes that file (the operator's link kept) ...
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    target.write_text("{}")
    ok(shared, "export", "-o", str(link))
    assert link.is_symlink()
    assert json.loads(target.read_text())["files"].keys() == out["files"].keys()
    # ... /dev/stdout is stdout, and a socket is refused, never replaced.
    assert json.loads(ok(shared, "export", "-o", "/dev/stdout").stdout)["version"] == 1
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        r = cli(shared, "export", "-o", str(sock_path))
        assert r.returncode == 1 and "is a socket" in r.stderr, r.stderr
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_import_round_trip_and_errors(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data").start()
    try:
        add(d, "i1", "--api-key-env", "K", K=CANARY + "-imp1")
        add(d, "i2")
        backup = tmp_path / "backup.json"
        ok(d, "export", "-o", str(backup))
        ok(d, "conn", "rm", "i2")
        ok(d, "conn", "set", "i1", "name=changed")
        # The export's masked secrets come back as placeholders: the stored key is kept,
        # in a replace as in a merge.
        for args in ([], ["--merge"]):
            ok(d, "conn", "set", "i1", "name=changed")
            ok(d, "import", str(backup), *args)
            conns = {c["id"]: c for c in jout(d, "conn", "list")}
            assert set(conns) == {"i1", "i2"}
            assert conns["i1"]["name"] == "name i1" and conns["i1"]["api_key"] == "…imp1"
        stored = json.loads((d.data_dir / "connections.json").read_text())
        assert [c["api_key"] for c in stored if c["id"] == "i1"] == [CANARY + "-imp1"]
        # A placeholder for a connection with nothing stored: the rest is imported, that
        # secret unset and named on stderr (it was all refused, so nothing came back).
        ok(d, "conn", "rm", "i1")
        r = cli(d, "import", str(backup))
        assert r.returncode == 0, r.stderr
        assert "1 secret(s) held masked" in r.stderr, r.stderr
        # the path in the file given, as over HTTP (not in the bus command's arguments)
        assert "$.files.connections.json[0].api_key" in r.stderr, r.stderr
        assert CANARY not in r.stderr + r.stdout
        conns = {c["id"]: c for c in jout(d, "conn", "list")}
        assert set(conns) == {"i1", "i2"} and conns["i1"]["api_key"] is None
        # A replace from a file without secrets.
        plain = json.loads(backup.read_text())
        plain["files"]["connections.json"] = [{"id": "only", "name": "Only", "exchange": "fakex"}]
        plain["files"].pop("connection-state.json")
        only = tmp_path / "only.json"
        only.write_text(json.dumps(plain))
        r = ok(d, "import", str(only))
        assert r.stdout.startswith(f"imported {only} (replace)")
        assert [c["id"] for c in jout(d, "conn", "list")] == ["only"]
        # A long history (the sync log is most of a large export) is not sent: an import
        # never rewrites it, and it would not fit in one bus message.
        logged = plain["files"]["connection-sync-log.json"]
        history = [dict(e, data={**e.get("data", {}), "pad": "x" * 2000}) for e in logged * 400]
        files_ = {**plain["files"], "connection-sync-log.json": history}
        long = tmp_path / "long.json"
        long.write_text(json.dumps({**plain, "files": files_}))
        assert long.stat().st_size > 1 << 20
        ok(d, "import", str(long))
        # From stdin, and a content error the daemon refuses (exit 1, nothing changed).
        plain["files"]["connections.json"] = [{"id": "x", "name": "X", "exchange": "e",
                                               "is_enabeld": True}]  # fmt: skip
        r = cli(d, "import", "-", "--merge", input=json.dumps(plain))
        assert r.returncode == 1
        assert r.stderr.startswith("ctsd: invalid: ") and "is_enabeld" in r.stderr
        assert [c["id"] for c in jout(d, "conn", "list")] == ["only"]
        # Too large for one bus message (an export of its own, say): over HTTP, with the
        # same answers and exit codes (it was refused, so the CLI could not import it).
        big = {"version": 1, "files": {"connections.json": [
            {"id": f"b{i}", "name": "n" * 150, "exchange": "fakex"} for i in range(6000)
        ]}}  # fmt: skip
        bigfile = tmp_path / "big.json"
        bigfile.write_text(json.dumps(big))
        assert bigfile.stat().st_size > 1 << 20
        big["files"]["connections.json"][5999]["is_enabeld"] = True
        badfile = tmp_path / "bad-big.json"
        badfile.write_text(json.dumps(big))
        r = cli(d, "import", str(badfile))
        assert r.returncode == 1 and r.stderr.startswith("ctsd: invalid: "), r.stderr
        assert "is_enabeld" in r.stderr and "[5999]" in r.stderr
        assert [c["id"] for c in jout(d, "conn", "list")] == ["only"]
        r = ok(d, "import", str(bigfile))
        assert r.stdout.startswith(f"imported {bigfile} (replace)")
        assert len(jout(d, "conn", "list")) == 6000
        # as the bus's import: in the file when answered, logged as the CLI's
        assert len(json.loads((d.data_dir / "connections.json").read_text())) == 6000
        since = str(jout(d, "status")["revision"] - 1)
        last = jout(d, "watch", "--since", since, "--count", "1")
        assert last["action"] == "import" and last["data"]["source"] == "cli", last
    finally:
        d.close()


def test_import_keeps_masked_document_secrets(tmp_path: Path) -> None:
    """A masked Project X key imported back keeps the stored key (merge and replace)."""
    d = Daemon(tmp_path / "data").start()
    try:
        doc = json.loads((d.data_dir / "connection.json").read_text())
        doc["projectX"]["apiKey"] = CANARY + "-px"
        (d.data_dir / "connection.json").write_text(json.dumps(doc, indent=2) + "\n")
        backup = tmp_path / "backup.json"

        def exported() -> bool:
            ok(d, "export", "-o", str(backup))
            files = json.loads(backup.read_text())["files"]
            return files["connection.json"]["projectX"]["apiKey"] is not None

        wait_until(exported, 15, interval=0.1, what="the hand edit taken in")
        assert CANARY not in backup.read_text()
        for args in ([], ["--merge"]):
            ok(d, "import", str(backup), *args)
            on_disk = json.loads((d.data_dir / "connection.json").read_text())
            assert on_disk["projectX"]["apiKey"] == CANARY + "-px"
    finally:
        d.close()


def test_reset(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data").start()
    try:
        add(d, "r1")
        r = cli(d, "reset")
        assert r.returncode == 2 and "--yes" in r.stderr
        assert len(jout(d, "conn", "list")) == 1
        r = ok(d, "reset", "--yes")
        assert r.stdout.startswith("reset: ")
        assert jout(d, "conn", "list") == []
        assert sync_log(d)[-1]["action"] == "reset"
    finally:
        d.close()


def test_file_invalid_on_disk(tmp_path: Path) -> None:
    """A hand-broken file: watch shows the notice, status exits 6 naming the file, a change
    to it is refused with 6; fixing it clears all of that."""
    d = Daemon(tmp_path / "data").start()
    tail = Tail(d, "--json", "--topic", "system")
    human = Tail(d, "--topic", "system")
    try:
        add(d, "f1")
        wait_until(lambda: jout(d, "status")["bus"]["subscribers"] >= 2, 15, interval=0.1)
        good = (d.data_dir / "connections.json").read_text()
        (d.data_dir / "connections.json").write_text("[oops")
        notice = json.loads(tail.take(1)[0])
        assert notice["type"] == "notice" and notice["notice"] == "file_invalid"
        assert notice["file"] == "connections.json" and notice["line"] == 1
        line = human.take(1)[0]
        assert line.startswith("! file_invalid connections.json:1:"), line
        r = cli(d, "status")
        assert r.returncode == 6
        assert "INVALID: connections.json" in r.stdout
        r = cli(d, "conn", "set", "f1", "name=x")
        assert r.returncode == 6 and r.stderr.startswith("ctsd: file_invalid: ")
        (d.data_dir / "connections.json").write_text(good)
        assert json.loads(tail.take(1)[0])["notice"] == "file_restored"
        assert ok(d, "status")
    finally:
        tail.stop()
        human.stop()
        d.close()


# --- attribution ----------------------------------------------------------------------------


def test_changes_are_attributed_to_the_cli(shared: Daemon) -> None:
    add(shared, "src1")
    entry = [e for e in sync_log(shared) if e["connection_id"] == "src1"][-1]
    assert entry["data"]["source"] == "cli"


# --- limits ---------------------------------------------------------------------------------


def test_rate_limited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "settings.json").write_text(
        '{"server": {"rate_limit": {"requests": 1, "window_s": 900}}}\n'
    )
    d = Daemon(data).start()
    try:
        # `conn list` needs two commands on its one connection: the second is refused.
        r = cli(d, "conn", "list")
        assert r.returncode == 7, r.stderr
        assert r.stderr.startswith("ctsd: rate_limited: ")
    finally:
        d.close()


def test_failed_auth_attempts_lock_out_nobody(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data").start()
    try:
        codes = [cli(d, "status", CTSD_TOKEN=f"wrong-{i}").returncode for i in range(12)]
        assert codes == [4] * 12  # each refused as what it is: a wrong token
        assert cli(d, "status").returncode == 0  # and the right one still gets in at once
    finally:
        d.close()


def test_watch_resumes_after_being_cut_off(tmp_path: Path) -> None:
    """Closed with 4008 (fell behind), `watch` reconnects with `since` = the last event it
    printed. A real daemon needs tens of MB through a stopped reader to get there, so a fake
    bus plays the daemon: it cuts the first subscription off and checks the second's `since`."""
    from websockets.sync.server import ServerConnection, serve

    subscriptions: list[dict[str, Any]] = []

    def ev(i: int) -> dict[str, Any]:
        return {"id": i, "connection_id": "c", "action": "update",
                "data": {"fields": ["name"], "source": "bus"},
                "created_at": "2024-01-01T00:00:00.000Z"}  # fmt: skip

    def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        assert ws.request.headers["Authorization"] == "Bearer tok"
        ws.send(json.dumps({"type": "auth_ok", "version": 1, "revision": 10}))
        cmd = json.loads(ws.recv(10))
        assert cmd["type"] == "subscribe"
        subscriptions.append(cmd)
        ws.send(json.dumps({"id": cmd["id"], "type": "result", "success": True,
                            "result": {"revision": 10}}))  # fmt: skip
        if len(subscriptions) == 1:
            ws.send(json.dumps({"type": "events", "events": [ev(11), ev(12)]}))
            ws.close(4008, "fell behind")
        else:
            since = cmd["since"]
            ws.send(json.dumps({"type": "events", "events": [ev(since + 1), ev(since + 2)]}))
            ws.recv(30)  # until the client goes away

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        r = ctsd("watch", "--json", "--since", "10", "-n", "4",
                 env=clean_env(CTSD_TOKEN="tok", CTSD_PORT=str(port)), timeout=30)  # fmt: skip
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [11, 12, 13, 14]
    assert subscriptions[0]["since"] == 10 and subscriptions[1]["since"] == 12
    assert r.stderr == "ctsd: fell behind; resuming from the last event printed\n"


def test_a_frame_nested_too_deeply_is_one_line() -> None:
    """A frame json cannot read for its depth (RecursionError, not ValueError) was a
    traceback; a fake bus plays the daemon that sends it."""
    from websockets.sync.server import ServerConnection, serve

    def handler(ws: ServerConnection) -> None:
        ws.send("[" * 100_000)
        with contextlib.suppress(Exception):
            ws.recv(10)  # until the client goes away

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        r = ctsd("status", env=clean_env(CTSD_TOKEN="tok", CTSD_PORT=str(port)), timeout=30)
        server.shutdown()
    assert r.returncode == 1, r.stderr
    assert r.stderr == "ctsd: the daemon sent a frame nested too deeply\n"
