"""Secrets at rest: the key file, the stored form, tampering, and the walkers.

In-process: these test the module the store and the offline commands share. The canary
secret is checked against every error message.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec
import pytest

from ctsd.models import Connection
from ctsd.secretbox import (
    KEY_FILE_ENV,
    Key,
    KeyFileError,
    SecretBox,
    SecretError,
    configured_key,
    is_encrypted,
    key_id,
    new_key_text,
    parse_key,
    stored_key_id,
)
from ctsd.secretfields import (
    CONNECTION_SECRETS,
    open_connection,
    open_connections,
    open_content,
    seal_connection,
    seal_content,
    secret_places,
    survey,
)
from tests.cli_helpers import CANARY

RAW = bytes(range(32))


def key(n: int = 1) -> Key:
    return Key.from_material(bytes([n]) * 32, f"key{n}")


def conn(cid: str, secret: str = CANARY) -> Connection:
    return Connection(
        id=cid, name=cid, exchange="x", api_key=f"{secret}-k", api_secret=f"{secret}-s"
    )


def no_secret_in(text: str, *stored: str) -> None:
    assert CANARY not in text
    for s in stored:
        piece = s.split(":")[-1][:12]
        assert not piece or piece not in text  # no piece of the ciphertext either


# --- the key file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        RAW,
        RAW.hex().encode(),
        RAW.hex().upper().encode() + b"\n",
        base64.b64encode(RAW),
        base64.b64encode(RAW) + b"\n",
        b"  " + base64.b64encode(RAW).rstrip(b"=") + b"\r\n",  # unpadded
        base64.urlsafe_b64encode(RAW) + b"\n",
    ],
    ids=["raw", "hex", "hex-upper-nl", "b64", "b64-nl", "b64-unpadded", "b64-urlsafe"],
)
def test_key_file_forms_give_the_same_key(content: bytes) -> None:
    assert parse_key(content, "f").material == RAW
    assert parse_key(content, "f").id == key_id(RAW)


def test_a_raw_key_with_whitespace_bytes_is_still_raw() -> None:
    raw = b" " * 31 + b"\n"  # exactly 32 bytes: raw, even though it looks like text
    assert parse_key(raw, "f").material == raw


@pytest.mark.parametrize(
    "content",
    [b"", b"short", RAW + b"\n", RAW + RAW, b"z" * 44, base64.b64encode(RAW[:31]), b"g" * 64],
)
def test_bad_key_files_are_refused_naming_the_file(content: bytes) -> None:
    with pytest.raises(KeyFileError) as e:
        parse_key(content, "/etc/ctsd/secrets-key")
    assert "/etc/ctsd/secrets-key" in str(e.value)
    assert "ctsd secrets init" in str(e.value)


def test_new_key_text_is_base64_of_32_fresh_bytes() -> None:
    a, b = new_key_text(), new_key_text()
    assert a != b and a.endswith(b"\n") and len(base64.b64decode(a)) == 32


def test_key_id_is_8_hex_digits_and_reveals_nothing() -> None:
    k = key()
    assert len(k.id) == 8 and int(k.id, 16) >= 0
    assert k.id not in k.material.hex()
    assert "material" not in repr(k) and k.material.hex() not in repr(k)


def test_configured_key_precedence(tmp_path: Path) -> None:
    explicit, cred = tmp_path / "explicit", tmp_path / "creds"
    explicit.write_bytes(new_key_text())
    cred.mkdir()
    (cred / "ctsd-secrets-key").write_bytes(new_key_text())
    both = {KEY_FILE_ENV: str(explicit), "CREDENTIALS_DIRECTORY": str(cred)}
    assert configured_key(both).material == parse_key(explicit.read_bytes(), "x").material  # type: ignore[union-attr]
    only_cred = {"CREDENTIALS_DIRECTORY": str(cred)}
    k = configured_key(only_cred)
    assert k is not None and k.source == "$CREDENTIALS_DIRECTORY/ctsd-secrets-key"
    assert configured_key({}) is None
    # A credentials dir without our credential: plain-text mode, not an error.
    assert configured_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_a_configured_key_that_is_missing_is_an_error_not_plain_text(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as e:
        configured_key({KEY_FILE_ENV: str(tmp_path / "nope")})
    assert "cannot read the secrets key" in str(e.value) and "nope" in str(e.value)


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_key_path_that_is_no_key_file_is_refused_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "key"
    if kind == "fifo":
        os.mkfifo(path)  # a plain open would wait for a writer for good
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.write_bytes(b"a" * 5000)
    with pytest.raises(KeyFileError) as e:
        configured_key({KEY_FILE_ENV: str(path)})
    assert str(path) in str(e.value)
    assert ("not a regular file" if kind != "huge" else "larger than") in str(e.value)


# --- values -----------------------------------------------------------------------------------


def test_round_trip_and_form() -> None:
    box = SecretBox(key())
    stored = box.encrypt("conn_a", "api_key", CANARY)
    assert stored.startswith(f"enc:v1:{key().id}:") and CANARY not in stored
    assert is_encrypted(stored) and stored_key_id(stored) == key().id
    assert box.decrypt("conn_a", "api_key", stored) == CANARY
    # A fresh nonce each time: the same secret never looks the same twice.
    assert box.encrypt("conn_a", "api_key", CANARY) != stored
    assert box.decrypt("conn_a", "api_key", box.encrypt("conn_a", "api_key", "")) == ""
    assert box.decrypt("c", "f", box.encrypt("c", "f", "ünïcødé ✓")) == "ünïcødé ✓"


def reason_of(box: SecretBox, record: str, field: str, stored: str) -> SecretError:
    with pytest.raises(SecretError) as e:
        box.decrypt(record, field, stored)
    no_secret_in(str(e.value), stored)
    assert record in str(e.value) and field in str(e.value)
    return e.value


def test_every_flipped_byte_fails_to_decrypt() -> None:
    box = SecretBox(key())
    stored = box.encrypt("conn_a", "api_secret", CANARY)
    blob = bytearray(base64.b64decode(stored.split(":")[3]))
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            flipped = f"enc:v1:{key().id}:{base64.b64encode(bytes(bad)).decode()}"
            assert reason_of(box, "conn_a", "api_secret", flipped).reason == "tampered"


def test_moved_to_another_record_or_field_fails() -> None:
    box = SecretBox(key())
    stored = box.encrypt("conn_a", "api_key", CANARY)
    assert reason_of(box, "conn_b", "api_key", stored).reason == "tampered"
    assert reason_of(box, "conn_a", "api_secret", stored).reason == "tampered"
    assert reason_of(box, "connection.json", "projectX.apiKey", stored).reason == "tampered"


def test_each_malformed_value_has_its_own_reason() -> None:
    box = SecretBox(key())
    stored = box.encrypt("c", "api_key", CANARY)
    data = stored.split(":")[3]
    cases = {
        "truncated": [stored[:-1], f"enc:v1:{key().id}:{data[:8]}", f"enc:v1:{key().id}:"],
        "tampered": [stored[:-4]],  # a whole base64 quantum gone: only the tag can tell
        "not_base64": [stored[:-3] + "!" + stored[-2:], stored + " "],
        "wrong_key": [stored.replace(key().id, "0badc0de")],
        "bad_format": ["enc:v2:" + stored[7:], "enc:", "enc:v1:nothex!!:" + data],
    }
    for reason, values in cases.items():
        for value in values:
            assert reason_of(box, "c", "api_key", value).reason == reason, value
    # A plain secret that starts with `enc:`: none of it shown (its next 8 characters were)
    e = reason_of(box, "c", "api_key", f"enc:{CANARY}")
    assert e.reason == "bad_format" and CANARY[:4] not in str(e), str(e)


def test_no_key_configured_names_the_missing_key() -> None:
    stored = SecretBox(key()).encrypt("c", "api_key", CANARY)
    e = reason_of(SecretBox(None), "c", "api_key", stored)
    assert e.reason == "no_key" and key().id in str(e) and KEY_FILE_ENV in str(e)


def test_a_box_with_two_keys_decrypts_either_and_encrypts_with_the_first() -> None:
    old, new = SecretBox(key(1)), SecretBox(key(2))
    both = SecretBox(key(2), also=[key(1)])
    a, b = old.encrypt("c", "f", "a"), new.encrypt("c", "f", "b")
    assert both.decrypt("c", "f", a) == "a" and both.decrypt("c", "f", b) == "b"
    assert stored_key_id(both.encrypt("c", "f", "x")) == key(2).id
    assert reason_of(new, "c", "f", a).reason == "wrong_key"


def test_seal_and_open() -> None:
    box, plain = SecretBox(key()), SecretBox(None)
    assert plain.seal("c", "f", CANARY) == CANARY  # no key: plain text as before
    assert box.seal("c", "f", None) is None and box.seal("c", "f", "") == ""
    sealed = box.seal("c", "f", CANARY)
    assert sealed is not None and is_encrypted(sealed)
    assert box.seal("c", "f", sealed) == sealed  # never re-encrypted on every write
    assert box.open("c", "f", sealed) == CANARY
    assert box.open("c", "f", "typed by hand") == "typed by hand"
    assert box.open("c", "f", None) is None
    with pytest.raises(SecretError):
        plain.encrypt("c", "f", "x")  # encrypting needs a key


# --- walkers ----------------------------------------------------------------------------------


def test_connection_secret_fields() -> None:
    assert set(CONNECTION_SECRETS) == {"api_key", "api_secret", "api_passphrase"}


def test_seal_and_open_a_connection() -> None:
    box = SecretBox(key())
    c = conn("conn_a")
    sealed = seal_connection(box, c)
    assert sealed.api_passphrase is None and is_encrypted(sealed.api_key)
    assert CANARY not in msgspec.json.encode(sealed).decode()
    assert seal_connection(box, sealed) is sealed
    assert seal_connection(SecretBox(None), c) is c
    assert open_connection(box, sealed) == c
    swapped = msgspec.structs.replace(sealed, api_key=sealed.api_secret)
    with pytest.raises(SecretError) as e:
        open_connection(box, swapped, index=4)
    assert str(e.value).startswith("connections.json: $[4].api_key (id conn_a): ")


def test_open_connections_reports_every_bad_value_and_where_a_swap_came_from() -> None:
    box = SecretBox(key())
    rows = [seal_connection(box, conn(f"conn_{i}")) for i in range(5)]
    a, b = rows[1], rows[3]
    rows[1] = msgspec.structs.replace(a, api_secret=b.api_secret)
    rows[3] = msgspec.structs.replace(b, api_secret=a.api_secret)
    rows[4] = msgspec.structs.replace(rows[4], api_key=rows[4].api_key[:-4])  # type: ignore[index]
    opened, errors = open_connections(box, rows)
    assert [c.api_key for c in opened[:4]] == [f"{CANARY}-k"] * 4
    assert opened[1].api_secret == rows[1].api_secret  # a failed value stays as stored
    by_path = {e.path: e for e in errors}
    assert set(by_path) == {(1, "api_secret"), (3, "api_secret"), (4, "api_key")}
    assert by_path[1, "api_secret"].reason == "moved"
    assert "belongs to connection conn_3, field api_secret" in str(by_path[1, "api_secret"])
    assert by_path[4, "api_key"].reason == "tampered"
    for e in errors:
        no_secret_in(str(e), a.api_secret or "", b.api_secret or "")
        assert str(e).startswith("connections.json: $[")


CONNECTION_DOC = {
    "projectX": {"apiUrl": "https://x", "username": "me", "apiKey": f"{CANARY}-px"},
    "server": {"port": 3587},
    "trading": {"simulationMode": True},
    "extra": {"accounts": [{"password": f"{CANARY}-pw"}, {"password": None}], "token": 1234},
    "odd.key": {"secret": f"{CANARY}-odd"},
}


def test_connection_json_places_and_their_bindings() -> None:
    places = {p.field: p for p in secret_places("connection.json", CONNECTION_DOC)}
    assert set(places) == {
        "projectX.username",  # a credential of connection.json too
        "projectX.apiKey",
        "extra.accounts[0].password",
        "extra.token",
        '["odd.key"].secret',
    }
    assert {p.record_id for p in places.values()} == {"connection.json"}
    assert CANARY not in repr(list(places.values()))


def test_a_list_under_a_secrets_name_is_a_list_of_secrets() -> None:
    """`"backupApiKeys": [...]` shows masked whole: each of its strings is sealed at rest,
    rekeyed and counted too (it stayed plain on disk, unreported)."""
    doc = {"projectX": {"apiKey": "k", "backupApiKeys": [CANARY, "", {"token": "t"}, 7]}}
    places = {p.path: (p.field, p.value) for p in secret_places("connection.json", doc)}
    assert places == {
        ("projectX", "apiKey"): ("projectX.apiKey", "k"),
        ("projectX", "backupApiKeys", 0): ("projectX.backupApiKeys", CANARY),
        ("projectX", "backupApiKeys", 2, "token"): ("projectX.backupApiKeys[2].token", "t"),
        ("projectX", "backupApiKeys", 3): ("projectX.backupApiKeys", 7),
    }
    box = SecretBox(key())
    sealed, count = seal_content(box, "connection.json", doc)
    assert count == 3 and CANARY not in msgspec.json.encode(sealed).decode()
    assert open_content(box, "connection.json", sealed) == (doc, [])
    # one removed by hand: the others still open (bound to the list, not their index)
    keys = {"projectX": {"backupApiKeys": ["one", "two", "three"]}}
    sealed, _ = seal_content(box, "connection.json", keys)
    del sealed["projectX"]["backupApiKeys"][0]
    opened, errors = open_content(box, "connection.json", sealed)
    assert errors == [] and opened == {"projectX": {"backupApiKeys": ["two", "three"]}}


def test_seal_and_open_connection_json() -> None:
    box = SecretBox(key())
    sealed, count = seal_content(box, "connection.json", CONNECTION_DOC)
    assert count == 4  # the number stays as it is: only strings are encrypted
    text = msgspec.json.encode(sealed).decode()
    assert CANARY not in text and sealed["extra"]["token"] == 1234
    assert sealed["projectX"]["username"] != "me"  # a credential: encrypted too
    assert sealed["server"] is CONNECTION_DOC["server"]
    assert CANARY in msgspec.json.encode(CONNECTION_DOC).decode()  # the input is untouched
    opened, errors = open_content(box, "connection.json", sealed)
    assert errors == [] and opened == CONNECTION_DOC
    # The Project X key moved into the account's password: refused, and traced back.
    moved = msgspec.json.decode(msgspec.json.encode(sealed))
    moved["extra"]["accounts"][0]["password"] = sealed["projectX"]["apiKey"]
    _, errors = open_content(box, "connection.json", moved)
    assert len(errors) == 1 and errors[0].reason == "moved"
    assert str(errors[0]).startswith("connection.json: $.extra.accounts[0].password: belongs to ")
    assert "$.projectX.apiKey" in str(errors[0])


def test_survey_counts_without_values() -> None:
    box_old, box_new = SecretBox(key(1)), SecretBox(key(2))
    conns = [
        {"id": "a", "name": "a", "exchange": "x", "api_key": box_new.encrypt("a", "api_key", "1")},
        {"id": "b", "name": "b", "exchange": "x", "api_key": box_old.encrypt("b", "api_key", "2")},
        {"id": "c", "name": "c", "exchange": "x", "api_key": CANARY, "api_secret": ""},
    ]
    found = survey(box_new, {"connections.json": conns, "connection.json": CONNECTION_DOC})
    assert found.readable == {key(2).id: 1}
    assert found.plain[0].where() == "connections.json $[2].api_key (connection c)"
    assert len(found.plain) == 5 and len(found.not_strings) == 1
    assert [e.reason for e in found.problems] == ["wrong_key"]
    assert found.total == 8
    assert CANARY not in repr(found)


@pytest.mark.serial  # timed on a core of its own, not one shared with another test worker
def test_decrypt_10k_connections_is_fast_enough() -> None:
    """A loose guard (the bench measures it properly): 30,000 values well under a second."""
    import time

    box = SecretBox(Key.from_material(os.urandom(32), "k"))
    rows = [
        seal_connection(
            box, Connection(id=f"c{i}", name="n", exchange="x", api_key="k" * 40,
                            api_secret="s" * 64, api_passphrase="p" * 16)
        )
        for i in range(10_000)
    ]  # fmt: skip
    start = time.perf_counter()
    _, errors = open_connections(box, rows)
    assert errors == [] and time.perf_counter() - start < 1.0


def test_a_tag_is_keyed_when_a_key_is_configured() -> None:
    """What leaves the host in place of a digest of a file's bytes: a hash under the key, so
    a guess at a secret typed in plain text cannot be checked without it."""
    one, two = (Key.from_material(bytes([n]) * 32, "test") for n in (1, 2))
    plain = SecretBox(None).tag("abc")
    assert plain == hashlib.sha256(b"abc").hexdigest()
    tags = {SecretBox(one).tag("abc"), SecretBox(two).tag("abc"), plain}
    assert len(tags) == 3 and SecretBox(one).tag("abc") == SecretBox(one).tag("abc")
