from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon


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
