"""The change path's sealer: plain secrets encrypted once, unchanged ones kept byte for byte,
values claiming to be encrypted checked in their own place, and a rotation mid-group."""

from __future__ import annotations

import msgspec
import pytest

from ctsd.errors import CtsdError
from ctsd.models import Connection
from ctsd.sealer import Sealer
from ctsd.secretbox import SecretBox, new_key_text, parse_key, stored_key_id
from tests.cli_helpers import CANARY


def box(*also: SecretBox) -> SecretBox:
    key = parse_key(new_key_text(), "k")
    return SecretBox(key, also=[b.key for b in also if b.key is not None])


def conn(cid: str, **kw: str | None) -> Connection:
    return Connection(id=cid, name=cid, exchange="bybit", **kw)  # type: ignore[arg-type]


def test_plain_is_sealed_and_the_same_value_keeps_its_ciphertext() -> None:
    s = Sealer(box())
    first, plain = s.connection(conn("a", api_secret=f"{CANARY}-1"), None)
    assert plain and first.api_secret is not None and CANARY not in first.api_secret
    again, plain = Sealer(s.box).connection(conn("a", api_secret=f"{CANARY}-1"), first)
    assert again.api_secret == first.api_secret and plain  # same value: same bytes, file rewritten
    changed, _ = Sealer(s.box).connection(conn("a", api_secret=f"{CANARY}-2"), first)
    assert changed.api_secret != first.api_secret
    assert s.box.decrypt("a", "api_secret", changed.api_secret) == f"{CANARY}-2"  # type: ignore[arg-type]


def test_the_same_secret_encrypted_again_keeps_the_stored_ciphertext() -> None:
    """A file saved from a buffer read before a rekey (or a value encrypted again by hand)
    holds another ciphertext of the same secret: no change, so no event tells the bots
    their key changed. Another secret is a change."""
    b = box()
    first, _ = Sealer(b).connection(conn("a", api_key=f"{CANARY}-1"), None)
    other = b.encrypt("a", "api_key", f"{CANARY}-1")
    assert other != first.api_key
    again, plain = Sealer(b).connection(conn("a", api_key=other), first)
    assert again.api_key == first.api_key and not plain
    changed, _ = Sealer(b).connection(conn("a", api_key=b.encrypt("a", "api_key", "x")), first)
    assert changed.api_key != first.api_key
    # After a rekey: a buffer read before it holds the value under the old key (kept for
    # reading), memory under the new one; the same secret: memory's ciphertext is kept.
    newer = box(b)
    stored, _ = Sealer(newer).connection(conn("a", api_key=f"{CANARY}-1"), None)
    again, _ = Sealer(newer).connection(conn("a", api_key=first.api_key), stored)
    assert again.api_key == stored.api_key


def test_a_value_from_another_place_or_key_is_refused_naming_the_field() -> None:
    b = box()
    a_conn, _ = Sealer(b).connection(conn("a", api_key="k-a"), None)
    with pytest.raises(CtsdError) as e:
        Sealer(b).connection(conn("b", api_key=a_conn.api_key), None, "$.changes")
    assert e.value.path == "$.changes.api_key" and "k-a" not in e.value.message
    with pytest.raises(CtsdError):
        Sealer(box()).connection(a_conn, None)  # under a key this sealer does not hold


def test_without_a_key_plain_stays_plain() -> None:
    c = conn("a", api_key="plain-key")
    assert Sealer(SecretBox(None)).connection(c, None) == (c, False)


def test_rotation_reseals_values_under_the_old_key() -> None:
    old = box()
    new = box(old)
    stored, _ = Sealer(old).connection(conn("a", api_key="v"), None)
    s = Sealer(old)
    s.rotate(new)
    resealed, _ = s.connection(msgspec.structs.replace(stored, name="x"), None)
    assert stored_key_id(resealed.api_key or "") == new.key_id
    assert new.decrypt("a", "api_key", resealed.api_key or "") == "v"


def test_connection_json_secrets_at_any_depth() -> None:
    b = box()
    doc = {"projectX": {"username": "me", "apiKey": f"{CANARY}-px", "autoConnect": True}}
    sealed, plain = Sealer(b).document("connection", doc, None)
    assert plain and CANARY not in str(sealed) and sealed["projectX"]["autoConnect"] is True
    same, _ = Sealer(b).document("connection", doc, sealed)
    assert same == sealed
    other = {"theme": "dark", "apiToken": f"{CANARY}-ui"}
    assert Sealer(b).document("ui-config", other, None) == (other, False)


def test_a_secret_that_moved_with_its_array_item_is_sealed_for_its_new_place() -> None:
    """An export of accounts [a, b] imported after c was added in front: each placeholder
    paired back to its own account's ciphertext, bound to the index it had, was refused as
    'does not decrypt' (review)."""
    from ctsd.redact import MASK, restore_placeholders
    from ctsd.secretfields import open_content

    b = box()

    def accounts(*items: tuple[str, str]) -> dict:
        return {"projectX": {"accounts": [{"name": n, "password": p} for n, p in items]}}

    stored, _ = Sealer(b).document(
        "connection", accounts(("c", "pc"), ("a", "pa"), ("b", "pb")), None
    )
    sent = restore_placeholders(accounts(("a", MASK), ("b", MASK)), stored)
    sealed, _ = Sealer(b).document("connection", sent, stored)
    opened, problems = open_content(b, "connection.json", sealed)
    assert not problems and opened == accounts(("a", "pa"), ("b", "pb"))
    # a value moved to a place of another name is still refused
    moved = {
        "projectX": {
            "accounts": [{"name": "a", "apiKey": sent["projectX"]["accounts"][0]["password"]}]
        }
    }
    with pytest.raises(CtsdError, match="does not decrypt"):
        Sealer(b).document("connection", moved, stored)


def test_a_value_sealed_under_a_name_no_longer_taken_for_a_secret_is_still_opened() -> None:
    """An older version sealed `tokenId` (any name with `token` was a secret); now it is a
    coin's id, shown: its stored ciphertext was neither opened nor rekeyed, and once the old
    key was dropped it could never be read (review)."""
    from ctsd.secretfields import document_field, open_content, seal_content

    b = box()
    sealed = b.encrypt("connection.json", document_field(("projectX", "tokenId")), "coin-7")
    doc = {"projectX": {"tokenId": sealed, "note": "enc:not-a-value"}}
    opened, problems = open_content(b, "connection.json", doc)
    assert not problems and opened == {"projectX": {"tokenId": "coin-7", "note": "enc:not-a-value"}}
    rekeyed, count = seal_content(box(), "connection.json", opened)
    assert count == 0 and rekeyed == opened  # (no longer a secret: stored as it reads now)
    # the items of a list sealed under a name once a secret's (`tokenList`)
    item = b.encrypt("connection.json", document_field(("trading", "tokenList")), "BTC")
    opened, problems = open_content(b, "connection.json", {"trading": {"tokenList": [item]}})
    assert not problems and opened == {"trading": {"tokenList": ["BTC"]}}


def test_a_refused_rekey_leaves_the_rest_of_its_group_under_the_old_key() -> None:
    """A rekey refused (here: connections.json invalid on disk) rotated the group's sealer
    all the same: a document set after it in the same group was sealed under the new key,
    which the store never adopts, and the next start could not decrypt it."""
    from ctsd import ops
    from ctsd.core import Committed, Context, Request, apply_group

    old = box()
    new = box(old)
    sealer = Sealer(old)
    ctx = Context("2026-12-06T10:00:00.000Z", {"connections.json": "invalid"}, sealer=sealer)
    doc = {"projectX": {"apiUrl": "https://px", "username": "u", "apiKey": f"{CANARY}-px"}}
    requests = [
        Request(ops.rekey(new), "cli"),
        Request(ops.set_document("connection", doc), "bus"),
    ]
    c = Committed()
    c.connections["a"], _ = Sealer(old).connection(conn("a", api_key="v"), None)
    (refused, stored), change = apply_group(c, requests, ctx)
    assert refused.error is not None and refused.error.code == "file_invalid"
    assert stored.error is None and sealer.rotated is None
    (rc,) = change.documents
    assert stored_key_id(rc.value["projectX"]["apiKey"]) == old.key_id
