"""What the hand-edit tests share: a data dir of numbered connections, the edit an operator
makes to one of them, and what must follow (exactly one event of source "file").

The edits themselves (atomic rename, in place, vim's dance, ...) are the tests' own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests import bus as buses
from tests.daemon import Daemon, log_lines, wait_events
from tests.datadir import STAMP, connection, dump

CONNS = "connections.json"
# The race test sends far more than the default 1,000 bus commands per 15 minutes; the
# periodic connection tests (which log `test` events of their own) are off, so the events
# seen are exactly those of the edits.
SETTINGS = {
    "server": {"rate_limit": {"requests": 1_000_000, "window_s": 900}},
    "test_interval_s": 0,
}


def numbered(i: int, **over: Any) -> dict[str, Any]:
    """Connection `conn_000i`, as an operator's file holds it (plain-text secrets, stamps)."""
    return connection(
        f"conn_{i:04d}",
        f"Connection {i}",
        **{
            "api_key": f"key-{i:04d}-SECRET",
            "api_secret": f"secret-{i:04d}-SECRET",
            "volume_factor": 1.0,
            "is_enabled": True,
            "created_at": STAMP,
            "updated_at": STAMP,
            **over,
        },
    )


def seed(data_dir: Path, n: int, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`n` numbered connections and `settings` (else SETTINGS) in `data_dir`."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conns = [numbered(i) for i in range(n)]
    (data_dir / CONNS).write_bytes(dump(conns))
    (data_dir / "settings.json").write_bytes(dump(settings or SETTINGS))
    return conns


def edit_name(body: bytes, cid: str, name: str) -> bytes:
    """connections.json `body` with connection `cid` renamed to `name`."""
    conns = json.loads(body)
    for c in conns:
        if c["id"] == cid:
            c["name"] = name
    return dump(conns)


def assert_one_name_update(d: Daemon, rev: int, cid: str, name: str) -> None:
    """After revision `rev`: exactly one event, the rename of `cid` from the file, and no
    half-written file judged on the way."""
    evs = wait_events(d, rev, lambda evs: True, f"the edit of {cid}")
    assert [(e["connection_id"], e["action"], e["data"]["fields"]) for e in evs] == [
        (cid, "update", ["name"])
    ], evs
    assert evs[0]["data"]["source"] == "file"
    assert evs[0]["data"]["values"]["name"] == name
    assert not log_lines(d, "file_invalid"), "a half-written file was judged"
    assert not log_lines(d, "file_restored_from_memory")


@asynccontextmanager
async def bus(d: Daemon, subscribe: bool = True) -> AsyncIterator[buses.Bus]:
    """The tests' bus, subscribed to everything (unless `subscribe=False`); changes are
    answered by the journal (no `sync`), as a frontend's are."""
    async with buses.bus(d, sync=None) as b:
        if subscribe:
            res = await b.call("subscribe")
            assert res["success"], res
        yield b
