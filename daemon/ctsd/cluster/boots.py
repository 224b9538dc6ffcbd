"""The boot ids of the daemons that ran on this data dir (`DATA/.cluster-boots`).

A cluster host's message ids are `<host id>:<boot id>-<n>`, the boot id new with each start.
A message with this host's id whose boot id no daemon of this data dir had was published by
another daemon running with the same host id (`ClusterEngine._check_twin`). Kept on disk, so
a message of the previous start that lands late (sent as the engine lost its quorum, stored
once it was back) is still known for this host's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import structlog

from ctsd.atomic import write_files
from ctsd.files import CLUSTER_BOOTS, Invalid
from ctsd.safefile import read_data_file

NAME = CLUSTER_BOOTS
KEPT = 64  # starts remembered (a message older than that many starts is history anyway)
_BOOT = re.compile(r"[0-9a-f]{16}")

log = structlog.get_logger("ctsd.cluster")


def remember(data_dir: Path, boot: str) -> frozenset[str]:
    """Add `boot` durably (before the engine publishes anything); the earlier ones."""
    path = data_dir / NAME
    earlier: list[str] = []
    try:
        raw, _ = read_data_file(path, NAME, private=False)  # (no secret in it)
        earlier = [b for b in msgspec.json.decode(raw, type=list[str]) if _BOOT.fullmatch(b)]
    except FileNotFoundError:
        pass
    except (OSError, Invalid, msgspec.MsgspecError) as e:  # made again: only a twin check
        reason = e.problem.format() if isinstance(e, Invalid) else str(e)
        log.warning("cluster.boots_unreadable", path=str(path), reason=reason)
    kept = [*earlier[-(KEPT - 1) :], boot]
    write_files([(path, msgspec.json.format(msgspec.json.encode(kept), indent=2) + b"\n")])
    return frozenset(earlier)
