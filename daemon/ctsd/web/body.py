"""Request bodies: JSON only, at most 1 MiB (an import: 64 MiB), read before anything is
decoded.

Starlette's own body limit answers in plain text; every error of this API is JSON, and a body
that is too big closes the connection (the rest of it is never read).
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from starlette.requests import ClientDisconnect, Request

from ctsd.errors import CtsdError
from ctsd.limits import MAX_MESSAGE_DEPTH, require_depth

MAX_BODY_BYTES = 1024 * 1024
# An export imports back unchanged: its sync log alone (never imported, but sent) is most of
# 1 MiB at a few hundred connections. The data files it carries are read up to 16 MiB each.
MAX_IMPORT_BODY_BYTES = 64 * 1024 * 1024

_decoder = msgspec.json.Decoder()


class BodyTooLarge(CtsdError):
    def __init__(self, limit: int) -> None:
        super().__init__("too_large", f"request body over {limit} bytes")


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json"


def _decoded(raw: bytes) -> Any:
    """The body decoded, no deeper than a message may be (every route, not only those whose
    records check it: the limit the error names is the one kept)."""
    value = _decoder.decode(raw)
    require_depth(value, MAX_MESSAGE_DEPTH, code="invalid_format")
    return value


async def read_json(request: Request, required: bool, limit: int = MAX_BODY_BYTES) -> Any:
    """The decoded JSON body (at most `limit` bytes), or None when there is none and none is
    required."""
    length = request.headers.get("content-length")
    if length is not None:
        # (and of a sane length: Python refuses to read a number of over 4,300 digits)
        if not length.isdigit() or len(length) > 20:
            raise CtsdError("invalid_format", "Content-Length must be a number")
        if int(length) > limit:
            raise BodyTooLarge(limit)
    has_body = (length is not None and int(length) > 0) or "transfer-encoding" in request.headers
    if has_body and not _is_json(request.headers.get("content-type")):
        raise CtsdError(
            "unsupported_media_type", "request bodies are JSON: send Content-Type: application/json"
        )
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # Gone (or dropped at the body's deadline) before its body ended: nothing was done,
        # and no one reads the answer; not a fault of the daemon's.
        raise CtsdError("invalid_format", "the connection closed before the body ended") from None
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise CtsdError("invalid", "a JSON body is required", path="$")
        return None
    try:
        if len(raw) > MAX_BODY_BYTES:
            # An import of tens of megabytes takes a second to decode: the loop (the bus,
            # the watchdog's pings) goes on meanwhile.
            return await anyio.to_thread.run_sync(_decoded, raw)
        return _decoded(raw)
    except msgspec.DecodeError as e:
        raise CtsdError("invalid_format", f"body is not JSON: {e}", path="$") from None
    except RecursionError:
        raise CtsdError(
            "invalid_format", f"body JSON nested deeper than {MAX_MESSAGE_DEPTH} levels", path="$"
        ) from None
