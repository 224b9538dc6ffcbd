"""The bus's per-connection sender at a cut (4008), against a transport that takes nothing:
the wire below is the websocket connection's interface (`Wire`), standing for a peer that
stopped reading; the outbox above it is the daemon's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ctsd.bus import outbox as outboxes
from ctsd.bus.outbox import CLOSE_LAGGING, Outbox, wire_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
async def _no_cut_left_waiting() -> AsyncIterator[None]:
    yield
    for task in list(outboxes._closing):  # (a settle that waits for good, below)
        task.cancel()


class StalledWire:
    """A connection whose peer reads nothing: every write is refused (its buffer is full)."""

    fast = None

    def __init__(self) -> None:
        self.open = True
        self.writable = asyncio.Event()  # never set: the peer reads nothing
        self.closed_with: tuple[int, str, list[bytes]] | None = None

    def write(self, framed: bytes) -> bool:
        return False

    def abort(self) -> None:
        self.open = False

    def close_behind(self, code: int, reason: str, before: list[bytes]) -> None:
        self.closed_with = (code, reason, before)
        self.open = False


async def _closed(wire: StalledWire) -> tuple[int, str, list[bytes]]:
    async with asyncio.timeout(5):
        while wire.closed_with is None:
            await asyncio.sleep(0.01)
    return wire.closed_with


def _asgi_close(_code: int, _reason: str) -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


async def test_a_cut_sends_the_replies_of_commands_still_under_way_before_the_close() -> None:
    """Queued events are dropped; the reply queued before the cut and the one of a change
    still under way at it go out ahead of the 4008 close, in order."""
    wire = StalledWire()
    out = Outbox(wire, _asgi_close, "peer")
    under_way: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def settle() -> None:
        await under_way

    out.settle = settle
    out.push(wire_of(b'{"type":"events"}'))
    out.push_reply(wire_of(b'{"id":1}'))
    out.cut()
    out.push(wire_of(b'{"type":"events","late":1}'))  # (an event after the cut: dropped)
    await asyncio.sleep(0.05)
    assert wire.closed_with is None  # waits for the change under way
    out.push_reply(wire_of(b'{"id":2}'))
    under_way.set_result(None)
    code, _reason, before = await _closed(wire)
    assert code == CLOSE_LAGGING
    assert before == [wire_of(b'{"id":1}'), wire_of(b'{"id":2}')]


async def test_a_cut_right_after_a_frame_was_queued_leaves_no_waiter_hanging() -> None:
    """The drain task made in the same step as the cut never ran (so never ran its own
    `finally`): `drained()` must not wait for it until the close."""
    wire = StalledWire()
    out = Outbox(wire, _asgi_close, "peer")
    out.settle = asyncio.Event().wait  # (under way for good: the close waits SETTLE_MAX_S)
    out.push(wire_of(b'{"type":"events"}'))  # queued: the drain task is made, not yet run
    out.cut()
    async with asyncio.timeout(1):
        await out.drained()


async def test_a_stop_while_a_cut_waits_sends_its_replies_with_the_stops_close() -> None:
    """The daemon stopping while a cut client's commands are under way: the replies queued
    for it go out ahead of the stop's close (1001), not dropped."""
    wire = StalledWire()
    out = Outbox(wire, _asgi_close, "peer")
    out.settle = asyncio.Event().wait
    out.push_reply(wire_of(b'{"id":1}'))
    out.cut()
    await out.close(1001, "daemon stopping")
    assert wire.closed_with == (1001, "daemon stopping", [wire_of(b'{"id":1}')])


async def test_a_cut_never_waits_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outboxes, "SETTLE_MAX_S", 0.1)
    wire = StalledWire()
    out = Outbox(wire, _asgi_close, "peer")
    out.settle = asyncio.Event().wait
    out.cut()
    code, _reason, before = await _closed(wire)
    assert (code, before) == (CLOSE_LAGGING, [])
