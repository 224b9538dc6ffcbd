"""Two stores in cluster mode, in-process, on a real 3-node NATS cluster: the moment two hosts
change one record at once, made deterministic by holding back one host's applying."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ctsd import ops
from ctsd.cluster.committer import ClusterCommitter
from ctsd.cluster.config import ClusterSettings
from ctsd.cluster.engine import ClusterEngine
from ctsd.cluster.messages import Change
from ctsd.errors import CtsdError
from ctsd.store import Store
from tests.daemon import wait_until_async
from tests.nats_cluster import (  # the `nats` fixture
    NatsCluster,
    nats_module_cluster,  # noqa: F401
    require_nats_server,
)

pytestmark = pytest.mark.anyio

require_nats_server()

_names = itertools.count(1)


@asynccontextmanager
async def host(data_dir: Path, settings: ClusterSettings) -> AsyncIterator[ClusterCommitter]:
    store = Store(data_dir)
    store.open()
    await store.start()
    committer = ClusterCommitter(store, ClusterEngine(settings))
    store.committer = committer
    await committer.engine.start()
    try:
        yield committer
    finally:
        await store.close()


async def test_same_record_on_two_hosts_one_wins_the_other_gets_conflict(
    nats: NatsCluster, tmp_path: Path
) -> None:
    name = f"s{os.getpid()}x{next(_names)}"

    def settings(host_id: str) -> ClusterSettings:
        return ClusterSettings(nats_urls=tuple(nats.urls), name=name, host_id=host_id)

    async with host(tmp_path / "x", settings("x")) as x, host(tmp_path / "y", settings("y")) as y:
        # Host y applies the stream through a gate, so it can be held behind host x.
        gate = asyncio.Event()
        gate.set()
        apply = y._apply

        async def gated(change: Change) -> None:
            await gate.wait()
            await apply(change)

        y._apply = gated  # type: ignore[method-assign]
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
        await x.store.submit(ops.create({"id": "c2", "name": "two", "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(2, timeout=10)

        gate.clear()  # y does not see what x does next
        await x.store.submit(ops.update("c1", {"name": "from x"}), "bus")
        on_y = [
            asyncio.create_task(y.store.submit(ops.update("c1", {"volume_factor": 3.0}), "bus")),
            asyncio.create_task(y.store.submit(ops.update("c2", {"name": "from y"}), "bus")),
        ]
        # y published against seq 2, the stream is at 3: y must apply x's change first
        await wait_until_async(lambda: y.conflicts > 0, 10, what="y's publish refused")
        assert not any(t.done() for t in on_y)
        gate.set()
        with pytest.raises(CtsdError) as refused:
            await on_y[0]
        assert refused.value.code == "conflict", refused.value
        assert (await on_y[1]).name == "from y"  # a record nobody else changed goes through
        await x.engine.wait_applied(y.engine.applied_seq, timeout=10)
        for c in (x, y):
            assert c.store.connections["c1"].name == "from x"
            assert c.store.connections["c1"].volume_factor == 1.0  # never silently merged
            assert c.store.connections["c2"].name == "from y"
        assert [e.id for e in x.store.log] == [e.id for e in y.store.log] == [1, 2, 3, 4]
