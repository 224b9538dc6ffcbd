"""The change stream's message format: headers, payload encoding, and the check on the way in.

A message is one change group. Its payload is the store's encoded group (opaque here),
compressed with zlib (nearly always: `COMPRESS_ABOVE`); its headers say which cluster and
schema version it belongs to, which host made it, and its id for the stream's duplicate
detection; a keyed group
(`keyed`) says the stream seq it was computed at (`Ctsd-Base`), any other is published with
the whole-stream check (`Nats-Expected-Last-Sequence`). A message that fails the check is
never applied (`BadMessage` names it).

The stream's first message founds the cluster (`Ctsd-Founding`): it names the object in the
snapshot bucket that holds the founding host's shared state, which every other host installs
before it applies anything else (`ClusterCommitter.found`).

Schema 2 added keyed groups, schema 3 the founding message (only it is tagged 3, so a
cluster founded before goes on with hosts not yet upgraded). Messages of older schemas are
still applied; a ctsd that reads older schemas only refuses newer messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from ctsd.cluster.errors import BadMessage
from ctsd.files import ALGORITHMS_DIR
from ctsd.models import HOST_ID_PATTERN

SCHEMA_VERSION = "2"
FOUNDING_SCHEMA = "3"  # the founding message only: older hosts apply every other message
SCHEMAS_READ = ("1", "2", "3")
H_CLUSTER = "Ctsd-Cluster"
H_SCHEMA = "Ctsd-Schema"
H_HOST = "Ctsd-Host"
H_ENCODING = "Ctsd-Encoding"
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
H_BASE = "Ctsd-Base"
H_FOUNDING = "Ctsd-Founding"
# The tags of the hand edits a group took in (`Change.taken`, one keyed hash each), as a JSON
# object: for the host that published it only, so out of the payload (the other hosts, and
# older ones, never look at it). At most TAKEN_MAX_BYTES, so that the headers stay within
# the room the engine keeps for them (`engine.HEADER_ROOM`): the files past it are left out
# (a tag only spares a take-in after a crash).
H_TAKEN = "Ctsd-Taken"
TAKEN_MAX_BYTES = 512
_TAG = re.compile(r"[0-9a-f]{64}")
FOUNDING_PREFIX = "founding-"
ENCODING_ZLIB = "zlib"
# Groups above this are sent compressed (level 1: quick). Nearly all are: a group of a few
# connection updates is JSON of some KiB, which every NATS node stores and replicates and
# every host receives, so compressing costs a host less CPU than it saves the servers. A huge
# group (an import) also stays under max_payload so.
COMPRESS_ABOVE = 1024
MAX_INFLATED = 256 * 1024 * 1024  # a compressed payload may not inflate past this
# Inflated on the event loop up to this (nearly every change: no thread hop), the rest on a
# worker thread: a huge change, or a small bomb, never holds every client of the host.
INFLATE_ON_LOOP_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Change:
    """One change group as delivered from the stream, checked (`decode`), then inflated
    (`inflated`)."""

    seq: int
    host: str
    msg_id: str
    payload: bytes
    published_at: datetime
    own: bool  # published by this host
    base: int | None = None  # a keyed group: the stream seq it was computed at
    founding: str | None = None  # the founding message: its state's object in the bucket
    compressed: bool = False  # `payload` is still zlib-compressed
    taken: Mapping[str, str] = field(default_factory=dict)  # file → tag (`H_TAKEN`)


def encode(
    payload: bytes,
    *,
    cluster: str,
    host: str,
    msg_id: str,
    expected_seq: int,
    keyed: bool = False,
    founding: str | None = None,
    taken: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The message data and headers for one change group computed at stream seq
    `expected_seq`; `keyed`: checked by the hosts, not by the stream (`keyed` module)."""
    headers = {
        H_CLUSTER: cluster,
        H_SCHEMA: SCHEMA_VERSION,
        H_HOST: host,
        H_MSG_ID: msg_id,
        H_BASE if keyed else H_EXPECTED_LAST_SEQ: str(expected_seq),
    }
    if founding is not None:
        headers[H_FOUNDING] = founding
        headers[H_SCHEMA] = FOUNDING_SCHEMA
    if taken:
        kept: dict[str, str] = {}
        # (the shared tables first: an algorithm's edit taken in again costs least)
        for file, tag in sorted(
            taken.items(), key=lambda ft: (ft[0].startswith(f"{ALGORITHMS_DIR}/"), ft[0])
        ):
            if len(_taken_text({**kept, file: tag})) <= TAKEN_MAX_BYTES:
                kept[file] = tag
        if kept:
            headers[H_TAKEN] = _taken_text(kept)
    if len(payload) > COMPRESS_ABOVE:
        packed = zlib.compress(payload, 1)
        if len(packed) < len(payload):  # not for bytes that do not shrink
            headers[H_ENCODING] = ENCODING_ZLIB
            return packed, headers
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
    """Check a message of the stream (its payload as it came); raises BadMessage naming
    it."""
    headers = headers or {}
    msg_id = headers.get(H_MSG_ID) or ""
    host = headers.get(H_HOST) or ""
    what = f"message seq {seq}" + (f" ({short(msg_id)})" if msg_id else "")
    if headers.get(H_CLUSTER) != cluster:
        raise BadMessage(
            f"{what} belongs to cluster {short(headers.get(H_CLUSTER))}, not {cluster!r}; "
            "it was not applied",
            seq=seq,
        )
    schema = headers.get(H_SCHEMA)
    if schema not in SCHEMAS_READ:
        raise BadMessage(
            f"{what} has schema version {short(schema)}; this ctsd applies versions "
            f"{', '.join(SCHEMAS_READ)} only (upgrade it to match the host that wrote it); it "
            "was not applied",
            seq=seq,
        )
    if not msg_id or not host:
        raise BadMessage(
            f"{what} has no {H_MSG_ID} or {H_HOST} header; it was not applied", seq=seq
        )
    # Both are shown in every later message about this change (status, /health, logs).
    for header, value, valid in (
        (H_HOST, host, re.fullmatch(HOST_ID_PATTERN, host)),
        (H_MSG_ID, msg_id, _is_msg_id(msg_id) and msg_id.startswith(f"{host}:")),
    ):
        if not valid:
            raise BadMessage(
                f"{what} has {header} {short(value)}: not one ctsd writes; it was not applied",
                seq=seq,
            )
    base: int | None = None
    if H_BASE in headers:
        text = headers[H_BASE]
        base = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None
        if base is None or base >= seq:
            raise BadMessage(
                f"{what} has {H_BASE} {short(text)}: not a stream seq before its own; it was "
                "not applied",
                seq=seq,
            )
    founding = headers.get(H_FOUNDING)
    if founding is not None and not (seq == 1 and base is None and is_founding_name(founding)):
        raise BadMessage(
            f"{what} has {H_FOUNDING} {short(founding)}: only the stream's first message founds "
            "the cluster, naming a founding object; it was not applied",
            seq=seq,
        )
    encoding = headers.get(H_ENCODING)
    if encoding is not None and encoding != ENCODING_ZLIB:
        raise BadMessage(
            f"{what} has unknown encoding {short(encoding)}; it was not applied", seq=seq
        )
    return Change(
        seq=seq,
        host=host,
        msg_id=msg_id,
        payload=data,
        published_at=published_at,
        own=host == host_id,
        base=base,
        founding=founding,
        compressed=encoding == ENCODING_ZLIB,
        taken=_taken(headers.get(H_TAKEN)) if host == host_id else {},
    )


def _taken_text(taken: Mapping[str, str]) -> str:
    return json.dumps(dict(taken), ensure_ascii=True, separators=(",", ":"))


def _taken(text: str | None) -> dict[str, str]:
    """`H_TAKEN` as this host wrote it; anything else counts as none (it only spares a take-in
    that would happen anyway)."""
    if not text or len(text) > TAKEN_MAX_BYTES:
        return {}
    try:
        value = msgspec.json.decode(text, type=dict[str, str])
    except ValueError:  # (msgspec's errors, and a lone surrogate's UnicodeEncodeError)
        return {}
    return {f: t for f, t in value.items() if _TAG.fullmatch(t)}


async def inflated(change: Change) -> Change:
    """`change` with its payload inflated; raises BadMessage naming it."""
    if not change.compressed:
        return change
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(change.payload, INFLATE_ON_LOOP_BYTES)
        if inflater.eof:
            out = _inflate(inflater, b"", out)
        else:
            out = await asyncio.to_thread(_inflate, inflater, inflater.unconsumed_tail, out)
    except zlib.error as exc:
        raise BadMessage(
            f"message seq {change.seq} ({short(change.msg_id)}) does not inflate ({exc}); it "
            "was not applied",
            seq=change.seq,
        ) from None
    return dataclasses.replace(change, payload=out, compressed=False)


def _is_msg_id(msg_id: str) -> bool:
    """Short printable ASCII (`<host>:<local id>`, as `ClusterEngine.msg_id` makes it)."""
    return len(msg_id) <= 200 and msg_id.isascii() and msg_id.isprintable()


def is_founding_name(name: str) -> bool:
    """An object name a founding message may give (`founding-<host>-<local id>`)."""
    return (
        name.startswith(FOUNDING_PREFIX)
        and len(name) <= 200
        and name.isascii()
        and all(ch.isalnum() or ch in "-_." for ch in name)
    )


def inflate(data: bytes) -> bytes:
    """zlib-compressed bytes inflated, up to MAX_INFLATED; raises zlib.error."""
    return _inflate(zlib.decompressobj(), data, b"")


def _inflate(inflater: zlib._Decompress, data: bytes, out: bytes) -> bytes:
    """The rest of `inflater`'s stream: `data` its input left, `out` what it gave so far."""
    out += inflater.decompress(data, MAX_INFLATED - len(out))
    if not inflater.eof:
        raise zlib.error("truncated, or larger than the limit")
    # (what ctsd compresses ends with its stream; bytes after it may stay in the tail)
    if inflater.unused_data or inflater.unconsumed_tail:
        raise zlib.error("bytes after the compressed data")
    return out


def short(value: object, limit: int = 80) -> str:
    """A header value as shown in an error: quoted, and cut when long (it is foreign input)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
