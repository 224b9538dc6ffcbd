"""The hand-edit decoder that reuses unchanged records decodes exactly what the full one does."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest

from ctsd import files
from ctsd.disk import decode_known as _decode_known
from ctsd.models import Connection

N = 60


def _known() -> tuple[bytes, dict[str, bytes], dict[str, Connection]]:
    conns = [
        Connection(
            id=f"conn_{i:04d}",
            name=f"Connection {i}",
            exchange="bybit",
            api_key=f"k{i}",
            connection_settings='{"recvWindow": 5000}' if i % 2 else "{}",
        )
        for i in range(N)
    ]
    return (
        files.encode_table(conns),
        {c.id: files.encode_record(c) for c in conns},
        {c.id: c for c in conns},
    )


def _edit(raw: bytes, fn: Any) -> bytes:
    conns = json.loads(raw)
    fn(conns)
    return files.encode_table(msgspec.convert(conns, list[Connection]))


EDITS = {
    "one field": lambda cs: cs[17].update(name="Renamed"),
    "first and last": lambda cs: (cs[0].update(is_active=True), cs[-1].update(volume_factor=2)),
    "inserted": lambda cs: cs.insert(5, {**cs[5], "id": "conn_new"}),
    "deleted": lambda cs: cs.pop(30),
    "reordered": lambda cs: cs.reverse(),
    "emptied": lambda cs: cs.clear(),
    "appended": lambda cs: cs.append({**cs[0], "id": "conn_last"}),
    "prepended": lambda cs: cs.insert(0, {**cs[0], "id": "conn_first"}),
    "last deleted": lambda cs: cs.pop(),
    "one left": lambda cs: cs.__delitem__(slice(1, None)),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_same_records_as_the_full_decoder(name: str) -> None:
    raw, frags, known = _known()
    edited = _edit(raw, EDITS[name])
    expected = files.decode_file(files.CONNECTIONS, edited)
    got = _decode_known(files.CONNECTIONS, edited, frags, known)
    if got is not None:  # None only means "use the full decoder"
        assert got == expected
    if name in ("one field", "first and last", "deleted", "one left", "appended", "prepended"):
        assert got is not None, "the common edits must take the fast path"
        reused = sum(1 for r in got if any(r is k for k in known.values()))
        assert reused >= len(got) - 2


@pytest.mark.parametrize(
    "bad",
    [
        lambda raw: raw.replace(b'"is_enabled"', b'"is_enabeld"', 1),  # unknown key
        lambda raw: raw.replace(b'"conn_0003"', b'"conn_0002"', 1),  # duplicate id
        lambda raw: raw.replace(b'"volume_factor": 1.0', b'"volume_factor": -1', 1),
        lambda raw: raw.replace(b'"{}"', b'"{nope"', 1),  # connection_settings not JSON
        lambda raw: raw.replace(b'"exchange": "bybit"', b'"exchange": 5', 1),
        lambda raw: raw[: len(raw) // 2],  # half written
        lambda raw: raw.replace(b"},\n  {", b"}\n  {", 1),  # a missing comma
        lambda raw: raw.replace(b'"name": "Connection 9",', b'"name": "Connection 9"', 1),
    ],
)
def test_invalid_is_never_accepted(bad: Any) -> None:
    raw, frags, known = _known()
    edited = bad(raw)
    with pytest.raises(files.Invalid):
        files.decode_file(files.CONNECTIONS, edited)
    assert _decode_known(files.CONNECTIONS, edited, frags, known) is None


def test_random_edits_agree() -> None:
    rng = random.Random(7)
    raw, frags, known = _known()
    for _ in range(200):
        conns = json.loads(raw)
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(conns)
            c[rng.choice(["name", "exchange"])] = f"x{rng.randint(0, 9)}"
        edited = files.encode_table(msgspec.convert(conns, list[Connection]))
        got = _decode_known(files.CONNECTIONS, edited, frags, known)
        assert got == files.decode_file(files.CONNECTIONS, edited)
