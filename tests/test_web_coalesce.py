"""Replies to frames read together leave in one socket write, in order, and nothing the
protocol writes (a close frame) ever overtakes them."""

from __future__ import annotations

import asyncio
import json

import pytest

from ctsd.web.protocols import COALESCE_MAX_BYTES, CoalescingTransport
from tests.bus import bus, close_code
from tests.daemon import Daemon


class Recorder:
    """The transport under the wrapper: what reached the socket, one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def wrapped(backlog: list[int]) -> tuple[CoalescingTransport, Recorder, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    rec = Recorder()
    return CoalescingTransport(rec, loop, lambda: backlog[0]), rec, loop  # type: ignore[arg-type]


def test_nothing_read_ahead_writes_at_once() -> None:
    t, rec, loop = wrapped([0])
    t.write(b"a")
    t.write(b"b")
    assert rec.writes == [b"a", b"b"]
    loop.close()


def test_answers_to_frames_read_together_go_in_one_write_with_the_last() -> None:
    backlog = [3]
    t, rec, loop = wrapped(backlog)
    for reply in (b"1", b"2", b"3"):
        backlog[0] -= 1  # the app takes a frame, then answers it
        t.write(reply)
        if backlog[0]:
            assert rec.writes == []
    assert rec.writes == [b"123"]
    loop.close()


def test_at_the_latest_at_the_end_of_the_loop_turn() -> None:
    t, rec, loop = wrapped([5])
    t.write(b"x")
    t.write(b"y")
    assert rec.writes == []
    loop.run_until_complete(asyncio.sleep(0))
    assert rec.writes == [b"xy"]
    loop.close()


def test_a_big_backlog_goes_out_without_waiting() -> None:
    t, rec, loop = wrapped([5])
    t.write(b"x" * (COALESCE_MAX_BYTES + 1))
    assert len(rec.writes) == 1
    assert t.get_write_buffer_size() == 0
    loop.close()


def test_close_sends_what_waits_first_abort_drops_it() -> None:
    t, rec, loop = wrapped([5])
    t.write(b"reply")
    t.close()
    assert rec.writes == [b"reply"] and rec.closed
    t2, rec2, _ = wrapped([5])
    t2.write(b"never")
    t2.abort()
    loop.run_until_complete(asyncio.sleep(0))
    assert rec2.writes == [] and rec2.aborted
    assert t.get_extra_info("peername") == "info:peername"  # the rest is the transport's
    loop.close()


@pytest.mark.anyio
async def test_pipelined_replies_arrive_in_order_before_the_close(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        for i in range(1, 201):
            await b.ws.send(json.dumps({"id": i, "type": "ping"}))
        await b.ws.send(json.dumps({"id": 201, "type": "ping", "pad": "x" * (1024 * 1024 + 10)}))
        code, frames = await close_code(b.ws)
    assert [f["id"] for f in frames[:200]] == list(range(1, 201))
    assert all(f["success"] for f in frames[:200])
    assert frames[200]["error"]["code"] == "too_large" and len(frames) == 201
    assert code == 1009
