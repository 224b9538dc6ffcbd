"""Hostile neighbours on the port: idle sockets, slow headers, unauthenticated floods. Each
is refused or dropped on time, and never makes another client's work fail."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from tests.bus import bus, close_code
from tests.daemon import TOKEN, Daemon, wait_until
from tests.datadir import connection, write_connections, write_settings

pytestmark = pytest.mark.anyio


class LimitedDaemon(Daemon):
    """The daemon with a small descriptor limit, as a unit's LimitNOFILE= would set."""

    nofile = 512

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().command()]


@pytest.mark.parametrize("cap", [200, None], ids=["max_connections 200", "default cap"])
async def test_a_flood_of_idle_sockets_never_breaks_a_write(
    data_dir: Path, cap: int | None
) -> None:
    # 1,100 idle sockets against a daemon allowed 512 descriptors: at the cap each new one
    # closes the oldest that never showed the token (told why: a 503), so the daemon's own
    # files always have descriptors. The default cap (1,024) is more than the limit leaves
    # room for: the daemon's own share of descriptors is kept all the same.
    if cap is not None:
        write_settings(data_dir, {"server": {"max_connections": cap}})
    d = LimitedDaemon(data_dir).start()
    socks: list[socket.socket] = []
    try:
        async with bus(d) as b:  # a client connected before the flood...
            for _ in range(1100):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
                except OSError:
                    break
            for i in range(20):  # ... keeps making durable changes throughout
                c = await b.ok("connections.create", connection=connection(name=f"n{i}"))
                assert c["id"]
        told = 0
        for s in socks[:50]:  # ... and the first ones made room, and were told why
            s.settimeout(5)
            try:
                if s.recv(200).startswith(b"HTTP/1.1 503"):
                    told += 1
            except OSError:
                pass
        assert told == 50
        # the newest is still open: its request is answered
        socks[-1].sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        socks[-1].settimeout(10)
        assert socks[-1].recv(200).startswith(b"HTTP/1.1 200")
        for s in socks:
            s.close()
        socks.clear()
        wait_until(lambda: httpx.get(d.url + "/health").status_code == 200, 10)
        assert "too many open files" not in d.stdout().lower()
        above = [
            e for e in d.log_events() if e.get("event") == "max_connections_above_descriptor_limit"
        ]
        assert bool(above) == (cap is None), above
        if cap is not None:  # set above the limit by hand while running: the warning then
            write_settings(data_dir, {"server": {"max_connections": 2000}})

            def warned() -> list[dict]:
                return [
                    e
                    for e in d.log_events()
                    if e.get("event") == "max_connections_above_descriptor_limit"
                ]

            [warning] = wait_until(warned, 10, what="the warning")
            assert warning["max_connections"] == 2000
    finally:
        for s in socks:
            s.close()
        d.close()


async def test_sockets_without_the_token_never_keep_a_client_with_it_out(data_dir: Path) -> None:
    """Every slot under the cap held by connections that never showed the token (idle
    sockets, a bus connection that never authenticates, kept-alive /health clients): a client
    with the token still gets in, each time, as the oldest of them makes room. Only once every
    slot has shown the token is a new connection refused."""
    write_settings(data_dir, {"server": {"max_connections": 10, "max_unauthenticated": 50}})
    d = Daemon(data_dir, env={"CTSD_HEADER_TIMEOUT_S": "120"}).start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    idle: list[socket.socket] = []
    clients: list[httpx.Client] = []
    try:
        async with bus(d) as b:  # authenticated: holds its slot throughout
            idle = [socket.create_connection(("127.0.0.1", d.port), timeout=5) for _ in range(5)]
            waiting = [await connect(d.ws_url) for _ in range(2)]
            for ws in waiting:
                assert json.loads(await ws.recv())["type"] == "auth_required"
            monitors = [httpx.Client(base_url=d.url, timeout=5) for _ in range(2)]
            for m in monitors:
                assert m.get("/health").status_code == 200  # kept alive, no token
            # 10 open: the cap. Nine clients with the token come, and stay.
            for i in range(9):  # (the first a monitor that sends the token to /health)
                clients.append(httpx.Client(base_url=d.url, headers=auth, timeout=5))
                path = "/health" if i == 0 else "/api/settings/connections"
                assert clients[-1].get(path).status_code == 200
            for s in idle:  # oldest first: the idle sockets were told why...
                assert s.recv(200).startswith(b"HTTP/1.1 503")
            for ws in waiting:  # ... the bus connections to try again later...
                assert (await close_code(ws))[0] == 1013
            # ... and the monitors' idle keep-alive connections closed, as a timeout would.
            # Every slot has shown the token now: a new connection is refused.
            r = monitors[0].get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "io_error"
            for c in clients:  # nobody with the token lost a connection
                assert c.get("/api/settings/connections").status_code == 200
            assert (await b.ok("ping"))["pong"] is True
            stats = (await b.ok("status"))["bus"]
            # 9, unless a monitor's keep-alive ran out first (5 s: a slow runner)
            assert 7 <= stats["connections_evicted"] <= 9, stats
            for m in monitors:
                m.close()
    finally:
        for s in idle:
            s.close()
        for c in clients:
            c.close()
        d.close()


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def _ping_flood(d: Daemon, upgrade: bytes = _UPGRADE + b"\r\n") -> tuple[socket.socket, bytes]:
    """A bus connection that sends 200,000 pings (26 MB) and reads nothing: far more pongs
    than the kernel's buffers hold. The socket and the last ping's payload."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", d.port))
    s.sendall(upgrade)
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # (no frame may come before the answer)
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    for k in range(200):  # all read: the daemon never stops reading pings
        payloads = [f"{k:06d}{i:06d}".encode().ljust(125, b".") for i in range(1000)]
        s.sendall(b"".join(Frame(Opcode.PING, p).serialize(mask=True) for p in payloads))
    return s, payloads[-1]


def test_a_connection_that_reads_nothing_makes_room_at_once(data_dir: Path) -> None:
    """The oldest connection without the token, stuck (its answers never read), is
    dropped the moment a newer one needs its slot: closing it gracefully would hold its
    descriptor until the write stall (30 s), one over the cap for each such victim."""
    write_settings(data_dir, {"server": {"max_connections": 2}})
    d = Daemon(data_dir).start()
    try:
        stuck, _ = _ping_flood(d)  # its buffer full (a pong at least), no token
        peer = stuck.getsockname()[1]
        with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            assert c.get("/api/settings/connections").status_code == 200
            assert c.get("/health").status_code == 200  # 2 open: the cap
            with httpx.Client(base_url=d.url) as other:
                assert other.get("/health").status_code == 200  # it took the stuck one's
            # the daemon closed its end (the kernel may still try to send what it holds)
            wait_until(lambda: (_daemon_end(d.port, peer) or (0,))[0] != ESTABLISHED, 5)
        stuck.close()
    finally:
        d.close()


async def test_unauthenticated_bus_connections_are_capped(data_dir: Path) -> None:
    """At the cap on connections waiting to authenticate, the one that waited longest is
    closed (1013) to make room: a process holding the cap never keeps a client that authenticates
    with its first frame (a browser cannot send the header) out."""
    write_settings(data_dir, {"server": {"max_unauthenticated": 5}})
    d = Daemon(data_dir).start()
    try:
        waiting = [await connect(d.ws_url) for _ in range(5)]
        for ws in waiting:
            assert json.loads(await ws.recv())["type"] == "auth_required"
        async with connect(d.ws_url) as newest:
            assert json.loads(await newest.recv())["type"] == "auth_required"
            # not auth_invalid (its token may be right): 1013, try again later
            assert await close_code(waiting[0]) == (1013, [])
            await newest.send(json.dumps({"type": "auth", "token": TOKEN}))
            assert json.loads(await newest.recv())["type"] == "auth_ok"
            # the newest authenticated: 4 wait, and the cap takes one more before the next
            # oldest must make room
            more = [await connect(d.ws_url) for _ in range(2)]
            for ws in more:
                assert json.loads(await ws.recv())["type"] == "auth_required"
            assert (await close_code(waiting[1]))[0] == 1013
            # a client showing the right token is not one waiting: nobody makes room
            async with bus(d) as b:
                assert (await b.ok("ping"))["pong"] is True
            with anyio.fail_after(5):  # still open
                await (await waiting[2].ping())
        for ws in waiting + more:
            await ws.close()
        evicted = [e for e in d.log_events() if e.get("event") == "bus_waiting_evicted"]
        assert len(evicted) == 1 and evicted[0]["cap"] == 5, evicted  # at most one a minute
    finally:
        d.close()


def _daemon_end(port: int, peer_port: int) -> tuple[int, int] | None:
    """(TCP state, bytes in the receive queue) of the daemon's end of a loopback connection;
    None once it is gone."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == peer_port:
            return int(f[3], 16), int(f[4].split(":")[1], 16)
    return None


ESTABLISHED = 1  # (in /proc/net/tcp)


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def test_a_ping_flood_from_a_peer_that_reads_nothing_holds_no_memory(data_dir: Path) -> None:
    """200,000 pings (26 MB) on a bus connection that never authenticates and never reads:
    every one answered, the pongs piled up in the daemon until the write stall dropped the
    connection. Now they go unanswered once the peer's buffer is full."""
    d = Daemon(data_dir).start()
    s = socket.socket()
    try:
        assert d.proc is not None
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as warm:
            warm.sendall(_UPGRADE + b"\r\n")  # what a first bus connection costs, first
            assert warm.recv(12) == b"HTTP/1.1 101"
        assert httpx.get(d.url + "/health").status_code == 200
        before = _rss_bytes(d.proc.pid)
        s, _ = _ping_flood(d)
        # every ping read by the daemon (nothing left in its receive queue)
        peer = s.getsockname()[1]
        wait_until(lambda: (_daemon_end(d.port, peer) or (0, 1))[1] == 0, 10)
        grown = _rss_bytes(d.proc.pid) - before
        assert grown < 8 * 1024 * 1024, f"the daemon grew by {grown / 2**20:.1f} MiB"
        assert httpx.get(d.url + "/health").status_code == 200
    finally:
        s.close()
        d.close()


def test_the_latest_ping_is_answered_once_the_peer_reads_again(data_dir: Path) -> None:
    """Pings read while the peer's buffer is full go unanswered, but for the latest, which is
    answered once the peer has read its buffer down (RFC 6455: a pong may answer only the
    latest ping, but that one must be answered)."""
    d = Daemon(data_dir).start()
    try:
        auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        s, last = _ping_flood(d, _UPGRADE + auth)  # authenticated: no auth timeout
        s.settimeout(10)
        stream = s.makefile("rb")
        pongs = 0
        while True:  # reads everything; the latest ping's pong comes last
            b0, b1 = stream.read(2)
            size = b1 & 0x7F
            if size == 126:
                size = int.from_bytes(stream.read(2), "big")
            elif size == 127:
                size = int.from_bytes(stream.read(8), "big")
            payload = stream.read(size)
            if b0 & 0x0F == 0xA:
                pongs += 1
                if payload == last:
                    break
        assert pongs < 100_000  # the flood was not answered ping for ping
    finally:
        d.close()


def test_a_client_that_stops_reading_is_dropped_once_its_answers_stall(data_dir: Path) -> None:
    """Answers pipelined (no token needed: /health) and never read fill the buffers; the
    daemon waited for them to drain for ever, holding the socket and its slot under the
    connection cap, so enough such sockets locked every client out. Dropped after the stall
    (1 s here), the socket is reset: it never gets most of what it asked for."""
    d = Daemon(data_dir, env={"CTSD_WRITE_STALL_S": "1"}).start()
    try:
        one = len(httpx.get(d.url + "/health").content)
        n = 60_000  # answers of many MB: far more than the kernel's buffers hold
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", d.port))
        s.settimeout(3)
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        try:
            s.sendall(request * n)  # until the daemon, stuck writing, stops reading
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        (dropped,) = wait_until(
            lambda: [e for e in d.log_events() if e.get("event") == "connection_dropped"],
            10,
            what="the connection dropped",
        )
        host, port = s.getsockname()
        assert dropped["peer"] == f"{host}:{port}" and dropped["unsent_bytes"] > 0
        t0 = time.monotonic()
        got = 0
        s.settimeout(10)
        try:
            while chunk := s.recv(1 << 16):
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < n * one // 2, (got, n * one)  # (`one`: an answer's body alone)
        assert time.monotonic() - t0 < 8
        s.close()
        assert httpx.get(d.url + "/health").status_code == 200
        # the drop is no crash: the answer cut short was logged as a route's failure
        assert not [e for e in d.log_events() if e.get("level") == "error"]
    finally:
        d.close()


def _rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


def test_clients_that_reset_their_connections_leave_nothing_held(daemon: Daemon) -> None:
    """A keep-alive connection its client reset (killed, a laptop asleep, a proxy) was held
    by uvicorn's keep-alive timer, some 8 KB each, until it fired: a client reconnecting in
    a loop grew the daemon by tens of MB."""
    assert daemon.proc is not None
    request = "GET /api/settings/connections HTTP/1.1\r\nHost: localhost\r\n"
    request += f"Authorization: Bearer {daemon.token}\r\n\r\n"
    linger_0 = struct.pack("ii", 1, 0)  # close() sends a reset

    def resets(n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            s.sendall(request.encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
            s.close()

    resets(300)  # (the allocator's first growth)
    before = _rss_kb(daemon.proc.pid)
    resets(2000)
    grown = _rss_kb(daemon.proc.pid) - before
    assert grown < 6_000, f"{grown} kB more after 2,000 reset connections"


def test_a_large_answer_read_slowly_is_not_cut_at_keep_alive(data_dir: Path) -> None:
    """uvicorn arms its keep-alive close (5 s) once the answer is handed over, not sent: a
    large answer read slowly is still going out then, and must not be cut."""
    pad = json.dumps({"note": "x" * 500})
    write_connections(
        data_dir, [connection(f"c{i:05d}", connection_settings=pad) for i in range(6000)]
    )
    d = Daemon(data_dir, env={"CTSD_WRITE_STALL_S": "1"}).start()
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", d.port))
        s.sendall(
            b"GET /api/settings/connections HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        s.settimeout(10)
        head, body, t0 = b"", b"", time.monotonic()
        pause = threading.Event()  # (the client's own pace: part of the scenario)
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        head, _, body = head.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = s.recv(1 << 16)
            assert chunk, f"cut after {len(body)} of {length} bytes"
            body += chunk
            if len(body) // (512 << 10) != (len(body) - len(chunk)) // (512 << 10):
                pause.wait(0.5)  # half a second after each 512 KiB
        assert time.monotonic() - t0 > 5, head  # (past uvicorn's keep-alive)
        assert len(json.loads(body)) == 6000
        s.close()
    finally:
        d.close()


def test_slow_headers_are_dropped_at_the_deadline(data_dir: Path) -> None:
    d = Daemon(data_dir, env={"CTSD_HEADER_TIMEOUT_S": "1"}).start()
    try:
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the daemon
        assert 0.5 <= time.monotonic() - t0 <= 5
        s.close()
        idle = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        t0 = time.monotonic()
        assert idle.recv(100) == b""  # nothing sent at all: dropped too
        assert time.monotonic() - t0 <= 5
        idle.close()
    finally:
        d.close()


async def test_a_body_that_never_ends_is_dropped_at_its_deadline(data_dir: Path) -> None:
    """A body promised and never sent, to a route that reads it, or after a quick 401 that
    did not: each connection is closed once the body's deadline passes (else enough of them
    hold every slot of the cap), and a bus connection, whose upgrade has no body, is not."""
    d = Daemon(data_dir, env={"CTSD_BODY_TIMEOUT_S": "1"}).start()
    try:
        head = b"Host: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        async with bus(d) as b:
            opened = time.monotonic()
            for request_line, auth in (
                (b"POST /api/data/ui-config HTTP/1.1\r\n", f"Authorization: Bearer {TOKEN}"),
                (b"POST /api/data/ui-config HTTP/1.1\r\n", "Authorization: Bearer wrong"),
            ):
                s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
                s.sendall(request_line + head + auth.encode() + b"\r\n\r\n" + b'{"a": ')
                t0 = time.monotonic()
                got = b""
                while chunk := s.recv(65536):  # an answer maybe (the 401), then the close
                    got += chunk
                assert 0.5 <= time.monotonic() - t0 <= 5, got
                s.close()
            # The bus connection opened before the first deadline outlived both of them.
            assert time.monotonic() - opened > 1.5
            assert (await b.ok("ping"))["pong"] is True
        assert "http_route_failed" not in d.stdout()  # a client gone is not the daemon's fault
        assert httpx.get(d.url + "/health").status_code == 200
    finally:
        d.close()


def refusal(port: int, *parts: bytes) -> tuple[bytes, dict[str, object]]:
    """What the daemon answers to a request sent as `parts`: (head, JSON body), read until
    it closes the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    for part in parts:
        s.sendall(part)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_huge_headers_and_request_lines_are_refused(daemon: Daemon) -> None:
    start = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
    head, body = refusal(daemon.port, start, b"X-Junk: " + b"a" * 100_000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert body["error"] == {"code": "invalid", "message": "headers larger than 65536 bytes"}
    head, body = refusal(daemon.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert "request line longer than" in str(body["error"])
    assert httpx.get(daemon.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /api/settings/connections/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: r55P\r\n\r\n",
        b"POST /api/settings/connections HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Content-Length: 7\r\n\r\n",
        b"GET /health HTTP/9.9\r\n\r\n",
        b"\x00\xff\xfe garbage\r\n\r\n",
    ],
)
def test_a_request_the_parser_refuses_gets_a_json_error(daemon: Daemon, request_: bytes) -> None:
    head, body = refusal(daemon.port, request_)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert b"\r\nx-revision: " in head  # as every answer
    assert body["error"]["code"] == "invalid" and "malformed HTTP request" in str(body)


def test_requests_the_parser_refuses_are_logged_in_summary(daemon: Daemon) -> None:
    """A client speaking TLS to the plain port (or a scan) in a loop made one uvicorn line
    per request, naming neither peer nor reason: the log flooded."""
    tls_hello = bytes.fromhex("160301012c010001280303") + b"\0" * 290
    for _ in range(40):
        assert refusal(daemon.port, tls_hello)[0].startswith(b"HTTP/1.1 400")
    refusal(daemon.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")

    def lines() -> list[dict[str, Any]]:
        return [e for e in daemon.log_events() if e.get("event") == "http_malformed"]

    wait_until(lambda: len(lines()) == 2, what="one line per reason")
    first, long_line = lines()
    assert first["remote"] == "127.0.0.1" and first["reason"].startswith("malformed HTTP")
    assert long_line["reason"].startswith("request line longer than")
    assert not [e for e in daemon.log_events() if "Invalid HTTP" in str(e.get("event"))]
    assert httpx.get(daemon.url + "/health").status_code == 200


async def test_deeply_nested_frame_is_an_error_not_a_crash(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        await b.ws.send('{"id": 1, "type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}")
        reply = json.loads(await b.ws.recv())
        assert reply["success"] is False
        assert reply["error"]["code"] in ("invalid_format", "invalid")
        assert "deeper than 72 levels" in reply["error"]["message"], reply  # names the limit
        assert (await b.ok("ping"))["pong"] is True
    assert "Traceback" not in daemon.stdout()


async def test_header_token_client_is_never_refused_by_other_clients_failures(
    daemon: Daemon,
) -> None:
    for _ in range(30):
        assert daemon.http("/api/connections/state", token="wrong")[0] == 401
    async with connect(
        daemon.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_ok"
