"""The tests' bus client: the project's own (`ctsd.client.bus`), opened on a test daemon, plus
what a test looks at — every frame as it came, replies by id (several commands in flight),
events and notices in arrival order.

Frames are read only when a test waits for something (`result`, `events_until`, `wait_for`,
`recv`), in the order they came; a test that must see a frame or a close the client would
hide writes and reads `Bus.ws` itself (`close_code`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ctsd.client import Target, open_bus
from ctsd.client.bus import Bus as ClientBus
from tests.daemon import TOKEN, Daemon


class Bus:
    """`call` sends a command and returns its whole result frame (`ok`/`err` check it);
    pushed frames that arrive meanwhile wait in `frames` for `events_until`, and every event
    and notice is also kept in `events`, `event_frames` (one list per `events` frame) and
    `notices`; `raw` is every frame received, as text."""

    def __init__(self, client: ClientBus, sync: str | None) -> None:
        self.client = client
        self.ws: ClientConnection = client.ws
        assert client.transcript is not None
        self.raw: list[str | bytes] = client.transcript
        self.sync = sync
        self.frames: list[dict[str, Any]] = client.pushed
        self.results: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.event_frames: list[list[dict[str, Any]]] = []
        self.notices: list[dict[str, Any]] = []

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame, whatever it is (TimeoutError after `timeout` seconds; the server's
        close as websockets' ConnectionClosed, with its code, which the CLI's `recv` turns
        into a message)."""
        with anyio.fail_after(timeout):
            raw = await self.ws.recv()
        self.raw.append(raw)
        assert isinstance(raw, str), "the bus sends text frames"
        frame = json.loads(raw)
        if frame.get("type") == "events":
            self.events.extend(frame["events"])
            self.event_frames.append(frame["events"])
        elif frame.get("type") == "notice":
            self.notices.append(frame)
        return frame

    async def _take_one(self, timeout: float) -> None:
        frame = await self.recv(timeout)
        if frame.get("type") == "result" and frame.get("id") is not None:
            self.results[frame["id"]] = frame
        else:
            self.frames.append(frame)

    async def send(self, type_: str, **args: Any) -> int:
        """Send a command; return its id. A change asks to be answered once it is in the data
        files (as the CLI does), so a test can read them next, unless the bus was opened with
        `sync=None` or the call passes `sync=None` (the journal's answer). Arguments that are
        None are left out."""
        sync = args.pop("sync", self.sync)
        frame = self.client.command(
            type_, sync=sync, **{k: v for k, v in args.items() if v is not None}
        )
        await self.client.send(frame)
        return frame["id"]

    async def result(self, msg_id: int, timeout: float = 10.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while msg_id not in self.results:
                await self._take_one(timeout)
        return self.results.pop(msg_id)

    async def call(self, type_: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        return await self.result(await self.send(type_, **args), timeout)

    async def ok(self, type_: str, **args: Any) -> Any:
        reply = await self.call(type_, **args)
        assert reply["success"] is True, reply
        return reply["result"]

    async def err(self, type_: str, **args: Any) -> dict[str, Any]:
        reply = await self.call(type_, **args)
        assert reply["success"] is False, reply
        assert set(reply) == {"id", "type", "success", "error"}, reply
        return reply["error"]

    async def events_until(self, revision: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every event not yet taken (kept frames first) until one with id >= revision."""
        out: list[dict[str, Any]] = []
        with anyio.fail_after(timeout):
            while True:
                while self.frames:
                    frame = self.frames.pop(0)
                    if frame["type"] == "events":
                        out.extend(frame["events"])
                if out and out[-1]["id"] >= revision:
                    return out
                await self._take_one(timeout)

    async def wait_event(self, action: str, cid: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event (received so far or next) of `action` on connection `cid`."""

        def found() -> dict[str, Any] | None:
            return next(
                (e for e in self.events if e["action"] == action and e["connection_id"] == cid),
                None,
            )

        return await self.wait_for(found, timeout, what=f"a {action} event for {cid}")

    async def wait_for(self, cond: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
        """Read frames until `cond()` is truthy (it looks at `events`, `notices`, ...)."""
        try:
            with anyio.fail_after(timeout):
                while not (value := cond()):
                    await self._take_one(timeout)
                return value
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


@asynccontextmanager
async def bus(
    d: Daemon,
    *,
    header: bool = True,
    token: str | None = None,
    sync: str | None = "files",
    **ws_options: Any,
) -> AsyncIterator[Bus]:
    """A bus connection to `d` with its token (or `token`), on the upgrade request or, with
    `header=False`, in an `auth` message; `ws_options` go to websockets' `connect`."""
    transcript: list[str | bytes] = []
    target = Target("127.0.0.1", d.port, d.data_dir)
    async with open_bus(
        target,
        token=token or d.token or TOKEN,
        auth_header=header,
        source=None,
        transcript=transcript,
        **{"max_size": None, **ws_options},
    ) as client:
        hello = [json.loads(raw) for raw in transcript]
        if not header:
            assert hello.pop(0) == {"type": "auth_required", "version": 1}, transcript
        assert [h["type"] for h in hello] == ["auth_ok"], transcript
        yield Bus(client, sync)


async def close_code(
    ws: ClientConnection, timeout: float = 10.0
) -> tuple[int | None, list[dict[str, Any]]]:
    """Read until the server closes; (close code, frames read meanwhile)."""
    frames = []
    with anyio.fail_after(timeout):
        try:
            while True:
                frames.append(json.loads(await ws.recv()))
        except ConnectionClosed as e:
            return (e.rcvd.code if e.rcvd else None), frames
