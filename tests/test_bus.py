"""The bus against the real daemon process, with real websockets clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ctsd.bus import fanout
from ctsd.bus.fanout import PROGRESS_S, PROGRESS_SLACK_S, progress_wait
from ctsd.bus.outbox import CLOSE_TIMEOUT_S
from ctsd.files import CONNECTIONS, SYNC_LOG
from tests.bus import bus, close_code
from tests.daemon import TOKEN, Daemon, wait_until, wait_until_async
from tests.datadir import CANARY, connection, write_settings
from tests.exchange import FakeExchange

pytestmark = pytest.mark.anyio


@pytest.fixture
def fast_daemon(data_dir: Path) -> Iterator[Daemon]:
    """A daemon whose rate limit does not get in the way of 1,000-change tests."""
    write_settings(data_dir, {"server": {"rate_limit": {"requests": 100000, "window_s": 1}}})
    d = Daemon(data_dir).start()
    try:
        yield d
    finally:
        d.close()


# --- auth ----------------------------------------------------------------------------------


async def test_auth_header(daemon: Daemon) -> None:
    async with connect(
        daemon.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        first = json.loads(await ws.recv())
        assert first == {"type": "auth_ok", "version": 1, "revision": 0}
        assert ws.response is not None and ws.response.headers["X-Revision"] == "0"


async def test_auth_message(daemon: Daemon) -> None:
    async with bus(daemon, header=False) as b:
        assert (await b.ok("ping"))["pong"] is True


async def test_the_token_as_read_from_its_file_is_taken(daemon: Daemon) -> None:
    """`fs.readFileSync(".token", "utf8")` keeps the file's newline: HTTP's header took it
    (trimmed), the bus's auth frame did not."""
    async with connect(daemon.ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_required"
        await ws.send(json.dumps({"type": "auth", "token": TOKEN + "\n"}))
        assert json.loads(await ws.recv())["type"] == "auth_ok"


async def test_auth_invalid_token_message(daemon: Daemon) -> None:
    async with connect(daemon.ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_required"
        await ws.send(json.dumps({"type": "auth", "token": "wrong"}))
        msg = json.loads(await ws.recv())
        assert msg["type"] == "auth_invalid" and msg["message"]
        assert await close_code(ws) == (1008, [])


async def test_an_authorization_of_another_scheme_leaves_auth_to_the_first_frame(
    daemon: Daemon,
) -> None:
    """A proxy's Basic login presents no bearer token: the client still authenticates with
    its `auth` frame."""
    basic = {"Authorization": "Basic dXNlcjpwdw=="}
    async with connect(daemon.ws_url, additional_headers=basic) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_required"
        await ws.send(json.dumps({"type": "auth", "token": TOKEN}))
        assert json.loads(await ws.recv())["type"] == "auth_ok"


async def test_auth_invalid_header(daemon: Daemon) -> None:
    async with connect(daemon.ws_url, additional_headers={"Authorization": "Bearer nope"}) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_invalid"
        assert await close_code(ws) == (1008, [])


async def test_auth_first_message_must_be_auth(daemon: Daemon) -> None:
    async with connect(daemon.ws_url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"id": 1, "type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "auth_invalid"
        assert await close_code(ws) == (1008, [])


async def test_an_auth_frame_over_the_limit_is_too_large_not_a_wrong_token(daemon: Daemon) -> None:
    """The frame limit holds before auth too, with its own answer and close code (1009 says
    "send smaller frames"; 1008 would say "fix the token")."""
    async with connect(daemon.ws_url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth", "token": "x" * (1024 * 1024 + 10)}))
        code, frames = await close_code(ws)
        assert code == 1009 and len(frames) == 1, (code, frames)
        assert frames[0]["success"] is False and frames[0]["error"]["code"] == "too_large"


async def test_auth_timeout_10s(daemon: Daemon) -> None:
    async with connect(daemon.ws_url) as ws:
        t0 = time.monotonic()
        assert json.loads(await ws.recv())["type"] == "auth_required"
        with anyio.fail_after(15):
            msg = json.loads(await ws.recv())
        waited = time.monotonic() - t0
        assert msg["type"] == "auth_invalid"
        assert 9.0 <= waited <= 13.0, waited
        assert await close_code(ws) == (1008, [])


async def _auth_message(d: Daemon, token: str) -> dict[str, Any]:
    """The server's answer to an `auth` message carrying `token`."""
    async with connect(d.ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_required"
        await ws.send(json.dumps({"type": "auth", "token": token}))
        return json.loads(await ws.recv())


async def test_failed_auth_never_locks_out_a_right_token(daemon: Daemon) -> None:
    # Every local client shares 127.0.0.1: wrong tokens from one process, however many and
    # wherever presented (HTTP header, bus header, auth message), never make another client's
    # right token be refused. They are answered and logged in summary.
    for _ in range(15):
        assert daemon.http("/api/connections/state", token="wrong")[0] == 401
    for _ in range(5):
        async with connect(daemon.ws_url, additional_headers={"Authorization": "Bearer x"}) as ws:
            assert json.loads(await ws.recv())["type"] == "auth_invalid"
    for _ in range(5):
        assert (await _auth_message(daemon, "wrong"))["type"] == "auth_invalid"
    assert daemon.http("/api/connections/state")[0] == 200
    right = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(daemon.ws_url, additional_headers=right) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_ok"
    assert (await _auth_message(daemon, TOKEN))["type"] == "auth_ok"
    # logged in summary: the first failure of the address at once, then a line a minute
    lines = [e for e in daemon.log_events() if e.get("event") == "auth_failed"]
    assert 1 <= len(lines) <= 3 and lines[0]["remote"] == "127.0.0.1"
    assert (lines[0]["where"], lines[0]["reason"]) == ("http", "invalid token"), lines[0]
    assert "wrong" not in json.dumps(lines)
    # (each refusal on the bus also logged a line of its own: `auth_invalid`, 10 here)
    assert not [e for e in daemon.log_events() if e.get("event") == "auth_invalid"]


async def test_token_less_attempts_are_answered_and_lock_out_nobody(daemon: Daemon) -> None:
    # Any web page can make the trader's browser send token-less requests (an <img> to
    # /api/...): they are refused, and nothing about them slows anybody else.
    for _ in range(12):
        assert daemon.http("/api/connections/state", token=None)[0] == 401
    for _ in range(12):
        async with connect(daemon.ws_url) as ws:
            assert json.loads(await ws.recv())["type"] == "auth_required"
            await ws.send(json.dumps({"id": 1, "type": "ping"}))  # not an auth message
            assert json.loads(await ws.recv())["type"] == "auth_invalid"
    assert daemon.http("/api/connections/state")[0] == 200
    async with bus(daemon) as b:
        assert (await b.ok("ping"))["pong"] is True
    events = [e.get("event") for e in daemon.log_events()]
    assert "auth_invalid" not in events and 1 <= events.count("auth_failed") <= 3, events


async def test_foreign_origin_refused_before_upgrade(daemon: Daemon) -> None:
    with pytest.raises(InvalidStatus) as e:
        async with connect(daemon.ws_url, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert e.value.response.status_code == 403
    assert json.loads(e.value.response.body)["error"]["code"] == "forbidden"
    # listed origin: fine
    async with connect(
        daemon.ws_url,
        origin="http://localhost:5173",  # type: ignore[arg-type]
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_ok"


# --- envelope errors -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "connections.update"])
async def test_oversized_frame_refused_and_closed_1009(daemon: Daemon, kind: str) -> None:
    async with bus(daemon) as b:
        big = json.dumps({"id": 1, "type": kind, "pad": "x" * (1024 * 1024 + 10)})
        await b.ws.send(big)
        reply = await b.recv()
        assert reply["success"] is False and reply["error"]["code"] == "too_large"
        code, _ = await close_code(b.ws)
        assert code == 1009


async def test_oversized_frame_answered_behind_a_backlog(daemon: Daemon) -> None:
    """A subscriber whose events back up (it reads slowly) still gets the `too_large` answer,
    after the events queued ahead of it, then the close 1009."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    async with bus(daemon, sync=None, max_queue=1, sock=sock) as slow:
        await slow.ok("subscribe")
        wide = json.dumps({"note": "x" * 60_000})  # ~60 KB events: past the socket's buffers
        async with bus(daemon, sync=None) as w:
            for i in range(85):
                await w.ok(
                    "connections.create",
                    connection=connection(id=f"w{i}", connection_settings=wide),
                )
        await slow.ws.send(json.dumps({"id": 7, "type": "ping", "pad": "x" * (1024 * 1024 + 10)}))
        code, frames = await close_code(slow.ws)
    assert code == 1009
    created = [e["connection_id"] for f in frames if f.get("type") == "events" for e in f["events"]]
    assert created[-1] == "w84", created[-3:]  # every event queued ahead of it went out
    assert frames[-1]["success"] is False and frames[-1]["error"]["code"] == "too_large"


async def test_frame_over_hard_cap_closed_1009_unread(daemon: Daemon) -> None:
    """Over 2 MiB the websocket protocol refuses the frame from its header, unread: the client
    is still told `too_large`, then closed 1009. (The header alone is sent: a client still
    sending 3 MiB when the daemon closes would get a reset, which may drop what it was sent.)"""
    async with bus(daemon) as b:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, 3 * 1024 * 1024) + b"mask"
        b.ws.transport.write(header + b"{")  # a text frame of 3 MiB announced, masked
        code, frames = await close_code(b.ws)
    assert code == 1009 and len(frames) == 1, (code, frames)
    assert frames[0]["success"] is False and frames[0]["error"]["code"] == "too_large"


async def test_frame_just_under_limit_is_read(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        err = await b.err("ping", pad="x" * (1024 * 1024 - 100))
        assert err["code"] == "invalid" and err["path"] == "$.pad"  # unknown, not too_large


async def test_malformed_json_and_envelope(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ws.send("{not json")
        reply = await b.recv()
        assert reply["type"] == "result" and reply["id"] is None
        assert reply["error"]["code"] == "invalid_format"
        await b.ws.send("[1, 2]")
        assert (await b.recv())["error"]["code"] == "invalid_format"
        await b.ws.send(json.dumps({"type": "ping"}))
        reply = await b.recv()
        assert reply["error"] == {
            "code": "invalid_format",
            "message": "`id` must be an integer",
            "path": "$.id",
        }
        for kind in ("ping", "connections.delete"):  # (a change is taken as it is read)
            await b.ws.send(json.dumps({"id": 2**60, "type": kind, "connection_id": "x"}))
            reply = await b.recv()
            assert reply["error"]["code"] == "invalid_format", reply
            assert reply["error"]["path"] == "$.id", reply
        for i, typ in enumerate(({}, {"type": None}, {"type": ["ping"]}), -3):  # (ids < 1)
            await b.ws.send(json.dumps({"id": i, **typ}))
            reply = await b.recv()
            assert reply["id"] == i and reply["error"]["path"] == "$.type", reply
            assert reply["error"]["code"] == "invalid_format", reply
        # JSON with a number out of range: answered with its id
        await b.ws.send('{"id": 7, "type": "connections.update", "fields": {"x": 1e999}}')
        reply = await b.recv()
        assert reply["id"] == 7 and reply["error"]["code"] == "invalid_format"
        assert "out of range" in reply["error"]["message"]
        # the connection is still usable
        assert (await b.ok("ping"))["pong"] is True


async def test_unknown_command(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        err = await b.err("connections.explode")
        assert err["code"] == "unknown_command" and err["path"] == "$.type"


async def test_id_reuse(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ws.send(json.dumps({"id": 5, "type": "ping"}))
        assert (await b.recv())["success"] is True
        for again in (5, 3):
            await b.ws.send(json.dumps({"id": again, "type": "ping"}))
            reply = await b.recv()
            assert reply["id"] == again and reply["error"]["code"] == "id_reuse"
        await b.ws.send(json.dumps({"id": 6, "type": "ping"}))
        assert (await b.recv())["success"] is True
        # A change is held to the same rule (it may be taken as soon as it is read).
        change = {"type": "connections.update", "connection_id": "nope", "changes": {}}
        await b.ws.send(json.dumps({"id": 6, **change}))
        assert (await b.recv())["error"]["code"] == "id_reuse"
        await b.ws.send(json.dumps({"id": 7, **change}))
        reply = await b.recv()
        assert reply["id"] == 7 and reply["error"]["code"] == "not_found"


async def test_a_change_frame_with_non_ascii_text_is_taken(daemon: Daemon) -> None:
    async with bus(daemon, sync=None) as b:
        await b.ok("connections.create", connection=connection(id="u1"))
        await b.ws.send(
            json.dumps(
                {
                    "id": 10**6,
                    "type": "connections.update",
                    "connection_id": "u1",
                    "changes": {"name": "Café ☕ 取引"},
                },
                ensure_ascii=False,
            )
        )
        reply = await b.recv()
        assert reply["success"] is True and reply["result"]["name"] == "Café ☕ 取引"


async def test_invalid_arguments_name_the_path(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        # a missing or unknown argument: the path names it; a near miss gets a did-you-mean
        err = await b.err("connections.get")
        assert err == {
            "code": "invalid",
            "message": "missing required field `connection_id`",
            "path": "$.connection_id",
        }
        err = await b.err("connections.get", connection_idd="x", connection_id="x")
        assert err == {
            "code": "invalid",
            "message": "unknown field `connection_idd`; did you mean `connection_id`?",
            "path": "$.connection_idd",
        }
        err = await b.err("connections.create", connection={"name": "n", "exchang": "bybit"})
        assert (
            err["path"] == "$.connection.exchang" and "did you mean `exchange`?" in err["message"]
        )
        await b.ok("connections.create", connection=connection(id="bu"))
        err = await b.err("connections.batch_update", updates=[{"id": "bu", "nmae": "y"}])
        assert err["path"] == "$.updates[0].nmae" and "did you mean `name`?" in err["message"]
        err = await b.err("connections.get", connection_id=5)
        assert err == {
            "code": "invalid",
            "message": "Expected `str`, got `int`",
            "path": "$.connection_id",
        }
        err = await b.err("subscribe", topics=["connections", "weather"])
        assert err["code"] == "invalid" and err["path"] == "$.topics[1]"
        err = await b.err("subscribe", since=5)  # revision is 0: not from this daemon
        assert err["code"] == "invalid" and err["path"] == "$.since"
        err = await b.err("subscribe", topics=[])
        assert err["code"] == "invalid" and err["path"] == "$.topics"
        # `source` is "bus" or "cli": a client cannot pass its change off as a hand edit.
        err = await b.err("connections.create", connection=connection(), source="file")
        assert err["code"] == "invalid" and err["path"] == "$.source"


async def test_source_attribution(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ok("connections.create", connection=connection(id="s1"))
        await b.ok("connections.update", connection_id="s1", changes={"name": "x"}, source="cli")
        log = await b.ok("sync_log.get")
        assert [e["data"]["source"] for e in log if e["connection_id"] == "s1"] == ["bus", "cli"]


# --- commands ----------------------------------------------------------------------------


async def test_a_test_asked_for_by_a_client_that_left_is_cancelled(daemon: Daemon) -> None:
    """An exchange test is cut when its bus connection ends: nobody waits for its answer,
    and a client that asks for many and leaves must not queue them ahead of everyone."""
    fake = FakeExchange(slow_s=1.0)
    try:
        async with bus(daemon) as b:
            for cid, mode in (("slow", "slow"), ("quick", "ok")):
                cs = json.dumps({"base_url": fake.base(mode)})
                await b.ok(
                    "connections.create", connection=connection(id=cid, connection_settings=cs)
                )
        async with bus(daemon) as b:
            await b.send("connections.test", connection_id="slow")
            await wait_until_async(lambda: fake.in_flight == 1, 5, what="the slow test under way")
        wait_until(lambda: fake.in_flight == 0, what="the exchange answered the slow test")
        async with bus(daemon) as b:
            # Had the slow test gone on, its answer (sent first) was recorded first.
            assert (await b.ok("connections.test", connection_id="quick"))["success"] is True
            tested = [
                e["connection_id"] for e in await b.ok("sync_log.get") if e["action"] == "test"
            ]
        assert tested == ["quick"], tested
    finally:
        fake.close()


async def test_connection_commands(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        c = await b.ok("connections.create", connection=connection(id="c1", api_key="k" * 20))
        assert c["id"] == "c1" and c["api_key"] == "…kkkk" and c["api_secret"] is None
        assert c["created_at"].endswith("Z")
        gen = await b.ok("connections.create", connection=connection(name="two", exchange="okx"))
        assert gen["id"].startswith("conn_") and len(gen["id"]) == 17

        err = await b.err("connections.create", connection=connection(id="c1"))
        assert err["code"] == "conflict" and err["path"] == "$.connection.id"
        err = await b.err("connections.create", connection=connection(is_enabeld=True))
        assert err["code"] == "invalid" and "is_enabled" in err["message"]
        err = await b.err("connections.create", connection=connection(api_secret="********"))
        assert err["code"] == "invalid" and err["path"] == "$.connection.api_secret"

        assert (await b.ok("connections.get", connection_id="c1"))["name"] == "one"
        err = await b.err("connections.get", connection_id="nope")
        assert err["code"] == "not_found" and err["path"] == "$.connection_id"

        assert [x["id"] for x in await b.ok("connections.list")] == ["c1", gen["id"]]
        assert [x["id"] for x in await b.ok("connections.list", exchange="okx")] == [gen["id"]]
        assert await b.ok("connections.list", active=True) == []

        upd = await b.ok("connections.update", connection_id="c1", changes={"volume_factor": 2.5})
        assert upd["volume_factor"] == 2.5
        err = await b.err("connections.update", connection_id="c1", changes={"volume_factor": -1})
        assert err["code"] == "invalid" and err["path"] == "$.changes.volume_factor"
        err = await b.err("connections.update", connection_id="zz", changes={"name": "x"})
        assert err["code"] == "not_found"
        err = await b.err("connections.update", connection_id="c1", changes={"id": "c9"})
        assert err["code"] == "invalid" and err["path"] == "$.changes.id"

        act = await b.ok("connections.set_active", connection_id="c1", active=True)
        assert act["is_active"] is True
        assert [x["id"] for x in await b.ok("connections.list", active=True)] == ["c1"]
        err = await b.err("connections.set_active", connection_id="c1", active="yes")
        assert err["code"] == "invalid" and err["path"] == "$.active"

        await b.ok("connections.set_volume", connection_id="c1", live=3.0)
        snap = await b.ok("snapshot")
        st = {s["connection_id"]: s for s in snap["state"]}["c1"]
        assert st["volume_factor_live"] == 3.0 and st["status"] == "active"
        err = await b.err("connections.set_volume", connection_id="c1", live=0)
        assert err["code"] == "invalid" and err["path"] == "$.live"
        err = await b.err("connections.set_volume", connection_id="c1")
        assert err["code"] == "invalid"

        assert await b.ok("connections.delete", connection_id=gen["id"]) == {"deleted": gen["id"]}
        err = await b.err("connections.delete", connection_id=gen["id"])
        assert err["code"] == "not_found"
        assert snap["revision"] >= 4
        assert set(snap) == {"revision", "connections", "state", "documents"}


async def test_pipelined_changes_answer_in_order_then_a_read_sees_them(daemon: Daemon) -> None:
    """A client may pipeline changes, answered once journalled: each gets its own answer, in
    the order sent, a refused one its error among them, past the cap of changes in flight
    too; a read sent after them is answered after them and sees them all."""
    async with bus(daemon, sync=None) as b:
        await b.ok("connections.create", connection=connection(id="c1"))
        sent = []
        for i in range(300):
            cid = "nope" if i == 150 else "c1"
            changes = {"volume_factor": i + 1}
            sent.append(await b.send("connections.update", connection_id=cid, changes=changes))
        read = await b.send("connections.get", connection_id="c1")
        frames = [await b.recv() for _ in range(301)]
    assert [f["id"] for f in frames] == [*sent, read]
    assert [f["success"] for f in frames[:300]] == [i != 150 for i in range(300)]
    assert frames[150]["error"]["code"] == "not_found"
    assert frames[299]["result"]["volume_factor"] == 300
    assert frames[300]["result"]["volume_factor"] == 300


async def test_changes_read_ahead_never_overtake_a_read_sent_before_them(
    daemon: Daemon,
) -> None:
    """Changes pipelined around reads: a change the daemon reads while an earlier read still
    waits (here for a change answered once in the files) is taken after that read, so each
    read sees exactly the changes sent before it, and every frame is answered in the order
    sent."""
    async with bus(daemon, sync=None) as b:
        await b.ok("connections.create", connection=connection(id="c1"))
        sent, reads = [], []
        for round_ in range(4):
            for i in range(50):
                changes = {"volume_factor": round_ * 50 + i + 1}
                sync = "files" if i == 49 else None
                sent.append(
                    await b.send(
                        "connections.update", connection_id="c1", changes=changes, sync=sync
                    )
                )
            reads.append(await b.send("connections.get", connection_id="c1"))
            sent.append(reads[-1])
            # The next changes then come in a read of their own, while the daemon still
            # holds the read back for the change that waits for the files.
            await anyio.sleep(0.002)
        frames = [await b.recv() for _ in range(len(sent))]
    assert [f["id"] for f in frames] == sent
    by_id = {f["id"]: f for f in frames}
    assert [by_id[r]["result"]["volume_factor"] for r in reads] == [50, 100, 150, 200]


@pytest.mark.parametrize("sync", [None, "files"])
async def test_a_client_pipelining_without_reading_is_paced_not_dropped(
    fast_daemon: Daemon, sync: str | None
) -> None:
    """A client that sends change after change and reads none of the answers for a while
    (more than its outbox may hold): the daemon stops reading its frames until it reads
    again; it is not dropped as a subscriber that fell behind would be."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", fast_daemon.port))
    sock.setblocking(False)
    n = 8000  # ~5 MB of answers: past the socket's buffers and the outbox's 1,000 frames
    async with bus(fast_daemon, sync=sync, max_queue=1, sock=sock) as b, bus(fast_daemon) as w:
        await b.ok("connections.create", connection=connection(id="c1"))
        sent: list[int] = []

        async def send_all() -> None:
            for i in range(n):
                changes = {"volume_factor": i + 1, "name": "x" * 200}
                sent.append(await b.send("connections.update", connection_id="c1", changes=changes))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            # The daemon stops taking changes from it (the revision stands still for a while)
            # long before all are sent: its unread answers hold it up.
            seen: list[int] = []
            with anyio.fail_after(30):
                while len(seen) < 5 or seen[-1] != seen[-5]:
                    seen.append((await w.ok("ping"))["revision"])
                    await anyio.sleep(0.1)
            assert seen[-1] < n
            answers = [await b.recv() for _ in range(n)]
    ids = [a["id"] for a in answers]
    # Answers to `sync: files` come as their files land, several rounds' at once: any order.
    assert (ids if sync is None else sorted(ids)) == sent
    assert all(a["success"] for a in answers)


async def test_large_changes_pipelined_without_reading_are_paced_one_at_a_time(
    daemon: Daemon,
) -> None:
    """Each `documents.set` of ~0.5 MB is answered with the document (as large): a client
    sending them without reading must not make the daemon hold its answers without bound.
    A large change waits until every change before it is answered and sent."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    n = 30  # ~15 MB of answers, against 8 MiB a lagging subscriber may have waiting
    async with bus(daemon, max_queue=1, sock=sock) as b, bus(daemon) as w:
        start = (await w.ok("ping"))["revision"]
        sent: list[int] = []

        async def send_all() -> None:
            for i in range(n):
                doc = {"i": i, "blob": "d" * 500_000}
                sent.append(await b.send("documents.set", name="ui-config", content=doc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            seen: list[int] = []
            with anyio.fail_after(30):  # the revision stands still: b's answers hold it up
                while len(seen) < 5 or seen[-1] != seen[-5]:
                    seen.append((await w.ok("ping"))["revision"])
                    await anyio.sleep(0.1)
            assert seen[-1] - start < n
            answers = [await b.recv() for _ in range(n)]
    assert [a["id"] for a in answers] == sent and all(a["success"] for a in answers)


async def test_large_replies_asked_back_to_back_never_drop_the_client(daemon: Daemon) -> None:
    """Two snapshots of about 9 MB asked for without reading: the second waits behind the
    first, past the 8 MiB a subscriber that falls behind may have waiting; it is a reply,
    paced by the client's own reading, and never drops the client with 4008."""
    async with bus(daemon) as w:
        for i in range(10):
            doc = {"name": f"big{i}", "blob": "b" * 900_000}
            await w.ok("documents.set", name=f"algorithms/big{i}", content=doc)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    async with bus(daemon, max_queue=1, sock=sock) as b:
        await b.ok("subscribe", topics=["documents"])
        ids = [await b.send("snapshot"), await b.send("snapshot")]
        async with bus(daemon) as w:  # an event for b while both wait
            await w.ok("documents.set", name="ui-config", content={"theme": "dark"})
        got = [await b.recv() for _ in range(3)]
        replies = [m for m in got if "success" in m]
        assert [r["id"] for r in replies] == ids and all(r["success"] for r in replies)
        assert len(replies[1]["result"]["documents"]) >= 10
        assert (await b.ok("ping"))["pong"] is True


async def test_batch_update_all_or_nothing_one_frame(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        for i in range(3):
            await b.ok("connections.create", connection=connection(name=f"n{i}", id=f"b{i}"))
        await b.ok("subscribe")
        rev = (await b.ok("ping"))["revision"]
        err = await b.err(
            "connections.batch_update",
            updates=[{"id": "b0", "name": "x"}, {"id": "b1", "volume_factor": 0}],
        )
        assert err["code"] == "invalid" and err["path"] == "$.updates[1].volume_factor"
        assert (await b.ok("connections.get", connection_id="b0"))["name"] == "n0"
        err = await b.err("connections.batch_update", updates=[{"id": "nope", "name": "x"}])
        assert err["code"] == "not_found" and err["path"] == "$.updates[0].id"
        out = await b.ok(
            "connections.batch_update",
            updates=[{"id": f"b{i}", "name": f"m{i}"} for i in range(3)],
        )
        assert [c["name"] for c in out] == ["m0", "m1", "m2"]
        events = await b.events_until(rev + 3)
        assert [e["id"] for e in events] == [rev + 1, rev + 2, rev + 3]
        frames = [json.loads(r) for r in b.raw if '"type":"events"' in r]
        assert len(frames[-1]["events"]) == 3, "one change = one events frame"
        assert all(e["data"]["source"] == "bus" for e in events)


async def test_documents_commands(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        names = await b.ok("documents.list")
        assert "settings" in names and "connection" in names and "watchlists" in names
        conn_doc = await b.ok("documents.get", name="connection")
        assert "projectX" in conn_doc
        err = await b.err("documents.get", name="nope")
        assert err["code"] == "not_found" and err["path"] == "$.name"
        content = {"lists": [{"name": "majors", "symbols": ["BTC"]}]}
        assert await b.ok("documents.set", name="watchlists", content=content) == content
        assert await b.ok("documents.get", name="watchlists") == content
        err = await b.err("documents.set", name="settings", content={"sync_log_limit": "many"})
        assert err["code"] == "invalid" and err["path"] == "$.content.sync_log_limit"
        err = await b.err("documents.set", name="nope", content={})
        assert err["code"] == "not_found"
        algo = {"name": "trend", "params": {"fast": 5}}
        await b.ok("documents.set", name="algorithms/trend", content=algo)
        assert "algorithms/trend" in await b.ok("documents.list")
        inst = {"instances": [{"id": "i1", "name": "x", "symbol": "ES", "algorithmName": "nope"}]}
        err = await b.err("documents.set", name="instances", content=inst)
        assert err["code"] == "invalid" and "algorithmName" in err["message"]
    on_disk = json.loads((daemon.data_dir / "watchlists.json").read_text())
    assert on_disk == content


async def test_sync_log_get_status_export(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        for i in range(5):
            await b.ok("connections.create", connection=connection(name=f"n{i}", id=f"s{i}"))
        log = await b.ok("sync_log.get", since=2)
        assert [e["id"] for e in log] == [3, 4, 5]
        assert [e["id"] for e in await b.ok("sync_log.get", since=0, limit=2)] == [1, 2]
        assert log[0]["action"] == "create" and log[0]["connection_id"] == "s2"
        st = await b.ok("status")
        assert st["revision"] == 5 and st["counts"]["connections"] == 5
        assert st["bus"]["clients"] == 1
        exp = await b.ok("data.export")
        assert exp["version"] == 1 and exp["revision"] == 5 and exp["exported_at"].endswith("Z")
        assert len(exp["files"]["connections.json"]) == 5
        assert "settings.json" in exp["files"] and "connection.json" in exp["files"]
        err = await b.err("sync_log.get", since=-1)
        assert err["code"] == "invalid" and err["path"] == "$.since"
        # A `since` ahead of the revision (another data dir's): refused, not answered with
        # nothing (a poller would skip what comes until the revision passes it).
        assert await b.ok("sync_log.get", since=5) == []
        err = await b.err("sync_log.get", since=6)
        assert err["code"] == "invalid" and "ahead of the current revision 5" in err["message"]
        code, body = daemon.http("/api/sync-log?since=6")
        assert code == 400 and body["error"]["code"] == "invalid", body


async def test_import_and_reset(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ok("connections.create", connection=connection(id="keep", api_secret=CANARY))
        exp = await b.ok("data.export")
        # an export imports back unchanged: its masked secrets keep the stored ones
        assert (await b.ok("data.import", data=exp, mode="replace"))["mode"] == "replace"
        stored = json.loads((daemon.data_dir / "connections.json").read_text())
        assert [c["api_secret"] for c in stored] == [CANARY]
        # ... and a placeholder where nothing is stored is imported unset, named
        ghost = {"files": {"connections.json": [connection(id="ghost", api_secret="********")]}}
        done = await b.ok("data.import", data=ghost, mode="merge")
        assert done["secrets_unset"] == ["$.data.files.connections.json[0].api_secret"]
        stored = json.loads((daemon.data_dir / "connections.json").read_text())
        assert [c["api_secret"] for c in stored if c["id"] == "ghost"] == [None]
        merged = await b.ok(
            "data.import",
            data={"files": {"connections.json": [connection(name="new", id="new")]}},
            mode="merge",
        )
        assert merged["mode"] == "merge"
        ids = [c["id"] for c in await b.ok("connections.list")]
        assert ids == ["keep", "ghost", "new"]
        err = await b.err("data.import", data={}, mode="sideways")
        assert err["code"] == "invalid" and err["path"] == "$.mode"
        err = await b.err("data.import", data={"files": {}})
        assert err["code"] == "invalid" and "mode" in err["message"]
        err = await b.err("data.reset")
        assert err["code"] == "invalid" and err["path"] == "$.confirm"
        await b.ok("data.reset", confirm=True)
        assert await b.ok("connections.list") == []
    assert json.loads((daemon.data_dir / "connections.json").read_text()) == []


async def test_heartbeat_and_tests(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ok("connections.create", connection=connection(id="h1"))
        hb = await b.ok("connections.heartbeat", connection_id="h1")
        assert hb["connection_id"] == "h1" and hb["timestamp"].endswith("Z")
        st = {s["connection_id"]: s for s in (await b.ok("snapshot"))["state"]}
        assert st["h1"]["last_heartbeat_at"] == hb["timestamp"]  # in memory at once
        err = await b.err("connections.heartbeat", connection_id="nope")
        assert err["code"] == "not_found"
        # base_url to a closed port: the test fails fast, and reports so
        cs = json.dumps({"base_url": "http://127.0.0.1:9"})
        await b.ok("connections.update", connection_id="h1", changes={"connection_settings": cs})
        res = await b.ok("connections.test", connection_id="h1")
        assert res["success"] is False and res["timestamp"].endswith("Z")
        err = await b.err("connections.test", connection_id="nope")
        assert err["code"] == "not_found"
        # Project X is not configured here: the command answers (with the probe's verdict)
        reply = await b.call("trading.test_connection")
        assert reply["success"] is True and isinstance(reply["result"], dict), reply
        st = await b.ok("status")
        assert "state" in st["projectx"]  # from ctsd.sweeps, not a fallback


async def test_a_test_pipelined_after_a_change_sees_it(daemon: Daemon) -> None:
    """A connection test reads the record: sent right after this client's create (not
    waiting for its answer), it runs once the create is in, as a read does. A large
    document goes first, so the group's journal record is written on a thread and the
    create is not in yet when the test comes."""
    async with bus(daemon) as b:
        doc = await b.send("documents.set", name="watchlists", content={"pad": "x" * 400_000})
        cs = json.dumps({"base_url": "http://127.0.0.1:9"})
        created = await b.send(
            "connections.create", connection=connection(id="pt1", connection_settings=cs)
        )
        tested = await b.send("connections.test", connection_id="pt1")
        for msg_id in (doc, created):
            r = await b.result(msg_id)
            assert r["success"] is True, r
        reply = await b.result(tested)
        # the test of the created record: its base_url is a closed port
        assert reply["success"] is True and reply["result"]["success"] is False, reply


# --- subscriptions -------------------------------------------------------------------------


async def test_subscribe_topics_and_filters(daemon: Daemon) -> None:
    async with bus(daemon) as w, bus(daemon) as state_only, bus(daemon) as c2_only:
        await w.ok("connections.create", connection=connection(id="c1"))
        await w.ok("connections.create", connection=connection(id="c2"))
        r = await state_only.ok("subscribe", topics=["state"])
        assert r == {"revision": 2}
        await c2_only.ok("subscribe", connection_ids=["c2"])
        await w.ok("connections.update", connection_id="c1", changes={"name": "x"})  # 3
        await w.ok("connections.update", connection_id="c2", changes={"name": "y"})  # 4
        await w.ok("connections.set_volume", connection_id="c2", live=2.0)  # 5
        await w.ok("documents.set", name="watchlists", content={"a": 1})  # 6
        await w.ok("connections.set_active", connection_id="c1", active=True)  # 7
        got = await state_only.events_until(7)
        assert [(e["id"], e["action"]) for e in got] == [(5, "update_volume"), (7, "set_active")]
        got = await c2_only.events_until(6)
        assert [(e["id"], e["action"]) for e in got] == [
            (4, "update"),
            (5, "update_volume"),
            (6, "document_update"),
        ]
        # a filter is held as long as its subscription: bounded (40,000 ids held 7 MB)
        err = await c2_only.err("subscribe", connection_ids=[f"c{i}" for i in range(1001)])
        assert err["code"] == "invalid" and err["path"] == "$.connection_ids", err
        err = await c2_only.err("subscribe", connection_ids=["c" * 129])
        assert err["code"] == "invalid" and err["path"] == "$.connection_ids[0]", err
        # unsubscribe ends it; subscribing again replaces the filter
        assert await c2_only.ok("unsubscribe") == {"unsubscribed": True}
        await w.ok("connections.update", connection_id="c2", changes={"name": "z"})  # 8
        await c2_only.ok("subscribe", topics=["documents"], since=7)
        await w.ok("documents.set", name="watchlists", content={"a": 2})  # 9
        got = await c2_only.events_until(9)
        assert [e["id"] for e in got] == [9]
        # What changes a state record reaches the state topic too: a create or delete (the
        # record made or removed), an update of what the state mirrors, a reset.
        await w.ok("connections.update", connection_id="c1", changes={"is_enabled": False})
        await w.ok("connections.create", connection=connection(id="c3"))  # 11
        await w.ok("connections.delete", connection_id="c3")  # 12
        await w.ok("data.reset", confirm=True)  # 13
        got = await state_only.events_until(13)
        assert [(e["id"], e["action"]) for e in got] == [
            (10, "update"),
            (11, "create"),
            (12, "delete"),
            (13, "reset"),
        ]


async def test_live_frames_of_every_length_arrive_whole(daemon: Daemon) -> None:
    """Live events are framed once and written straight to each subscriber: frames with a
    16-bit and a 64-bit length field (and the 7-bit `progress`, tested below) must parse."""
    async with bus(daemon) as w, bus(daemon) as s1, bus(daemon) as s2:
        rev = (await s1.ok("subscribe", topics=["connections"]))["revision"]
        await s2.ok("subscribe", topics=["connections"])
        # a connection's settings (an event carries them): frames of ~16 KB and over 64 KiB
        for cid, n in (("f16", 16_000), ("f64", 65_400)):
            settings = json.dumps({"pad": "x" * n})
            conn = {"id": cid, "name": cid, "exchange": "bybit", "connection_settings": settings}
            await w.ok("connections.create", connection=conn)
            rev += 1
            for sub in (s1, s2):
                (ev,) = await sub.events_until(rev)
                assert ev["action"] == "create" and ev["connection_id"] == cid
                assert ev["data"]["values"]["connection_settings"] == settings


async def test_replay_then_live_no_gap_no_duplicate(fast_daemon: Daemon) -> None:
    d = fast_daemon
    n = 1000
    async with bus(d) as w, bus(d) as late:
        await w.ok("connections.create", connection=connection(id="r1"))
        base = (await w.ok("ping"))["revision"]
        done = anyio.Event()

        async def writer() -> None:
            ids = [await w.send("connections.update", connection_id="r1", changes={"user_id": i})
                   for i in range(2, n + 2)]  # fmt: skip
            for i in ids:
                assert (await w.result(i, timeout=60))["success"] is True
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            # subscribe from an old revision while changes stream in
            with anyio.fail_after(30):
                while (await late.ok("ping"))["revision"] < base + n // 3:
                    await anyio.sleep(0.005)
            since = base + 10
            await late.ok("subscribe", since=since)
            events = await late.events_until(base + n, timeout=60)
            await done.wait()
        ids = [e["id"] for e in events]
        assert ids == list(range(since + 1, base + n + 1)), "gap or duplicate"
        assert [e["data"]["values"]["user_id"] for e in events] == list(range(12, n + 2))


async def test_replay_never_splits_a_change(daemon: Daemon) -> None:
    """Replay comes in frames of about 500 events, but one change is always one frame."""
    async with bus(daemon) as w, bus(daemon) as late:
        conns = [connection(name=f"n{i}", id=f"b{i}") for i in range(600)]
        await w.ok("data.import", data={"files": {"connections.json": conns}}, mode="replace")
        since = (await w.ok("ping"))["revision"]
        updates = [{"id": f"b{i}", "user_id": i + 100} for i in range(600)]  # 600 events
        await w.ok("connections.batch_update", updates=updates)
        await w.ok("connections.update", connection_id="b0", changes={"user_id": 7})
        await late.ok("subscribe", since=since)
        await late.events_until(since + 601)
        frames = [m["events"] for m in map(json.loads, late.raw) if m["type"] == "events"]
        assert [len(f) for f in frames] == [600, 1]


async def test_revision_compacted(data_dir: Path) -> None:
    write_settings(data_dir, {"sync_log_limit": 20})
    d = Daemon(data_dir).start()
    try:
        async with bus(d) as b:
            for i in range(30):
                await b.ok("connections.create", connection=connection(name=f"n{i}", id=f"k{i}"))
            err = await b.err("subscribe", since=5)
            assert err["code"] == "revision_compacted" and err["oldest"] == 11
            await b.ok("connections.update", connection_id="k0", changes={"name": "q"})
            # no subscription was made
            assert (await b.ok("status"))["bus"]["subscribers"] == 0
            await b.ok("subscribe", since=11)  # oldest - 1: everything still retained
            events = await b.events_until(31)
            assert [e["id"] for e in events] == list(range(12, 32))
            err = await b.err("sync_log.get", since=3)
            assert err["code"] == "revision_compacted" and err["oldest"] == 12
        code, body = d.http("/api/sync-log?since=3")
        assert code == 409 and body["error"]["code"] == "revision_compacted"
    finally:
        d.close()


async def test_sync_log_without_since_after_compaction(data_dir: Path) -> None:
    # Without `since`: the newest `limit` retained entries, oldest first, even once trimmed.
    write_settings(data_dir, {"sync_log_limit": 20})
    d = Daemon(data_dir).start()
    try:
        async with bus(d) as b:
            for i in range(30):
                await b.ok("connections.create", connection=connection(name=f"n{i}", id=f"k{i}"))
            assert [e["id"] for e in await b.ok("sync_log.get")] == list(range(11, 31))
            assert [e["id"] for e in await b.ok("sync_log.get", limit=3)] == [28, 29, 30]
            assert [e["id"] for e in await b.ok("sync_log.get", limit=50)] == list(range(11, 31))
            # with `since` nothing changes: compaction is still reported
            assert (await b.err("sync_log.get", since=3))["code"] == "revision_compacted"
            assert [e["id"] for e in await b.ok("sync_log.get", since=27)] == [28, 29, 30]
        code, log = d.http("/api/sync-log")
        assert code == 200 and [e["id"] for e in log] == list(range(11, 31))
        code, log = d.http("/api/sync-log?limit=2")
        assert code == 200 and [e["id"] for e in log] == [29, 30]
        assert d.http("/api/sync-log?since=3")[0] == 409
    finally:
        d.close()


async def test_slow_subscriber_cut_4008_fast_keeps_up(data_dir: Path) -> None:
    write_settings(
        data_dir,
        {"sync_log_limit": 100, "server": {"rate_limit": {"requests": 100000, "window_s": 1}}},
    )
    d = Daemon(data_dir).start()
    # 3,000 changes of ~3 KB, one frame each: past the server's socket buffer (up to 4 MB
    # autotuned) plus the 1,000-frame queue.
    n = 3000
    pad = "x" * 3000
    try:
        async with bus(d) as w:
            await w.ok("connections.create", connection=connection(id="z1"))
            # The slow client stops reading its socket after one unread frame (max_queue=1),
            # and its small receive buffer (no autotuning) keeps its kernel from absorbing it.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.connect(("127.0.0.1", d.port))
            sock.setblocking(False)
            async with bus(d, max_queue=1, sock=sock) as slow, bus(d) as fast:
                await slow.ok("subscribe", connection_ids=["z1"])
                await fast.ok("subscribe", connection_ids=["z1"])
                rev = (await w.ok("ping"))["revision"]

                async def write() -> None:
                    # replies read as they come: an unread writer would stall its own changes
                    ids = []
                    for i in range(n):
                        if i == 1200:  # behind by now (the cut comes ~1,000 frames later)
                            for k in range(3):
                                frame = {"id": 900 + k, "type": "connections.set_volume"}
                                frame.update(connection_id="z1", live=10 + k)
                                await slow.ws.send(json.dumps(frame))
                        cs = json.dumps({"pad": pad, "i": i})
                        ids.append(
                            await w.send(
                                "connections.update",
                                connection_id="z1",
                                changes={"connection_settings": cs},
                            )
                        )
                        while len(ids) > 100:
                            assert (await w.result(ids.pop(0), timeout=30))["success"] is True
                    for i in ids:
                        assert (await w.result(i, timeout=30))["success"] is True

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    got = await fast.events_until(rev + n, timeout=60)
                want = list(range(rev + 1, rev + n + 1))
                assert [e["id"] for e in got if e["id"] <= rev + n] == want
                assert (await w.ok("status"))["bus"]["lagging_closed"] == 1
                # Still not reading past the close's own timeout: the close waited for the
                # backlog to drain, then dropped the connection (1006, no hint to resume).
                # And it sends meanwhile (a keepalive ping, a command): a socket closed with
                # that unread is reset, backlog and close lost.
                await slow.ws.send(json.dumps({"id": 10**9, "type": "ping"}))
                await anyio.sleep(CLOSE_TIMEOUT_S + 0.5)
                code, frames = await close_code(slow.ws, timeout=30)
                assert code == 4008
                # Each of its commands carried out was answered before the close: those
                # events do not say whose they were.
                answered = [f["id"] for f in frames if f.get("id") in (900, 901, 902)]
                assert answered and answered == [900, 901, 902][: len(answered)], frames[-5:]
                state = json.loads((data_dir / "connection-state.json").read_text())
                assert state[0]["volume_factor_live"] == 10 + len(answered) - 1
    finally:
        d.close()


async def test_notice_on_invalid_hand_edit(daemon: Daemon) -> None:
    async with bus(daemon) as b, bus(daemon) as conns_only, bus(daemon) as w:
        await b.ok("subscribe", topics=["system"])
        rev = (await conns_only.ok("subscribe", topics=["connections"]))["revision"]
        (daemon.data_dir / "watchlists.json").write_text('{"a": 1,,}\n')
        with anyio.fail_after(10):
            while not b.frames:
                msg = await b.recv()
                b.frames.append(msg)
        notice = b.frames[0]
        assert notice["type"] == "notice" and notice["notice"] == "file_invalid"
        assert notice["file"] == "watchlists.json" and notice["line"] == 1
        assert "revision" not in notice
        # notices are topic `system` only: a change after it reaches the other subscriber
        # with nothing before it
        await w.ok("connections.create", connection=connection(id="after"))
        await conns_only.events_until(rev + 1)
        assert all(json.loads(r)["type"] != "notice" for r in conns_only.raw)


async def test_shutdown_notice_and_1001(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ok("subscribe")
        daemon.send_signal(15)
        code, frames = await close_code(b.ws)
        assert code == 1001
        assert {"type": "notice", "notice": "shutting_down"} in frames
    assert daemon.proc is not None and daemon.proc.wait(10) == 0


# --- limits --------------------------------------------------------------------------------


async def test_rate_limit_heartbeats_exempt(data_dir: Path) -> None:
    write_settings(data_dir, {"server": {"rate_limit": {"requests": 20, "window_s": 900}}})
    d = Daemon(data_dir).start()
    try:
        async with bus(d) as b:
            await b.ok("connections.create", connection=connection(id="h1"))
            codes = []
            for _ in range(25):
                reply = await b.call("ping")
                codes.append(reply["success"] or reply["error"]["code"])
            assert codes[:19] == [True] * 19
            assert codes[19:] == ["rate_limited"] * 6
            change = {"connection_id": "h1", "changes": {"name": "n"}, "sync": None}
            reply = await b.call("connections.update", **change)
            assert reply["error"]["code"] == "rate_limited"
        # frames refused before naming a command (malformed, unknown) spend the budget too
        async with bus(d) as b3:
            for raw in ["{nope", "[]", '{"id": "x"}', '{"id": 1, "type": "nope"}'] * 5:
                await b3.ws.send(raw)
                assert (await b3.recv())["error"]["code"] != "rate_limited"
            await b3.ws.send("{nope")
            assert (await b3.recv())["error"]["code"] == "rate_limited"
            reply = await b3.call("ping")
            assert reply["error"]["code"] == "rate_limited"
        async with bus(d) as b:
            for _ in range(50):
                reply = await b.call("connections.heartbeat", connection_id="h1")
                assert reply["success"] is True, reply
        # another client has its own budget
        async with bus(d) as b2:
            assert (await b2.ok("ping"))["pong"] is True
    finally:
        d.close()


# --- metrics -------------------------------------------------------------------------------


def bus_metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = d.http("/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_follow_the_bus(daemon: Daemon) -> None:
    async with bus(daemon) as sub, bus(daemon) as w:
        rev = (await sub.ok("subscribe"))["revision"]
        m0 = bus_metrics(daemon)
        assert m0[("ctsd_bus_clients", ())] == 2 and m0[("ctsd_bus_subscribers", ())] == 1
        await w.ok("connections.create", connection=connection(id="m1"))
        await sub.events_until(rev + 1)
        await w.err("no.such.command")
        await w.err("connections.get", connection_id="absent")
        m1 = bus_metrics(daemon)

        def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
            return m1[(name, labels)] - m0.get((name, labels), 0.0)

        assert grew("ctsd_bus_events_sent_total") >= 1
        assert grew("ctsd_bus_frames_sent_total") >= 1
        assert grew("ctsd_changes_total") >= 1
        assert grew("ctsd_write_seconds_count") >= 1
        await w.ok("connections.update", connection_id="m1", changes={"name": "x"}, sync="files")
        m2 = bus_metrics(daemon)
        size = sum((daemon.data_dir / f).stat().st_size for f in (CONNECTIONS, SYNC_LOG))
        assert m2[("ctsd_checkpoint_rounds_total", ())] > m0[("ctsd_checkpoint_rounds_total", ())]
        assert (
            m2[("ctsd_checkpoint_written_bytes_total", ())]
            - m0[("ctsd_checkpoint_written_bytes_total", ())]
            >= size
        )  # at least the files the update was written to
        assert grew("ctsd_errors_total", (("code", "unknown_command"),)) == 1
        assert grew("ctsd_errors_total", (("code", "not_found"),)) == 1
    gone = (("ctsd_bus_clients", ()), ("ctsd_bus_subscribers", ()))
    wait_until(lambda: all(bus_metrics(daemon)[k] == 0 for k in gone), 5, what="clients gone")


# --- secrets -------------------------------------------------------------------------------


async def test_canary_secret_never_leaves(daemon: Daemon) -> None:
    d = daemon
    key = CANARY + "-key-abcd"
    async with bus(d) as watcher, bus(d) as b:
        await watcher.ok("subscribe")
        await b.ok("connections.create", connection=connection(id="cn", api_key=key))
        await b.ok(
            "connections.update", connection_id="cn", changes={"api_secret": CANARY, "name": "n2"}
        )
        await b.ok(
            "connections.batch_update", updates=[{"id": "cn", "api_passphrase": CANARY + "p"}]
        )
        doc = await b.ok("documents.get", name="connection")
        doc["projectX"]["apiKey"] = CANARY + "-px"
        doc["projectX"]["username"] = "trader"
        assert (await b.ok("documents.set", name="connection", content=doc))["projectX"][
            "apiKey"
        ] == "********"
        await b.ok("connections.set_active", connection_id="cn", active=True)
        await b.ok(
            "data.import",
            data={"files": {"connections.json": [connection(id="im", api_secret=CANARY + "i")]}},
            mode="merge",
        )
        c = await b.ok("connections.get", connection_id="cn")
        assert c["api_key"] == "…abcd" and c["api_secret"] == "********"
        for cmd in ("snapshot", "data.export", "connections.list", "status", "documents.list"):
            await b.ok(cmd)
        await b.ok("sync_log.get")
        await b.ok("documents.get", name="connection")
        await b.err("connections.update", connection_id="cn", changes={"api_secret": 5})
        await watcher.events_until((await b.ok("ping"))["revision"])
        frames = b.raw + watcher.raw
        assert len(frames) > 15
        bodies = [
            str(d.http(p)[1])
            for p in (
                "/api/trading/connection",
                "/api/trading/server-status",
                "/api/settings/connections",
                "/api/settings/connections/cn",
                "/api/connections/active",
                "/api/connections/state",
                "/api/sync-log",
                "/api/data/connection",
                "/api/data/export",
                "/metrics",
            )
        ]
    # what was stored is the real secret (the daemon kept it) ...
    assert CANARY in (d.data_dir / "connections.json").read_text()
    # ... and it never left: no frame, no HTTP body, no log line
    for text in [*frames, *bodies, d.stdout(), d.stderr()]:
        assert CANARY not in text
    for log_file in (d.data_dir / "logs").glob("*"):
        assert CANARY not in log_file.read_text()
    assert CANARY not in (d.data_dir / "connection-sync-log.json").read_text()


async def test_progress_to_idle_subscribers(data_dir: Path) -> None:
    # The 30 s interval shortened to 1 s (CTSD_BUS_PROGRESS_S) so the test takes seconds.
    d = Daemon(data_dir, env={"CTSD_BUS_PROGRESS_S": "1"}).start()
    try:
        async with bus(d) as b, bus(d) as plain:
            await b.ok("connections.create", connection=connection(id="p1"))
            await b.ok("subscribe", topics=["documents"])
            t0 = time.monotonic()
            msg = await b.recv(timeout=5)
            assert msg == {"type": "progress", "revision": 1}
            assert time.monotonic() - t0 >= 0.5
            # a bus connection without a subscription gets none
            with anyio.move_on_after(1.5):
                extra = await plain.recv()
                raise AssertionError(f"unsubscribed client got {extra}")
    finally:
        d.close()


def test_progress_wakes_when_the_first_idle_subscriber_is_due() -> None:
    """`progress` every PROGRESS_S to an idle subscriber: the loop sleeps until the first is
    due, not a fixed step (which sent it up to a step late), and never less than the slack
    it serves those due together within."""
    now = 1000.0
    assert progress_wait(now, []) == PROGRESS_S
    assert progress_wait(now, [now - PROGRESS_S + 3.0, now - 1.0]) == pytest.approx(3.0)
    assert progress_wait(now, [now - PROGRESS_S - 5.0]) == PROGRESS_SLACK_S  # overdue


async def test_a_client_that_reads_nothing_gets_one_progress_per_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stalled client's last frame sent never moves: due again at every wake of the loop,
    it was queued a progress four times a second, filling its queue to the cut."""
    monkeypatch.setattr(fanout, "PROGRESS_S", 0.5)
    monkeypatch.setattr(fanout, "PROGRESS_SLACK_S", 0.05)

    class Stalled:
        last_sent = time.monotonic() - 1.0  # overdue, and never sent anything again
        pushed = 0

        def push(self, framed: bytes) -> None:
            self.pushed += 1

    hub = fanout.Hub(SimpleNamespace(revision=7))  # type: ignore[arg-type]
    stalled = Stalled()
    hub.by_outbox[stalled] = fanout.Sub(stalled, (fanout.ALL_TOPICS, None))  # type: ignore[index, arg-type]
    task = asyncio.get_running_loop().create_task(hub._progress())
    await anyio.sleep(1.2)  # due at once, then every 0.5 s: 3 at most
    task.cancel()
    assert 1 <= stalled.pushed <= 3, stalled.pushed


async def test_events_before_the_reply_on_the_same_connection(fast_daemon: Daemon) -> None:
    async with bus(fast_daemon) as b:
        await b.ok("connections.create", connection=connection(id="o1"))
        await b.ok("subscribe", since=0)  # a replay in front makes a backlog likelier
        n = 300
        for i in range(n):
            await b.send("connections.update", connection_id="o1", changes={"user_id": i + 2})
        seen: set[int] = set()
        replies = 0
        with anyio.fail_after(30):
            while replies < n:
                msg = await b.recv()
                if msg["type"] == "events":
                    for e in msg["events"]:
                        if e["action"] == "update":
                            seen.add(e["data"]["values"]["user_id"])
                elif msg["type"] == "result":
                    assert msg["success"] is True, msg
                    assert msg["result"]["user_id"] in seen, "reply overtook its event"
                    replies += 1


async def test_every_server_frame_matches_the_protocol_structs(daemon: Daemon) -> None:
    import msgspec

    from ctsd.bus import protocol as p

    kinds = {
        "auth_ok": p.AuthOk,
        "events": p.Events,
        "progress": p.Progress,
        "notice": p.Notice,
    }
    async with bus(daemon) as b:
        await b.ok("subscribe")
        await b.ok("connections.create", connection=connection(id="f1"))
        await b.err("connections.get", connection_id="nope")
        await b.err("nope")
        await b.ok("connections.batch_update", updates=[{"id": "f1", "name": "q"}])
        await b.ok("snapshot")
        await b.events_until((await b.ok("ping"))["revision"])
        frames = b.raw
    assert {json.loads(f)["type"] for f in frames} == {"auth_ok", "result", "events"}
    for raw in frames:
        msg = json.loads(raw)
        if msg["type"] == "result":
            kind: Any = p.Ok if msg["success"] else p.Fail
        else:
            kind = kinds[msg["type"]]
        msgspec.json.decode(raw, type=kind)  # raises on a field of the wrong shape
        fields = {f.encode_name for f in msgspec.structs.fields(kind)}
        assert set(msg) <= fields | {"type"}, (msg, fields)  # and nothing undeclared


async def test_hand_edit_of_state_file_is_topic_state(daemon: Daemon) -> None:
    async with bus(daemon) as w, bus(daemon) as st, bus(daemon) as conns:
        await w.ok("connections.create", connection=connection(id="e1"))
        rev = (await st.ok("subscribe", topics=["state"]))["revision"]
        await conns.ok("subscribe", topics=["connections"])
        path = daemon.data_dir / "connection-state.json"
        records = json.loads(path.read_text())
        records[0]["volume_factor_live"] = 7.5
        path.write_text(json.dumps(records, indent=2) + "\n")
        got = await st.events_until(rev + 1)
        assert got[0]["action"] == "update" and got[0]["data"]["file"] == "connection-state.json"
        assert got[0]["data"]["source"] == "file"
        # the connections topic did not get it: the next thing it sees is a later change
        await w.ok("connections.update", connection_id="e1", changes={"name": "after"})
        later = await conns.events_until(rev + 2)
        assert [e["id"] for e in later] == [rev + 2]


async def test_shutdown_in_time_with_a_client_that_reads_nothing(daemon: Daemon) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    async with bus(daemon, max_queue=1, sock=sock) as deaf:
        await deaf.ok("subscribe")
        # ~60 KB events (a create shows every field), 5 MB unread: its buffers stay full
        wide = json.dumps({"note": "x" * 60_000})
        async with bus(daemon, sync=None) as w:
            for _ in range(85):
                await w.ok("connections.create", connection=connection(connection_settings=wide))
        # `deaf` has not read a single frame since; its closing handshake cannot complete
        t0 = time.monotonic()
        daemon.send_signal(15)
        assert daemon.proc is not None
        with anyio.fail_after(10):
            while daemon.proc.poll() is None:
                await anyio.sleep(0.05)
        assert daemon.proc.returncode == 0
        assert time.monotonic() - t0 < 5.0
        deaf.ws.transport.abort()  # it would wait 10 s to notice, reading nothing


async def test_a_stop_still_sends_answers_queued_for_a_slow_reader(daemon: Daemon) -> None:
    """Changes made durable while their client's outbox is backed up (it reads slowly): at a
    stop their answers still reach it, ahead of the notice and the close, not dropped."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    async with bus(daemon, sync=None, max_queue=1, sock=sock) as slow:
        await slow.ok("subscribe")
        # ~60 KB events (a create shows every field): past the socket's buffers (which
        # grow to a few MB), into its outbox
        wide = json.dumps({"note": "x" * 60_000})
        async with bus(daemon, sync=None) as w:
            for _ in range(85):
                await w.ok("connections.create", connection=connection(connection_settings=wide))
            sent = [
                await slow.send("connections.create", connection=connection(id=f"s{i}"))
                for i in range(3)
            ]
            with anyio.fail_after(10):  # durable (and answered into the backed-up outbox)
                while (await w.call("connections.get", connection_id="s2"))["success"] is False:
                    await anyio.sleep(0.02)
        daemon.send_signal(15)
        code, frames = await close_code(slow.ws)
    assert code == 1001
    answers = [f for f in frames if f.get("type") == "result"]
    assert [(f["id"], f["success"]) for f in answers] == [(i, True) for i in sent]
    assert frames.index(answers[-1]) < frames.index({"type": "notice", "notice": "shutting_down"})


async def test_commands_sent_once_a_stop_began_are_refused_and_nothing_is_done(
    daemon: Daemon,
) -> None:
    """While a stop drains (here: a slow reader's answers), a command that comes is refused
    `io_error` (nothing done, safe to retry), never done and left unanswered; a connection
    still waiting to authenticate is closed with 1001 like the others."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    async with (
        bus(daemon, sync=None, max_queue=1, sock=sock) as slow,
        bus(daemon, sync=None) as w,
        connect(daemon.ws_url) as waiting,  # no token yet
    ):
        assert json.loads(await waiting.recv())["type"] == "auth_required"
        await slow.ok("subscribe")
        wide = json.dumps({"note": "x" * 60_000})  # backs the slow reader up (as above)
        for _ in range(85):
            await w.ok("connections.create", connection=connection(connection_settings=wide))
        await slow.send("connections.create", connection=connection(id="answered"))
        daemon.send_signal(15)

        def refused() -> bool:  # the stop has begun: no new connection is taken
            try:
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=1) as s:
                    s.sendall(
                        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                    )
                    return b" 503 " in s.recv(200)
            except ConnectionRefusedError:
                return True
            except OSError:  # (a busy daemon's slow answer, say): not a sign of the stop
                return False

        wait_until(refused, 5, what="the stop begun")
        await waiting.send(json.dumps({"type": "auth", "token": TOKEN}))  # authenticates now
        err = await w.err("connections.create", connection=connection(id="late"))
        assert err["code"] == "io_error" and "nothing was done" in err["message"], err
        code, _ = await close_code(w.ws)
        assert code == 1001
        code, _ = await close_code(waiting)
        assert code == 1001
        slow.ws.transport.abort()  # it reads nothing: its answers are another test's
    assert daemon.proc is not None and daemon.proc.wait(timeout=10) == 0
    ids = {c["id"] for c in json.loads((daemon.data_dir / CONNECTIONS).read_text())}
    assert "answered" in ids and "late" not in ids


async def test_pipelined_changes_are_committed_in_the_order_sent_sync_or_not(
    daemon: Daemon,
) -> None:
    """A change that asks for the files (`sync`) and a plain one right after it, to the same
    field, without waiting: the later one wins, as sent."""
    async with bus(daemon, sync=None) as b:
        await b.ok("connections.create", connection=connection(id="c1"))
        for i in range(20):
            first = await b.send(
                "connections.update", connection_id="c1", changes={"name": f"a{i}"}, sync="files"
            )
            second = await b.send(
                "connections.update", connection_id="c1", changes={"name": f"b{i}"}
            )
            replies = [await b.result(first), await b.result(second)]
            assert all(r["success"] for r in replies), replies
            assert (await b.ok("connections.get", connection_id="c1"))["name"] == f"b{i}"


async def test_a_slow_connection_test_does_not_hold_up_other_commands(daemon: Daemon) -> None:
    silent = socket.socket()  # accepts (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        async with bus(daemon) as b:
            cs = json.dumps({"base_url": f"http://127.0.0.1:{silent.getsockname()[1]}"})
            await b.ok("connections.create", connection=connection(id="t1", connection_settings=cs))
            test_id = await b.send("connections.test", connection_id="t1")
            t0 = time.monotonic()
            assert (await b.ok("ping"))["pong"] is True
            assert time.monotonic() - t0 < 1.0
            assert test_id not in b.results  # the test is still running
    finally:
        silent.close()


def _raw_ws(d: Daemon) -> socket.socket:
    """A websocket opened by hand, so the test sees every frame, pings included, and can
    leave them unanswered (client libraries answer pings by themselves)."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _read_frame(s: socket.socket) -> tuple[int, bytes] | None:
    """(opcode, payload) of the next server frame (unmasked), or None at EOF."""

    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    try:
        b0, b1 = exactly(2)
        size = b1 & 0x7F
        if size == 126:
            size = int.from_bytes(exactly(2), "big")
        elif size == 127:
            size = int.from_bytes(exactly(8), "big")
        return b0 & 0x0F, exactly(size)
    except (EOFError, ConnectionResetError):
        return None


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame as a client sends it (masked), payload under 126 bytes."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def test_text_frames_that_are_not_utf8_close_1007_and_are_logged_in_summary(
    daemon: Daemon,
) -> None:
    """Each one logged an error with a traceback (uvicorn's), which any peer can repeat."""
    for _ in range(12):
        s = _raw_ws(daemon)
        try:
            assert (_read_frame(s) or (None,))[0] == 0x1  # auth_ok
            s.sendall(_client_frame(0x1, b'{"id": 1, "type": "ping", "x": "\xff"}'))
            while (frame := _read_frame(s)) is not None and frame[0] != 0x8:
                pass
            assert frame is not None and int.from_bytes(frame[1][:2], "big") == 1007, frame
        finally:
            s.close()
    lines = [e for e in daemon.log_events() if "utf" in json.dumps(e).lower()]
    assert 1 <= len(lines) <= 3 and all(e["event"] == "bus_frame_not_utf8" for e in lines), lines


def test_keepalive_pings_and_a_silent_client_is_dropped(data_dir: Path) -> None:
    d = Daemon(data_dir, env={"CTSD_BUS_PING_S": "0.3"}).start()
    try:
        s = _raw_ws(d)
        opcode, payload = _read_frame(s) or (None, b"")
        assert opcode == 0x1 and json.loads(payload)["type"] == "auth_ok"
        t0 = time.monotonic()
        seen: list[int] = []
        while (frame := _read_frame(s)) is not None:  # never answer: no pong
            seen.append(frame[0])
            if frame[0] == 0x8:  # close
                assert int.from_bytes(frame[1][:2], "big") == 1011, frame
                break
        assert 0x9 in seen, seen  # a ping came
        # dropped after one interval plus the timeout, not the library's 20 s default
        assert time.monotonic() - t0 < 3, seen
        s.close()
    finally:
        d.close()
