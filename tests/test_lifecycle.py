"""`ctsd serve` as a real subprocess: readiness, configuration, start failures, signals,
the watchdog, invalid files at start, and secrets kept out of every log."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ctsd import files, ops
from ctsd.atomic import TEMP_PREFIX
from ctsd.config import Listen, resolve_data_dir, resolve_listen
from ctsd.models import Settings
from tests.bus import bus
from tests.daemon import Daemon, NotifySocket, free_port, invalid_files, wait_until
from tests.datadir import CANARY, connection, write_connections
from tests.inprocess import killed_after


class Bare(Daemon):
    """The daemon without the harness' --data-dir/--port flags (for precedence tests)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ctsd", "serve", "--log-format", "json", *self.args]


def ready_event(d: Daemon) -> dict[str, Any]:
    return wait_until(
        lambda: next((e for e in d.log_events() if e.get("event") == "ready"), None),
        what="ready log event",
    )


def run_to_exit(d: Daemon, timeout: float = 15.0) -> int:
    d.start(wait=False)
    assert d.proc is not None
    return d.proc.wait(timeout)


def refused_start(d: Daemon) -> str:
    """Run `d` until it exits 1; the one line it wrote on stderr (it is closed after)."""
    try:
        assert run_to_exit(d) == 1
        return one_line(d.stderr())
    finally:
        d.close()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def temp_files(data_dir: Path) -> list[Path]:
    return list(data_dir.rglob(f"{TEMP_PREFIX}*"))


def all_files_valid(data_dir: Path) -> None:
    for name in [
        files.CONNECTIONS,
        files.STATE,
        files.SYNC_LOG,
        *(f for f, _ in files.DOCUMENTS.values()),
    ]:
        files.decode_file(name, (data_dir / name).read_bytes())


# --- readiness ------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_and_health(data_dir: Path, abstract: bool) -> None:
    d = Daemon(data_dir, abstract_notify=abstract)
    try:
        d.start()
        msgs = d.notify.poll()
        assert "READY=1" in msgs
        status = [m for m in msgs if m.startswith("STATUS=")]
        assert status and "0 connections" in status[0], msgs
        assert f"MAINPID={d.proc.pid}" in msgs  # type: ignore[union-attr]
        # /health answers once READY=1 was sent: no retry loop needed.
        code, body = d.http("/health", token=None)
        assert code == 200 and body["status"] == "ok", body
        assert ready_event(d)["port"] == d.port
        assert stat_mode(data_dir) == 0o700
        for name in ("connections.json", "settings.json", "logs/ctsd.log"):
            assert stat_mode(data_dir / name) == 0o600, name
        assert stat_mode(data_dir / "logs") == 0o700
        assert d.stop() == 0
    finally:
        d.close()


def test_status_follows_the_revision_and_the_invalid_files(data_dir: Path) -> None:
    """`systemctl status` shows STATUS=: brought up to date as changes come and files turn
    invalid, not only at READY and after a reload."""
    d = Daemon(data_dir)
    try:
        d.start()
        seen = len(d.notify.poll())
        write_connections(data_dir, [connection("c1", "v")])  # (a change: taken in)
        d.notify.wait_for("STATUS=1 connections, revision 1, 0 invalid files", after=seen)
        (data_dir / "ui-config.json").write_text("{")
        d.notify.wait_for("STATUS=1 connections, revision 1, 1 invalid files", after=seen)
        assert d.stop() == 0
    finally:
        d.close()


def test_a_reload_says_where_each_file_still_invalid_is_broken(daemon: Daemon) -> None:
    (daemon.data_dir / "ui-config.json").write_text('{"a": 1,}')
    wait_until(lambda: "ui-config.json" in invalid_files(daemon), what="the file reported")
    seen = len(daemon.notify.poll())
    daemon.send_signal(signal.SIGHUP)
    daemon.notify.wait_for("READY=1", after=seen)

    def reloaded() -> list[dict[str, Any]]:  # (logged before READY=1: waited for all the same)
        return [e for e in daemon.log_events() if e.get("event") == "reloaded"]

    (done,) = wait_until(reloaded, what="the reloaded line")
    assert done["invalid_files"]["ui-config.json"].startswith("ui-config.json:1:"), done


def test_what_the_load_finds_is_in_the_log_file_too(data_dir: Path) -> None:
    """An invalid file found at start is reported where it is in DATA/logs/ctsd.log as well
    as on the console (the file was opened only after the load)."""
    write_connections(data_dir, [connection("c1", "v")])
    (data_dir / "ui-config.json").write_text('{"a": 1,}')
    d = Daemon(data_dir)
    try:
        d.start()
        lines = (data_dir / "logs" / "ctsd.log").read_text().splitlines()
        (found,) = [json.loads(x) for x in lines if '"file_invalid"' in x]
        assert found["file"] == "ui-config.json" and "ui-config.json:1:" in found["problem"]
        assert d.stop() == 0
    finally:
        d.close()


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


# --- configuration precedence ---------------------------------------------------------------


def test_defaults_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CTSD_DATA_DIR", "DATA_DIR", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None) == tmp_path / "data"
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "p"))
    assert resolve_data_dir(None) == tmp_path / "p"
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "d"))
    assert resolve_data_dir(None) == tmp_path / "d"
    monkeypatch.setenv("CTSD_DATA_DIR", str(tmp_path / "c"))
    assert resolve_data_dir(None) == tmp_path / "c"
    assert resolve_data_dir(str(tmp_path / "f")) == tmp_path / "f"
    # host/port defaults (binding 3587 for real could clash with a running ctsd)
    monkeypatch.delenv("CTSD_HOST", raising=False)
    monkeypatch.delenv("CTSD_PORT", raising=False)
    assert resolve_listen(None, None, Settings()) == Listen("127.0.0.1", 3587)
    from_file = msgspec.convert({"server": {"host": "::1", "port": 4000}}, Settings)
    assert resolve_listen(None, None, from_file) == Listen("::1", 4000)
    monkeypatch.setenv("CTSD_PORT", "4001")
    assert resolve_listen(None, None, from_file) == Listen("::1", 4001)
    assert resolve_listen("127.0.0.1", 4002, from_file) == Listen("127.0.0.1", 4002)


def test_data_dir_from_env_and_flag(tmp_path: Path) -> None:
    # The seeds' own variable names reach the real daemon; the flag beats them.
    for env, args, used in [
        ({"DATA_PATH": str(tmp_path / "p")}, [], tmp_path / "p"),
        ({"DATA_PATH": str(tmp_path / "p"), "DATA_DIR": str(tmp_path / "d")}, [], tmp_path / "d"),
        (
            {"CTSD_DATA_DIR": str(tmp_path / "c"), "DATA_DIR": str(tmp_path / "d")},
            ["--data-dir", str(tmp_path / "f")],
            tmp_path / "f",
        ),
    ]:
        d = Bare(used, env=env, args=[*args, "--port", str(free_port())])
        try:
            d.start()
            assert ready_event(d)["data_dir"] == str(used)
            assert (used / files.CONNECTIONS).is_file()
        finally:
            d.close()
    assert not (tmp_path / "c").exists()


def test_host_and_port_precedence(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    p_settings, p_env, p_flag = free_port(), free_port(), free_port()
    (data_dir / "settings.json").write_text(
        json.dumps({"server": {"host": "127.0.0.2", "port": p_settings}, "app_key": 1})
    )
    cases = [
        ({}, [], ("127.0.0.2", p_settings)),
        ({"CTSD_HOST": "127.0.0.3", "CTSD_PORT": str(p_env)}, [], ("127.0.0.3", p_env)),
        (
            {"CTSD_HOST": "127.0.0.3", "CTSD_PORT": str(p_env)},
            ["--host", "127.0.0.1", "--port", str(p_flag)],
            ("127.0.0.1", p_flag),
        ),
    ]
    for env, args, (host, port) in cases:
        d = Bare(data_dir, env={"CTSD_DATA_DIR": str(data_dir), **env}, args=args)
        try:
            d.start()
            ev = ready_event(d)
            assert (ev["host"], ev["port"]) == (host, port)
            with socket.create_connection((host, port), timeout=5):
                pass
            assert not any(e.get("event") == "non_loopback_bind" for e in d.log_events())
        finally:
            d.close()
    # The trading app's own keys in settings.json are kept as written.
    assert json.loads((data_dir / "settings.json").read_text())["app_key"] == 1


def test_non_loopback_host_logs_a_warning(data_dir: Path) -> None:
    d = Daemon(data_dir, args=["--host", "0.0.0.0"])
    try:
        d.start()
        warn = wait_until(
            lambda: [e for e in d.log_events() if e.get("event") == "non_loopback_bind"]
        )
        assert warn[0]["level"] == "warning" and warn[0]["host"] == "0.0.0.0"
    finally:
        d.close()


# --- start failures: exit 1, one line on stderr --------------------------------------------


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({}, ["--host", "192.168..1"], "--host"),
        ({"CTSD_HOST": "."}, [], "CTSD_HOST"),
        ({}, ["--host", "no such host.invalid"], "--host"),
    ],
)
def test_a_host_that_is_no_address_is_one_line(
    data_dir: Path, env: dict[str, str], args: list[str], named: str
) -> None:
    d = Daemon(data_dir, env=env, args=args)
    try:
        assert run_to_exit(d) == 1
        line = one_line(d.stderr())
        assert named in line and "is not an IP address or a host name" in line, line
    finally:
        d.close()


def test_second_instance_exits_naming_the_holder(daemon: Daemon) -> None:
    second = Daemon(daemon.data_dir)
    try:
        assert run_to_exit(second) == 1
        line = one_line(second.stderr())
        assert f"pid {daemon.proc.pid}" in line, line  # type: ignore[union-attr]
        assert "READY=1" not in second.notify.poll()
    finally:
        second.close()
    # The holder is unharmed: its pid is still in the lock file and it still answers.
    held = (daemon.data_dir / ".lock").read_text().splitlines()
    assert held == [str(daemon.proc.pid), f"127.0.0.1 {daemon.port}"]  # type: ignore[union-attr]
    assert daemon.http("/health", token=None)[0] == 200


def _journal_stream(d: Daemon, path: Path) -> None:
    """`d` writes to `path` as to systemd's stream to the journal (JOURNAL_STREAM names it)."""
    path.touch()
    st = os.stat(path)
    d.extra_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"


def test_lines_to_the_journal_carry_their_priority(daemon: Daemon) -> None:
    """Under systemd each line begins `<N>`, its syslog priority: `journalctl -p warning`
    finds the warnings and errors (all came at info). A start that fails says why on
    stderr at error priority, and in the log; off the journal, lines are as they were."""
    assert not daemon.stdout().startswith("<")
    d = Daemon(daemon.data_dir)  # (the lock is held: its start fails)
    _journal_stream(d, d.stderr_path)
    try:
        assert run_to_exit(d) == 1
        assert d.stderr().startswith("<3>ctsd: ") and "pid" in d.stderr(), d.stderr()
        (failed,) = [e for e in d.log_events() if e["event"] == "start_failed"]
        assert failed["level"] == "error" and "pid" in failed["reason"], failed
    finally:
        d.close()
    daemon.stop()
    d = Daemon(daemon.data_dir)
    _journal_stream(d, d.stdout_path)
    try:
        d.start()
        (d.data_dir / "connections.json").write_text("[{]\n")  # (logged as an error)
        lines = wait_until(
            lambda: [x for x in d.stdout().splitlines() if '"file_invalid"' in x] and d.stdout()
        ).splitlines()
        assert lines and all(re.match(r"<[2-7]>\{", x) for x in lines), lines[:3]
        by_level = {json.loads(x[3:])["level"]: x[:3] for x in lines}
        assert by_level["info"] == "<6>" and by_level["error"] == "<3>", by_level
    finally:
        d.close()


def test_token_file_made_when_none_is_configured(data_dir: Path) -> None:
    d = Daemon(data_dir, token=None)
    try:
        d.start()
        token = (data_dir / ".token").read_text().strip()
        assert len(token) == 43 and stat_mode(data_dir / ".token") == 0o600
        assert d.http("/api/connections/state", token=token)[0] == 200
        assert d.http("/api/connections/state", token="wrong")[0] == 401
        assert token not in d.stdout() + d.stderr()
    finally:
        d.close()


def test_bad_port_in_env_exits_1(data_dir: Path) -> None:
    d = Bare(data_dir, env={"CTSD_DATA_DIR": str(data_dir), "CTSD_PORT": "eighty"})
    try:
        assert run_to_exit(d) == 1
        assert "CTSD_PORT" in one_line(d.stderr())
    finally:
        d.close()


def test_unknown_event_loop_exits_1(data_dir: Path) -> None:
    d = Daemon(data_dir, env={"CTSD_EVENT_LOOP": "trio"})
    try:
        assert run_to_exit(d) == 1
        assert "CTSD_EVENT_LOOP" in one_line(d.stderr())
    finally:
        d.close()


@pytest.mark.parametrize(
    ("section", "env", "says"),
    [
        # in cluster mode by the file: never a start on its own instead
        (
            {"nats_urls": ["nats://127.0.0.1:9"], "name": "d", "max_age_s": 60},
            {},
            "cluster.max_age_s 60 is too short",
        ),
        # in cluster mode by the environment: never a start under the hostname instead
        (
            {"host_id": "h-real", "replicas": 9},
            {"CTSD_CLUSTER_NATS_URLS": "nats://127.0.0.1:9", "CTSD_CLUSTER_NAME": "d"},
            "<= 5 (at $.cluster.replicas)",
        ),
        ({"nats_url": ["nats://127.0.0.1:9"]}, {}, "nats_url"),
    ],
)
def test_a_cluster_section_that_does_not_load_stops_the_start(
    data_dir: Path, section: dict[str, Any], env: dict[str, str], says: str
) -> None:
    """Which cluster this host is in, and as which host, cannot be read: exit 1 with the
    file, line, column and fault, the file left as written."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    path = data_dir / "settings.json"
    path.write_text(json.dumps({"cluster": section}, indent=2) + "\n")
    path.chmod(0o600)
    before = path.read_bytes()
    d = Daemon(data_dir, env=env)
    try:
        assert run_to_exit(d) == 1
        line = one_line(d.stderr())
        assert line.startswith("ctsd: cluster settings: settings.json:") and says in line, line
        assert path.read_bytes() == before
    finally:
        d.close()


@pytest.mark.parametrize("broken_by", ["a value", "its mode"])
def test_a_settings_file_invalid_elsewhere_still_puts_the_host_in_its_cluster(
    data_dir: Path, broken_by: str
) -> None:
    """settings.json invalid at start outside its `cluster` section (a bad value, or readable
    by others), no copy to stand for it: the section as written still counts (never a start
    on this host alone); a file that does not parse and may hold one stops the start."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    path = data_dir / "settings.json"
    section = {"nats_urls": [f"nats://127.0.0.1:{free_port()}"], "name": "d", "host_id": "h1"}
    bad = {"stale_after_s": -1} if broken_by == "a value" else {}
    path.write_text(json.dumps({**bad, "cluster": section}, indent=2) + "\n")
    path.chmod(0o600 if broken_by == "a value" else 0o644)
    d = Daemon(data_dir, env={"CTSD_CLUSTER_CATCH_UP_S": "0.5"})
    try:
        d.start(timeout=30)
        health = d.http("/health")[1]
        assert health["checks"]["cluster"]["host_id"] == "h1", health
        assert "settings.json" in health["checks"]["files"]["invalid"], health
    finally:
        d.close()
    path.write_text('{"cluster": {"nats_urls": ["nats://127.0.0.1:9"], "name": "d"\n')
    path.chmod(0o600)
    line = refused_start(Daemon(data_dir))
    assert "may hold this host's cluster section" in line and "settings.json:" in line, line


def test_a_settings_file_broken_while_stopped_counts_as_its_copy_unless_it_names_a_cluster(
    data_dir: Path,
) -> None:
    """settings.json broken while the daemon was down (a bad value): served as its copy
    holds it, the listen address too, until fixed; but one that names a cluster section its
    copy does not have stops the start (never a start on this host alone in its place)."""
    data_dir.mkdir(mode=0o700)
    path = data_dir / "settings.json"
    kept_port, new_port = free_port(), free_port()
    path.write_text(json.dumps({"server": {"port": kept_port}}) + "\n")
    env = {"CTSD_DATA_DIR": str(data_dir)}
    d = Bare(data_dir, env=env)
    try:
        d.start()
        assert ready_event(d)["port"] == kept_port
        assert d.stop() == 0
    finally:
        d.close()
    path.write_text(json.dumps({"server": {"port": new_port}, "stale_after_s": -1}) + "\n")
    d = Bare(data_dir, env=env)
    try:
        d.start()
        assert ready_event(d)["port"] == kept_port
        d.port = kept_port
        health = d.http("/health", token=None)[1]
        assert "settings.json" in health["checks"]["files"]["invalid"], health
    finally:
        d.close()
    section = {"nats_urls": ["nats://127.0.0.1:9"], "name": "d", "host_id": "h1"}
    path.write_text(json.dumps({"stale_after_s": -1, "cluster": section}) + "\n")
    line = refused_start(Bare(data_dir, env=env))
    assert "not the one this host last ran with" in line and "settings.json:" in line, line


def test_a_settings_file_invalid_at_its_first_start_still_names_the_address(
    data_dir: Path,
) -> None:
    """settings.json invalid at a start with no valid version of it (no copy: a first start,
    a data dir brought over): served with the defaults, but listening where the file says,
    as it will once fixed (bots look for it there); an address that cannot be read from the
    file stops the start, naming the file, unless the flags give one."""
    data_dir.mkdir(mode=0o700)
    path = data_dir / "settings.json"
    port = free_port()
    path.write_text(json.dumps({"server": {"port": port, "cors_origins": "http://a"}}) + "\n")
    path.chmod(0o600)
    env = {"CTSD_DATA_DIR": str(data_dir)}
    d = Bare(data_dir, env=env)
    try:
        d.start()
        assert ready_event(d)["port"] == port
        d.port = port
        health = d.http("/health", token=None)[1]
        assert "settings.json" in health["checks"]["files"]["invalid"], health
        assert d.stop() == 0
        d.start()  # (again: still no copy of it)
        assert [e["port"] for e in d.log_events() if e.get("event") == "ready"] == [port] * 2
        # Fixed with another port: taken in, and said to wait for a restart.
        path.write_text(json.dumps({"server": {"port": port + 1}}) + "\n")
        moved = wait_until(
            lambda: [e for e in d.log_events() if e["event"] == "listen_address_not_applied"]
        )
        assert moved[0]["configured"] == f"127.0.0.1:{port + 1}", moved
        assert moved[0]["listening"] == f"127.0.0.1:{port}", moved
    finally:
        d.close()
    shutil.rmtree(data_dir / ".bases")  # (the fixed file's copy would stand for it now)
    for server in ({"port": 99999}, {"port": "3600"}, {"host": "a b"}, 7):
        path.write_text(json.dumps({"server": server}) + "\n")
        line = refused_start(Bare(data_dir, env=env))
        assert "settings.json:" in line and "address to listen on" in line, line
    path.write_text('{"server": {"port": 3600,\n')
    line = refused_start(Bare(data_dir, env=env))
    assert "settings.json:2:" in line and "--host and --port" in line, line
    d = Bare(data_dir, env=env, args=["--host", "127.0.0.1", "--port", "0"])
    try:
        d.start()  # (the flags give the address; the ready line names the port it bound)
        d.port = ready_event(d)["port"]
        assert d.port != 0 and d.http("/health", token=None)[0] == 200
    finally:
        d.close()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"CTSD_CLUSTER_NATS_URLS": "http://127.0.0.1:4222", "CTSD_CLUSTER_NAME": "d"},
            "has scheme 'http'",
        ),
        ({"CTSD_CLUSTER_NATS_URLS": "nats://127.0.0.1:4222", "CTSD_HOST_ID": "a b"}, "HOST_ID"),
        ({"CTSD_HOST": "a b"}, "CTSD_HOST"),  # (the port is given as --port)
    ],
)
def test_a_mistyped_setting_of_the_environment_leaves_the_data_dir_as_it_was(
    data_dir: Path, env: dict[str, str], says: str
) -> None:
    """Refused before the data dir is touched: the default files were made first."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    d = Daemon(data_dir, env=env)
    try:
        assert run_to_exit(d) == 1
        line = one_line(d.stderr())
        assert line.startswith("ctsd: ") and says in line, line
        assert list(data_dir.iterdir()) == []
    finally:
        d.close()


def test_a_start_that_cannot_record_itself_stops_with_one_line(data_dir: Path) -> None:
    """Cluster mode: the start's boot id is kept before anything is published; when it cannot
    be (here the name is a directory; a full disk does the same), the start stops."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    (data_dir / ".cluster-boots").mkdir()
    env = {"CTSD_CLUSTER_NATS_URLS": "nats://127.0.0.1:9", "CTSD_CLUSTER_NAME": "d"}
    d = Daemon(data_dir, env=env)
    try:
        assert run_to_exit(d) == 1
        line = one_line(d.stderr())
        assert line.startswith("ctsd: cannot write ") and ".cluster-boots" in line, line
    finally:
        d.close()


def test_asyncio_loop_serves_bus_http_and_writes(data_dir: Path) -> None:
    d = Daemon(data_dir, env={"CTSD_EVENT_LOOP": "asyncio"})
    try:
        d.start()
        auth = {"Authorization": f"Bearer {d.token}"}
        made = httpx.post(
            d.url + "/api/settings/connections",
            json={"name": "on asyncio", "exchange": "binance"},
            headers=auth,
        )
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        with connect(d.ws_url, additional_headers=auth, open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "auth_ok"
            ws.send(json.dumps({"id": 1, "type": "connections.get", "connection_id": cid}))
            reply = json.loads(ws.recv(timeout=5))
            assert reply["result"]["name"] == "on asyncio", reply
        assert d.stop() == 0
    finally:
        d.close()
    # Stopped by SIGTERM after a checkpoint: the change is in the data file.
    assert cid in (data_dir / "connections.json").read_text()


def test_port_busy_exits_1(data_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        d = Daemon(data_dir, port=busy.getsockname()[1])
        try:
            assert run_to_exit(d) == 1
            line = one_line(d.stderr())
            assert str(d.port) in line and "listen" in line, line
        finally:
            d.close()
    # The lock was released: a daemon starts on the same dir at once.
    d2 = Daemon(data_dir)
    try:
        d2.start()
    finally:
        d2.close()


def test_data_dir_unusable_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a dir")
    d = Daemon(blocker)
    try:
        assert run_to_exit(d) == 1
        assert "not a directory" in one_line(d.stderr())
    finally:
        d.close()
    assert blocker.read_text() == "not a dir"
    d = Daemon(blocker / "sub")
    try:
        assert run_to_exit(d) == 1
        one_line(d.stderr())
    finally:
        d.close()


def test_read_only_data_dir_exits_1(tmp_path: Path) -> None:
    # Root ignores chmod: a read-only tmpfs is what an unwritable dir looks like to root.
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        d = Daemon(mnt)
        try:
            assert run_to_exit(d) == 1
            assert "not writable" in one_line(d.stderr())
        finally:
            d.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal(daemon: Daemon, sig: int) -> None:
    start = time.monotonic()
    assert daemon.stop(sig, timeout=5) == 0
    assert time.monotonic() - start < 5
    msgs = daemon.notify.poll()
    assert "STOPPING=1" in msgs and msgs.index("STOPPING=1") > msgs.index("READY=1")
    assert temp_files(daemon.data_dir) == []
    assert any(e.get("event") == "stopped" for e in daemon.log_events())
    assert daemon.stderr() == ""


def test_signals_before_ready_and_while_stopping_never_cut_the_daemon_short(
    data_dir: Path,
) -> None:
    """A SIGHUP while starting (the cluster out of reach holds it there) is no reason to end
    the process; Ctrl-Cs sent while it stops never interrupt the last writes: exit 0, no
    traceback."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    section = {"nats_urls": [f"nats://127.0.0.1:{free_port()}"], "name": "d", "host_id": "h1"}
    (data_dir / "settings.json").write_text(json.dumps({"cluster": section}) + "\n")
    d = Daemon(data_dir, env={"CTSD_CLUSTER_CATCH_UP_S": "1.5"})
    try:
        d.start(wait=False)
        assert d.proc is not None
        status = "STATUS=catching up with cluster d"
        wait_until(lambda: status in d.notify.poll(), 20, what="the catch-up")
        d.send_signal(signal.SIGHUP)
        d.wait_ready(timeout=30)
        d.send_signal(signal.SIGTERM)

        def one_came_while_stopping() -> bool:  # one Ctrl-C after another until one did
            if d.proc is None or d.proc.poll() is not None:
                return True
            d.send_signal(signal.SIGINT)
            return any(e.get("event") == "already_stopping" for e in d.log_events())

        wait_until(one_came_while_stopping, 10, what="a Ctrl-C while stopping")
        assert d.proc.wait(10) == 0, d.stderr()
        assert any(e.get("event") == "already_stopping" for e in d.log_events())
        assert d.stderr() == ""
        assert any(e.get("event") == "stopped" for e in d.log_events())
    finally:
        d.close()


def test_sigterm_while_starting_stops_at_once_with_exit_0(data_dir: Path) -> None:
    """`systemctl stop` while the start waits for the cluster (out of reach here): SIGTERM's
    default action killed the process; it now stops as Ctrl-C does, exit 0."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    section = {"nats_urls": [f"nats://127.0.0.1:{free_port()}"], "name": "d", "host_id": "h1"}
    (data_dir / "settings.json").write_text(json.dumps({"cluster": section}) + "\n")
    d = Daemon(data_dir, env={"CTSD_CLUSTER_CATCH_UP_S": "60"})
    try:
        d.start(wait=False)
        assert d.proc is not None
        status = "STATUS=catching up with cluster d"
        wait_until(lambda: status in d.notify.poll(), 20, what="the catch-up")
        d.send_signal(signal.SIGTERM)
        assert d.proc.wait(5) == 0, d.stderr()
        assert d.stderr() == "ctsd: interrupted while starting\n"
    finally:
        d.close()


def test_sigterm_while_the_command_line_is_read_stops_with_exit_0(data_dir: Path) -> None:
    """A SIGTERM after the modules loaded, while click reads the command line (before
    `serve` runs): click took the interrupt for a Ctrl-C at a prompt, printed "Aborted!" and
    exited 1, a failure to systemd. It stops as any SIGTERM before READY does, exit 0. (The
    signal is sent from the group's callback, which click runs inside that window.)"""
    script = f"""
import os, signal, sys, time
sys.argv = ["ctsd", "serve", "--data-dir", {str(data_dir)!r}, "--port", "{free_port()}"]
from ctsd import cli, launch

def stopped_here() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)

cli.main.callback = stopped_here
launch.run()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSD_", "NOTIFY_"))}
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=30
    )
    assert (r.returncode, r.stderr) == (0, "ctsd: interrupted while starting\n")


@pytest.mark.parametrize("how", ["module", "script"])
def test_signals_in_the_first_half_second_are_handled(data_dir: Path, how: str) -> None:
    """A SIGHUP (logrotate) or SIGTERM in the half second the daemon's modules take to
    import ended the process by their default action (systemd counts death by SIGHUP as a
    clean exit: no restart). Now they are handled before anything heavy is imported, under
    `python -m ctsd` and the installed `ctsd` script alike: ignored, and a stop with exit 0."""
    import subprocess as sp

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSD_", "NOTIFY_"))}
    env["CTSD_TOKEN"] = "t" * 32
    script = Path(sys.executable).parent / "ctsd"
    cmd = [str(script)] if how == "script" else [sys.executable, "-m", "ctsd"]
    args = ["serve", "--data-dir", str(data_dir), "--port", str(free_port())]

    def attempt() -> bool:
        """Were the handlers seen before the daemon's modules loaded? (The signals came
        either way, each stop exit 0.) A slow poll may look only after they loaded."""
        proc = sp.Popen([*cmd, *args], stdout=sp.DEVNULL, stderr=sp.DEVNULL, env=env)
        try:

            def handled() -> bool:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                ignored = next(ln for ln in status.splitlines() if ln.startswith("SigIgn:"))
                return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGHUP - 1)))

            wait_until(handled, 15, interval=0.001, what="SIGHUP ignored")
            loaded = "msgspec" in Path(f"/proc/{proc.pid}/maps").read_text()
            proc.send_signal(signal.SIGHUP)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            return not loaded
        finally:
            proc.kill()
            proc.wait()

    # Without the early handlers no attempt can see them first; with them, nearly all do.
    assert any(attempt() for _ in range(5)), "the handlers came only after the imports"


def test_a_stray_sigusr1_is_logged_not_fatal(daemon: Daemon) -> None:
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        daemon.send_signal(sig)

    def logged() -> set[str]:
        return {e["signal"] for e in daemon.log_events() if e.get("event") == "signal_ignored"}

    wait_until(lambda: logged() == {"SIGUSR1", "SIGUSR2"}, 5, what="both logged")
    assert daemon.http("/health")[0] == 200
    assert daemon.stop() == 0


def test_sighup_reloads_settings_and_files(daemon: Daemon) -> None:
    data = daemon.data_dir
    (data / "settings.json").write_text(json.dumps({"sync_log_limit": 2}))
    conns = [
        {"id": f"h{i}", "name": f"hand {i}", "exchange": "bybit", "api_secret": CANARY}
        for i in range(3)
    ]
    (data / "connections.json").write_text(json.dumps(conns))
    after = len(daemon.notify.poll())
    daemon.send_signal(signal.SIGHUP)
    i = daemon.notify.wait_for("RELOADING=1", after=after)
    daemon.notify.wait_for("READY=1", after=i + 1)
    # Both files were taken in: three creates (source file), then the log trimmed to 2.
    log = json.loads((data / files.SYNC_LOG).read_text())
    assert len(log) == 2, log
    assert sorted(s["connection_id"] for s in json.loads((data / files.STATE).read_text())) == [
        "h0",
        "h1",
        "h2",
    ]
    assert any(e.get("event") == "reloaded" for e in daemon.log_events())
    assert daemon.http("/health", token=None)[1]["status"] == "ok"
    assert daemon.proc.poll() is None  # type: ignore[union-attr]
    assert CANARY not in (data / files.SYNC_LOG).read_text()


def test_sighup_opens_a_log_file_moved_away_again(daemon: Daemon) -> None:
    """logrotate moves logs/ctsd.log away and signals: the lines after the reload go to a
    new ctsd.log (0600), not on into the moved file."""
    logs_dir = daemon.data_dir / "logs"
    (logs_dir / "ctsd.log").rename(logs_dir / "ctsd.log.1")
    after = len(daemon.notify.poll())
    daemon.send_signal(signal.SIGHUP)
    daemon.notify.wait_for("READY=1", after=daemon.notify.wait_for("RELOADING=1", after=after))
    new = wait_until(lambda: (logs_dir / "ctsd.log").exists() and (logs_dir / "ctsd.log"))
    assert '"reloaded"' in wait_until(lambda: new.read_text()), new.read_text()
    assert stat_mode(new) == 0o600
    assert '"reloaded"' not in (logs_dir / "ctsd.log.1").read_text()


# --- watchdog -------------------------------------------------------------------------------


def _pings(sock: NotifySocket, seconds: float) -> list[float]:
    """Arrival times of WATCHDOG=1 over `seconds` (observing a window is the point here)."""
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        before = len(sock.messages)
        sock.poll()
        now = time.monotonic()
        times += [now for m in sock.messages[before:] if m == "WATCHDOG=1"]
        time.sleep(0.005)
    return times


def test_watchdog_pings_at_half_the_interval_and_stop_when_blocked(data_dir: Path) -> None:
    d = Daemon(data_dir, env={"WATCHDOG_USEC": "200000"})  # pings every 0.1 s
    try:
        d.start()
        pings = _pings(d.notify, 1.0)
        assert 7 <= len(pings) <= 13, len(pings)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.04), gaps
        # A stopped process is a blocked loop as far as systemd can tell: no pings.
        os.kill(d.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            _pings(d.notify, 0.05)  # drain what was already in flight
            assert _pings(d.notify, 0.5) == []
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        n = len(d.notify.messages)
        d.notify.wait_for("WATCHDOG=1", timeout=5, after=n)
    finally:
        d.close()


def test_no_watchdog_pings_without_watchdog_usec(daemon: Daemon) -> None:
    assert "WATCHDOG=1" not in daemon.notify.poll()
    assert _pings(daemon.notify, 0.3) == []


# --- invalid file at start ------------------------------------------------------------------


def test_invalid_file_at_start_degrades_health_and_is_untouched(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    bad = b'[\n  {"id": "c1", "name": "x", "exchange": "bybit", "is_enabeld": true}\n]\n'
    (data_dir / files.CONNECTIONS).write_bytes(bad)
    st = (data_dir / files.CONNECTIONS).stat()
    d = Daemon(data_dir)
    try:
        d.start()
        code, body = d.http("/health", token=None)
        assert code == 200 and body["status"] == "degraded", body
        problem = body["checks"]["files"]["invalid"][files.CONNECTIONS]
        assert problem.startswith("connections.json:2:50: ") and "is_enabled" in problem
        assert d.stop() == 0
    finally:
        d.close()
    assert (data_dir / files.CONNECTIONS).read_bytes() == bad
    assert (data_dir / files.CONNECTIONS).stat().st_ino == st.st_ino


def _run(data_dir: Path, body: Callable[[Daemon], None] = lambda _d: None) -> None:
    """Start a daemon on `data_dir`, run `body` with it, stop it cleanly (SIGTERM)."""
    d = Daemon(data_dir)
    try:
        d.start()
        body(d)
        assert d.stop() == 0
    finally:
        d.close()


def test_invalid_sync_log_at_start_with_a_journal_begun_later(data_dir: Path) -> None:
    """A journal begun at revision 2 and a sync log broken by hand: the files' revision is
    unknown, so the journal is not judged by it: the daemon starts, degraded, and leaves the
    sync log as it is (it used to refuse to start, calling its own journal foreign)."""

    def create_two(d: Daemon) -> None:
        for name in ("one", "two"):
            made = httpx.post(
                d.url + "/api/settings/connections?sync=files",
                json={"name": name, "exchange": "bybit"},
                headers={"Authorization": f"Bearer {d.token}"},
            )
            assert made.status_code == 201, made.text

    def degraded(d: Daemon) -> None:
        code, body = d.http("/health", token=None)
        assert code == 200 and body["status"] == "degraded", body
        assert files.SYNC_LOG in body["checks"]["files"]["invalid"], body

    _run(data_dir, create_two)
    (data_dir / ".journal").unlink()
    _run(data_dir)  # begins a new journal at the files' revision, 2
    bad = b'[\n  {"id": 1, "connection_id": nul\n'
    (data_dir / files.SYNC_LOG).write_bytes(bad)
    _run(data_dir, degraded)
    assert (data_dir / files.SYNC_LOG).read_bytes() == bad


@pytest.mark.anyio
async def test_an_edit_made_while_stopped_is_a_change_a_resuming_bot_sees(data_dir: Path) -> None:
    """connections.json edited while the daemon is down (a name changed, the masked
    placeholder pasted for the key): the next start takes it in through the door before
    READY, logged with source "file" and broadcast, so a bot resuming with `since` sees it,
    and the key stays as stored."""
    write_connections(data_dir, [connection("c1", name="before", api_key=CANARY)])
    _run(data_dir)
    since = max((e["id"] for e in json.loads((data_dir / files.SYNC_LOG).read_text())), default=0)
    rows = json.loads((data_dir / files.CONNECTIONS).read_text())
    rows[0].update(name="edited while down", api_key="********")
    (data_dir / files.CONNECTIONS).write_text(json.dumps(rows, indent=2) + "\n")
    d = Daemon(data_dir)
    try:
        d.start()
        async with bus(d) as b:
            await b.ok("subscribe", since=since)
            event = await b.wait_event("update", "c1")
            assert event["id"] == since + 1 and event["data"]["source"] == "file", event
            assert event["data"]["values"]["name"] == "edited while down", event
        wait_until(
            lambda: CANARY in (data_dir / files.CONNECTIONS).read_text(),
            what="the stored key written back over the placeholder",
        )
        assert d.stop() == 0
        assert CANARY not in d.stdout() + d.stderr() + "".join(map(str, b.raw))
    finally:
        d.close()
    _run(data_dir)  # taken in once: no event at the next start
    log = json.loads((data_dir / files.SYNC_LOG).read_text())
    assert [e["id"] for e in log if e["id"] > since] == [since + 1]
    # Killed (-9) once connections.json was left alone a second: its copy follows then, so an
    # edit made after the kill is taken in as well.
    d = Daemon(data_dir)
    try:
        d.start()
        patched = httpx.patch(
            d.url + "/api/settings/connections/c1?sync=files",
            json={"name": "n2"},
            headers={"Authorization": f"Bearer {d.token}"},
        )
        assert patched.status_code == 200, patched.text
        copy = data_dir / ".bases" / files.CONNECTIONS
        wait_until(lambda: copy.exists() and '"n2"' in copy.read_text(), what="the copy")
        d.kill()
    finally:
        d.close()
    rows = json.loads((data_dir / files.CONNECTIONS).read_text())
    rows[0]["name"] = "after the kill"
    (data_dir / files.CONNECTIONS).write_text(json.dumps(rows, indent=2) + "\n")
    _run(data_dir)
    log = json.loads((data_dir / files.SYNC_LOG).read_text())
    assert log[-1]["data"]["values"]["name"] == "after the kill", log[-1]
    assert log[-1]["data"]["source"] == "file", log[-1]
    # Deleted meanwhile, and its copy unusable: the start stops, saying what to do.
    (data_dir / files.CONNECTIONS).unlink()
    (data_dir / ".bases" / files.CONNECTIONS).write_text("[]\n")
    line = refused_start(Daemon(data_dir))
    assert "connections.json was deleted while the daemon was down" in line, line
    assert not (data_dir / files.CONNECTIONS).exists()


# --- the bus ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_canary_secret_never_in_any_log(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    conn = {
        "id": "c1",
        "name": "canary",
        "exchange": "bybit",
        "api_key": CANARY + "-key",
        "api_secret": CANARY,
        "api_passphrase": CANARY + "-pass",
    }
    (data_dir / files.CONNECTIONS).write_text(json.dumps([conn], indent=2))
    doc = {"projectX": {"username": "u", "apiKey": CANARY, "password": CANARY}}
    (data_dir / "connection.json").write_text(json.dumps(doc))
    d = Daemon(data_dir, args=["--log-level", "debug"])
    try:
        d.start()
        async with bus(d, sync=None) as b:
            got = await b.ok("connections.get", connection_id="c1")
            assert CANARY not in json.dumps(got)
            changes = {"api_secret": CANARY + "2"}
            await b.ok("connections.update", connection_id="c1", changes=changes)
            await b.ok("connections.create", connection={**conn, "id": "c2", "api_key": CANARY})
            rid = await b.send(
                "connections.update", connection_id="c1", changes={"api_sceret": CANARY}
            )
            err = await b.result(rid)
            assert err["id"] == rid and not err["success"]
            assert CANARY not in json.dumps(err)
        code, listed = d.http("/api/settings/connections")
        assert code == 200 and CANARY not in json.dumps(listed), listed
        # Invalid hand edits right at the secrets: a wrong type, and a string cut short.
        bad = json.dumps([{**conn, "api_secret": {"nested": CANARY}}], indent=2)
        (data_dir / files.CONNECTIONS).write_text(bad)
        cut = json.dumps(doc).split(CANARY)[0] + CANARY + "\n"
        (data_dir / "connection.json").write_text(cut)
        d.send_signal(signal.SIGHUP)

        def reported() -> set[str]:
            return {e.get("file") for e in d.log_events() if e.get("event") == "file_invalid"}

        wait_until(lambda: {files.CONNECTIONS, "connection.json"} <= reported())
        health = d.http("/health", token=None)[1]
        assert health["status"] == "degraded" and CANARY not in json.dumps(health)
        assert d.stop() == 0
    finally:
        d.close()
    outputs = {"stdout": d.stdout(), "stderr": d.stderr()}
    for p in sorted((data_dir / "logs").iterdir()):
        outputs[p.name] = p.read_text(errors="replace")
    assert "ready" in outputs["stdout"] and "ctsd.log" in outputs
    for where, text in outputs.items():
        assert CANARY not in text, where


def _seed_connections(data_dir: Path, n: int) -> None:
    write_connections(data_dir, [connection(f"c{i}", "v") for i in range(n)])


@pytest.mark.anyio
async def test_a_stop_that_leaves_changes_in_the_journal_says_so(data_dir: Path) -> None:
    """connections.json cannot be replaced (immutable: the disk refusing it): a change is
    acknowledged from the journal, the stop cannot write it and says so, naming the file;
    the next start writes it."""
    d = Daemon(data_dir).start()
    target = data_dir / "connections.json"
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        d.close()
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        async with bus(d) as b:
            reply = await b.call("connections.create", connection=connection(id="kept"))
            assert "saved (journal)" in reply["error"]["message"], reply  # (it waits for files)
        assert d.stop() == 0
        (said,) = [e for e in d.log_events() if e["event"] == "stopped_with_changes_in_the_journal"]
        assert "connections.json" in said["files"], said
        subprocess.run(["chattr", "-i", str(target)], check=True)
        d.start()
        assert wait_until(lambda: b'"kept"' in target.read_bytes())
    finally:
        subprocess.run(["chattr", "-i", str(target)], capture_output=True)
        d.close()


@pytest.mark.anyio
async def test_sigterm_during_a_burst_loses_no_acked_change(data_dir: Path) -> None:
    _seed_connections(data_dir, 10)
    d = Daemon(data_dir).start()
    try:
        async with bus(d, sync=None) as b:
            sent: dict[int, tuple[str, str]] = {}
            for seq in range(300):
                cid, name = f"c{seq % 10}", f"s{seq}"
                rid = await b.send("connections.update", connection_id=cid, changes={"name": name})
                sent[rid] = (cid, name)
            acked: list[int] = []
            try:
                while len(acked) < 300:
                    msg = await b.recv(timeout=10)
                    if msg.get("type") != "result":
                        continue
                    if msg["success"]:
                        acked.append(msg["id"])
                    if len(acked) == 20:
                        d.send_signal(signal.SIGTERM)  # mid-burst
            except ConnectionClosed as e:
                # Closed by the shutdown: "going away"; whatever was acked must be on disk.
                assert e.rcvd is not None and e.rcvd.code == 1001, e
        assert d.proc.wait(5) == 0  # type: ignore[union-attr]
        assert "STOPPING=1" in d.notify.poll()
    finally:
        d.close()
    assert len(acked) >= 20
    assert temp_files(data_dir) == []
    all_files_valid(data_dir)
    on_disk = {c["id"]: c["name"] for c in json.loads((data_dir / files.CONNECTIONS).read_text())}
    last_acked: dict[str, int] = {}
    for rid in acked:
        cid, name = sent[rid]
        last_acked[cid] = max(last_acked.get(cid, -1), int(name[1:]))
    for cid, seq in last_acked.items():
        assert int(on_disk[cid][1:]) >= seq, (cid, on_disk[cid], seq)


# --- kill -9 in the middle of a change storm ------------------------------------------------

# Kills per run: 15 in the normal run (tests/test_crash.py kills a storm of its own too);
# the long run is CTSD_CRASH_CYCLES=1000, as for that one.
ROUNDS = int(os.environ.get("CTSD_CRASH_CYCLES") or 15)
CLIENTS = 4
PER_CLIENT = 40
CONNS_PER_CLIENT = 5
WINDOW = 8


async def _storm(d: Daemon, rnd: int, kill_after: int) -> tuple[dict[tuple[str, str], int], int]:
    """Pipelined changes from CLIENTS clients (WINDOW each in flight); SIGKILL once
    `kill_after` acks arrived.

    Every change carries a value that grows with (round, seq): a name `v<N>` in
    connections.json, or every fourth one a live volume factor N in connection-state.json
    (a group then writes both files and the log). Returns the highest acknowledged value per
    (connection, field), and how many acks arrived.
    """
    import asyncio

    acked: dict[tuple[str, str], int] = {}
    total = 0
    killed = asyncio.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            d.proc.kill()  # type: ignore[union-attr]

    async def client(k: int) -> None:
        nonlocal total
        async with bus(d, sync=None) as b:
            targets: dict[int, tuple[str, str, int]] = {}

            async def send(seq: int) -> None:
                cid = f"c{k * CONNS_PER_CLIENT + seq % CONNS_PER_CLIENT}"
                value = rnd * 1000 + seq + 1
                if seq % 4 == 3:
                    rid = await b.send(
                        "connections.set_volume", connection_id=cid, live=float(value)
                    )
                    targets[rid] = (cid, "live", value)
                else:
                    changes = {"name": f"v{value}"}
                    rid = await b.send("connections.update", connection_id=cid, changes=changes)
                    targets[rid] = (cid, "name", value)

            # WINDOW changes in flight per client: groups stay large, and a kill after ack N
            # lands with at most CLIENTS * WINDOW more answered (mid-storm by construction).
            for seq in range(WINDOW):
                await send(seq)
            sent = WINDOW
            answered = 0
            while answered < PER_CLIENT:
                msg = await b.recv(timeout=60)
                if msg.get("type") != "result":
                    continue
                assert msg["success"], msg
                cid, field, value = targets[msg["id"]]
                acked[cid, field] = max(acked.get((cid, field), 0), value)
                total += 1
                answered += 1
                if total >= kill_after:
                    kill()
                if sent < PER_CLIENT:
                    await send(sent)
                    sent += 1

    results = await asyncio.gather(*(client(k) for k in range(CLIENTS)), return_exceptions=True)
    kill()  # all acked before the chosen moment: kill now
    for r in results:
        if isinstance(r, AssertionError):
            raise r
    return acked, total


@pytest.mark.slow
def test_kill_9_during_a_change_storm(data_dir: Path) -> None:
    import asyncio
    import random

    rng = random.Random(20240802)  # reproducible kill moments
    _seed_connections(data_dir, CLIENTS * CONNS_PER_CLIENT)
    mid_storm = 0
    for rnd in range(ROUNDS):
        d = Daemon(data_dir)
        try:
            d.start()
            _, health = d.http("/health", token=None)
            assert health["status"] == "ok", (rnd, health)  # the last kill broke nothing
            assert temp_files(data_dir) == []  # what the kill left half-written is gone
            kill_after = rng.randint(0, CLIENTS * PER_CLIENT)
            acked, n_acked = asyncio.run(_storm(d, rnd, kill_after))
            d.proc.wait(5)  # type: ignore[union-attr]
            assert d.proc.returncode == -signal.SIGKILL  # type: ignore[union-attr]
        finally:
            d.close()
        # Straight after the kill every file is valid JSON; once restarted (the journal is
        # applied to the files before READY) every acknowledged change is in them.
        all_files_valid(data_dir)
        again = Daemon(data_dir).start()
        again.close()
        all_files_valid(data_dir)
        conns = json.loads((data_dir / files.CONNECTIONS).read_text())
        states = json.loads((data_dir / files.STATE).read_text())
        on_disk = {(c["id"], "name"): int(c["name"].lstrip("v") or 0) for c in conns}
        on_disk |= {(s["connection_id"], "live"): s["volume_factor_live"] for s in states}
        for key, value in acked.items():
            assert on_disk[key] >= value, (rnd, key, on_disk[key], value)
        log = msgspec.json.decode((data_dir / files.SYNC_LOG).read_bytes())
        ids = [e["id"] for e in log]
        assert ids == sorted(set(ids))
        mid_storm += 0 < n_acked < CLIENTS * PER_CLIENT
    # Most kills must land with changes both acknowledged and still in flight (the window
    # makes every kill chosen before the last CLIENTS * WINDOW acks one of those).
    assert mid_storm >= ROUNDS * 3 // 4, mid_storm


# --- log format -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_format", [None, "json", "JSON"], ids=["tty-console", "env-json", "env-json-upper"]
)
def test_log_format_console_on_a_tty_unless_set(data_dir: Path, env_format: str | None) -> None:
    import pty
    import subprocess as sp

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSD_", "NOTIFY_"))}
    env.update({"CTSD_TOKEN": "t" * 32, "PYTHONUNBUFFERED": "1"})
    if env_format:
        env["CTSD_LOG_FORMAT"] = env_format
    cmd = [sys.executable, "-m", "ctsd", "serve", "--data-dir", str(data_dir)]
    proc = sp.Popen([*cmd, "--port", str(free_port())], stdout=slave, stderr=sp.PIPE, env=env)
    os.close(slave)
    out = b""
    try:

        def saw_ready() -> bool:
            nonlocal out
            out += os.read(master, 65536)
            return b"ready" in out

        wait_until(saw_ready, timeout=15, what="the ready line on the tty")
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    line = next(ln for ln in out.decode(errors="replace").splitlines() if "ready" in ln)
    if env_format in ("json", "JSON"):  # (as a unit file may spell it)
        assert json.loads(line)["event"] == "ready"
    else:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)  # the console renderer colours a TTY
        assert not plain.startswith("{") and "[info     ] ready" in plain, plain


@pytest.mark.anyio
async def test_a_port_change_still_in_the_journal_at_start_is_where_it_binds(
    data_dir: Path,
) -> None:
    """settings.json's port changed through the door, the daemon killed before the file got
    it: the next start binds where the journal says, not where the file still says."""
    data_dir.mkdir(mode=0o700)
    old, new = free_port(), free_port()
    (data_dir / "settings.json").write_text(json.dumps({"server": {"port": old}}))
    (data_dir / "settings.json").chmod(0o600)
    await killed_after(data_dir, ops.set_document("settings", {"server": {"port": new}}))
    assert json.loads((data_dir / "settings.json").read_text())["server"]["port"] == old
    d = Bare(data_dir, env={"CTSD_DATA_DIR": str(data_dir)})
    try:
        d.start()
        assert ready_event(d)["port"] == new
    finally:
        d.close()


def test_a_log_file_that_cannot_be_written_costs_one_warning_a_minute(tmp_path: Path) -> None:
    """The data disk full (here: the log file's stream on /dev/full): the lines still reach
    stdout, as JSON; logging's default printed a traceback block on stderr for every line,
    just as the daemon logs its failing writes."""
    script = f"""
import logging, structlog
from pathlib import Path
from ctsd import logs
logs.setup("json", "info")
logs.add_file(Path({str(tmp_path)!r}))
kind = logs.PrivateRotatingFileHandler
(handler,) = [h for h in logging.getLogger().handlers if isinstance(h, kind)]
handler.stream = open("/dev/full", "w")
for i in range(3):
    structlog.get_logger("ctsd.store").error("commit_failed", n=i)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["n"] for e in lines if e["event"] == "commit_failed"] == [0, 1, 2]
    (warning,) = [e for e in lines if e["event"].startswith("log_write_failed")]
    assert "ctsd.log: No space left on device" in warning["event"], warning
    assert warning["level"] == "warning" and warning["logger"] == "ctsd.logs"


def test_a_stdout_that_cannot_be_written_costs_one_warning_a_minute(tmp_path: Path) -> None:
    """stdout a pipe whose reader is gone (`ctsd serve | head`; here: /dev/full): every line
    printed a traceback block on stderr. Now the lines still reach the log file, and it says
    once why stdout has none."""
    script = f"""
import logging, structlog
from pathlib import Path
from ctsd import logs
logs.setup("json", "info")
logs.add_file(Path({str(tmp_path)!r}))
(handler,) = [h for h in logging.getLogger().handlers if isinstance(h, logs.StdoutHandler)]
handler.stream = open("/dev/full", "w")
for i in range(3):
    structlog.get_logger("ctsd.store").error("commit_failed", n=i)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = [json.loads(line) for line in (tmp_path / "ctsd.log").read_text().splitlines()]
    assert [e["n"] for e in lines if e["event"] == "commit_failed"] == [0, 1, 2]
    (warning,) = [e for e in lines if e["event"].startswith("log_write_failed")]
    assert "stdout: No space left on device" in warning["event"], warning
