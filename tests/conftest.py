from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon

# Files the tests write by hand are the operator's, made as systemd's UMask=0077 makes them:
# the daemon refuses data files other users may read (tests of that set the mode on purpose).
os.umask(0o077)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # websockets' asyncio API


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def daemon(data_dir: Path) -> Iterator[Daemon]:
    """A started daemon on a fresh data dir; stopped (SIGTERM, then kill) afterwards."""
    d = Daemon(data_dir).start()
    try:
        yield d
    finally:
        d.close()
