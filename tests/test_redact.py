"""The one masking rule set: which keys are secrets (by pattern, at any depth, inside
`connection_settings` too), how a set or unset secret reads, and how a placeholder sent back
keeps the stored secret (or is refused where nothing is stored)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctsd import limits
from ctsd.errors import CtsdError
from ctsd.models import Connection
from ctsd.redact import (
    MASK,
    is_secret_key,
    mask,
    mask_if_needed,
    mask_record,
    mask_url_secrets,
    may_hold_placeholders,
    restore_placeholders,
)
from tests.strategies import json_objects, keys, scalars

CANARY = "CANARY-SECRET-7f3a9c"
URLS = st.sampled_from([f"https://desk:{CANARY}@gw.example", "wss://feed.example/v1", "a://b@c"])


def test_mask_rules() -> None:
    record = {
        "name": "Bybit",
        "api_key": "abcdefghijkl1234",
        "api_secret": "s3cr3t",
        "api_passphrase": "",
        "extra": None,
    }
    assert mask(record) == {
        "name": "Bybit",
        "api_key": MASK,  # a tail only where a connection record is shown (mask_record)
        "api_secret": MASK,
        "api_passphrase": None,  # set to "" is unset: null, not ""
        "extra": None,
    }
    conn = msgspec.convert(
        {"id": "c1", "name": "Bybit", "exchange": "bybit", "api_key": "abcdefghijkl1234"},
        Connection,
    )
    assert mask_record(conn)["api_key"] == "…1234"
    short_key = msgspec.structs.replace(conn, api_key="short")
    assert mask_record(short_key)["api_key"] == MASK  # too short to show a tail
    # Only a connection's api_key shows a tail: the Project X credentials show as set.
    nested = {"projectX": {"apiKey": "x" * 20, "password": "p", "apiUrl": "https://x"}}
    assert mask(nested) == {"projectX": {"apiKey": MASK, "password": MASK, "apiUrl": "https://x"}}
    assert mask([{"token": "t"}]) == [{"token": MASK}]


@pytest.mark.parametrize(
    "name",
    [
        "api_key", "apiKey", "API-KEY", "x-api-key", "apikey", "api_secret", "secretKey",
        "client_secret", "password", "db_password", "passwd", "passphrase", "api_passphrase",
        "token", "apiToken", "accessToken", "refresh_token", "x-auth-token", "tokenValue",
        "new_token", "custom_token", "my_token", "token2", "TOKEN_2", "tokenX",
        "apiTokenValue", "AUTHTOKEN", "access_token_b64", "token_v2", "apiTokens",
        "refresh_tokens", "accesstokenvalue", "id_token_hint", "tokenJson", "authTokenCookie",
        "sessionTokenId", "refreshTokenExpiresAt", "apiTokenList", "GH_TOKENS", "tokensJson",
        "fcmTokens", "apiTokensList", "privateKey", "private_key",
        "private_signing_key", "privkey", "credentials", "credential_id", "Authorization",
        "accessKey", "username", "userName", "user_name", "pwd",
    ],
)  # fmt: skip
def test_secret_names_by_pattern(name: str) -> None:
    assert is_secret_key(name)
    assert mask({"deep": [{"x": {name: CANARY}}]})["deep"][0]["x"][name] == MASK


@pytest.mark.parametrize(
    "name",
    [
        "name", "exchange", "apiUrl", "auth", "user_id", "key", "keys", "public_key", "id",
        # A trading app's coins and what describes a token (not the token itself).
        "tokens", "maxTokens", "tokenLogoSize", "tokenAddress", "token_type", "TOKENS",
        "favoriteTokens", "tokenDecimals", "tokenId", "token_id", "tokenIn", "tokenMint",
        "tokenMarketCap", "baseToken", "selectedToken", "tokensCount", "token0", "tokenA",
        "srcToken", "lpToken", "collateralToken", "tokenList", "tokenInfo", "token1", "tokenB",
    ],
)  # fmt: skip
def test_other_names_are_not_secrets(name: str) -> None:
    assert not is_secret_key(name)
    assert mask({name: "value"}) == {name: "value"}


def test_a_watchlist_of_tokens_shows_and_exports_whole() -> None:
    """A watchlist's `tokens` (coins) showed as "********" and an export imported back
    lost them: `token` was a secret anywhere in a name."""
    doc = {"lists": [{"name": "DeFi", "tokens": ["UNI", "AAVE"]}], "maxTokens": 100}
    assert mask(doc) == doc


def test_switches_and_objects_under_secret_names() -> None:
    # A boolean is a switch, not a password; an object under a secret-like name is walked.
    doc = {"savePassword": True, "tokens": {"btc": {"symbol": "BTC", "apiToken": CANARY}}}
    assert mask(doc) == {
        "savePassword": True,
        "tokens": {"btc": {"symbol": "BTC", "apiToken": MASK}},
    }
    # A number is no switch: a passphrase of digits written as a JSON number is one.
    assert mask({"passphrase": 123456, "apiToken": 5}) == {"passphrase": MASK, "apiToken": MASK}
    shown = mask({"connection_settings": '{"passphrase": 123456}'})["connection_settings"]
    assert "123456" not in shown


def test_secrets_inside_connection_settings_are_masked_in_the_string() -> None:
    inner = {"base_url": "http://gw", "auth": {"apiToken": CANARY}, "timeout": 5}
    shown = mask({"connection_settings": json.dumps(inner)})["connection_settings"]
    assert CANARY not in shown
    assert json.loads(shown) == {"base_url": "http://gw", "auth": {"apiToken": MASK}, "timeout": 5}
    plain = '{"base_url": "http://gw"}'
    assert mask({"connection_settings": plain}) == {"connection_settings": plain}  # as it was
    # Not JSON: nothing can be said of what it holds, so nothing of it is shown.
    assert mask({"connection_settings": '{"token": "' + CANARY})["connection_settings"] == MASK


def test_mask_never_raises_on_depth() -> None:
    deep: list = []
    cur = deep
    for _ in range(100_000):
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    cur.append({"secret": CANARY})
    assert CANARY not in repr_depth_safe(mask(deep))


def repr_depth_safe(value: object) -> str:
    """The strings in a value of any depth (repr would recurse)."""
    out: list[str] = []
    work = [value]
    while work:
        v = work.pop()
        if isinstance(v, dict):
            work.extend(v.values())
            out.extend(k for k in v if isinstance(k, str))
        elif isinstance(v, list):
            work.extend(v)
        elif isinstance(v, str):
            out.append(v)
    return "\n".join(out)


# --- placeholders sent back -------------------------------------------------------------------


def test_placeholder_sent_back_keeps_the_stored_secret() -> None:
    stored = {"name": "a", "api_key": "abcdefghijkl1234", "api_secret": CANARY, "n": 1}
    shown = mask(stored)
    assert restore_placeholders(shown, stored, "$.changes") == stored
    # Either form of the api_key placeholder; a real new value replaces; null clears.
    assert restore_placeholders({"api_key": MASK}, stored)["api_key"] == stored["api_key"]
    assert restore_placeholders({"api_secret": "new"}, stored) == {"api_secret": "new"}
    assert restore_placeholders({"api_secret": None}, stored) == {"api_secret": None}
    sent = {"name": "b"}
    assert restore_placeholders(sent, stored) is sent  # nothing to restore: as sent


def test_placeholder_where_nothing_is_stored_is_invalid() -> None:
    for stored in (None, {"api_secret": None}, {"api_secret": ""}, {}):
        with pytest.raises(CtsdError) as e:
            restore_placeholders({"list": [{"api_secret": MASK}]}, stored, "$.changes")
        assert e.value.code == "invalid" and e.value.path == "$.changes.list[0].api_secret"
        assert MASK not in e.value.message


def test_tail_placeholder_must_match_the_stored_secret() -> None:
    stored = {"api_key": "abcdefghijkl1234"}
    assert restore_placeholders({"api_key": "…1234"}, stored, records=True) == stored
    assert restore_placeholders([{"api_key": "…1234"}], [stored], records=True) == [stored]
    with pytest.raises(CtsdError) as e:
        restore_placeholders({"api_key": "…9999"}, stored, "$.c", records=True)
    assert e.value.path == "$.c.api_key" and "1234" not in e.value.message
    # Only a connection record's own api_key shows a tail: one deeper (a document's, one in
    # connection_settings) shows "********", so a tail there is refused, right or wrong,
    # else it answered a guess of its last four.
    for sent, where in (
        ({"broker": {"api_key": "…1234"}}, {"broker": stored}),
        ({"api_key": "…1234"}, stored),  # (a document: not a record)
        (
            {"connection_settings": '{"api_key": "…1234"}'},
            {"connection_settings": '{"api_key": "abcdefghijkl1234"}'},
        ),
    ):
        records = "connection_settings" in sent
        with pytest.raises(CtsdError, match="does not match"):
            restore_placeholders(sent, where, records=records)
    # Only api_key ever shows a tail: for another secret, a tail sent would let a client
    # guess its last four (answered "matches" or not), so it is refused whatever it holds.
    doc = {"projectX": {"apiKey": "abcdefghijkl1234"}}
    for tail in ("…1234", "…9999"):
        with pytest.raises(CtsdError):
            restore_placeholders({"projectX": {"apiKey": tail}}, doc)
    # Encrypted since the export that showed the tail (a key configured after it): the
    # export imports back. Any tail keeps it, as "********" does: no guessing oracle.
    sealed = {"api_key": "enc:v1:k1:AAAAciphertext"}
    for tail in ("…1234", "…9999"):
        assert restore_placeholders({"api_key": tail}, sealed, records=True) == sealed


def test_a_secret_stored_empty_and_sent_back_null_stays_as_stored() -> None:
    """Empty and null both read as unset (an export shows null): sent back, nothing changes
    (an update of that field alone is walked for it too)."""
    assert may_hold_placeholders({"api_passphrase": None})
    assert not may_hold_placeholders({"name": None})
    stored = [{"id": "a", "api_passphrase": "", "api_key": "k"}]
    sent = [{"id": "a", "api_passphrase": None, "api_key": None}]
    assert restore_placeholders(sent, stored) == [
        {"id": "a", "api_passphrase": "", "api_key": None}  # (a set one sent null is unset)
    ]


def test_placeholders_in_arrays_follow_the_record_id() -> None:
    stored = [{"id": "a", "api_secret": "A-" + CANARY}, {"id": "b", "api_secret": "B-" + CANARY}]
    sent = [{"id": "b", "api_secret": MASK}, {"id": "a", "api_secret": MASK}]
    assert restore_placeholders(sent, stored) == [stored[1], stored[0]]
    with pytest.raises(CtsdError) as e:
        restore_placeholders([{"id": "new", "api_secret": MASK}], stored, "$.files.c")
    assert e.value.path == "$.files.c[0].api_secret"
    # Without ids, items pair by position.
    assert restore_placeholders([{"token": MASK}], [{"token": "t"}]) == [{"token": "t"}]


def test_placeholders_in_arrays_without_ids_follow_what_the_item_shows() -> None:
    """An export of [a, b] imported after c was added in front: by position a took c's
    password and b a's, silently (review)."""
    stored = [
        {"name": "c", "password": "pc"},
        {"name": "a", "password": "pa"},
        {"name": "b", "password": "pb"},
    ]
    sent = [{"name": "a", "password": MASK}, {"name": "b", "password": MASK}]
    assert restore_placeholders(sent, stored) == stored[1:]
    # an item edited in place: the one stored at its index, when no other took it (an item
    # appended in the same save changes nothing of that); two that show the same: by position
    renamed = [{"name": "c2", "password": MASK}, *sent]
    assert restore_placeholders(renamed, stored)[0] == {"name": "c2", "password": "pc"}
    ab = stored[1:]
    edited = [{"name": "a2", "password": MASK}, {"name": "b", "password": MASK}]
    appended = [*edited, {"name": "n", "password": "pn"}]
    assert [x["password"] for x in restore_placeholders(appended, ab)] == ["pa", "pb", "pn"]
    twins = [{"name": "t", "password": "p1"}, {"name": "t", "password": "p2"}]
    assert restore_placeholders([{"name": "t", "password": MASK}] * 2, twins) == twins
    # never an item another one took: a new one in front of `a` gets nothing stored
    unset: list[str] = []
    front = [{"name": "new", "password": MASK}, {"name": "a", "password": MASK}]
    got = restore_placeholders(front, ab, "$", unset=unset)
    assert got == [{"name": "new", "password": None}, ab[0]] and unset == ["$[0].password"]


def test_items_that_differ_only_deeper_or_lost_a_neighbour_never_get_its_secret() -> None:
    """The first pairing looked at an item's top level only, and fell back to the index
    after a removal: reversed or with one removed, an account took the other's secret
    beside the other's URL (review)."""
    a = {"name": "x", "endpoint": {"url": "https://a"}, "apiSecret": "SA"}
    b = {"name": "x", "endpoint": {"url": "https://b"}, "apiSecret": "SB"}
    shown = [{**item, "apiSecret": MASK} for item in (a, b)]
    assert restore_placeholders(shown[::-1], [a, b]) == [b, a]
    assert restore_placeholders(shown[1:], [a, b]) == [b]
    # one removed and another edited: the edited one gets nothing stored, not the neighbour's
    c = {"exchange": "bybit", "apiSecret": "SC"}
    stored = [
        {"exchange": "binance", "apiSecret": "S1"},
        {"exchange": "kraken", "apiSecret": "S2"},
        c,
    ]
    edited = [{**stored[0], "apiSecret": MASK}, {**c, "label": "new", "apiSecret": MASK}]
    unset: list[str] = []
    got = restore_placeholders(edited, stored, "$", unset=unset)
    assert (
        got[0]["apiSecret"] == "S1" and got[1]["apiSecret"] is None and unset == ["$[1].apiSecret"]
    )


def test_an_insert_a_removal_and_an_edit_in_one_save_never_move_a_secret() -> None:
    """Items of one URL: with one removed, one inserted and one renamed in a save, the index
    gave the renamed one its removed neighbour's secret; two renamed and swapped swapped
    their secrets; numbers whose hashes collide (-1 and -2) swapped them too (review)."""
    url = "https://px.example"
    a = {"name": "main", "url": url, "password": "sA"}
    b = {"name": "sub", "url": url, "password": "sB"}
    sent = [{"name": "X", "url": url, "password": "sX"}, {**a, "name": "main2", "password": MASK}]
    unset: list[str] = []
    got = restore_placeholders(sent, [a, b], "$", unset=unset)
    assert got[1]["password"] is None and unset == ["$[1].password"]
    swapped = [{**b, "name": "sub2", "password": MASK}, {**a, "name": "main2", "password": MASK}]
    unset = []
    got = restore_placeholders(swapped, [a, b], "$", unset=unset)
    assert [x["password"] for x in got] == [None, None] and len(unset) == 2
    n1 = {"name": "a", "n": -1, "password": "s1"}
    n2 = {"name": "a", "n": -2, "password": "s2"}
    masked = [{**n2, "password": MASK}, {**n1, "password": MASK}]
    assert restore_placeholders(masked, [n1, n2]) == [n2, n1]


def test_items_told_apart_by_what_masking_shows_under_secret_names() -> None:
    """Everything under a secret's name was left out of what tells items apart, though an
    object there is shown walked and a switch as it is: reordered, alice took bob's password;
    a copy of bob sent in alice's place took hers (review)."""
    alice = {"credentials": {"login": "alice", "password": "PA"}}
    bob = {"credentials": {"login": "bob", "password": "PB"}}
    shown = [mask(bob), mask(alice)]
    assert restore_placeholders(shown, [alice, bob]) == [bob, alice]
    x1 = {"name": "x", "savePassword": True, "password": "P1"}
    x2 = {"name": "x", "savePassword": False, "password": "P2"}
    assert restore_placeholders([mask(x2), mask(x1)], [x1, x2]) == [x2, x1]
    a = {"user": "alice", "host": "h1", "password": "PA"}
    b = {"user": "bob", "host": "h2", "password": "PB"}
    unset: list[str] = []
    got = restore_placeholders([mask(b), mask(b)], [a, b], "$", unset=unset)
    assert [x["password"] for x in got] == [None, "PB"] and unset == ["$[0].password"]


def test_pairing_array_items_is_linear_however_deep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each list level masked and encoded whole subtrees: an 800 KB document nested 30 deep
    took seconds on the event loop. Counted, not timed: each string of either tree is looked
    at a bounded number of times, however deep it sits."""
    from ctsd import redact

    doc: Any = {"password": "p"}
    for _ in range(30):  # (each level: 2,000 keys of an 800 KB document)
        doc = {"a": [doc, {"b": "c"}], **{f"k{i}": f"v{i}" for i in range(2000)}}
    sent = json.loads(json.dumps(doc).replace('"p"', '"' + MASK + '"'))
    looks = 0
    masked = redact.mask_url_secrets

    def counted(text: str) -> str:
        nonlocal looks
        looks += 1
        return masked(text)

    monkeypatch.setattr(redact, "mask_url_secrets", counted)
    assert restore_placeholders(sent, doc) == doc
    strings = 2 * 30 * 2001  # (the values of both trees)
    assert looks < 4 * strings, looks  # (each subtree masked whole per level: ~15 times more)


def test_non_secret_fields_may_hold_anything() -> None:
    sent = {"name": MASK, "note": "…1234"}
    assert restore_placeholders(sent, None) is sent


def test_connection_settings_placeholders_keep_the_inner_secrets() -> None:
    stored_text = '{"base_url": "http://gw",  "apiToken": "' + CANARY + '"}'
    stored = {"connection_settings": stored_text}
    shown = mask(stored)
    # Sent back as shown: the stored string, byte for byte.
    assert restore_placeholders(shown, stored) == stored
    # Changed elsewhere in the object: the inner secret is kept, the change taken.
    edited = json.loads(shown["connection_settings"])
    edited["timeout"] = 5
    out = restore_placeholders({"connection_settings": json.dumps(edited)}, stored)
    assert json.loads(out["connection_settings"]) == {
        "base_url": "http://gw",
        "apiToken": CANARY,
        "timeout": 5,
    }
    # The URL beside it changed: the secret must be sent again (it is kept only for the
    # address it was given for).
    edited["base_url"] = "http://other"
    with pytest.raises(CtsdError) as e:
        restore_placeholders({"connection_settings": json.dumps(edited)}, stored, "$.c")
    assert e.value.path == "$.c.connection_settings.apiToken" and "base_url" in e.value.message
    # Nothing stored inside: invalid, naming the inner field.
    with pytest.raises(CtsdError) as e:
        restore_placeholders(shown, {"connection_settings": "{}"}, "$.changes")
    assert e.value.path == "$.changes.connection_settings.apiToken"


def test_a_secret_is_kept_only_for_the_address_it_was_given_for() -> None:
    """Project X's credentials sent back as placeholders with `apiUrl` pointed elsewhere (or
    set where the default was used, or removed) are refused: the daemon would log in there
    with them. Other sections, and a URL's own masked password, are judged the same way."""
    stored = {
        "projectX": {"apiUrl": "https://api.topstepx.com", "username": "me", "apiKey": CANARY},
        "other": {"url": "https://x", "token": "T" * 16},
    }
    shown = mask(stored)
    assert restore_placeholders(shown, stored) == stored  # as read: kept
    for url in ("http://attacker:9000", None):
        sent = copy.deepcopy(shown)
        sent["projectX"]["apiUrl"] = url
        with pytest.raises(CtsdError) as e:
            restore_placeholders(sent, stored, "$.content")
        assert e.value.path.startswith("$.content.projectX.") and "apiUrl" in e.value.message
        assert CANARY not in e.value.message
    sent = copy.deepcopy(shown)
    del sent["projectX"]["apiUrl"]  # the default URL from now on: a move too
    with pytest.raises(CtsdError):
        restore_placeholders(sent, stored)
    # Sent again with the new URL: taken as sent.
    sent = copy.deepcopy(shown)
    sent["projectX"].update(apiUrl="https://new", username="me", apiKey="new-key")
    assert restore_placeholders(sent, stored)["projectX"]["apiKey"] == "new-key"
    # Deeper: a URL moved around a nested object refuses the placeholders inside it.
    nested = {"gw": {"url": "https://a", "auth": {"password": "pw"}}}
    sent = {"gw": {"url": "https://b", "auth": {"password": MASK}}}
    with pytest.raises(CtsdError):
        restore_placeholders(sent, nested)
    # A URL password masked, with another URL beside it moved: refused too.
    both = {"api": "https://a", "proxy": "http://u:pw@proxy"}
    with pytest.raises(CtsdError):
        restore_placeholders({"api": "https://b", "proxy": f"http://u:{MASK}@proxy"}, both)


def test_restore_refuses_a_depth_bomb_cleanly() -> None:
    bomb: dict = {}
    cur = bomb
    for _ in range(50_000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(CtsdError) as e:
        restore_placeholders(bomb, None, "$.content")
    assert e.value.code == "invalid" and str(limits.MAX_MESSAGE_DEPTH) in e.value.message


def test_an_encrypted_secret_is_masked_whole() -> None:
    """Its tail is ciphertext: showing it would tell nothing apart. A tail sent back (an
    export made before the key was configured) keeps it, as the plain mask does."""
    stored = {"api_key": "enc:v1:0123abcd:" + "A" * 40}
    assert mask(stored) == {"api_key": MASK}
    assert restore_placeholders({"api_key": MASK}, stored, "$") == stored
    assert restore_placeholders({"api_key": "…AAAA"}, stored, "$", records=True) == stored


def test_a_url_password_is_masked_wherever_the_url_sits() -> None:
    """`base_url` is no secret by its name, but the password in it is; the user name stays
    (it tells accounts apart), and so does a URL without a password."""
    text = {
        "base_url": f"https://me:{CANARY}@gw.example/v5?x=1",
        "note": f"failed: ftp://op:p@ss-{CANARY}@files/x and http://only-user@host",
        "list": [f"wss://a:{CANARY}@b", f"nats://u:{CANARY}/?#@h:4222"],
        "json": f'{{"url":"http://u:{CANARY}@h","mail":"x@y"}}',
    }
    shown = mask(text)
    assert CANARY not in json.dumps(shown)
    assert shown["base_url"] == f"https://me:{MASK}@gw.example/v5?x=1"
    assert shown["note"] == f"failed: ftp://op:{MASK}@files/x and http://only-user@host"
    # JSON text quoting two addresses: masked to the last @ (the safe side).
    assert shown["json"] == f'{{"url":"http://u:{MASK}@y"}}'

    inner = {"base_url": f"https://me:{CANARY}@gw", "n": 1}
    settings = mask({"connection_settings": json.dumps(inner)})["connection_settings"]
    assert CANARY not in settings and json.loads(settings)["base_url"] == f"https://me:{MASK}@gw"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A password with digits then `/`, or `://`, in it; a URL in another's query.
        ("https://admin:2024/Spring@api.example.com", f"https://admin:{MASK}@api.example.com"),
        ("postgres://u:abc://def@h/db", f"postgres://u:{MASK}@h/db"),
        ("https://h/?next=http://u:pw@x", f"https://h/?next=http:{MASK}@x"),
        # A user name with an @ (an email login) or a /, a password with a quote.
        ("smtp://me@mail.example:pw@smtp.example", f"smtp://me@mail.example:{MASK}@smtp.example"),
        ("https://DOM/user:pw@host", f"https://DOM/user:{MASK}@host"),
        ('https://me:Tr0ub"4dor@gw/v5', f"https://me:{MASK}@gw/v5"),
        ("x" + "1" * 40 + "://u:pw@h", "x" + "1" * 40 + f"://u:{MASK}@h"),
        # On the safe side: a path holding an @ after a port is masked too.
        ("http://localhost:5173/@vite/client", f"http://localhost:{MASK}@vite/client"),
        # A password with a space: masked on to the last @ of its line before another URL.
        ("'nats://u:pa ss@h:4222' is bad", f"'nats://u:{MASK}@h:4222' is bad"),
        ("nats://u:a b@c d@h x", f"nats://u:{MASK}@h x"),
        ("nats://u:pa ss, nats://v:w@h", f"nats://u:pa ss, nats://v:{MASK}@h"),
        ("nats://u:pa ss\nmail x@y", "nats://u:pa ss\nmail x@y"),
        # A port, with or without a path, before a later @: no password.
        ("nats://h:4222 down, ask ops@desk", "nats://h:4222 down, ask ops@desk"),
        ("GET http://h:5173/x?y for bob@desk", "GET http://h:5173/x?y for bob@desk"),
        # A `:` in an IPv6 host is no user's: nothing masked after it either. One in a path,
        # before a later @, is masked (a user with a /, a domain's, holds one too).
        ("http://[::1]:8080/x failed; ops@desk", "http://[::1]:8080/x failed; ops@desk"),
        ("https://DOM/user:pa ss@host", f"https://DOM/user:{MASK}@host"),
        ("GET http://h/a:b 404, ask bob@desk", f"GET http://h/a:{MASK}@desk"),
        # Query parameters named as secrets, in the fragment too, and percent-encoded names;
        # a value ends at a quote after its first character (a URL quoted in JSON text).
        ("https://api.x/v1?apiKey=s3&x=1", f"https://api.x/v1?apiKey={MASK}&x=1"),
        ("wss://x:9443/ws?listenKey=s3", f"wss://x:9443/ws?listenKey={MASK}"),
        ("https://h/cb#access_token=s3&state=7", f"https://h/cb#access_token={MASK}&state=7"),
        ("https://h/?a=1;api%5Fkey=s3", f"https://h/?a=1;api%5Fkey={MASK}"),
        ('{"u":"https://h/?sig=s3","n":1}', f'{{"u":"https://h/?sig={MASK}","n":1}}'),
        ("https://h/x?token=(s3)&y=[1]", f"https://h/x?token={MASK}&y=[1]"),
        (
            "https://s3.x/o?X-Amz-Credential=a&X-Amz-Signature=s3",
            f"https://s3.x/o?X-Amz-Credential={MASK}&X-Amz-Signature={MASK}",
        ),
        ("https://u:pw@h/?token=s3", f"https://u:{MASK}@h/?token={MASK}"),
        ("https://h/?next=https://g/?sig=s3", f"https://h/?next=https://g/?sig={MASK}"),
        # A URL with a secret, percent-encoded in a parameter (a login's redirect): masked
        # whole; one with none is shown.
        ("https://h/?next=https%3A%2F%2Fu%3Apw%40g%2F&x=1", f"https://h/?next={MASK}&x=1"),
        ("https://h/?r=https%253A%252F%252Fg%252F%253Ftoken%253Ds3", f"https://h/?r={MASK}"),
        (
            "https://h/?next=https%3A%2F%2Fg%2Fx%3Fa%3D1",
            "https://h/?next=https%3A%2F%2Fg%2Fx%3Fa%3D1",
        ),
        # An @ in the query (an email), before a secret; with a port, the span to it masked.
        ("https://h/v1?user=me@x.com&api_key=s3", f"https://h/v1?user=me@x.com&api_key={MASK}"),
        ("https://h:8080/v1?u=me@x.com&token=s3", f"https://h:{MASK}@x.com&token={MASK}"),
        # A password with a space, then a query.
        ("https://d:p w@gw/x?token=s3 ok", f"https://d:{MASK}@gw/x?token={MASK} ok"),
        # Not secrets: an empty value, a path's query with no URL, names that only end in key.
        ("https://h/?token=&x=1 /x?token=s3", "https://h/?token=&x=1 /x?token=s3"),
        ("https://h/bars?sortKey=time&code=US", "https://h/bars?sortKey=time&code=US"),
        # No password: as written.
        ("http://only-user@host/x", "http://only-user@host/x"),
        ("mail me at a@b.c, see https://x.example/", "mail me at a@b.c, see https://x.example/"),
    ],
)
def test_url_secrets_are_masked_on_the_safe_side(text: str, shown: str) -> None:
    assert mask_url_secrets(text) == shown


@pytest.mark.parametrize(
    "crafted",
    [
        "x" * 400_000 + " @ ://",
        "a://b:" * 80_000 + " @",
        "/" + "a" * 400_000 + "@://",
        ("://" + "x" * 100) * 3_000 + "@",
        "h://" + "a" * 300_000 + "://@",
        "h://u:x " * 50_000 + "@",
        "h://u:x @ " * 40_000,
        "h://x?" + "a" * 400_000 + "=",
        "h://x" + "?a=" * 130_000,
        "h://x?" + "&" * 400_000,
        "https://h/?" + "private" * 60_000 + "=1",  # a name judged in one pass too
        "https://h/?" + "=" * 400_000,
        "https://h/?n=" + "%" * 400_000 + "://",
        "https://h/?" + "n=%25://u:x%40&" * 30_000,
        "https://h/?next=%25" + "25" * 200_000,  # decodes two characters shorter a pass
        "https://h/?" + "n=%25" + "25" * 2_000 + "&" * 100,
    ],
)
def test_masking_a_crafted_string_takes_one_pass(crafted: str) -> None:
    """Masking runs on every string of every log line and answer (an unauthenticated
    request's path is logged): a pattern that backtracks took seconds on these."""
    started = time.perf_counter()
    mask({"path": crafted})
    assert time.perf_counter() - started < 1.0  # one pass: a few ms; quadratic: a minute


def test_a_url_holding_an_encoded_secret_sent_back_as_shown_keeps_it() -> None:
    stored = {"notes": "see https://h/?next=https%3A%2F%2Fu%3Apw%40g%2F&x=1"}
    shown = mask(stored)
    assert "pw" not in json.dumps(shown)
    assert restore_placeholders(shown, stored, "$.d") == stored


def test_text_with_a_mask_beside_a_url_is_no_url_sent_back_masked() -> None:
    """Eight asterisks beside a link (a rating, a markdown rule) are text, not a masked URL
    secret sent back: stored as sent."""
    sent = {"notes": f"rating {MASK} https://example.com/?q=1", "n": f"https://h/?a={MASK}x"}
    assert restore_placeholders(sent, None, "$.d") == sent


def test_a_stored_value_that_reads_as_a_slipped_placeholder_is_kept_not_refused() -> None:
    """`"****"` stored under a secret's name by an earlier version: sent back as it is (beside
    an edit of its sibling), it is no slip of the one shown; another such value is."""
    stored = {"auth": {"password": "****", "host": "a"}}
    sent = {"auth": {"password": "****", "host": "b"}}
    assert restore_placeholders(sent, stored, "$") == sent
    with pytest.raises(CtsdError):
        restore_placeholders({"auth": {"password": "*****", "host": "b"}}, stored, "$")


def test_hostile_names_are_not_kept_in_the_names_cache() -> None:
    from ctsd import secretnames

    before = len(secretnames._JUDGED)
    assert not is_secret_key("x" * 10_000) and is_secret_key("x" * 10_000 + "token")
    assert len(secretnames._JUDGED) == before


def test_a_url_sent_back_as_shown_keeps_its_password() -> None:
    stored = {"base_url": f"https://me:{CANARY}@gw/v5", "n": 1}
    shown = mask(stored)
    assert may_hold_placeholders(shown)
    assert restore_placeholders(shown, stored, "$.c") == stored
    # A secret query value likewise; the URL changed around it: refused.
    stored = {"hook": f"https://h/x?api_key={CANARY}&ch=1"}
    shown = mask(stored)
    assert CANARY not in json.dumps(shown) and may_hold_placeholders(shown)
    assert restore_placeholders(shown, stored, "$.c") == stored
    with pytest.raises(CtsdError):
        restore_placeholders({"hook": f"https://h/x?api_key={MASK}&ch=2"}, stored, "$.c")
    # The URL changed around the masked password, or none is stored: refused, naming it.
    for sent, held in (
        ({"base_url": f"https://me:{MASK}@other/v5"}, stored),
        ({"base_url": f"https://me:{MASK}@gw/v5"}, None),
        ({"base_url": f"https://me:{MASK}@gw/v5"}, {"base_url": "https://gw/v5"}),
    ):
        with pytest.raises(CtsdError) as e:
            restore_placeholders(sent, held, "$.c")
        assert e.value.code == "invalid" and e.value.path == "$.c.base_url"
        assert CANARY not in e.value.message
    # A new password sent in clear is taken as it is.
    sent = {"base_url": "https://me:new@gw/v5"}
    assert restore_placeholders(sent, stored) is sent


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"api_key": "K" * 20, "api_secret": "S" * 30, "api_passphrase": "p"},
        {"api_key": "short", "api_secret": "", "api_passphrase": None},
        {"api_key": "enc:v1:abcdefghijklmnop", "api_secret": "enc:v1:zz"},
        {"connection_settings": json.dumps({"base_url": "http://x", "token": "T" * 16})},
        {"connection_settings": json.dumps({"nested": {"password": "pw", "n": [1, {"k": 2}]}})},
        {"connection_settings": "not json at all"},
        {"connection_settings": "{}"},
        {"api_type": "see https://me:pw@gw", "margin_type": "wss://a:b@c"},
    ],
)
def test_a_record_masked_by_its_type_shows_what_the_walk_shows(fields: dict[str, str]) -> None:
    """But its api_key's tail: only a connection record shows one."""
    conn = Connection(id="c1", name="n", exchange="bybit", **fields)
    shown, walked = mask_record(conn), mask(msgspec.to_builtins(conn))
    key = fields.get("api_key")
    if key and len(key) >= 12 and not key.startswith("enc:"):
        assert (shown.pop("api_key"), walked.pop("api_key")) == ("…" + key[-4:], MASK)
    assert shown == walked


@pytest.mark.parametrize(
    ("sent", "may"),
    [
        ({"name": "x", "user_id": 3, "api_key": "a-real-new-key"}, False),
        ({}, False),
        ({"api_key": MASK}, True),
        ({"api_key": "…abcd"}, True),
        ({"name": "x", "connection_settings": "{}"}, True),
        ({"nested": {"api_secret": MASK}}, True),
        ({"list": [MASK]}, True),
        ([{"api_key": MASK}], True),
        ("text", True),
    ],
)
def test_placeholders_are_looked_for_only_where_they_may_be(sent: object, may: bool) -> None:
    assert may_hold_placeholders(sent) is may
    if not may:  # nothing the walk would restore
        assert restore_placeholders(sent, {"api_key": "stored-key-123456"}) is sent


def test_a_console_traceback_never_shows_the_locals_that_hold_a_secret() -> None:
    """A logged exception in the console format: its traceback (rich's, when installed,
    shows every frame's local variables) must not carry what a local held, a request body
    with its api key, say; the event's own fields, and a URL password in the exception's
    text, are masked as in the JSON format."""
    code = f"""
import structlog
from ctsd import logs
logs.setup("console")
def login():
    body = {{"userName": "desk", "apiKey": "{CANARY}"}}
    raise RuntimeError("the gateway https://desk:{CANARY}@gw.example/login said no")
try:
    login()
except RuntimeError:
    structlog.get_logger("ctsd.probes").exception("login_failed", api_key="{CANARY}")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    shown = out.stdout + out.stderr
    assert "login_failed" in shown and "the gateway https://desk:" in shown, shown
    assert CANARY not in shown, shown  # (the exception's own text is masked too)


@given(json_objects | st.dictionaries(keys, st.lists(URLS | scalars, max_size=3), max_size=3))
def test_mask_if_needed_masks_what_mask_masks(data: dict[str, Any]) -> None:
    """The look without a copy that every event's data takes (`Tx.emit`) passes over nothing
    `mask` would change: the same JSON either way, and `data` itself when nothing changes."""
    shown = mask_if_needed(data)
    assert msgspec.json.encode(shown) == msgspec.json.encode(mask(data))
    assert CANARY not in json.dumps(shown)


def test_mask_if_needed_looks_into_any_mapping_at_the_top() -> None:
    from collections import OrderedDict

    data = OrderedDict(name="x", api_secret=CANARY)
    assert CANARY not in json.dumps(mask_if_needed(data))
