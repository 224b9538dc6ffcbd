"""Snapshots of the shared state, kept in the cluster's JetStream object store.

The stream keeps a bounded history; a host further behind than that (`StreamTrimmed`) starts
from a snapshot instead: the shared state as of some stream seq, encoded by the store (opaque
bytes here), then applies the stream from that seq on. Hosts put snapshots now and then; the
bucket keeps the newest one (object `latest`), tagged with the cluster, schema version, seq
and host, and checked on the way back like a stream message. The founding host's state is
kept beside it under a name of its own (`put_founding`), for as long as the cluster lives: the
stream's first message names it (`messages.H_FOUNDING`).
"""

from __future__ import annotations

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from ctsd.cluster.engine import ClusterEngine
from ctsd.cluster.errors import SnapshotInvalid, Unavailable
from ctsd.cluster.messages import H_CLUSTER, H_HOST, H_SCHEMA

SNAPSHOT_SCHEMA = "1"  # the snapshot format (the change messages have their own)
H_SEQ = "Ctsd-Seq"
OBJECT = "latest"

log = structlog.get_logger("ctsd.cluster")


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the stream seq the state is at: apply the stream from seq + 1
    host: str  # the host that took it
    data: bytes


class Snapshots:
    """The snapshot bucket of the engine's cluster (`ctsd_<name>_snapshots`)."""

    def __init__(self, engine: ClusterEngine) -> None:
        self.engine = engine
        self.bucket = f"ctsd_{engine.settings.name}_snapshots"
        self._store: ObjectStore | None = None

    async def ensure(self) -> None:
        """Find or create the bucket. Done at start, while the NATS nodes are usually all
        up: creating a replicated bucket needs every replica's node, using it only a quorum,
        so a bucket first wanted while a node is down could not be made until it is back.
        Raises Unavailable."""
        await self._bucket()

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            js = self.engine.jetstream()
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
        return self._store

    async def put(self, seq: int, data: bytes) -> bool:
        """Keep `data` as the snapshot at stream seq `seq`, unless a newer one is kept already.

        Returns whether it was stored. Raises Unavailable.
        """
        store = await self._bucket()
        try:
            try:
                current = await self._seq_of_latest(store)
            except SnapshotInvalid:
                current = None  # one no host can use is replaced
            if current is not None and current >= seq:
                return False
            await store.put(OBJECT, data, meta=self._meta(OBJECT, seq))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"storing the snapshot at seq {seq}: {exc}") from None
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
            result = await store.get(name)
        except nats.js.errors.ObjectNotFoundError:
            raise SnapshotInvalid(
                f"the founding state {name} is not in bucket {self.bucket}"
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"reading the founding state {name}: {exc}") from None
        headers = result.info.headers or {}
        return Snapshot(seq=seq, host=headers.get(H_HOST, "?"), data=result.data or b"")

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
            },
        )

    async def latest(self) -> Snapshot | None:
        """The newest snapshot, checked; None when there is none. Raises SnapshotInvalid,
        Unavailable."""
        store = await self._bucket()
        try:
            seq = await self._seq_of_latest(store)
            if seq is None:
                return None
            result = await store.get(OBJECT)
        except nats.js.errors.ObjectNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"reading the snapshot: {exc}") from None
        headers = result.info.headers or {}
        return Snapshot(seq=seq, host=headers.get(H_HOST, "?"), data=result.data or b"")

    async def _seq_of_latest(self, store: ObjectStore) -> int | None:
        return await self._seq_of(store, OBJECT)

    async def _seq_of(self, store: ObjectStore, obj: str) -> int | None:
        try:
            info = await store.get_info(obj)
        except nats.js.errors.ObjectNotFoundError:
            return None
        headers = info.headers or {}
        name = self.engine.settings.name
        what = f"the snapshot in bucket {self.bucket}" if obj == OBJECT else f"object {obj}"
        if headers.get(H_CLUSTER) != name:
            raise SnapshotInvalid(
                f"{what} belongs to cluster {headers.get(H_CLUSTER)!r}, not {name!r}"
            )
        if headers.get(H_SCHEMA) != SNAPSHOT_SCHEMA:
            raise SnapshotInvalid(
                f"{what} has schema version {headers.get(H_SCHEMA)!r}; this ctsd reads "
                f"version {SNAPSHOT_SCHEMA} only"
            )
        seq = headers.get(H_SEQ, "")
        if not seq.isdigit():
            raise SnapshotInvalid(f"{what} has no valid {H_SEQ} header")
        return int(seq)
