"""Snapshots of the shared state, kept in the cluster's JetStream object store.

The stream keeps a bounded history; a host further behind than that (`StreamTrimmed`) starts
from a snapshot instead: the shared state as of some stream seq, encoded by the store (opaque
bytes here), then applies the stream from that seq on. Hosts put snapshots now and then, each
as an object of its own (`snapshot-<seq>-<host>`), tagged with the cluster, schema version,
seq and host, and checked on the way back like a stream message; after a put the older ones
are removed, so the bucket holds the newest one. (Not one name replaced in place: of two
hosts putting at once, nats-py's put removes only the chunks of the version it saw when it
began, so the other's would stay for good, and the slower put could replace a newer snapshot
with an older one.) Chunks no entry names (an upload cut short) are removed by a later put
once they are old. The founding host's state is kept beside it under a name of its
own (`put_founding`), for as long as the cluster lives: the stream's first message names it
(`messages.H_FOUNDING`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from typing import NamedTuple

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)

from ctsd.cluster.engine import ClusterEngine
from ctsd.cluster.errors import SnapshotInvalid, Unavailable
from ctsd.cluster.messages import H_CLUSTER, H_HOST, H_SCHEMA, is_founding_name

SNAPSHOT_SCHEMA = "1"  # the snapshot format (the change messages have their own)
H_SEQ = "Ctsd-Seq"
H_STREAM = "Ctsd-Stream-Created"  # the stream the seq counts in (`ClusterEngine.stream_created`)
PREFIX = "snapshot-"
READ_ATTEMPTS = 3  # a snapshot removed while read (a newer one came): the bucket looked at again
# Chunks no entry names are an upload cut short (a host killed while it put one), unless one
# is under way: an upload's entry is stored after its last chunk, so chunks left this long
# after their last one are removed (both times are the servers').
ORPHAN_AFTER_S = 600.0

log = structlog.get_logger("ctsd.cluster")


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the stream seq the state is at: apply the stream from seq + 1
    host: str  # the host that took it
    data: bytes


class Snapshots:
    """The snapshot bucket of the engine's cluster (`ctsd_<name>_snapshots`)."""

    def __init__(
        self,
        engine: ClusterEngine,
        timeout_s: float | None = None,
        orphan_after_s: float = ORPHAN_AFTER_S,
    ) -> None:
        self.engine = engine
        self._orphan_after_s = orphan_after_s
        self.bucket = f"ctsd_{engine.settings.name}_snapshots"
        self._store: ObjectStore | None = None
        self._store_js: JetStreamContext | None = None  # the context `_store` was made on
        # How long a listing or a chunk may keep a reader waiting.
        self._timeout_s = timeout_s or max(5.0, engine.settings.publish_timeout_s)

    async def ensure(self) -> None:
        """Find or create the bucket. Done at start, while the NATS nodes are usually all
        up: creating a replicated bucket needs every replica's node, using it only a quorum,
        so a bucket first wanted while a node is down could not be made until it is back.
        Raises Unavailable."""
        await self._bucket()

    async def _bucket(self) -> ObjectStore:
        js = self.engine.jetstream()
        # A connection the client gave up for good is made anew: so is the bucket's handle.
        if self._store is None or self._store_js is not js:
            config = ObjectStoreConfig(
                description=f"ctsd snapshots of cluster {self.engine.settings.name}",
                storage=StorageType.FILE,
                replicas=self.engine.settings.replicas,
            )
            try:
                try:
                    self._store = await js.object_store(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._store = await js.create_object_store(self.bucket, config=config)
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"snapshot bucket {self.bucket}: {exc}") from None
            self._store_js = js
        return self._store

    async def put(self, seq: int, data: bytes) -> bool:
        """Keep `data` as the snapshot at stream seq `seq`, unless a newer one is kept already;
        then remove the older ones (and any no host can use). Returns whether it was stored.
        Raises Unavailable."""
        store = await self._bucket()
        try:
            if any(s >= seq for s, _ in (await self._snapshots(store)).kept):
                return False
            name = f"{PREFIX}{seq}-{self.engine.settings.host_id}"
            try:
                await store.put(name, data, meta=self._meta(name, seq))
            except BaseException:
                # nats-py removed the chunks, but its entry may have been stored (an answer
                # lost): an entry pointing at nothing, newest of all, would be read in vain.
                await self._remove(ObjectInfo(name=name, bucket=self.bucket, nuid=""))
                raise
            listing = await self._snapshots(store)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"storing the snapshot at seq {seq}: {exc}") from None
        kept = listing.kept
        newest = max(kept, key=lambda k: (k[0], k[1].name), default=None)
        for info in listing.unusable + [i for _, i in kept if newest is None or i is not newest[1]]:
            await self._remove(info)
        await self._remove_orphans(listing)
        return True

    async def put_founding(self, name: str, seq: int, data: bytes) -> None:
        """Keep `data`, the state of a host about to found the cluster, as object `name`.
        Raises Unavailable."""
        store = await self._bucket()
        try:
            await store.put(name, data, meta=self._meta(name, seq))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"storing the founding state {name}: {exc}") from None

    async def founding(self, name: str) -> Snapshot:
        """The founding state kept as `name`, checked like a snapshot. Raises SnapshotInvalid
        (also when it is missing), Unavailable."""
        store = await self._bucket()
        try:
            seq = await self._seq_of(store, name)
            if seq is None:
                raise SnapshotInvalid(
                    f"the founding state {name} is not in bucket {self.bucket} (deleted by hand?)"
                )
            info = await store.get_info(name)
            data = await self._read(info)
        except nats.js.errors.ObjectNotFoundError:
            raise SnapshotInvalid(
                f"the founding state {name} is not in bucket {self.bucket}"
            ) from None
        except (nats.errors.Error, TimeoutError, _Unread) as exc:
            raise Unavailable(f"reading the founding state {name}: {exc}") from None
        return Snapshot(seq=seq, host=(info.headers or {}).get(H_HOST, "?"), data=data)

    async def forget(self, name: str) -> None:
        """Remove object `name` (a founding state the stream did not take), if it can."""
        try:
            await (await self._bucket()).delete(name)
        except (nats.errors.Error, TimeoutError, Unavailable) as exc:
            log.info("cluster.founding_state_left", name=name, reason=str(exc))

    def _meta(self, name: str, seq: int) -> ObjectMeta:
        settings = self.engine.settings
        return ObjectMeta(
            name=name,
            description=f"state of cluster {settings.name} at stream seq {seq}",
            headers={
                H_CLUSTER: settings.name,
                H_SCHEMA: SNAPSHOT_SCHEMA,
                H_HOST: settings.host_id,
                H_SEQ: str(seq),
                H_STREAM: self.engine.stream_created,
            },
        )

    async def latest(self) -> Snapshot | None:
        """The newest snapshot, checked; None when there is none. Raises SnapshotInvalid (the
        bucket holds one no host can use, newer ones being put over it), Unavailable."""
        store = await self._bucket()
        why = ""
        unread: set[str] = set()  # read in vain twice: its data are gone, the next one is tried
        tried: set[str] = set()
        for _ in range(READ_ATTEMPTS + 1):
            try:
                listing = await self._snapshots(store)
                kept = [k for k in listing.kept if k[1].name not in unread]
                unusable = listing.unusable
                newest = max(kept, key=lambda k: (k[0], k[1].name), default=None)
                for bad in unusable:  # the newest decides (an older one is removed at a put)
                    seq = _tagged_seq(bad)
                    if newest is None or seq is None or seq >= newest[0]:
                        raise SnapshotInvalid(self._fault(bad))
                if newest is None:
                    if unread:
                        break
                    return None
                seq, info = newest
                data = await self._read(info)
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"reading the snapshot: {exc}") from None
            except _Unread as exc:
                why = str(exc)  # removed meanwhile (a newer one was put), or its data lost
                (unread if info.name in tried else tried).add(info.name)
                continue
            return Snapshot(seq=seq, host=(info.headers or {}).get(H_HOST, "?"), data=data)
        raise Unavailable(f"reading the snapshot: {why}")

    async def _snapshots(self, store: ObjectStore) -> _Listing:
        """The snapshots in the bucket (founding states aside), and what `_remove_orphans`
        needs."""
        kept: list[tuple[int, ObjectInfo]] = []
        unusable: list[ObjectInfo] = []
        named: set[str] | None = set()
        newest: datetime | None = None
        # The entries found by their subjects, not through `ObjectStore.list`: that makes a
        # consumer, which a cluster whose meta leader is being elected (a node just stopped)
        # cannot make for seconds, and waits for the end of the listing with no time limit.
        js = self.engine.jetstream()
        stream = OBJ_STREAM_TEMPLATE.format(bucket=self.bucket)
        entries = await js.stream_info(stream, subjects_filter=f"$O.{self.bucket}.M.>")
        for subject in entries.state.subjects or {}:
            try:
                msg = await js.get_last_msg(stream, subject)
                if msg.time is not None and (newest is None or msg.time > newest):
                    newest = msg.time
                info = ObjectInfo.from_response(json.loads(msg.data or b""))
            except nats.js.errors.NotFoundError:
                continue  # removed meanwhile
            except (ValueError, TypeError, KeyError, AttributeError):  # not one nats-py reads
                unusable.append(ObjectInfo(name=_name_of(subject), bucket=self.bucket, nuid=""))
                named = None
                continue
            if named is not None and not info.deleted:
                named.add(info.nuid)
            if info.deleted or is_founding_name(info.name):
                continue
            try:
                kept.append((self._checked_seq(info), info))
            except SnapshotInvalid:
                unusable.append(info)
        return _Listing(kept, unusable, named, newest)

    async def _remove_orphans(self, listing: _Listing) -> None:
        """Chunks no entry names, their last one `orphan_after_s` older than the newest entry
        (just put: the servers' time now, whatever this host's clock says), removed. Best
        effort, as `_remove`."""
        named, now = listing.named, listing.newest
        if named is None or now is None:
            return
        js = self.engine.jetstream()
        stream = OBJ_STREAM_TEMPLATE.format(bucket=self.bucket)
        prefix = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj="")
        try:
            chunks = await js.stream_info(stream, subjects_filter=f"{prefix}>")
            for subject in chunks.state.subjects or {}:
                if subject.removeprefix(prefix) in named:
                    continue
                try:
                    last = await js.get_last_msg(stream, subject)
                except nats.js.errors.NotFoundError:
                    continue  # removed meanwhile
                if last.time is None:
                    continue
                if (now - last.time).total_seconds() >= self._orphan_after_s:
                    await js.purge_stream(stream, subject=subject)
                    log.info("cluster.snapshot_chunks_removed", subject=subject)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("cluster.snapshot_chunks_left", reason=str(exc))

    async def _read(self, info: ObjectInfo) -> bytes:
        """An object's data, its digest checked. Raises _Unread when its chunks stop coming
        (removed while read) or do not match. Not `ObjectStore.get`, which waits for chunks
        with no time limit, and leaves its consumer behind when cancelled."""
        if not info.size:
            return b""
        js = self.engine.jetstream()
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        sub = await js.subscribe(subject, ordered_consumer=True)
        data = bytearray()
        try:
            while len(data) < info.size:
                try:
                    msg = await sub.next_msg(timeout=self._timeout_s)
                except nats.errors.TimeoutError:
                    raise _Unread(f"object {info.name} stopped coming (removed?)") from None
                data += msg.data
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        digest = (info.digest or "").partition("=")[2]
        if (
            len(data) != info.size
            or base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode() != digest
        ):
            raise _Unread(f"object {info.name} is not whole (removed while read?)")
        return bytes(data)

    async def _remove(self, info: ObjectInfo) -> None:
        """An older (or unusable) snapshot removed whole: its meta entry too, not left as a
        deletion marker (one per snapshot ever put would pile up). Best effort: another host's
        put removes what this one could not."""
        js = self.engine.jetstream()
        stream = OBJ_STREAM_TEMPLATE.format(bucket=self.bucket)
        name = base64.urlsafe_b64encode(info.name.encode()).decode()
        try:
            await js.purge_stream(
                stream, subject=OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=name)
            )
            if info.nuid:
                await js.purge_stream(
                    stream,
                    subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid),
                )
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("cluster.snapshot_left", name=info.name, reason=str(exc))

    async def _seq_of(self, store: ObjectStore, obj: str) -> int | None:
        try:
            info = await store.get_info(obj)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return self._checked_seq(info)

    def _checked_seq(self, info: ObjectInfo) -> int:
        """The seq an object's tags give it. Raises SnapshotInvalid."""
        fault = self._fault(info)
        seq = _tagged_seq(info)
        if fault or seq is None:
            raise SnapshotInvalid(fault)
        return seq

    def _fault(self, info: ObjectInfo) -> str:
        """Why no host can use the object ("" when its tags are right)."""
        headers = info.headers or {}
        name = self.engine.settings.name
        what = (
            f"object {info.name}"
            if is_founding_name(info.name)
            else f"the snapshot {info.name} in bucket {self.bucket}"
        )
        if not info.nuid:
            return f"{what} is not a valid object entry"
        if headers.get(H_CLUSTER) != name:
            return f"{what} belongs to cluster {headers.get(H_CLUSTER)!r}, not {name!r}"
        if headers.get(H_SCHEMA) != SNAPSHOT_SCHEMA:
            return (
                f"{what} has schema version {headers.get(H_SCHEMA)!r}; this ctsd reads "
                f"version {SNAPSHOT_SCHEMA} only"
            )
        if _tagged_seq(info) is None:
            return f"{what} has no valid {H_SEQ} header"
        created, ours = headers.get(H_STREAM), self.engine.stream_created
        if created and ours and created != ours:
            return (
                f"{what} counts in stream {self.engine.stream} created {created}, not in the one "
                f"created {ours} (deleted and created again?): its seq means nothing here"
            )
        return ""


def _name_of(meta_subject: str) -> str:
    """The object name an entry's subject encodes (as is when it encodes none)."""
    token = meta_subject.rpartition(".")[2]
    try:
        return base64.urlsafe_b64decode(token).decode()
    except ValueError:
        return token


def _tagged_seq(info: ObjectInfo) -> int | None:
    seq = (info.headers or {}).get(H_SEQ, "")
    ok = isinstance(seq, str) and 0 < len(seq) <= 19 and seq.isascii() and seq.isdigit()
    return int(seq) if ok else None  # (19 digits: int() refuses thousands)


class _Listing(NamedTuple):
    kept: list[tuple[int, ObjectInfo]]  # the snapshots with valid tags, and their seq
    unusable: list[ObjectInfo]  # those no host can use
    named: set[str] | None  # the chunks every entry names (None: an entry did not decode)
    newest: datetime | None  # the servers' time of the newest entry


class _Unread(Exception):
    """An object's data could not be read whole (its chunks removed meanwhile, say)."""
