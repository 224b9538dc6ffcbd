"""The change stream's message format: headers, payload encoding, and the check on the way in.

A message is one change group. Its payload is the store's encoded group (opaque here),
compressed with zlib when large; its headers say which cluster and schema version it belongs
to, which host made it, and its id for the stream's duplicate detection. A message that fails
the check is never applied (`BadMessage` names it).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from ctsd.cluster.errors import BadMessage

SCHEMA_VERSION = "1"
H_CLUSTER = "Ctsd-Cluster"
H_SCHEMA = "Ctsd-Schema"
H_HOST = "Ctsd-Host"
H_ENCODING = "Ctsd-Encoding"
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
ENCODING_ZLIB = "zlib"
COMPRESS_ABOVE = 64 * 1024  # big groups (an import) are compressed to stay under max_payload
MAX_INFLATED = 256 * 1024 * 1024  # a compressed payload may not inflate past this


@dataclass(frozen=True, slots=True)
class Change:
    """One change group as delivered from the stream, checked and inflated."""

    seq: int
    host: str
    msg_id: str
    payload: bytes
    published_at: datetime
    own: bool  # published by this host


def encode(
    payload: bytes, *, cluster: str, host: str, msg_id: str, expected_seq: int
) -> tuple[bytes, dict[str, str]]:
    """The message data and headers for one change group."""
    headers = {
        H_CLUSTER: cluster,
        H_SCHEMA: SCHEMA_VERSION,
        H_HOST: host,
        H_MSG_ID: msg_id,
        H_EXPECTED_LAST_SEQ: str(expected_seq),
    }
    if len(payload) > COMPRESS_ABOVE:
        headers[H_ENCODING] = ENCODING_ZLIB
        return zlib.compress(payload, 1), headers
    return payload, headers


def decode(
    headers: Mapping[str, str] | None,
    data: bytes,
    *,
    seq: int,
    published_at: datetime,
    cluster: str,
    host_id: str,
) -> Change:
    """Check a message of the stream and inflate it; raises BadMessage naming it."""
    headers = headers or {}
    msg_id = headers.get(H_MSG_ID) or ""
    host = headers.get(H_HOST) or ""
    what = f"message seq {seq}" + (f" ({_short(msg_id)})" if msg_id else "")
    if headers.get(H_CLUSTER) != cluster:
        raise BadMessage(
            f"{what} belongs to cluster {_short(headers.get(H_CLUSTER))}, not {cluster!r}; "
            "it was not applied",
            seq=seq,
        )
    schema = headers.get(H_SCHEMA)
    if schema != SCHEMA_VERSION:
        raise BadMessage(
            f"{what} has schema version {_short(schema)}; this ctsd applies version "
            f"{SCHEMA_VERSION} only (upgrade it to match the host that wrote it); it was "
            "not applied",
            seq=seq,
        )
    if not msg_id or not host:
        raise BadMessage(
            f"{what} has no {H_MSG_ID} or {H_HOST} header; it was not applied", seq=seq
        )
    payload = data
    encoding = headers.get(H_ENCODING)
    if encoding == ENCODING_ZLIB:
        try:
            payload = inflate(data)
        except zlib.error as exc:
            what += f" does not inflate ({exc})"
            raise BadMessage(f"{what}; it was not applied", seq=seq) from None
    elif encoding is not None:
        raise BadMessage(
            f"{what} has unknown encoding {_short(encoding)}; it was not applied", seq=seq
        )
    return Change(
        seq=seq,
        host=host,
        msg_id=msg_id,
        payload=payload,
        published_at=published_at,
        own=host == host_id,
    )


def inflate(data: bytes) -> bytes:
    """zlib-compressed bytes inflated, up to MAX_INFLATED; raises zlib.error."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_INFLATED)
    if inflater.unconsumed_tail or not inflater.eof:
        raise zlib.error("truncated, or larger than the limit")
    return out


def _short(value: object, limit: int = 80) -> str:
    """A header value as shown in an error: quoted, and cut when long (it is foreign input)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
