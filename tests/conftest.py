from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.daemon import Daemon
from tests.exchange import FakeExchange

# Files the tests write by hand are the operator's, made as systemd's UMask=0077 makes them:
# the daemon refuses data files other users may read (tests of that set the mode on purpose).
os.umask(0o077)

# Property tests (tests/test_fuzz.py): a few hundred examples in the normal run, the same ones
# every run (derandomized, no example database); CTSD_FUZZ=long runs them long and random.
settings.register_profile(
    "ctsd",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("CTSD_FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("long" if os.environ.get("CTSD_FUZZ") == "long" else "ctsd")


# The cluster fault tests (a NATS cluster of their own that they kill, stop or cut) wait out
# the servers' own fault timers, about ten seconds each. In the normal run each runs on one
# of the server releases (`nats_servers()`), taken in turn by the tests' names, so that both
# releases meet faults and the suite keeps to its time; CTSD_NATS_EVERY_VERSION=1 runs each
# on every one.
FAULT_FIXTURES = frozenset({"own_cluster", "own_nats", "apart_nats"})
# They, and the tests that stop a node of a cluster on one release, run alone (`serial`,
# after the other tests' workers): a second worker on the same cores stretched a restarted
# node's way back past its 30 s wait.
SERIAL_FIXTURES = FAULT_FIXTURES | {"cut_cluster"}


@pytest.hookimpl(tryfirst=True)  # before `-m` picks by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERIAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.serial)
    if os.environ.get("CTSD_NATS_EVERY_VERSION"):
        return
    releases: dict[str, list[pytest.Item]] = {}
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params  # type: ignore[attr-defined]
        if not params or not FAULT_FIXTURES & params.keys():
            continue
        rest = sorted((k, str(v)) for k, v in params.items() if k not in FAULT_FIXTURES)
        releases.setdefault(f"{item.path}::{item.originalname}{rest}", []).append(item)  # type: ignore[attr-defined]
    dropped = [
        item
        for turn, name in enumerate(sorted(releases))
        for i, item in enumerate(releases[name])
        if i != turn % len(releases[name])
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in gone]


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


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    """A fake exchange on a free loopback port (`tests.exchange`), closed afterwards."""
    f = FakeExchange()
    try:
        yield f
    finally:
        f.close()
