"""Which change stream this data dir's applied seqs count in (`DATA/.cluster-stream`).

The journal holds a bare seq. Started under another cluster's name (a data dir copied from
another desk, a setting mistyped), or after its stream was deleted and made again, a host
would apply a longer stream from that seq on, over data that stream never held: the hosts
fork and none says so. The stream's name and creation time, kept here once the host applies
it, let the engine refuse that (`ClusterEngine._check_history`, `stream_mismatch`).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import structlog

from ctsd.atomic import write_files
from ctsd.cluster.engine import StreamId
from ctsd.files import CLUSTER_STREAM, Invalid
from ctsd.safefile import read_data_file

NAME = CLUSTER_STREAM

log = structlog.get_logger("ctsd.cluster")


def read(data_dir: Path) -> StreamId | None:
    """The stream this data dir applied, None when it never said (a new host, an older ctsd,
    or a file that does not read: then only this check is lost, and it is said)."""
    path = data_dir / NAME
    try:
        raw, _ = read_data_file(path, NAME, private=False)  # (no secret in it)
        return msgspec.json.decode(raw, type=StreamId)
    except FileNotFoundError:
        return None
    except (OSError, Invalid, msgspec.MsgspecError) as e:
        reason = e.problem.format() if isinstance(e, Invalid) else str(e)
        log.warning("cluster.stream_id_unreadable", path=str(path), reason=reason)
        return None


def write(data_dir: Path, sid: StreamId) -> None:
    """Kept durably: before the host applies anything of that stream."""
    body = msgspec.json.format(msgspec.json.encode(sid), indent=2) + b"\n"
    write_files([(data_dir / NAME, body)])
