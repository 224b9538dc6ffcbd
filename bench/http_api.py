"""HTTP benchmark: the REST API of the real daemon beside floors measured in the same run.

    .venv/bin/python bench/http_api.py                   # ~1 minute
    .venv/bin/python bench/http_api.py --dir /var/tmp --updates 500

Starts `ctsd serve` on a temporary data dir under the current directory (or `--dir`) with
1,000 connections, and a bare Starlette app under uvicorn (a subprocess) that answers one
route with pre-encoded bytes.

  (a) update ack   `PUT /api/settings/connections/{id}` (one keep-alive connection, sequential,
                   a minimal client) against the same change as a bus `connections.update`
                   on one websocket, rounds interleaved; p50/p99 and the ratio.
                   Target: p50 ≤ 1.3 × the bus.
  (b) list         `GET /api/settings/connections` at 1,000 connections: requests/s with 16
                   keep-alive connections (wrk, a C load generator, so the client is not the
                   bottleneck), beside the bare Starlette route returning the same bytes.

Not a test: numbers depend on the machine and what else runs (the 1-minute load average is
printed before and after). Needs `wrk` (Debian: apt-get install wrk) for (b).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HEADERS,
    Call,
    Daemon,
    Row,
    auth_and,
    connections,
    daemon,
    free_port,
    ms,
    pct,
    print_table,
    wait_until,
)


def bare_server(port: int, body_file: str) -> None:
    """A bare Starlette route answering the same bytes (`bench/http_api.py --bare PORT FILE`)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = Path(body_file).read_bytes()

    async def listing(_request: object) -> Response:
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/api/settings/connections", listing)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="httptools")


class KeepAlive:
    """A minimal HTTP/1.1 keep-alive client: one request at a time on one socket.

    httpx's own per-request work is about a millisecond here, several times what the server
    spends on a PUT; timing it would measure the client. The websockets client on the bus side
    is thin in the same way, so both columns time the daemon."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {HEADERS['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def update_acks(d: Daemon, n: int, rounds: int) -> tuple[list[float], list[float]]:
    ws = await connect(d.ws_url, additional_headers=HEADERS, compression=None, max_size=None)
    await auth_and(ws, None)
    call = Call(ws)
    http = await KeepAlive.open(d.port)
    http_s: list[float] = []
    bus_s: list[float] = []
    for i in range(rounds):  # interleaved: load drift on the machine hits both alike
        cid = f"b{i % n}"
        body = json.dumps({"user_id": 2 * i + 2}).encode()
        t0 = time.perf_counter()
        status, answer = await http.request("PUT", f"/api/settings/connections/{cid}", body)
        http_s.append(time.perf_counter() - t0)
        assert status == 200, answer
        t0 = time.perf_counter()
        await call("connections.update", connection_id=cid, changes={"user_id": 2 * i + 3})
        bus_s.append(time.perf_counter() - t0)
    http.close()
    await ws.close()
    return http_s, bus_s


def wrk(url: str, seconds: float, headers: dict[str, str]) -> float:
    args = ["wrk", "-t2", "-c16", f"-d{seconds:g}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{url}: {non2xx.group(1)} error responses")
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="where the data dir goes")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if args.bare:
        bare_server(int(args.bare[0]), args.bare[1])
        return

    bare: subprocess.Popen[bytes] | None = None
    rows: list[Row] = []
    verdicts: list[str] = []
    load0 = os.getloadavg()[0]
    with daemon(args.dir) as d:
        base = d.data_dir.parent
        try:
            with httpx.Client(base_url=d.url, headers=HEADERS, timeout=60) as client:
                body = {"files": {"connections.json": connections(args.connections)}}
                r = client.post("/api/data/import?mode=replace", json=body)
                assert r.status_code == 200, r.text
                listing = client.get("/api/settings/connections").content
            http_s, bus_s = asyncio.run(update_acks(d, args.connections, args.updates))
            ratio = pct(http_s, 0.5) / pct(bus_s, 0.5)
            n = args.connections
            rows.append((f"(a) bus connections.update ack @{n}", *_p50_p99(bus_s), ""))
            rows.append((f"(a) HTTP PUT ack @{n}", *_p50_p99(http_s), f"{ratio:.2f} × bus (p50)"))
            verdicts.append(f"(a) PUT p50 {ratio:.2f} × bus ≤ 1.3: {_met(ratio <= 1.3)}")

            if shutil.which("wrk") is None:
                rows.append(("(b) GET list", "wrk not installed", "", "apt-get install wrk"))
            else:
                body_file = base / "listing.json"
                body_file.write_bytes(listing)
                port = free_port()
                bare = subprocess.Popen(
                    [sys.executable, __file__, "--bare", str(port), str(body_file)]
                )
                url = f"http://127.0.0.1:{port}/api/settings/connections"
                wait_until(lambda: _up(url), 15)
                bare_rps = wrk(url, args.seconds, {})
                ctsd_rps = wrk(d.url + "/api/settings/connections", args.seconds, HEADERS)
                kb = len(listing) // 1024
                rows.append(
                    (f"(b) bare Starlette route, same {kb} KB", f"{bare_rps:,.0f}/s", "", "")
                )
                rows.append(
                    (
                        f"(b) ctsd GET /api/settings/connections @{args.connections}",
                        f"{ctsd_rps:,.0f}/s",
                        "16 clients",
                        f"{ctsd_rps / bare_rps:.2f} × bare",
                    )
                )
        finally:
            if bare is not None:
                bare.terminate()
                bare.wait()
    print_table(rows, verdicts, load0)


def _p50_p99(values: list[float]) -> tuple[str, str]:
    return ms(pct(values, 0.5)), ms(pct(values, 0.99))


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
