"""`ctsd secrets init|status|rekey` as an operator runs them, and rekey killed mid-way.

Real subprocesses throughout; the canary secret is grepped in every output.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import msgspec
import pytest

from ctsd import bases, rekey
from ctsd.secretbox import Key, parse_key
from tests.cli_helpers import CANARY, clean_env, closed, ctsd, without_dac
from tests.crash_driver import kill_at_every_step, kill_at_random, spawn
from tests.daemon import Daemon, free_port
from tests.secrets_helpers import make_key, plaintexts, snapshot, stored_under, write_plain_data


def run(
    *args: str, key: Path | None = None, prefix: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    if key is not None:
        env["CTSD_SECRETS_KEY_FILE"] = str(key)
    r = ctsd(*args, env=clean_env(**env), prefix=prefix)
    assert CANARY not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def rekey_to(
    key: Path, data_dir: Path, current: Path | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = ("secrets", "rekey", "--new-key", str(key), "--data-dir", str(data_dir))
    return run(*args, key=current, prefix=prefix)


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_plain_data(data)
    return data


# --- init -------------------------------------------------------------------------------------


def test_init_makes_a_private_key_file_and_says_how_to_load_it(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "ctsd" / "secrets-key"
    r = run("secrets", "init", "--key-file", str(path))
    assert r.returncode == 0, r.stderr
    key = parse_key(path.read_bytes(), "k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert f"key id {key.id}" in r.stdout
    assert f"systemd-creds encrypt --name=ctsd-secrets-key {path} {path}.cred" in r.stdout
    assert f"LoadCredentialEncrypted=ctsd-secrets-key:{path}.cred" in r.stdout
    assert f"LoadCredential=ctsd-secrets-key:{path}" in r.stdout
    assert path.read_text().strip() not in r.stdout + r.stderr  # the key is never printed


def test_init_never_replaces_a_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"precious")
    r = run("secrets", "init", "--key-file", str(path))
    assert r.returncode == 1 and "already exists" in r.stderr
    assert path.read_bytes() == b"precious"


def test_init_defaults_to_the_configured_key_file(tmp_path: Path) -> None:
    path = tmp_path / "from-env"
    r = run("secrets", "init", CTSD_SECRETS_KEY_FILE=str(path))
    assert r.returncode == 0 and path.exists()


# --- status -----------------------------------------------------------------------------------


def test_status_without_a_key(plain_dir: Path) -> None:
    r = run("secrets", "status", "--data-dir", str(plain_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "key: none configured" in r.stdout
    assert "secret values: 9 — 9 plain text" in r.stdout
    assert "connections.json $[0].api_key (connection conn_00000)" in r.stdout
    assert "connection.json $.projectX.apiKey" in r.stdout


def test_status_with_a_key_and_plain_values_exits_1(plain_dir: Path, tmp_path: Path) -> None:
    k1 = tmp_path / "k1"
    key = make_key(k1)
    r = run("secrets", "status", "--data-dir", str(plain_dir), key=k1)
    assert r.returncode == 1
    assert f"key: configured (CTSD_SECRETS_KEY_FILE={k1}), key id {key.id}" in r.stdout
    assert "the daemon encrypts them when it next writes the file" in r.stdout


def test_status_json(plain_dir: Path, tmp_path: Path) -> None:
    k1 = tmp_path / "k1"
    key = make_key(k1)
    assert (
        run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir)).returncode == 0
    )
    out = json.loads(
        run("secrets", "status", "--json", "--data-dir", str(plain_dir), key=k1).stdout
    )
    assert out == {
        "ok": True, "key_id": key.id, "values": 9, "encrypted": {key.id: 9}, "plain": [],
        "not_strings": [], "undecryptable": [],
    }  # fmt: skip


def test_status_names_each_value_that_cannot_be_decrypted(plain_dir: Path, tmp_path: Path) -> None:
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    make_key(k1)
    key2 = make_key(k2)
    assert (
        run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir)).returncode == 0
    )
    conns = json.loads((plain_dir / "connections.json").read_text())
    conns[0]["api_secret"], conns[1]["api_secret"] = conns[1]["api_secret"], conns[0]["api_secret"]
    conns[2]["api_key"] = conns[2]["api_key"][:-6]
    (plain_dir / "connections.json").write_text(json.dumps(conns, indent=2))
    r = run("secrets", "status", "--data-dir", str(plain_dir), key=k1)
    assert r.returncode == 1
    assert "3 cannot be decrypted" in r.stdout
    assert (
        "connections.json: $[0].api_secret (id conn_00000): belongs to connection conn_00001"
        in r.stdout
    )
    assert "connections.json: $[2].api_key (id conn_00002): " in r.stdout
    r = run("secrets", "status", "--data-dir", str(plain_dir), key=k2)
    assert r.returncode == 1 and f"the configured key is {key2.id}" in r.stdout
    r = run("secrets", "status", "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "no key is configured" in r.stdout


def test_status_with_an_unreadable_key_or_no_data_dir(plain_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    r = run("secrets", "status", "--data-dir", str(plain_dir), key=bad)
    assert r.returncode == 1 and f"{bad}: not a secrets key" in r.stderr
    r = run("secrets", "status", "--data-dir", str(tmp_path / "nope"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_init_under_the_home_of_an_unknown_user_is_one_line() -> None:
    r = run("secrets", "init", "--key-file", "~no-such-user-here/key")
    assert r.returncode == 1 and "no user's home to put for its ~" in r.stderr, r.stderr


def test_status_names_a_file_it_cannot_read_and_never_blocks(plain_dir: Path) -> None:
    """A directory, then a FIFO (a plain open would wait for a writer for good) where
    connections.json should be, then a rekey's record that is a directory: one line each,
    exit 1, never a traceback or a hang."""
    conns = plain_dir / "connections.json"
    conns.unlink()
    conns.mkdir()
    r = run("secrets", "status", "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "connections.json:1:1: is a directory" in r.stdout, r.stdout
    conns.rmdir()
    os.mkfifo(conns, 0o600)
    r = run("secrets", "status", "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "connections.json:1:1: is a FIFO" in r.stdout, r.stdout
    conns.unlink()
    (plain_dir / rekey.INTENT).mkdir()
    r = run("secrets", "status", "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is a directory" in r.stderr, r.stderr


# --- rekey ------------------------------------------------------------------------------------


def test_rekey_from_plain_text_then_to_a_new_key(plain_dir: Path, tmp_path: Path) -> None:
    expected = plaintexts(plain_dir)
    settings = (plain_dir / "settings.json").read_bytes()
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    key1, key2 = make_key(k1), make_key(k2)
    # The daemon's copies of its files would judge every re-encrypted value a hand edit
    copies = plain_dir / bases.DIR
    copies.mkdir(mode=0o700)
    (copies / "connections.json").write_bytes(b"ctsd-base 1 -\n[]\n")
    r = run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir))
    assert r.returncode == 0, r.stderr
    assert not copies.exists()
    assert (
        "re-encrypted 9 secret value(s) in connection.json, connections.json under key id "
        f"{key1.id} (was plain text)" in r.stdout
    )
    assert "Keep the old key" in r.stdout
    assert stored_under(plain_dir, [key1], expected) == {key1.id}
    for f in ("connections.json", "connection.json"):
        assert CANARY not in (plain_dir / f).read_text()
        assert stat.S_IMODE((plain_dir / f).stat().st_mode) == 0o600
    assert (plain_dir / "settings.json").read_bytes() == settings
    # Everything else in the files is kept (names, flags, the app's own keys).
    doc = json.loads((plain_dir / "connection.json").read_text())
    assert doc["projectX"]["username"].startswith("enc:v1:")  # a credential: encrypted too
    assert doc["trading"]["defaultCommission"] == 2.8
    r = run("secrets", "rekey", "--new-key", str(k2), "--data-dir", str(plain_dir), key=k1)
    assert r.returncode == 0, r.stderr
    assert f"under key id {key2.id} (was key id {key1.id})" in r.stdout
    assert stored_under(plain_dir, [key1, key2], expected) == {key2.id}
    assert not (plain_dir / rekey.INTENT).exists()
    # The daemon-to-be reads it: `ctsd verify` is happy with the encrypted files.
    assert ctsd("verify", "--data-dir", str(plain_dir)).returncode == 0
    # With no key configured, the new key was named as the configured one (review).
    k3 = tmp_path / "k3"
    key3 = make_key(k3)
    r = run("secrets", "rekey", "--new-key", str(k3), "--data-dir", str(plain_dir))
    assert r.returncode == 1 and f"is encrypted under key id {key2.id}" in r.stderr, r.stderr
    assert f"no key is configured (only the new key, id {key3.id}, was given)" in r.stderr
    assert "the configured key is" not in r.stderr


def test_rekey_refuses_and_changes_nothing_when_a_value_fails(
    plain_dir: Path, tmp_path: Path
) -> None:
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    make_key(k1)
    make_key(k2)
    run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir))
    doc = json.loads((plain_dir / "connection.json").read_text())
    stored = doc["projectX"]["apiKey"]
    doc["projectX"]["apiKey"] = stored[:20] + ("A" if stored[20] != "A" else "B") + stored[21:]
    (plain_dir / "connection.json").write_text(json.dumps(doc))
    before = snapshot(plain_dir)
    r = run("secrets", "rekey", "--new-key", str(k2), "--data-dir", str(plain_dir), key=k1)
    assert r.returncode == 1
    assert "connection.json: $.projectX.apiKey: does not decrypt" in r.stderr
    assert "nothing was changed" in r.stderr
    assert snapshot(plain_dir) == before
    # With the wrong key configured, every value is named, and nothing changes either.
    k3 = tmp_path / "k3"
    make_key(k3)
    r = rekey_to(k3, plain_dir, current=k2)
    assert r.returncode == 1 and r.stderr.count("is encrypted under key id") == 9
    assert snapshot(plain_dir) == before


def test_rekey_refuses_bad_input(plain_dir: Path, tmp_path: Path) -> None:
    k1 = tmp_path / "k1"
    key1 = make_key(k1)
    r = run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir), key=k1)
    assert r.returncode == 1 and f"the new key is the configured key (id {key1.id})" in r.stderr
    r = run("secrets", "rekey", "--new-key", str(tmp_path / "none"), "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "cannot read the secrets key" in r.stderr
    (plain_dir / "connections.json").write_text('[{"id": "x", "name": "x", "exchange": "x",}]')
    before = snapshot(plain_dir)
    r = run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(plain_dir))
    assert r.returncode == 1 and "connections.json:1:" in r.stderr and "ctsd verify" in r.stderr
    assert snapshot(plain_dir) == before
    r = run("secrets", "rekey", "--new-key", str(k1), "--data-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "does not exist" in r.stderr


@pytest.mark.parametrize("closed_one", ["parent", "dir"])
def test_a_data_dir_this_user_cannot_enter_is_one_line(closed_one: str, tmp_path: Path) -> None:
    """status: Path.is_dir() raised EACCES (a parent we cannot search), or a file in the dir
    was named; rekey: "cannot rewrite the data files", or a lock it could not take read as a
    daemon running, and the rekey went looking for it on the bus."""
    data = tmp_path / "parent" / "data"
    write_plain_data(data)
    k1 = tmp_path / "k1"
    make_key(k1)
    with closed(data.parent if closed_one == "parent" else data):
        status = run("secrets", "status", "--data-dir", str(data), prefix=without_dac())
        rekeyed = rekey_to(k1, data, prefix=without_dac())
    for r in (status, rekeyed):
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"ctsd: cannot access {data}: Permission denied\n"


def test_with_a_daemon_running_the_files_are_never_touched_behind_its_back(
    plain_dir: Path, tmp_path: Path
) -> None:
    """rekey, backup and restore go through a running daemon (tests/test_secrets_daemon.py,
    tests/test_backup_online.py); one the CLI cannot reach (here: CTSD_PORT names another
    port) is exit 3, and nothing was done offline."""
    k1 = tmp_path / "k1"
    make_key(k1)
    archive = tmp_path / "b.tar.gz"
    assert run("backup", "--data-dir", str(plain_dir), "-o", str(archive)).returncode == 0
    d = Daemon(plain_dir).start()
    try:
        before = snapshot(plain_dir)
        for args in (
            ("secrets", "rekey", "--new-key", str(k1)),
            ("backup", "-o", str(tmp_path / "other.tar.gz")),
            ("restore", str(archive)),
        ):
            r = run(*args, "--data-dir", str(plain_dir), CTSD_PORT=str(free_port()))
            assert r.returncode == 3, (args, r.stderr)
            assert "no daemon answering" in r.stderr, r.stderr
        assert snapshot(plain_dir) == before
        assert not (tmp_path / "other.tar.gz").exists()
    finally:
        d.close()
    assert CANARY not in d.stdout() + d.stderr()


# --- kill -9 during rekey ---------------------------------------------------------------------


def encrypted_dir(tmp_path: Path, connections: int) -> tuple[Path, Key, Key, dict, dict]:
    """A data dir under key 1, key 2 ready; (dir, key1, key2, plaintexts, bytes before)."""
    data = tmp_path / "base"
    write_plain_data(data, connections)
    expected = plaintexts(data)
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    key1, key2 = make_key(k1), make_key(k2)
    rekey.rekey_offline(data, None, key1)
    return data, key1, key2, expected, snapshot(data)


def check_after_crash(
    data: Path, key1: Key, key2: Key, expected: dict, before: dict[str, bytes]
) -> str:
    """The promise after a kill -9: each value decrypts with exactly one of the two keys;
    once the interrupted rekey is finished, the files are all old or all new."""
    stored_under(data, [key1, key2], expected)
    rekey.finish_pending(data)
    used = stored_under(data, [key1, key2], expected)
    assert len(used) == 1, used
    assert not (data / rekey.INTENT).exists()
    after = {k: v for k, v in snapshot(data).items() if not k.startswith(".ctsd-tmp-")}
    if used == {key1.id}:
        assert after == before
        return "old"
    assert set(after) == set(before)
    assert after["settings.json"] == before["settings.json"]
    return "new"


def test_rekey_killed_at_every_step(tmp_path: Path) -> None:
    base, key1, key2, expected, before = encrypted_dir(tmp_path, 20)
    work = tmp_path / "work"

    def prepare() -> list[str]:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(base, work)
        return ["rekey", str(work), str(tmp_path / "k2")]

    env = clean_env(CTSD_SECRETS_KEY_FILE=str(tmp_path / "k1"))
    kill_at_every_step(prepare, env, lambda: check_after_crash(work, key1, key2, expected, before))


def test_rekey_killed_at_random_moments(tmp_path: Path) -> None:
    base, key1, key2, expected, before = encrypted_dir(tmp_path, 2_000)
    work = tmp_path / "work"

    def prepare() -> list[str]:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(base, work)
        return ["rekey", str(work), str(tmp_path / "k2")]

    env = clean_env(CTSD_SECRETS_KEY_FILE=str(tmp_path / "k1"))
    kill_at_random(
        prepare, env, lambda: check_after_crash(work, key1, key2, expected, before), seed=11
    )


def test_finishing_an_interrupted_rekey_never_overwrites_a_later_edit(tmp_path: Path) -> None:
    base, *_ = encrypted_dir(tmp_path, 5)
    env = clean_env(CTSD_SECRETS_KEY_FILE=str(tmp_path / "k1"))
    # Kill right after the intent is durable, before a data file is renamed: find that step.
    intent_step = None
    for kill_at in range(1, 100):
        work = tmp_path / f"w{kill_at}"
        shutil.copytree(base, work)
        spawn(["rekey", str(work), str(tmp_path / "k2"), str(kill_at)], env).communicate(timeout=60)
        if (work / rekey.INTENT).exists():
            intent_step = work
            break
    assert intent_step is not None
    work = intent_step
    edited = json.loads((work / "connections.json").read_text())
    edited[0]["name"] = "edited by hand"
    (work / "connections.json").write_text(json.dumps(edited, indent=2))
    hand = (work / "connections.json").read_bytes()
    with pytest.raises(rekey.RekeyRefused) as e:
        rekey.finish_pending(work)
    assert "changed since an interrupted rekey" in str(e.value)
    assert (work / "connections.json").read_bytes() == hand
    assert (work / rekey.INTENT).exists()
    r = run("secrets", "status", "--data-dir", str(work), key=tmp_path / "k2")
    assert "an interrupted rekey" in r.stdout
    assert msgspec.json.decode(hand)[0]["name"] == "edited by hand"
