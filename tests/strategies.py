"""Hypothesis strategies the property tests share: JSON values (with secret-like and plain
key names), and byte-level mutations that turn valid JSON into near-misses."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

SECRET_NAMES = [
    "api_key", "apiKey", "api_secret", "secretKey", "password", "passphrase", "token",
    "apiToken", "accessToken", "privateKey", "private_key", "credentials", "username",
    "Authorization", "client_secret",
]  # fmt: skip
PLAIN_NAMES = ["name", "id", "theme", "symbols", "base_url", "value", "x", ""]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
keys = st.sampled_from(PLAIN_NAMES + SECRET_NAMES) | st.text(max_size=10)


def json_values(leaves: st.SearchStrategy[Any] = scalars, max_leaves: int = 25) -> Any:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=max_leaves,
    )


json_objects = st.dictionaries(keys, json_values(), max_size=6)
extra_keys = st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), json_values(), max_size=3)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]),
        st.integers(min_value=0, max_value=10_000),
        st.binary(min_size=1, max_size=3)
        | st.sampled_from([b"{", b"[", b'"', b",", b"\\", b"\xff"]),
    ),
    min_size=1,
    max_size=4,
)


def mutate(raw: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """`raw` with the `mutations` drawn applied in turn (positions wrap around its length)."""
    for op, pos, data in ops:
        pos = pos % (len(raw) + 1)
        if op == "delete":
            raw = raw[:pos] + raw[pos + len(data) :]
        elif op == "insert":
            raw = raw[:pos] + data + raw[pos:]
        elif op == "replace":
            raw = raw[:pos] + data + raw[pos + len(data) :]
        elif op == "truncate":
            raw = raw[:pos]
        else:  # duplicate a slice (repeats keys, records, brackets)
            raw = raw[:pos] + raw[pos : pos + 40] + raw[pos:]
    return raw
