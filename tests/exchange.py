"""A fake exchange on 127.0.0.1 for connection tests and Project X logins (never a real one).

Point a connection at it with `connection(..., base_url=fake.base(MODE))`: the first path
segment picks how it answers (`ok`, `slow`, `hold`, `err500`, `badjson`, `bybiterr`,
`projectx`), the rest is the exchange's own path.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.datadir import STAMP, connection

PX_USER = "trader-joe"
PX_KEY = "PXKEY-very-secret-0123456789"
PX_TOKEN = "SESSION-TOKEN-must-not-leak"


class FakeExchange:
    """A fake exchange: the first path segment picks the behaviour, the rest is the exchange
    path (`http://127.0.0.1:PORT/ok/v5/market/time`)."""

    def __init__(self, slow_s: float = 2.0) -> None:
        self.slow_s = slow_s
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def base(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests.append((method, h.path, {k.lower(): v for k, v in h.headers.items()}))
        try:
            mode, _, rest = h.path.lstrip("/").partition("/")
            path = "/" + rest.split("?", 1)[0]
            length = int(h.headers.get("Content-Length") or 0)
            body_in = h.rfile.read(length) if length else b""
            if mode == "slow":
                time.sleep(self.slow_s)
                mode = "ok"
            if mode == "hold":
                time.sleep(0.3)
                mode = "ok"
            if mode == "err500":
                self._send(h, 500, b'{"error": "boom"}')
            elif mode == "badjson":
                self._send(h, 200, b"<html>maintenance</html>")
            elif mode == "bybiterr":
                self._send(h, 200, json.dumps({"retCode": 10002, "retMsg": "bad time"}).encode())
            elif mode == "deep":  # past msgspec's nesting limit
                self._send(h, 200, b"[" * 5000 + b"]" * 5000)
            elif mode == "longcode":  # an error code a server may make as long as it likes
                self._send(h, 200, json.dumps({"retCode": "9" * 200_000}).encode())
            elif mode == "gzip":  # a good answer, compressed (inflated by the prober itself)
                body = gzip.compress(json.dumps(self._time_body(path)).encode())
                self._send(h, 200, body, {"Content-Encoding": "gzip"})
            elif mode in ("gziptrail", "gzipcut"):  # more after its end; cut short
                body = gzip.compress(json.dumps(self._time_body(path)).encode())
                body = body + b"x" * 1000 if mode == "gziptrail" else body[: len(body) // 2]
                self._send(h, 200, body, {"Content-Encoding": "gzip"})
            elif mode == "bomb":  # 48 KB on the wire, 50 MB inflated
                bomb = gzip.compress(b" " * 50_000_000, 9)
                self._send(h, 200, bomb, {"Content-Encoding": "gzip"})
            elif mode == "empty":  # a 2xx with no body at all
                self._send(h, 200, b"")
            elif mode == "echo":  # a careless server quoting the request, query and all
                body = {"retCode": 10003, "retMsg": f"invalid api key in {h.path}"}
                self._send(h, 200, json.dumps(body).encode())
            elif mode == "echo401":  # the same in its reason phrase
                self._send(h, 401, b"{}", reason=f"bad key {h.path}")
            elif mode == "projectxreason":  # a refusal whose reason phrase echoes the key
                creds = json.loads(body_in or b"{}")
                self._send(h, 401, b"{}", reason=f"Unauthorized key {creds.get('apiKey')}")
            elif mode in ("projectx", "projectxpad"):
                creds = json.loads(body_in or b"{}")
                pad = "x" * 192 if mode == "projectxpad" else ""  # the key across a 200 cut
                ok = creds.get("userName") == PX_USER and creds.get("apiKey") == PX_KEY
                answer = (
                    {"token": PX_TOKEN, "success": True, "errorCode": 0, "errorMessage": None}
                    if ok
                    else {
                        "token": None,
                        "success": False,
                        "errorCode": 3,
                        # a careless server echoing what it got: must be scrubbed
                        "errorMessage": f"invalid key {pad}{creds.get('apiKey')}",
                    }
                )
                self._send(h, 200, json.dumps(answer).encode())
            else:
                self._send(h, 200, json.dumps(self._time_body(path)).encode())
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _time_body(path: str) -> Any:
        ms = int(time.time() * 1000)
        if path == "/v5/market/time":
            return {"retCode": 0, "retMsg": "OK", "result": {"timeSecond": str(ms // 1000)}}
        if path == "/api/v5/public/time":
            return {"code": "0", "msg": "", "data": [{"ts": str(ms)}]}
        if path == "/openApi/swap/v2/server/time":
            return {"code": 0, "msg": "", "data": {"serverTime": ms}}
        return {"serverTime": ms}

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        h.send_response(status, reason)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def probe_connection(cid: str, base_url: str | None = None, **fields: Any) -> dict[str, Any]:
    """A connection record as the probe and sweep tests want it: enabled and active (the sweeps
    watch it), with secrets an exchange must never see, stamped, its tests sent to `base_url`
    (the fake) when given. `fields` win."""
    record: dict[str, Any] = {
        "is_enabled": True,
        "is_active": True,
        "api_key": "CONNKEY-secret-abcdef123456",
        "api_secret": "CONNSECRET-zzz",
        "connection_settings": json.dumps({"base_url": base_url} if base_url else {}),
        "created_at": STAMP,
        "updated_at": STAMP,
    }
    return connection(cid, **{**record, **fields})


def px_document(api_url: str, key: str = PX_KEY) -> dict[str, Any]:
    """connection.json with Project X credentials pointing at `api_url`."""
    return {
        "projectX": {
            "apiUrl": api_url,
            "websocketUrl": "wss://rtc.example",
            "username": PX_USER,
            "apiKey": key,
            "autoConnect": True,
        },
        "server": {"port": 3587, "corsOrigins": []},
        "trading": {"defaultCommission": 2.8, "simulationMode": True},
    }
