"""The daemon's parts over a data dir, built as the app builds them but without a server or a
subprocess: for the core tests of the store, probes and sweeps."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ctsd.bases import Bases
from ctsd.probes import Prober
from ctsd.secretbox import SecretBox
from ctsd.store import Store
from ctsd.sweeps import Sweeper
from tests.datadir import write_connections, write_settings


async def open_app(
    data_dir: Path,
    conns: list[dict[str, Any]],
    settings: dict[str, Any] | None = None,
    box: SecretBox | None = None,
) -> SimpleNamespace:
    """Store, prober and sweeper over `data_dir` holding `conns` and `settings`."""
    write_connections(data_dir, conns)
    write_settings(data_dir, settings or {})
    store = Store(data_dir, box)
    store.open()
    await store.start()
    prober = Prober(store)
    return SimpleNamespace(
        store=store, prober=prober, sweeper=Sweeper(store, prober), data_dir=data_dir
    )


async def sync_log(app: Any) -> list[dict[str, Any]]:
    """The sync-log file, once it holds every change made so far."""
    await app.store.checkpointer.flush()
    return json.loads((app.data_dir / "connection-sync-log.json").read_text())


async def state_file(app: Any) -> dict[str, dict[str, Any]]:
    await app.store.checkpointer.flush()
    rows = json.loads((app.data_dir / "connection-state.json").read_text())
    return {r["connection_id"]: r for r in rows}


def loaded_with_copies(data_dir: Path, box: SecretBox | None = None) -> tuple[Store, list[str]]:
    """The store on `data_dir` opened as the daemon opens it, with the copies of its files
    (`Bases`): the files edited while it was down set back to them. The store and those
    files (for `take_in_edited`, once started)."""
    store = Store(data_dir, box)
    copies = Bases(data_dir)
    store.load(copies)
    edited = store.set_back(copies)
    store.replay()
    return store, edited


@contextlib.asynccontextmanager
async def then_killed(data_dir: Path, *, copies: bool = False) -> AsyncIterator[Store]:
    """The store on `data_dir`, started (`copies`: as the daemon starts it), that dies (at
    the end of the block) before any checkpoint round writes what it did: its changes are in
    the journal only, as after a kill -9 in that window."""
    if copies:
        store, _ = loaded_with_copies(data_dir)
    else:
        store = Store(data_dir)
        store.open()
    await store.start()
    store.checkpointer.stop()  # no further round ...
    assert store._checkpoints is not None
    await store._checkpoints
    yield store
    store.journal.close()  # ... and the daemon is gone
    assert store._writer is not None
    store._writer.cancel()
    store._io.shutdown(wait=True)


async def killed_after(data_dir: Path, *ops: Any) -> None:
    """The store on `data_dir` applies `ops` and dies before any checkpoint round writes
    them (`then_killed`)."""
    async with then_killed(data_dir) as store:
        for op in ops:
            await store.submit(op, "bus")
