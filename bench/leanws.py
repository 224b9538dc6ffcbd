"""A lean websocket client for load generation: request/reply over one connection.

The benches share two cores with what they measure. The websockets library's client parses
every frame through its general protocol machinery, so the load generator itself takes a
share of the cores that the daemons then lack (bench/cluster.py prints how much).
This client does only what a request/reply load needs: the opening handshake, requests sent
as text frames with a zero mask key (masking by zeros leaves the payload as it is; RFC 6455
requires a mask, not a random one from a load generator), and unmasked server frames cut by
hand. Pings are answered; anything else the server sends (events, notices) is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from urllib.parse import urlsplit

import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame with mask key 0000."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class LeanClient(asyncio.Protocol):
    """One bus connection; `call` sends a command and waits for its result frame."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._opened = asyncio.get_running_loop().create_future()
        self._handshake_done = False
        self._waiting: dict[int, asyncio.Future[dict]] = {}
        self._frames: asyncio.Queue[dict] = asyncio.Queue()  # frames nobody waits for
        self.id = 0

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> LeanClient:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {parts.path or '/'} HTTP/1.1",
            f"Host: {parts.hostname}:{parts.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        assert client.transport is not None
        client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await client._opened
        return client

    async def next_frame(self) -> dict:
        """The next frame that answered no `call` (the first is `auth_ok`)."""
        return await self._frames.get()

    async def call(self, type_: str, **args: object) -> dict:
        """The result frame of one command (`success` true or false)."""
        self.id += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[self.id] = fut
        assert self.transport is not None
        self.transport.write(client_frame(0x1, _encode({"id": self.id, "type": type_, **args})))
        return await fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's too)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._handshake_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status:
                if not self._opened.done():
                    self._opened.set_exception(ConnectionError(status.decode(errors="replace")))
                buf.clear()
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self._handshake_done = True
            self._opened.set_result(None)
        while len(buf) >= 2:
            if not buf[0] & 0x80:
                raise ValueError("a fragmented frame: the daemon sends whole frames")
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                (n,), at = struct.unpack_from("!H", buf, 2), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                (n,), at = struct.unpack_from("!Q", buf, 2), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            if opcode == 0x1:
                self._text(_decode(payload))
            elif opcode == 0x9:  # ping
                assert self.transport is not None
                self.transport.write(client_frame(0xA, payload))

    def _text(self, frame: dict) -> None:
        fut = self._waiting.pop(frame.get("id"), None) if frame.get("type") == "result" else None
        if fut is not None:
            fut.set_result(frame)
        elif frame.get("type") not in ("event", "notice"):
            self._frames.put_nowait(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError(f"connection lost: {exc}")
        if not self._opened.done():
            self._opened.set_exception(err)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()
