"""Data dirs with canary secrets, key files, and checks on how every secret is stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from ctsd.secretbox import Key, SecretBox, is_encrypted, new_key_text, parse_key, stored_key_id
from ctsd.secretfields import SECRET_FILES, secret_places
from tests.daemon import Daemon
from tests.datadir import CANARY, connection, write_connections


def make_key(path: Path) -> Key:
    path.write_bytes(new_key_text())
    path.chmod(0o600)
    return parse_key(path.read_bytes(), str(path))


def write_plain_data(data_dir: Path, connections: int = 3) -> None:
    """A data dir whose secrets are plain text, each value unique and carrying the canary."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conns = [
        connection(
            f"conn_{i:05d}",
            f"Conn {i}",
            api_key=f"{CANARY}-key-{i}",
            api_secret=f"{CANARY}-secret-{i}",
            api_passphrase=f"{CANARY}-pass-{i}" if i % 2 else None,
            volume_factor=1.5,
            connection_settings="{}",
        )
        for i in range(connections)
    ]
    write_connections(data_dir, conns)
    doc = {
        "projectX": {"apiUrl": "https://api.topstepx.com", "username": "me",
                     "apiKey": f"{CANARY}-px", "autoConnect": True},
        "server": {"port": 3587},
        "trading": {"defaultCommission": 2.8, "simulationMode": True},
    }  # fmt: skip
    (data_dir / "connection.json").write_text(json.dumps(doc, indent=2) + "\n")
    (data_dir / "settings.json").write_text('{"theme": "dark"}\n')


def plaintexts(data_dir: Path) -> dict[tuple[str, Any], str]:
    """(file, JSON path) → plain value, for a data dir written by `write_plain_data`."""
    out = {}
    for file in SECRET_FILES:
        content = msgspec.json.decode((data_dir / file).read_bytes())
        for p in secret_places(file, content):
            out[file, p.path] = p.value
    return out


def stored_under(data_dir: Path, keys: list[Key], expected: dict[tuple[str, Any], str]) -> set[str]:
    """Check every secret decrypts, with exactly the key its id names, to its original value;
    return the key ids in use ("plain" for a plain-text value)."""
    by_id = {k.id: SecretBox(k) for k in keys}
    used: set[str] = set()
    seen = set()
    for file in SECRET_FILES:
        content = msgspec.json.decode((data_dir / file).read_bytes())
        for p in secret_places(file, content):
            seen.add((file, p.path))
            if not is_encrypted(p.value):
                assert p.value == expected[file, p.path]
                used.add("plain")
                continue
            kid = stored_key_id(p.value)
            assert kid in by_id, (file, p.path, kid)
            assert by_id[kid].decrypt(p.record_id, p.field, p.value) == expected[file, p.path]
            for other, box in by_id.items():
                if other != kid:
                    assert not box.decrypts_as(p.value, p.record_id, p.field)
            used.add(kid)
    assert seen == set(expected), "a secret appeared or went missing"
    return used


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every file below `data_dir` but the lock, the daemon's logs and caches → bytes."""
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file()
        and p.name != ".lock"
        and p.relative_to(data_dir).parts[0] not in ("logs", "historical")
    }


def keyed(data_dir: Path, key_file: Path, **kw: Any) -> Daemon:
    """A daemon that reads its secrets key from `key_file`."""
    return Daemon(data_dir, env={"CTSD_SECRETS_KEY_FILE": str(key_file)}, **kw)
