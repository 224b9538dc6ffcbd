"""Test harness: the real daemon as a subprocess, readiness read from a real NOTIFY_SOCKET.

`with Daemon(data_dir) as d:` starts it and kills it afterwards (the `daemon` fixture gives
one on a fresh data dir). What the outside sees of it: `d.http(...)`, `d.log_events()`,
and below, `sync_log`, `revision`, `health`, `invalid_files`, `log_lines`, `wait_events`.
Its bus: `tests.bus.bus(d)`. Tests poll for conditions with timeouts (`wait_until`); they
never sleep blindly.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio

TOKEN = "test-token-0123456789abcdefghijklmnop"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_LOW, _HIGH = _ephemeral_range()
# Ports below the ephemeral range when there is room there, else above it; each process
# starts at its own place and walks on, so two calls (or two test processes) never hand out
# the same port.
_PORTS = range(10_000, _LOW) if _LOW - 10_000 >= 5_000 else range(_HIGH + 1, 65_536)
_next_port = _PORTS.start + (os.getpid() * 7_919) % len(_PORTS)


def free_port() -> int:
    """A loopback port free now, outside the kernel's ephemeral range. A port the kernel picks
    (bind to 0) is one it also gives outgoing connections: a NATS client or route connecting
    between this call and the daemon's bind could take it ("Address already in use")."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (_next_port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): the next one
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


@contextlib.contextmanager
def http_server(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server (a fake exchange, a web page's origin) served from a thread on a
    free port while the block runs; yields its origin, `http://127.0.0.1:PORT`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_until(
    cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll `cond` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


async def wait_until_async(
    cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """`wait_until` for tests running on the event loop: yields to it between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await anyio.sleep(interval)


class NotifySocket:
    """A datagram socket bound where systemd's would be; collects sd_notify messages."""

    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"ctsd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            self.messages.extend(data.decode().split("\n"))

    def wait_for(self, field: str, timeout: float = 10.0, after: int = 0) -> int:
        """Wait until `field` (e.g. "READY=1") arrives at index >= after; return its index."""

        def found() -> int | None:
            msgs = self.poll()
            for i in range(after, len(msgs)):
                if msgs[i] == field:
                    return i + 1
            return None

        return wait_until(found, timeout, what=f"sd_notify {field}") - 1

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        token: str | None = TOKEN,
        abstract_notify: bool = False,
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.token = token
        self.extra_env = env or {}
        self.args = args or []
        self.workdir = Path(tempfile.mkdtemp(prefix="ctsd-test-"))
        self.notify = NotifySocket(self.workdir, abstract=abstract_notify)
        self._ready_after = 0  # the notify messages before the last start
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self._closed_output: dict[Path, str] = {}  # what the daemon printed, kept after close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "ctsd", "serve",
            "--data-dir", str(self.data_dir),
            "--port", str(self.port),
            "--log-format", "json",
            *self.args,
        ]  # fmt: skip

    def start(self, wait: bool = True, timeout: float = 15.0) -> Daemon:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CTSD_", "NOTIFY_", "WATCHDOG_"))
        }
        env.update({"NOTIFY_SOCKET": self.notify.address, "PYTHONUNBUFFERED": "1"})
        if self.token is not None:
            env["CTSD_TOKEN"] = self.token
        env.update(self.extra_env)
        self._ready_after = len(self.notify.poll())  # (a restart: not the last run's READY)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=open(self.stdout_path, "ab"),  # noqa: SIM115 - the child owns it
            stderr=open(self.stderr_path, "ab"),  # noqa: SIM115
            env=env,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.stderr()}{self.stdout()[-2000:]}"
                )
            return "READY=1" in self.notify.poll()[self._ready_after :]

        wait_until(ready, timeout, what="READY=1")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s of {sig}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stdout(self) -> str:
        return self._read(self.stdout_path)

    def stderr(self) -> str:
        return self._read(self.stderr_path)

    def _read(self, path: Path) -> str:
        if path in self._closed_output:
            return self._closed_output[path]
        return path.read_text(errors="replace") if path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def http(
        self,
        path: str,
        method: str = "GET",
        token: str | None = "default",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or text) for a plain HTTP request."""
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        tok = self.token if token == "default" else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def close(self) -> None:
        self.kill()
        self.notify.close()
        for path in (self.stdout_path, self.stderr_path):
            self._closed_output[path] = self._read(path)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- what the outside sees of a running daemon ---------------------------------------------

SYNC_LOG = "connection-sync-log.json"


def http_json(
    d: Daemon, method: str, path: str, body: Any, timeout: float = 10.0
) -> tuple[int, Any]:
    """(status, decoded JSON body) of a request with a JSON body."""
    req = urllib.request.Request(
        d.url + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {d.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sync_log(d: Daemon) -> list[dict[str, Any]]:
    """The sync-log file. The daemon replaces it atomically: a read is always a whole version
    (and a change answered with `sync: files` is in it)."""
    return json.loads((d.data_dir / SYNC_LOG).read_bytes())


def events_after(d: Daemon, revision: int) -> list[dict[str, Any]]:
    return [e for e in sync_log(d) if e["id"] > revision]


def wait_events(
    d: Daemon, after: int, pred: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    """The sync-log events after revision `after`, once there are some and `pred` holds."""

    def check() -> list[dict[str, Any]] | None:
        evs = events_after(d, after)
        return evs if evs and pred(evs) else None

    return wait_until(check, 5.0, what=what)


def health(d: Daemon) -> dict[str, Any]:
    status, body = d.http("/health", token=None)
    assert status == 200, body
    return body


def revision(d: Daemon) -> int:
    """The daemon's revision now (the sync-log file may be a few milliseconds behind)."""
    return int(health(d)["revision"])


def invalid_files(d: Daemon) -> dict[str, str]:
    """File → problem, for every data file `/health` reports invalid."""
    return health(d)["checks"]["files"]["invalid"]


def log_lines(d: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines of one event."""
    return [e for e in d.log_events() if e.get("event") == event]
