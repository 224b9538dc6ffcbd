"""A throwaway PostgreSQL server for the tests: its own cluster in a temp dir, on a free
loopback port, with password authentication; stopped and removed afterwards.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system
user (the Debian package creates it) and its commands run through `runuser`. When the
server binaries are missing, the set-up installs them (`apt-get install -y postgresql`,
as `.ci/run` does); if that is impossible the tests are skipped — or fail, when
`CTSD_REQUIRE_POSTGRES=1` (CI) says they must run.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon import free_port


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _version(path: str) -> int:
    try:
        return int(Path(path).parts[4])
    except (IndexError, ValueError):
        return 0


def _install() -> str | None:
    """Install the server; None on success, else why not."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "postgresql is not installed and this user cannot install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]  # another test worker may hold the lock
    install = [*apt, "install", "-y", "-qq", "postgresql"]
    r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:  # the package lists may be old
        subprocess.run([*apt, "update", "-qq"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    return None if r.returncode == 0 else f"apt-get install postgresql failed: {r.stderr[-500:]}"


def unavailable(reason: str) -> None:
    if os.environ.get("CTSD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (CTSD_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"no PostgreSQL server for the migration tests: {reason}")


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    database: str

    def url(self, password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{self.database}"


def run_postgres(password: str) -> Iterator[Postgres]:
    bindir = _bindir()
    if bindir is None:
        why = _install()
        bindir = _bindir()
        if bindir is None:
            unavailable(why or "installed, but initdb was not found")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="ctsd-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run the server")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if prefix:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    port = free_port()
    data = root / "cluster"

    def as_owner(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)

    r = as_owner(
        str(bindir / "initdb"), "-D", str(data), "-U", "ctsd", "--pwfile", str(pwfile),
        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"initdb failed: {r.stderr[-500:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = as_owner(
        str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w",
        "-t", "60", "start",
    )  # fmt: skip
    if r.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"the server did not start: {r.stderr[-300:]} {log[-500:]}")
    try:
        import psycopg

        with psycopg.connect(
            f"postgresql://ctsd:{password}@127.0.0.1:{port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE cts")
        yield Postgres(port, "ctsd", password, "cts")
    finally:
        as_owner(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def new_password() -> str:
    return "pw-" + secrets.token_hex(8)
