"""Hostile and careless neighbours in the data dir, against the real daemon: FIFOs, links,
loose permissions, a file where a directory should be, names with a newline, duplicate keys,
depth bombs, planted temp-file links and URLs the HTTP client cannot parse.

Each case is refused with a clear error, the daemon keeps serving, nothing is written outside
the data dir and the offending file is left exactly as it is.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ctsd import atomic
from tests.bus import bus
from tests.cli_helpers import clean_env, ctsd
from tests.daemon import Daemon, free_port, health, invalid_files, wait_until

pytestmark = pytest.mark.anyio

WATCHLISTS = "watchlists.json"


def notices(d: Daemon, event: str = "file_invalid") -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == event]


def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return ctsd("verify", "--data-dir", str(data_dir), timeout=20)


# --- not a regular file --------------------------------------------------------------------


async def test_fifo_at_start_is_invalid_not_a_hang(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    fifo = data_dir / WATCHLISTS  # rm DATA/watchlists.json; mkfifo DATA/watchlists.json
    os.mkfifo(fifo, 0o600)
    d = Daemon(data_dir)
    try:
        d.start(timeout=15)  # READY: nothing blocked before binding
        problem = invalid_files(d)[WATCHLISTS]
        assert "is a FIFO, expected a regular JSON file" in problem, problem
        assert health(d)["status"] == "degraded"
        async with bus(d) as b:
            err = await b.err("documents.set", name="watchlists", content={"a": ["NQ"]})
            assert err["code"] == "file_invalid", err
            await b.ok("connections.create", connection={"id": "c1", "name": "n", "exchange": "x"})
            d.send_signal(signal.SIGHUP)
            wait_until(lambda: d.notify.poll().count("READY=1") >= 2, what="reload done")
            assert await b.ok("ping") is not None
            assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left exactly as it is
            # Replaced by a good file: taken in, health ok again.
            fifo.unlink()
            fifo.write_text('{"main": ["ES"]}\n')
            wait_until(lambda: WATCHLISTS not in invalid_files(d), what="fixed file taken in")
            assert (await b.ok("documents.get", name="watchlists")) == {"main": ["ES"]}
        assert d.stop() == 0
    finally:
        d.close()


async def test_fifo_made_while_running_never_blocks_a_write(daemon: Daemon) -> None:
    d = daemon
    path = d.data_dir / WATCHLISTS
    async with bus(d) as b:
        await b.ok("documents.set", name="watchlists", content={"x": 1})
        path.unlink()
        os.mkfifo(path, 0o600)
        err = await b.err("documents.set", name="watchlists", content={"x": 2})
        assert err["code"] == "file_invalid" and "FIFO" in err["message"], err
        wait_until(lambda: any(n.get("file") == WATCHLISTS for n in notices(d)))
        # Once the watcher has seen it too, a write is refused before it is made: still why.
        err = await b.err("documents.set", name="watchlists", content={"x": 3})
        assert err["code"] == "file_invalid" and "is a FIFO" in err["message"], err
        # Every other change keeps flowing.
        await b.ok("documents.set", name="ui-config", content={"theme": "dark"})
        await b.ok("connections.create", connection={"id": "c1", "name": "n", "exchange": "x"})
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    r = verify(d.data_dir)
    assert r.returncode == 1 and f"{path}:1:1: is a FIFO" in r.stdout, r.stdout


async def test_symlinked_data_file_is_invalid_and_never_written_through(
    daemon: Daemon, tmp_path: Path
) -> None:
    d = daemon
    outside = tmp_path / "outside.json"
    outside.write_text('{"main": ["NQ"]}\n')
    before = outside.read_bytes()
    path = d.data_dir / WATCHLISTS
    path.unlink()
    path.symlink_to(outside)
    wait_until(lambda: WATCHLISTS in invalid_files(d), what="the link reported")
    assert (
        "is a symlink: ctsd does not follow links in its data dir" in invalid_files(d)[WATCHLISTS]
    )
    async with bus(d) as b:
        err = await b.err("documents.set", name="watchlists", content={"x": 2})
        assert err["code"] == "file_invalid", err  # not a silent `conflict`
    assert path.is_symlink() and outside.read_bytes() == before
    r = verify(d.data_dir)
    assert r.returncode == 1 and "is a symlink" in r.stdout


async def test_symlinked_algorithm_file_is_invalid(daemon: Daemon, tmp_path: Path) -> None:
    outside = tmp_path / "algo.json"
    outside.write_text('{"name": "ext"}\n')
    (daemon.data_dir / "algorithms" / "ext.json").symlink_to(outside)
    wait_until(lambda: "algorithms/ext.json" in invalid_files(daemon))
    async with bus(daemon) as b:
        err = await b.err("documents.set", name="algorithms/ext", content={"name": "ext"})
        assert err["code"] == "file_invalid", err
    assert outside.read_text() == '{"name": "ext"}\n'


async def test_planted_temp_file_link_is_never_followed(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    assert d.proc is not None
    outside = tmp_path / "stolen.json"
    # The temp names an older daemon used (pid-based) and a few guesses: all links out.
    for name in (WATCHLISTS, "connections.json", "connection-sync-log.json"):
        for suffix in (str(d.proc.pid), "0", "1"):
            (d.data_dir / f".ctsd-tmp-{name}.{suffix}").symlink_to(outside)
    async with bus(d) as b:
        await b.ok("documents.set", name="watchlists", content={"k": "CANARY"})
        await b.ok("connections.create", connection={"id": "c1", "name": "n", "exchange": "x"})
        assert (await b.ok("documents.get", name="watchlists")) == {"k": "CANARY"}
    assert not outside.exists(), "written through a planted link"
    assert json.loads((d.data_dir / WATCHLISTS).read_text()) == {"k": "CANARY"}
    assert stat.S_IMODE((d.data_dir / WATCHLISTS).stat().st_mode) == 0o600


def test_temp_name_taken_by_a_link_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a planted link at the exact temp name (guessed, say): O_EXCL|O_NOFOLLOW refuse
    it, and the write goes on under a fresh random name."""
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "outside.json"
    drawn = iter(["guessed", "fresh"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda _n: next(drawn))
    planted = data / f"{atomic.TEMP_PREFIX}x.json.guessed"
    planted.symlink_to(outside)
    atomic.write_files([(data / "x.json", b"{}\n")])
    assert not outside.exists()
    assert (data / "x.json").read_bytes() == b"{}\n"
    assert planted.is_symlink() and sorted(p.name for p in data.iterdir()) == [
        planted.name,
        "x.json",
    ]


# --- permissions -----------------------------------------------------------------------------


async def test_data_file_other_users_may_read_is_invalid_until_chmod(daemon: Daemon) -> None:
    d = daemon
    path = d.data_dir / WATCHLISTS
    path.write_text('{"main": ["NQ"]}\n')
    os.chmod(path, 0o644)
    wait_until(lambda: WATCHLISTS in invalid_files(d), what="the mode reported")
    problem = invalid_files(d)[WATCHLISTS]
    assert f"mode 0644 lets other users read it; chmod 600 {path}" in problem, problem
    async with bus(d) as b:
        err = await b.err("documents.set", name="watchlists", content={"x": 1})
        assert err["code"] == "file_invalid"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # never "repaired" by the daemon
        os.chmod(path, 0o600)
        wait_until(lambda: WATCHLISTS not in invalid_files(d), what="chmod 600 taken in")
        assert (await b.ok("documents.get", name="watchlists")) == {"main": ["NQ"]}


def test_loose_token_file_refuses_start(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    token = data_dir / ".token"
    token.write_text("x" * 43 + "\n")
    os.chmod(token, 0o644)
    d = Daemon(data_dir, token=None)
    try:
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(15) == 1
        lines = d.stderr().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].endswith(
            f"{token} is mode 0644: other users may have read the bus token; "
            "chmod 600 it and consider a new token"
        ), lines
    finally:
        d.close()
    r = verify(data_dir)
    assert r.returncode == 1 and f"{token}: is mode 0644" in r.stdout, r.stdout


def test_a_token_of_two_lines_refuses_start_without_showing_it(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    token = data_dir / ".token"
    token.write_text("SecretTok1\n# old: SecretTok0\n")
    os.chmod(token, 0o600)
    d = Daemon(data_dir, token=None)
    try:
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(15) == 1
        err = d.stderr()
        assert f"the bus token in {token} holds a line break" in err, err
        assert "SecretTok" not in err + d.stdout()
    finally:
        d.close()


def test_wide_data_dir_is_warned_and_shown(data_dir: Path) -> None:
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)
    d = Daemon(data_dir)
    try:
        d.start()
        warned = [e for e in d.log_events() if e.get("event") == "data_dir_mode"]
        assert warned and "chmod 700" in warned[0]["problem"], warned
        body = health(d)
        assert body["status"] == "degraded"
        assert "mode 0755" in body["checks"]["data_dir"]["problems"]["."]
    finally:
        d.close()
    r = verify(data_dir)
    assert r.returncode == 1
    assert f"{data_dir}: mode 0755 lets other users list the data dir" in r.stdout
    os.chmod(data_dir, 0o700)
    assert verify(data_dir).returncode == 0


# --- the data dir's own directories ---------------------------------------------------------


@pytest.mark.parametrize("sub", ["algorithms", "logs", "historical"])
def test_symlinked_directory_refuses_start(data_dir: Path, tmp_path: Path, sub: str) -> None:
    data_dir.mkdir(mode=0o700)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data_dir / sub).symlink_to(outside)
    d = Daemon(data_dir)
    try:
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(15) == 1
        lines = d.stderr().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"{data_dir / sub} is a symlink: ctsd does not follow links" in lines[0]
    finally:
        d.close()
    assert list(outside.iterdir()) == []
    r = verify(data_dir)
    assert r.returncode == 1 and f"{data_dir / sub}: is a symlink" in r.stdout, r.stdout


def test_symlinked_log_file_refuses_start(data_dir: Path, tmp_path: Path) -> None:
    (data_dir / "logs").mkdir(parents=True, mode=0o700)
    outside = tmp_path / "elsewhere.log"
    (data_dir / "logs" / "ctsd.log").symlink_to(outside)
    d = Daemon(data_dir)
    try:
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(15) == 1
        lines = d.stderr().strip().splitlines()
        assert len(lines) == 1 and "ctsd.log is a symlink" in lines[0], lines
    finally:
        d.close()
    assert not outside.exists()


async def test_algorithms_replaced_by_a_file_is_io_error(daemon: Daemon) -> None:
    d = daemon
    algos = d.data_dir / "algorithms"
    async with bus(d) as b:
        await b.ok("documents.set", name="algorithms/Fast", content={"name": "Fast"})
        (algos / "Fast.json").unlink()
        algos.rmdir()
        algos.write_text("not a directory\n")
        err = await b.err("documents.set", name="algorithms/Slow", content={"name": "Slow"})
        assert err["code"] == "io_error", err
        body = health(d)
        assert body["status"] == "degraded"
        assert "algorithms" in body["checks"]["data_dir"]["problems"], body
        await b.ok("documents.set", name="ui-config", content={"still": "serving"})
    assert algos.read_text() == "not a directory\n"


# --- names, keys and depth ------------------------------------------------------------------


async def test_algorithm_name_with_a_trailing_newline_is_refused(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        err = await b.err("documents.set", name="algorithms/x\n", content={"name": "x"})
        assert err["code"] in ("not_found", "invalid"), err
        err = await b.err("documents.get", name="algorithms/x\n")
        assert err["code"] in ("not_found", "invalid"), err
    assert os.listdir(daemon.data_dir / "algorithms") == []


def test_duplicate_keys_are_invalid_at_start_on_edit_and_in_verify(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    conns = (
        '[\n  {\n    "id": "c1",\n    "name": "first",\n    "exchange": "bybit",\n'
        '    "name": "second"\n  }\n]\n'
    )
    (data_dir / "connections.json").write_text(conns)
    d = Daemon(data_dir)
    try:
        d.start()
        problem = invalid_files(d)["connections.json"]
        assert problem.startswith("connections.json:6:5: duplicate key `name` (first at line 4)")
        assert "$[0].name" in problem
        doc = '{\n  "lists": {\n    "a": [1],\n    "a": [2]\n  }\n}\n'
        (data_dir / WATCHLISTS).write_text(doc)
        wait_until(lambda: WATCHLISTS in invalid_files(d), what="the hand edit judged")
        notice = [n for n in notices(d) if n.get("file") == WATCHLISTS][-1]
        assert notice["problem"].startswith(f"{WATCHLISTS}:4:5: duplicate key `a`"), notice
        assert (data_dir / WATCHLISTS).read_text() == doc
    finally:
        d.close()
    r = verify(data_dir)
    assert r.returncode == 1
    assert f"{data_dir}/connections.json:6:5: duplicate key `name`" in r.stdout
    assert f"{data_dir}/{WATCHLISTS}:4:5: duplicate key `a`" in r.stdout


async def test_duplicate_key_in_a_hand_edit_of_a_big_table(daemon: Daemon) -> None:
    """The fast path (only changed records decoded) checks the bytes it decodes too."""
    d = daemon
    async with bus(d) as b:
        for i in range(20):
            await b.ok(
                "connections.create", connection={"id": f"c{i}", "name": "n", "exchange": "x"}
            )
    path = d.data_dir / "connections.json"
    text = path.read_text()
    edited = text.replace('"name": "n",', '"name": "n",\n    "name": "m",', 1)
    assert edited != text
    path.write_text(edited)
    wait_until(lambda: "connections.json" in invalid_files(d), what="the duplicate reported")
    assert "duplicate key `name`" in invalid_files(d)["connections.json"]


async def test_deep_document_is_refused_and_the_daemon_keeps_answering(daemon: Daemon) -> None:
    d = daemon
    deep: Any = []
    for _ in range(600):
        deep = [deep]
    async with bus(d) as b:
        err = await b.err("documents.set", name="ui-config", content={"a": deep})
        assert err["code"] == "invalid" and "64 levels" in err["message"], err
        for cmd in ("snapshot", "data.export"):
            await b.ok(cmd)
        await b.ok("documents.get", name="ui-config")
    assert health(d)["status"] == "ok"
    # By hand: 100 levels in a file.
    (d.data_dir / "ui-config.json").write_text('{"a": ' + "[" * 100 + "]" * 100 + "}\n")
    wait_until(lambda: "ui-config.json" in invalid_files(d))
    assert "ui-config.json:1:70: nested deeper than 64 levels" in invalid_files(d)["ui-config.json"]
    r = verify(d.data_dir)
    assert r.returncode == 1 and "nested deeper than 64 levels" in r.stdout


def test_settings_nested_past_what_json_reads_is_invalid_at_start_not_a_crash(
    data_dir: Path,
) -> None:
    """settings.json invalid at start is read once more for its cluster section: nested
    thousands deep (past what Python's json reads), that read crashed the start."""
    data_dir.mkdir(mode=0o700)
    settings = data_dir / "settings.json"
    settings.write_text('{"ui": ' + "[" * 5000 + "]" * 5000 + "}\n")
    d = Daemon(data_dir)
    try:
        d.start(timeout=15)
        assert "nested deeper than 64 levels" in invalid_files(d)["settings.json"]
        assert d.stop() == 0
    finally:
        d.close()
    # One that may hold the cluster section: the start is refused in one line, never a
    # traceback (a start on its own in a cluster host's place would be worse).
    settings.write_text('{"cluster": {}, "ui": ' + "[" * 5000 + "]" * 5000 + "}\n")
    r = ctsd("serve", "--data-dir", str(data_dir), "--port", str(free_port()), env=clean_env())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "may hold this host's cluster section" in r.stderr and r.stderr.count("\n") == 1


async def test_a_number_too_long_to_read_is_invalid_not_a_crash(daemon: Daemon) -> None:
    """Past int()'s digit limit the stdlib decoder that locates problems raised ValueError,
    which no reader of a file caught (the intake's judging, verify)."""
    d = daemon
    doc = '{\n  "lists": {"a": [' + "9" * 5000 + "]}\n}\n"
    (d.data_dir / WATCHLISTS).write_text(doc)
    wait_until(lambda: WATCHLISTS in invalid_files(d), what="the hand edit judged")
    assert invalid_files(d)[WATCHLISTS].startswith(f"{WATCHLISTS}:2:19: number out of range")
    assert (d.data_dir / WATCHLISTS).read_text() == doc
    async with bus(d) as b:
        await b.ok("documents.get", name="watchlists")
    r = verify(d.data_dir)
    assert r.returncode == 1 and f"{WATCHLISTS}:2:19: number out of range" in r.stdout, r


# --- probes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("base_url", ["http://[::1", "http://[::1]:99999/", "http://a\tb/"])
async def test_connection_test_with_an_unusable_url_is_a_failed_test(
    daemon: Daemon, base_url: str
) -> None:
    settings = json.dumps({"base_url": base_url})
    conn = {"id": "u1", "name": "n", "exchange": "fakex", "connection_settings": settings}
    async with bus(daemon) as b:
        await b.ok("connections.create", connection=conn)
        result = await b.ok("connections.test", connection_id="u1")
        assert result["success"] is False and result["error"], result
    assert not [e for e in daemon.log_events() if e.get("level") == "error"]


def test_verify_never_hangs_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "connections.json", 0o600)
    os.mkfifo(tmp_path / "algorithms.json", 0o600)  # not a data file name: ignored
    r = ctsd("verify", "--data-dir", str(tmp_path), env=clean_env(), timeout=20)
    assert r.returncode == 1
    assert f"{tmp_path}/connections.json:1:1: is a FIFO" in r.stdout


def test_client_never_hangs_on_a_fifo_settings_file(tmp_path: Path) -> None:
    # The CLI reads server.host/port from DATA/settings.json, as the daemon binds them.
    os.mkfifo(tmp_path / "settings.json", 0o600)
    port = str(free_port())  # nothing listens there
    r = ctsd("status", "--data-dir", str(tmp_path), env=clean_env(CTSD_PORT=port, CTSD_TOKEN="t"))
    assert r.returncode == 3 and "no daemon answering" in r.stderr, r.stderr


async def test_a_sync_log_id_written_past_the_revision_is_invalid_not_taken(
    daemon: Daemon,
) -> None:
    """The operator's file stays as written, reported invalid where the id is; the daemon
    goes on giving ids after its own revision."""
    path = daemon.data_dir / "connection-sync-log.json"
    async with bus(daemon) as b:
        await b.ok("connections.create", connection={"id": "c1", "name": "n", "exchange": "x"})
        wait_until(lambda: json.loads(path.read_text()))  # the event reached the file
        log = json.loads(path.read_text())
        log.append({**log[-1], "id": 999_999})
        edited = json.dumps(log, indent=2) + "\n"
        path.write_text(edited)
        wait_until(lambda: "connection-sync-log.json" in invalid_files(daemon))
        problem = invalid_files(daemon)["connection-sync-log.json"]
        assert "999999 is past the daemon's revision" in problem and "$[1].id" in problem
        assert path.read_text() == edited
        r = await b.ok("ping")
        assert r["revision"] == log[0]["id"]
