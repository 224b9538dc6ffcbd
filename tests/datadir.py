"""Data dirs as an operator writes them: connection records, JSON files, saves as editors
make them. The one connection factory of the suite is `connection`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

# A secret value tests plant and then grep every output (frames, bodies, logs, files) for.
CANARY = "CANARY-SECRET-7f3a9c"
# A fixed created_at/updated_at, for records whose bytes a test compares.
STAMP = "2024-01-01T00:00:00.000Z"


def connection(
    cid: str | None = None,
    name: str | None = None,
    *,
    exchange: str = "bybit",
    base_url: str | None = None,
    canary: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """A valid connection: a record for `connections.json` (with `cid`), or the body of a
    create (without: the daemon picks the id). `name` defaults to the id (else "one").
    `base_url` sends its connection tests to a local fake exchange; `canary=True` sets every
    secret to a value unique to the record that carries `CANARY`. `fields` go in as given
    (they win over all of the above)."""
    record: dict[str, Any] = {} if cid is None else {"id": cid}
    record["name"] = name if name is not None else (cid or "one")
    record["exchange"] = exchange
    if canary:
        tag = cid or record["name"]
        record["api_key"] = f"{CANARY}-key-{tag}"
        record["api_secret"] = f"{CANARY}-secret-{tag}"
        record["api_passphrase"] = f"{CANARY}-pass-{tag}"
    if base_url is not None:
        record["connection_settings"] = json.dumps({"base_url": base_url})
    record.update(fields)
    return record


def dump(value: Any) -> bytes:
    """JSON as the daemon writes it (and as a careful operator does): 2-space indent, newline."""
    return (json.dumps(value, indent=2) + "\n").encode()


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(dump(value))


def write_settings(data_dir: Path, settings: dict[str, Any]) -> None:
    write_json(data_dir / "settings.json", settings)


def write_connections(data_dir: Path, conns: list[dict[str, Any]]) -> None:
    write_json(data_dir / "connections.json", conns)


def atomic_save(path: Path, body: bytes) -> None:
    """What most editors do: write a temp file in the same dir, then rename it over."""
    tmp = path.with_name(f".{path.name}.edit-{os.getpid()}")
    tmp.write_bytes(body)
    os.replace(tmp, path)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Any:
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); EFBIG case covers it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def before_each_rename(monkeypatch: pytest.MonkeyPatch, hook: Any) -> None:
    """`hook(destination)` runs before each rename the daemon's writes make (`os.replace`, and
    `atomic`'s swap): a test lands a hand save, or a kill, at that exact point."""
    from ctsd import atomic

    real_replace, real_exchange = os.replace, atomic._exchange

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        hook(Path(dst))
        real_replace(src, dst, **kw)

    def exchange(a: Path, b: Path) -> bool:
        hook(Path(b))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", exchange)
