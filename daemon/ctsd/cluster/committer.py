"""Cluster mode's committer: a group of changes is acknowledged once the cluster's stream has
it (and this host's journal), and every change any host made is applied here in stream order.

    writer: apply_group on the committed state (at stream seq N) → publish, keyed (with base
    N) or with "expected last seq N" → the stream takes it as S → once this host has applied
    up to S - 1: still applies? (keyed) → revisions and stream seq stamped on its events →
    journal append (with S) → install → publish the events → answer

    another host's change: the engine's consumer → decode and validate → keep this host's
    own fields → still applies? (keyed) → stamped → journal append (with its seq) → install
    → publish the events

When another host's change to the same records got in first (`Conflict` from the stream, or a
keyed group that no longer applies: `keyed`), the writer waits until it is applied here and
computes the group again on the new state, with the whole-stream check. A request that touches
a record changed meanwhile is answered `conflict` (never a silent overwrite): on the second
computation each request carries the revision of the first as its precondition, the core's
If-Match check.

Local to this host and never published: the sweeps' changes (heartbeats flushed to the file,
`status` turned stale or active). They go to the journal alone and add no sync-log event, so
the sync log and its revisions stay the same on every host. Of another host's changes this
host keeps its own `status` and `last_heartbeat_at` (made consistent with `is_active`) and its
own `settings.json` keys `server` and `cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from ctsd import files
from ctsd.cluster import keyed, messages, shared
from ctsd.cluster.engine import ClusterEngine
from ctsd.cluster.errors import (
    BadMessage,
    ClusterError,
    Conflict,
    ForeignData,
    FoundingUnavailable,
    InvalidChange,
    NoSnapshot,
    PublishRefused,
    SnapshotInvalid,
    SnapshotNotInstalled,
    SnapshotTooLarge,
    Stalled,
    StreamTrimmed,
    TooLarge,
    Unavailable,
)
from ctsd.cluster.snapshots import Snapshot, Snapshots
from ctsd.committer import failed, journal_failed
from ctsd.core import Change, Committed, Context, Outcome, RecordChange, Request, apply_group
from ctsd.errors import CtsdError
from ctsd.models import Connection, ConnectionState, SyncEvent

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.cluster")

LOCAL_SOURCES = frozenset({"sweep"})  # heartbeats and the stale sweep stay on this host
LOCAL_STATE_FIELDS = ("status", "last_heartbeat_at")
BACK_POLL_S = 0.5  # how often it looks whether the cluster takes writes again
SNAPSHOT_POLL_S = 0.25  # how often it looks whether a snapshot is due
SNAPSHOT_RETRY_S = 5.0  # after a failed one
FOUNDING_ATTEMPTS = 4  # reads of the founding state before the host stalls on it (retried)
FOUNDING_RETRY_S = 0.5
LANDED_KEPT = 1024  # msg ids `landed` remembers
# Another host's change this large is decoded and checked on a thread (an import of
# thousands of records takes long enough to hold up every client of this host meanwhile);
# the stream's order holds: the consumer waits for it.
DECODE_ON_THREAD_BYTES = 1024 * 1024

_encode = msgspec.json.Encoder().encode


@dataclass
class _Own:
    """A group this host is committing: applied from memory when the stream gets to it."""

    change: Change
    outcomes: list[Outcome]
    ctx: Context
    base: int  # the stream seq it was computed at
    names: frozenset[str] | None  # keyed: its records' revision keys
    version: int  # `Committed.version` it was computed on
    msg_id: str = ""  # its message's id in the stream
    lsn: int | None = None  # its journal record, once applied
    superseded: bool = False  # keyed, and another change to its records got in first


class ClusterCommitter:
    shared = True

    def __init__(self, store: Store, engine: ClusterEngine) -> None:
        self.store = store
        self.engine = engine
        self.host = engine.settings.host_id
        # A journal append and its install happen together: a local change computed on the
        # committed state must not have another host's change installed under it meanwhile.
        self._install = asyncio.Lock()
        self._own: dict[str, _Own] = {}  # msg id → this host's group being committed
        # Msg ids of this host's groups answered with an unknown outcome (an answer lost, a
        # stall), and whether each has been applied here since: `landed` tells that caller
        # that it got in. Only those: the host's every group would push them out.
        self._asked: OrderedDict[str, bool] = OrderedDict()
        # ... and of those that took hand edits in, their `Change.taken` (for the journal
        # record the group gets when the stream brings it here).
        self._asked_taken: dict[str, dict[str, str]] = {}
        # Why the last snapshot put failed (shown in status until one succeeds).
        self.snapshot_problem: str | None = None
        self.conflicts = 0  # groups computed again after another host's change got in first
        self._back: asyncio.Task[None] | None = None
        self.snapshots = Snapshots(engine)
        # The stream seq of the last change installed here (what a snapshot is taken at).
        self._installed_seq = 0
        self._snapshotted_seq = 0  # the seq of the last snapshot this host put (or found)
        self._snapshot_task: asyncio.Task[None] | None = None
        # Has this host applied (or founded) the stream? Until then its first change must
        # found the cluster, or its data meet the join check (`found`, `_check_join`).
        self._joined = False
        # Why a host with data has not founded its cluster yet (the start's try failed: the
        # servers not ready, a timeout); tried again in the background (`_found_later`).
        self.founding_problem: str | None = None
        self._founding: asyncio.Task[None] | None = None
        self._founding_lock = asyncio.Lock()

    # --- start ----------------------------------------------------------------------------------

    async def start_empty(self) -> None:
        """A host that holds nothing yet and joins a cluster with a history: the newest
        snapshot installed first, so the stream is applied from its seq on, not from seq 1
        (a long history would make the first start of a new host slow). When the cluster is
        out of reach, holds no snapshot the stream reaches, or the snapshot does not validate,
        nothing is applied and the stream is applied from its start as before (a trimmed one
        meets `start_from_snapshot`). Raises SnapshotNotInstalled (the disk refused it:
        nothing of it applied), as the trimmed path does."""
        store, engine = self.store, self.engine
        if store.journal.last_seq or shared.holds_data(store.committed) is not None:
            return
        try:
            first, last = await engine.stream_bounds()
            snap = await self.snapshots.latest() if last > 0 else None
        except Exception as e:  # (an optimisation only: never a reason to stop the start)
            _skip_snapshot(e if isinstance(e, ClusterError) else f"{type(e).__name__}: {e}")
            return
        if snap is None or not first - 1 <= snap.seq <= last:
            # No history, or no snapshot put yet: the stream is all there is. One the stream
            # no longer reaches: the catch-up meets the trimmed stream and says so.
            return
        try:
            await self.install_snapshot(snap, check_join=snap.host)
        except SnapshotInvalid as e:  # checked whole before any of it was applied
            _skip_snapshot(e)
        except OSError as e:
            raise self._not_installed(snap, e) from None

    def _not_installed(self, snap: Snapshot, e: OSError) -> SnapshotNotInstalled:
        return SnapshotNotInstalled(
            f"the snapshot in bucket {self.snapshots.bucket} (seq {snap.seq}, from host "
            f"{shared.shown(snap.host)}) could not be written here: {e.strerror or e}; "
            "nothing of it was applied"
        )

    def subscribe(self) -> int:
        """Apply the stream from where this host's journal and files are; returns that seq."""
        seq = self.store.journal.last_seq
        self._installed_seq = self._snapshotted_seq = seq
        self._joined = seq > 0
        self.engine.subscribe_from(seq, self._apply)
        return seq

    async def catch_up(self, timeout: float) -> int:
        """Apply what the stream holds beyond this host (from the newest snapshot when the
        stream was trimmed past it); returns the applied seq. Raises SnapshotInvalid (the
        snapshot needed cannot be used: nothing of it applied), other ClusterErrors."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            seq = await self.engine.catch_up(timeout=timeout)
        except StreamTrimmed as trimmed:
            await self.start_from_snapshot(trimmed)
            seq = await self.engine.catch_up(timeout=max(1.0, deadline - loop.time()))
        if not self._joined:
            await self.found()
            seq = await self.engine.catch_up(timeout=max(1.0, deadline - loop.time()))
        return seq

    async def found(self) -> None:
        """Found the cluster, if its stream is empty, this host never applied it and holds
        data (connections, a sync log, algorithms): its shared state goes to the snapshot
        bucket, and the stream's first message names it (published with "expected last seq
        0": of hosts founding at once, one wins). Every host that joins later installs that
        state first (`_apply_founding`), so the data of the first host reaches every other.
        An empty host founds nothing: its first change simply starts the stream. Returns
        too when the stream has a history (founded, or another host got in first): the first
        message this host applies decides whether it may join (`_check_join`). Called
        before this host publishes anything. Raises Unavailable."""
        if self._joined:
            return
        async with self._founding_lock:  # (the background try and a write's, one at a time)
            if not self._joined:
                await self._found()

    async def _found(self) -> None:
        engine, store = self.engine, self.store
        self._check_files_known()  # (a first own message would found or join the cluster)
        if await engine.stream_last_seq() > 0 or shared.holds_data(store.committed) is None:
            return
        local_id = engine.new_local_id()
        name = f"{messages.FOUNDING_PREFIX}{self.host}-{local_id}"
        async with self._install:  # the state as of now, which the founding message keeps
            # The sync log without the stream seqs of an earlier cluster (this host's data
            # came from one): they would pass here for changes every host holds already.
            # They go first, durably: a founding message this host does not get to apply
            # itself (killed, its answer lost) is then applied from the stream at its next
            # start, not taken for one its files hold by those seqs.
            log_here = keyed.unstamped(store.committed.log)
            if log_here != list(store.committed.log):
                unstamp = Change(log=log_here)
                store.install(unstamp, await store.append(unstamp))
            state = shared.capture(store.committed, engine.settings.name, 1)
            msg_id = engine.msg_id(local_id)
            own = _Own(Change(), [], store.context(), 0, None, store.committed.version, msg_id)
        await self.snapshots.put_founding(name, 1, await asyncio.to_thread(shared.encode, state))
        self._own[msg_id] = own
        try:
            await engine.commit(
                _encode(Change()),
                0,
                local_id,
                functools.partial(self._apply_own, own),
                timeout=engine.settings.publish_timeout_s,
                founding=name,
            )
        except Conflict:
            # Another host got in first (or this one did, its answer lost: the stream then
            # names this very object, which must stay). This host joins: its first message
            # applied decides.
            with contextlib.suppress(Unavailable):  # unknown: the object is left
                if await engine.founding_of_stream() != name:
                    await self.snapshots.forget(name)
            return
        except Unavailable as e:
            if not e.outcome_unknown:  # not in the stream: the next attempt stores its own
                await self.snapshots.forget(name)
            raise
        except PublishRefused:
            await self.snapshots.forget(name)
            raise
        except TimeoutError:
            raise Unavailable("the founding message is in the stream but not applied yet") from None
        finally:
            del self._own[msg_id]
        log.info(
            "cluster.founded",
            cluster=engine.settings.name,
            name=name,
            connections=len(state.connections),
            revision=store.committed.revision,
        )

    def started(self) -> None:
        """The start is done (caught up, or given up on for now): put a snapshot now and then
        (a host behind puts none), and take hand edits refused meanwhile in once the cluster
        takes writes again (not during the start, whose own order takes them in)."""
        if self._snapshot_task is None:
            self._snapshot_task = asyncio.create_task(self._snapshot_loop(), name="snapshots")
        if self._back is None:
            self._back = asyncio.create_task(self._take_in_when_back(), name="cluster-back")
        if self._founding is None and self._unfounded():
            self.founding_problem = f"cluster {self.engine.settings.name} not founded yet"
            self._founding = asyncio.create_task(self._found_later(), name="cluster-founding")

    def _unfounded(self) -> bool:
        """A host with data that has not applied the stream (nor founded it)."""
        return not self._joined and shared.holds_data(self.store.committed) is not None

    async def _found_later(self) -> None:
        """The start could not found the cluster (the servers not ready yet, a timeout):
        tried again until the stream has its first message (this host's founding, or another
        host's history, which the join check then meets), `/health` degraded meanwhile. Left
        to this host's first write, an empty host's first write would found an empty
        cluster first, and this host's data would be foreign to it."""
        wait = FOUNDING_RETRY_S
        name = self.engine.settings.name
        while self._unfounded():
            try:
                await self.found()
                if await self.engine.stream_last_seq() > 0:
                    break
            except ClusterError as e:
                self.founding_problem = f"cluster {name} not founded yet: {e}"
            except Exception as e:  # (the disk, say: tried again, never a task gone quiet)
                log.exception("cluster.founding_failed")
                self.founding_problem = f"cluster {name} not founded yet: {e}"
            await asyncio.sleep(wait)
            wait = min(wait * 2, SNAPSHOT_RETRY_S)
        self.founding_problem = None

    async def _take_in_when_back(self) -> None:
        """Hand edits refused while the cluster could not take changes are taken in once it
        can again (the files differ from what the daemon last read). An outage is noticed by
        the engine's count of them, so one shorter than a poll is not missed."""
        engine = self.engine
        # Not taking writes now: edits made until it does are taken in then.
        seen = engine.outages if engine.state == "connected" else -1
        while True:
            await asyncio.sleep(BACK_POLL_S)
            try:
                engine.check_writable()
                writable = engine.state == "connected"
            except Unavailable:
                writable = False
            if not writable:
                seen = -1  # whatever the count says: an outage it may not know of
                continue
            if engine.outages == seen:
                continue
            seen = engine.outages
            log.info("cluster_back", reason="taking in hand edits made meanwhile")
            for file in self.store.known_files():
                try:
                    await self.store.ingest(file)
                except Exception:  # one file must not keep the others out
                    log.exception("take_in_failed", file=file)

    # --- writing --------------------------------------------------------------------------------

    async def commit(self, requests: list[Request]) -> tuple[list[Outcome], int | None]:
        outcomes: list[Outcome] = [Outcome() for _ in requests]
        lsns: list[int] = []
        kept: set[int] = set()
        for i, r in enumerate(requests):
            if r.file == files.SETTINGS:
                # A hand edit of this host's `server`, `cluster` or `watch` keys alone: nothing
                # the other hosts take, so no event in the shared sync log; taken in with the
                # cluster out of reach too (a `cluster` key fixed by hand). Alone, whatever
                # else came in the same group.
                done = await self._commit_local([r], own_settings_only=True)
                if done is not None:
                    (outcomes[i],), lsn = done
                    kept.add(i)
                    if lsn is not None:
                        lsns.append(lsn)
        shared = [
            i for i, r in enumerate(requests) if r.source not in LOCAL_SOURCES and i not in kept
        ]
        local = [i for i, r in enumerate(requests) if r.source in LOCAL_SOURCES]
        for part, run in ((shared, self._commit_shared), (local, self._commit_local)):
            if not part:
                continue
            done = await run([requests[i] for i in part])
            assert done is not None
            outs, lsn = done
            for i, out in zip(part, outs, strict=True):
                outcomes[i] = out
            if lsn is not None:
                lsns.append(lsn)
        return outcomes, max(lsns, default=None)

    async def _commit_local(
        self, requests: list[Request], own_settings_only: bool = False
    ) -> tuple[list[Outcome], int | None] | None:
        """Kept on this host, never published. `own_settings_only`: only if the group changes
        nothing but this host's own settings keys (else None: it is published after all)."""
        store = self.store
        async with self._install:
            ctx = store.context()
            version = store.committed.version
            outcomes, change = apply_group(store.committed, requests, ctx)
            if own_settings_only and not _own_settings_only(change):
                return None
            # This host's own: no sync-log event (the log and its revisions are shared), and
            # of a state record only its own fields (not the shared `updated_at` and
            # `last_sync_at` that moved with them).
            change.events = []
            for out in outcomes:
                out.events = []
            change.state = [_local_part(rc, store.committed) for rc in change.state]
            if change.empty:
                return outcomes, None
            try:
                lsn = await store.append(change)
            except OSError as e:
                log.error("journal_append_failed", error=str(e))
                return failed(requests, journal_failed(e)), None
            store.install(change, lsn, ctx, exact=store.committed.version == version)
        return outcomes, lsn

    async def _commit_shared(self, requests: list[Request]) -> tuple[list[Outcome], int | None]:
        store, engine = self.store, self.engine
        first_revision: int | None = None
        # Requests without their own If-Match: after a conflict they carry the revision of
        # the first computation, and a refusal of that is answered `conflict`.
        unguarded = {i for i, r in enumerate(requests) if r.if_match is None}
        guarded: set[int] = set()
        # A group computed again after each conflict, for up to publish_timeout_s: a host
        # whose writes keep meeting the other hosts' (they apply their own at once, it must
        # first receive theirs) gets through once they pause; then it answers `conflict`.
        give_up = time.monotonic() + engine.settings.publish_timeout_s
        may_key = True  # after a keyed group was superseded: the whole-stream check
        for attempt in itertools.count(1):
            try:
                engine.check_writable()
                await self.found()  # the first change of a host that has not joined yet
                if not self._joined and shared.holds_data(store.committed) is not None:
                    # Not before the join check: its data may be what the cluster lacks.
                    raise Unavailable(
                        f"this host is joining cluster {engine.settings.name}: it takes "
                        "writes once it has applied the cluster's history"
                    )
            except Unavailable as e:
                return failed(requests, unavailable(e)), None
            except ClusterError as e:  # the founding message was refused, or not applied
                why = Unavailable(f"founding cluster {engine.settings.name}: {e}")
                return failed(requests, unavailable(why)), None
            expected = engine.applied_seq
            if first_revision is None:
                first_revision = store.committed.revision
            ctx = dataclasses.replace(
                store.context(), own_settings=shared.LOCAL_SETTINGS_KEYS, local_status=True
            )
            version = store.committed.version
            outcomes, change = apply_group(store.committed, requests, ctx)
            for i in guarded:
                err = outcomes[i].error
                if err is not None and err.code == "precondition_failed":
                    outcomes[i].error = CtsdError(
                        "conflict",
                        "another host changed a record this change touches at the same time; "
                        "read it again and retry",
                    )
            if change.empty:
                return outcomes, None
            for event in change.events:
                event.data["host"] = self.host
            names = keyed.keys(change) if may_key else None
            local_id = engine.new_local_id()
            msg_id = engine.msg_id(local_id)
            own = _Own(change, outcomes, ctx, expected, names, version, msg_id)
            self._own[msg_id] = own  # the consumer applies it from here if it gets there first
            try:
                seq = await engine.commit(
                    # `taken` names this host's files: not in the payload, but as tags in a
                    # header, for this host should it die before it journals the group
                    _encode(msgspec.structs.replace(change, taken={})),
                    expected,
                    local_id,
                    functools.partial(self._apply_own, own),
                    timeout=engine.settings.publish_timeout_s,
                    keyed=names is not None,
                    taken={f: store.box.tag(d) for f, d in change.taken.items()},
                )
            except Conflict as e:
                if own.lsn is not None:  # it was taken after all (its answer had been lost)
                    return outcomes, own.lsn
                own.superseded = True
                await_seq = max(e.last_seq or 0, expected + 1)
            except Unavailable as e:
                if own.lsn is not None:
                    return outcomes, own.lsn
                return failed(requests, self._unknown(unavailable(e, msg_id), msg_id, change)), None
            except TooLarge as e:
                if len(requests) > 1:
                    # A group too large for one message: each of its requests alone, so one
                    # large request (an import, a big hand edit) fails alone.
                    return await self._commit_each(requests)
                err = CtsdError("too_large", str(e), extra={"max_payload": e.limit})
                return failed(requests, err), None
            except PublishRefused as e:  # (nothing stored: a retry does not cure it)
                return failed(requests, CtsdError("io_error", str(e))), None
            except Stalled as e:
                msg = f"the change is in the cluster's stream but not applied here: {e}"
                err = CtsdError("io_error", msg, extra={"msg_id": msg_id})
                return failed(requests, self._unknown(err, msg_id, change)), None
            except TimeoutError:
                if own.lsn is not None:  # applied here as the wait gave up
                    return outcomes, own.lsn
                why = Unavailable(
                    "the change is in the cluster's stream but this host has not applied it yet",
                    outcome_unknown=True,
                )
                err = self._unknown(unavailable(why, msg_id), msg_id, change)
                return failed(requests, err), None
            else:
                if own.lsn is None and not own.superseded:
                    # Passed over here by a snapshot installed meanwhile: whether the other
                    # hosts applied it (then the snapshot holds it) or found it superseded
                    # is not known here. Never a success for what may exist nowhere.
                    why = Unavailable(
                        "the change is in the cluster's stream, but this host took a snapshot "
                        "past it before applying it",
                        outcome_unknown=True,
                    )
                    return failed(requests, unavailable(why, msg_id)), None  # (never lands)
                if not own.superseded:
                    return outcomes, own.lsn
                await_seq = seq
                may_key = False  # the next attempt is sure to get through if nothing else does
            finally:
                del self._own[msg_id]
            # Another host changed something this group was computed on, and got in first.
            self.conflicts += 1
            if time.monotonic() >= give_up:
                err = CtsdError(
                    "conflict",
                    f"other hosts kept changing the cluster's state ({attempt} attempts in "
                    f"{engine.settings.publish_timeout_s:g} s); retry",
                )
                return failed(requests, err), None
            try:
                await engine.wait_applied(await_seq, engine.settings.publish_timeout_s)
            except (TimeoutError, Stalled) as exc:
                why = Unavailable(f"catching up with another host's change: {exc or 'timed out'}")
                return failed(requests, unavailable(why)), None
            guarded = unguarded
            requests = [
                r
                if r.if_match is not None
                else Request(r.op, r.source, first_revision, against_base=True)
                for r in requests
            ]
        raise AssertionError("unreachable")

    async def _commit_each(self, requests: list[Request]) -> tuple[list[Outcome], int | None]:
        outcomes: list[Outcome] = []
        lsns: list[int] = []
        for request in requests:
            (out,), lsn = await self._commit_shared([request])
            outcomes.append(out)
            if lsn is not None:
                lsns.append(lsn)
        return outcomes, max(lsns, default=None)

    async def _apply_own(self, own: _Own, seq: int) -> None:
        """This host's group, applied from memory once the stream got to it (at once after the
        publish, or when the consumer delivers it): journalled with an fdatasync, since it is
        acknowledged from here."""
        store = self.store
        self._joined = True
        async with self._install:
            c = store.committed
            if own.names is not None and not _still_applies(
                c, own.change, own.names, own.base, seq
            ):
                own.superseded = True
                self._installed_seq = seq
                return
            base = own.outcomes[0].seen if own.outcomes else c.revision  # computed at
            if c.revision != base:
                # Other hosts' changes landed since the group was computed: an answer without
                # events shows the state at `base`, which the revisions after it may not be.
                for out in own.outcomes:
                    if not out.events:
                        out.seen = base
            keyed.stamp(own.change.events, c.revision, seq)
            own.lsn = await store.append(own.change, seq)
            store.install(own.change, own.lsn, own.ctx, exact=c.version == own.version)
            self._installed_seq = seq
            # (its caller may have given up on it meanwhile, answered `unavailable`)
            self._note_landed(own.msg_id)
        for out in own.outcomes:
            if out.events:
                store.publish(out.events)

    # --- applying the stream --------------------------------------------------------------------

    async def _apply(self, msg: messages.Change) -> None:
        """One change of the stream, in order (the engine's consumer calls this)."""
        own = self._own.get(msg.msg_id) if msg.own else None
        if own is not None:
            await self._apply_own(own, msg.seq)
            return
        if msg.founding is not None:  # (this host's own too, when it lost track of it)
            await self._apply_founding(msg)
            return
        if not self._joined:
            if not msg.own:
                self._check_join()
            self._joined = True
        if len(msg.payload) > DECODE_ON_THREAD_BYTES:
            change = await asyncio.to_thread(_decoded, msg.payload)
        else:
            change = _decoded(msg.payload)
        problem = shared.foreign_secret(
            self.store.box.key_ids, change.connections, change.documents
        )
        if problem is not None:
            raise InvalidChange(f"{problem}: every host of a cluster loads the same secrets key")
        names = None
        if msg.base is not None:
            names = keyed.keys(change)
            if names is None:
                raise InvalidChange(
                    "it is published as keyed but changes more than the records its events name"
                )
        async with self._install:
            if not msg.own:  # under the lock: a sweep's change to this host's fields is kept
                change = self._localized(change)
            committed = self.store.committed
            if self._held(committed, msg, change):
                if msg.own:
                    self._note_landed(msg.msg_id)
                return
            problem = shared.change_problem(committed, change, msg.seq)
            if problem is not None:  # before the journal: nothing of it is applied
                raise InvalidChange(problem)
            if (
                names is not None
                and msg.base is not None
                and not _still_applies(committed, change, names, msg.base, msg.seq)
            ):
                log.debug("cluster.superseded", seq=msg.seq, host=msg.host)
                self._installed_seq = msg.seq
                return
            keyed.stamp(change.events, committed.revision, msg.seq)
            if msg.own:  # its hand edits' digests for the journal (`Change.taken`)
                taken = self._asked_taken.pop(msg.msg_id, None)
                if taken is None and msg.taken:  # from before a crash: known by their tags
                    taken = await self.store.taken_in_before_a_crash(msg.taken)
                change.taken = taken or {}
            # Another host's change (or this host's from before a restart) is held durably by
            # the stream and acknowledged to nobody here: no fdatasync of its own.
            lsn = await self.store.append(change, msg.seq, sync=False)
            # Patched on (not `exact`): this host's sweeps may have moved fields of its own
            # since the change was computed (`status`, and the state's `updated_at` with it).
            self.store.install(change, lsn)
            self._installed_seq = msg.seq
            if msg.own:
                self._note_landed(msg.msg_id)
        if change.events:
            self.store.publish(change.events)

    def _unknown(self, err: CtsdError, msg_id: str, change: Change) -> CtsdError:
        """`err`, the answer to a group whose outcome is unknown: `landed` answers for it."""
        if "msg_id" in err.extra:
            self._asked[msg_id] = False
            if change.taken:
                self._asked_taken[msg_id] = change.taken
            if len(self._asked) > LANDED_KEPT:
                gone, _ = self._asked.popitem(last=False)
                self._asked_taken.pop(gone, None)
        return err

    def _note_landed(self, msg_id: str) -> None:
        if msg_id in self._asked:
            self._asked[msg_id] = True

    def landed(self, msg_id: str) -> bool:
        """Has this host's group `msg_id`, answered with an unknown outcome, reached the stream
        and been applied here since?"""
        return self._asked.get(msg_id, False)

    def _check_files_known(self) -> None:
        """Before this host first joins, founds or publishes: raise ForeignData if a data file
        of it is invalid with no copy to stand for it. What it holds is unknown, and once
        fixed it would be taken in whole, over the cluster's state (deleting on every host
        what it lacks). (One with a copy is taken in against it: the edit alone.)"""
        bases = self.store.checkpointer.bases
        unknown = [
            p
            for f, p in sorted(self.store.problems.items())
            if bases is None or not bases.has_copy(f)
        ]
        if unknown:
            raise ForeignData(
                f"{unknown[0].format()}: this host cannot tell what its data dir holds, and "
                "the file, once fixed, would be taken in whole over the data of cluster "
                f"{self.engine.settings.name!r}; fix it (or move it aside) before this host "
                "joins or founds it"
            )

    def _check_join(self, founding: shared.SharedState | None = None, by: str = "") -> None:
        """Before the first change of a stream this host never applied (nor founded): raise
        ForeignData if the host holds data of its own that the stream does not have (the
        same data as the `founding` state is no loss)."""
        c = self.store.committed
        cluster = self.engine.settings.name
        self._check_files_known()
        if keyed.held_seq(c.log) is not None:
            return  # the files hold the stream's changes (a journal moved aside)
        held = shared.holds_data(c)
        if held is None:
            return
        if founding is not None and shared.same_data(c, founding, self.store.box):
            return
        raise ForeignData(
            f"this data dir holds {held} of its own, but cluster {cluster!r} already has a "
            f"history{f' (founded by host {by})' if by else ''} that this host never applied: "
            "joining would fork or lose them. Join with an empty data dir (stop ctsd, move "
            f"{self.store.data_dir} aside, start it again), then bring what the old one held "
            "in through any host (`ctsd export` from a daemon run on it without cluster "
            "settings, then `ctsd import --merge`)"
        )

    async def _apply_founding(self, msg: messages.Change) -> None:
        """The stream's first message, from the host that founded the cluster: its state is
        installed here before anything else (nothing of this host's is lost: `_check_join`)."""
        assert msg.founding is not None
        held = keyed.held_seq(self.store.committed.log)
        if held is not None and held >= msg.seq:  # its files are further on (a journal lost)
            log.info("cluster.already_held", seq=msg.seq, revision=self.store.committed.revision)
            self._joined = True
            return
        await self._install_founding(msg.founding, msg.host)

    async def _retry_founding(self, stalled: FoundingUnavailable) -> None:
        """The founding state read again: installed (applying goes on), or the verdict it
        brings (data of this host's own, a founding state that is not valid) made the reason
        this host stays stalled. Raises FoundingUnavailable (tried again later)."""
        try:
            await self._install_founding(stalled.name, stalled.host)
        except ForeignData as e:
            self.engine.stall(e)
            return
        except InvalidChange as e:
            self.engine.stall(BadMessage(f"message seq 1 (from host {stalled.host}): {e}", seq=1))
            return
        self.engine.resume(from_seq=1)

    async def _install_founding(self, name: str, host: str) -> None:
        """Read the founding state `name` and install it at seq 1. Raises InvalidChange (it
        is missing or does not validate), ForeignData, FoundingUnavailable (cannot be read
        now: the snapshot loop tries again)."""
        for attempt in itertools.count(1):
            try:
                snap = await self.snapshots.founding(name)
                break
            except SnapshotInvalid as e:
                raise InvalidChange(str(e)) from None
            except Unavailable as e:
                if attempt >= FOUNDING_ATTEMPTS:
                    raise FoundingUnavailable(
                        f"the cluster's founding state {name} cannot be read now ({e}); "
                        "trying again",
                        name=name,
                        host=host,
                    ) from None
                await asyncio.sleep(FOUNDING_RETRY_S)
        if snap.seq != 1:
            raise InvalidChange(f"{name} holds the state at seq {snap.seq}, not 1")
        try:
            await self.install_snapshot(snap, check_join=host)
        except SnapshotInvalid as e:
            raise InvalidChange(str(e)) from None

    def _held(self, committed: Committed, msg: messages.Change, change: Change) -> bool:
        """Do the data files hold this change already (a journal that lost its last records,
        or was moved aside)? Applying it again would fork the sync log, or set it back (a sync
        log edited by hand). The sync log is written last of a round's files, so the files
        hold every change up to the newest one it has events of."""
        held = keyed.held_seq(committed.log)
        if held is not None and msg.seq <= held:
            log.info("cluster.already_held", seq=msg.seq, revision=committed.revision)
            return True
        if not change.events or change.log is not None or msg.base is not None:
            return False  # no events, or their revisions are given here
        # Computed on the state right before it (the whole-stream check): its revisions are
        # the ones it gets here, unless the sync logs differ.
        first, last = change.events[0].id, change.events[-1].id
        if held is None and last <= committed.revision:
            log.info("cluster.already_held", seq=msg.seq, revision=committed.revision)
            return True  # a schema 1 change: its events carry no stream seq
        if first != committed.revision + 1:
            raise InvalidChange(
                f"its first event has revision {first}, but this host is at revision "
                f"{committed.revision}: the hosts' sync logs differ"
            )
        return False

    def _localized(self, change: Change) -> Change:
        """Another host's change with this host's own fields kept as they are here."""
        c = self.store.committed
        conns = {rc.key: rc.value for rc in change.connections if rc.value is not None}
        state: list[RecordChange] = []
        for rc in change.state:
            value = rc.value
            if value is None:
                state.append(rc)
                continue
            cur = c.state.get(rc.key)
            status = cur.status if cur is not None else value.status
            beat = cur.last_heartbeat_at if cur is not None else None
            conn = conns.get(rc.key) or c.connections.get(rc.key)
            if conn is not None:  # `status` follows `is_active` as on one host
                live = conn.is_enabled and conn.is_active
                status = (
                    status if live and status != "inactive" else ("active" if live else "inactive")
                )
            value = msgspec.structs.replace(value, status=status, last_heartbeat_at=beat)
            fields = rc.fields
            if fields is not None:
                fields = [f for f in fields if f not in LOCAL_STATE_FIELDS]
                if cur is not None and cur.status != status:
                    fields.append("status")
            state.append(RecordChange(rc.key, value, fields))
        documents: list[RecordChange] = []
        mine = c.documents.get("settings") or {}
        local = {k: mine[k] for k in shared.LOCAL_SETTINGS_KEYS if k in mine}
        for rc in change.documents:
            if rc.key != "settings" or (rc.value is None and not local):
                documents.append(rc)
                continue
            # Another host's settings with this host's own keys; its deletion of the file (a
            # snapshot without one too) deletes the shared keys only: this host's cluster and
            # server keys stay, or it would run on its own at its next start.
            value = {
                k: v for k, v in (rc.value or {}).items() if k not in shared.LOCAL_SETTINGS_KEYS
            }
            value.update(local)
            fields = rc.fields if rc.value is not None else None
            if fields is not None:
                fields = [k for k in fields if k not in shared.LOCAL_SETTINGS_KEYS]
            documents.append(RecordChange(rc.key, value, fields))
        return msgspec.structs.replace(change, state=state, documents=documents)

    # --- snapshots ------------------------------------------------------------------------------

    async def start_from_snapshot(self, trimmed: StreamTrimmed) -> None:
        """The stream no longer holds what this host missed: install the newest snapshot and
        apply the stream from its seq on. Raises SnapshotInvalid, NoSnapshot, SnapshotNotInstalled
        (nothing of it applied) or Unavailable."""
        if not self._joined:
            self._check_join()
        snap = await self.snapshots.latest()
        bucket = f"the snapshot bucket {self.snapshots.bucket}"
        if snap is None:
            raise NoSnapshot(
                f"{trimmed}, but {bucket} holds none: start a host that is up to date (it "
                "puts one within cluster.snapshot_every_s), then this one again"
            )
        if snap.seq + 1 < trimmed.first_seq or snap.seq <= trimmed.applied_seq:
            raise NoSnapshot(
                f"{trimmed}, but the newest snapshot in {bucket} is at seq {snap.seq}: it "
                "does not reach the stream (take snapshots more often than the stream forgets: "
                "cluster.snapshot_every_msgs, cluster.max_msgs)"
            )
        try:
            await self.install_snapshot(snap)
        except OSError as e:  # the disk refused it (full, read-only): tried again later
            raise self._not_installed(snap, e) from None
        self.engine.resume(from_seq=snap.seq)

    async def install_snapshot(self, snap: Snapshot, check_join: str = "") -> None:
        """Replace this host's shared state with the snapshot's, checked whole first, as one
        change of the stream: journalled with the snapshot's seq, installed, files written by
        the checkpointer, the sync log's new events published. Raises SnapshotInvalid, or
        ForeignData (`check_join`: the founding host, and this host has not joined)."""
        what = (
            f"the snapshot in bucket {self.snapshots.bucket} (seq {snap.seq}, from host "
            f"{shared.shown(snap.host)})"
        )
        # In a thread (inflate, decode and check a whole state): the loop serves meanwhile.
        state = await asyncio.to_thread(
            shared.decode, snap.data, cluster=self.engine.settings.name, seq=snap.seq, what=what
        )
        problem = shared.foreign_secret(
            self.store.box.key_ids,
            [RecordChange(x.id, x) for x in state.connections],
            [RecordChange(k, v) for k, v in state.documents.items()],
        )
        if problem is not None:
            raise SnapshotInvalid(
                f"{what} cannot be used here: {problem}: every host of a cluster loads the "
                "same secrets key"
            )
        if check_join and not self._joined:
            self._check_join(state, check_join)
        store = self.store
        c = store.committed
        before = c.revision
        async with self._install:
            change = self._localized(shared.replacement(c, state))
            lsn = await store.append(change, snap.seq)
            store.install(change, lsn)
            self._installed_seq = self._snapshotted_seq = snap.seq
            self._joined = True
        # Joining a cluster is the normal start of a new host; installing a snapshot later
        # means it fell behind what the stream keeps.
        (log.info if check_join else log.warning)(
            "cluster.joined" if check_join else "cluster.snapshot_installed",
            seq=snap.seq,
            host=snap.host,
            connections=len(state.connections),
            revision=c.revision,
        )
        news = [e for e in c.log if e.id > before]
        # Missed events the snapshot's sync log no longer holds (a host cut off for longer than
        # the stream keeps, which is more than the log keeps): subscribers must not take the
        # next event for the one after their last.
        store.replaced(c.revision > before and (not news or news[0].id != before + 1))
        if news:
            store.publish(news)

    async def put_snapshot(self) -> bool:
        """Put the shared state as of the last change installed here; whether it was stored
        (not when the bucket holds a newer one). Raises Unavailable."""
        async with self._install:  # the state and its seq from the same moment
            seq = self._installed_seq
            state = shared.capture(self.store.committed, self.engine.settings.name, seq)
        try:
            data = await asyncio.to_thread(shared.encode, state)  # off the event loop
        except SnapshotTooLarge:
            self._snapshotted_seq = max(self._snapshotted_seq, seq)  # again after more news
            raise
        stored = await self.snapshots.put(seq, data)
        self._snapshotted_seq = max(self._snapshotted_seq, seq)
        if stored:
            log.info("cluster.snapshot_put", seq=seq, bytes=len(data))
        return stored

    async def _snapshot_loop(self) -> None:
        """Snapshots after every `snapshot_every_msgs` changes, or `snapshot_every_s` after the
        last one when anything changed since; and, should this host fall further behind than
        the stream keeps while it runs, the newest snapshot installed."""
        settings = self.engine.settings
        try:
            await self.snapshots.ensure()
        except ClusterError as e:  # made when first needed, then
            log.warning("cluster.snapshot_bucket_not_ready", reason=str(e))
        last = time.monotonic()
        while True:
            await asyncio.sleep(SNAPSHOT_POLL_S)
            try:
                stalled = self.engine.stalled_by
                if isinstance(stalled, StreamTrimmed):
                    try:
                        await self.start_from_snapshot(stalled)
                    except ForeignData as e:  # the verdict, not a failure to retry
                        self.engine.stall(e)
                    continue
                if isinstance(stalled, FoundingUnavailable):
                    await self._retry_founding(stalled)
                    continue
                news = self._installed_seq - self._snapshotted_seq
                if news <= 0 or self.engine.status().state != "connected":
                    continue  # (not while catching up either: an old state, and the lock)
                if news < settings.snapshot_every_msgs and (
                    time.monotonic() - last < settings.snapshot_every_s
                ):
                    continue
                try:
                    await self.put_snapshot()
                except Exception as e:
                    self.snapshot_problem = str(e) or type(e).__name__  # until a put succeeds
                    raise
                last = time.monotonic()
                self.snapshot_problem = None
            except SnapshotTooLarge as e:  # tried again after as much news as a snapshot
                last = time.monotonic()
                log.error("cluster.snapshot_failed", reason=str(e))
            except ClusterError as e:
                log.warning("cluster.snapshot_failed", reason=str(e))
                await asyncio.sleep(SNAPSHOT_RETRY_S)
            except Exception:  # the loop must go on: the next snapshot may work
                log.exception("cluster.snapshot_failed")
                await asyncio.sleep(SNAPSHOT_RETRY_S)

    async def close(self) -> None:
        for task in (self._back, self._snapshot_task, self._founding):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.engine.close()

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.engine.status()
        founding = self.founding_problem
        return {
            "ok": st.ok and founding is None,
            **msgspec.structs.asdict(st),
            "conflicts": self.conflicts,
            **({"snapshot_problem": p} if (p := self.snapshot_problem) is not None else {}),
            **({"founding_problem": founding} if founding is not None else {}),
        }


def _skip_snapshot(why: object) -> None:
    log.warning("cluster.join_from_snapshot_skipped", reason=str(why), then="the whole stream")


def unavailable(e: Unavailable, msg_id: str | None = None) -> CtsdError:
    """`msg_id`: the group's, kept (`extra`) when it may have reached the stream after all, so
    the caller can ask later whether it did (`ClusterCommitter.landed`)."""
    note = (
        " (it may still have reached the cluster; it then shows up like any other change)"
        if e.outcome_unknown
        else ""
    )
    extra = {"msg_id": msg_id} if e.outcome_unknown and msg_id is not None else None
    msg = f"the cluster cannot take changes now: {e.reason}{note}"
    return CtsdError("unavailable", msg, extra=extra)


def _local_part(rc: RecordChange, c: Committed) -> RecordChange:
    """A sweep's change of a state record, cut to the fields that are this host's own."""
    current = c.state.get(rc.key)
    if rc.value is None or current is None:
        return rc
    own = {f: getattr(rc.value, f) for f in LOCAL_STATE_FIELDS}
    return RecordChange(rc.key, msgspec.structs.replace(current, **own), list(LOCAL_STATE_FIELDS))


def _own_settings_only(change: Change) -> bool:
    """True if `change` sets nothing but keys of settings.json that are this host's own."""
    if change.connections or change.state or change.order is not None or change.log is not None:
        return False
    if change.touched or change.replaces or len(change.documents) != 1:
        return False
    (rc,) = change.documents
    return (
        rc.key == "settings"
        and rc.value is not None
        and rc.fields is not None
        and all(k in shared.LOCAL_SETTINGS_KEYS for k in rc.fields)
    )


def _still_applies(
    c: Committed, change: Change, names: frozenset[str], base: int, seq: int
) -> bool:
    """`keyed.still_applies` on this host's state (its events not stamped yet: as computed)."""
    try:
        return keyed.still_applies(c.log, c.revision, names, base, change.events[0].id, seq)
    except keyed.LogsDiffer as e:
        raise InvalidChange(str(e)) from None


# Another host's change, decoded straight into its record types: every record is checked
# before any of it is applied (a change is applied whole or not at all), in one pass rather
# than a decode into `Change` (whose values are plain) and a conversion after it.


class _ConnectionChange(msgspec.Struct, array_like=True, omit_defaults=True):
    key: str
    value: Connection | None = None
    fields: list[str] | None = None
    hand: bool = False


class _StateChange(msgspec.Struct, array_like=True, omit_defaults=True):
    key: str
    value: ConnectionState | None = None
    fields: list[str] | None = None
    hand: bool = False


class _DocumentChange(msgspec.Struct, array_like=True, omit_defaults=True):
    key: str
    value: dict[str, Any] | None = None
    fields: list[str] | None = None
    hand: bool = False


class _TypedChange(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """`Change` as it comes from the stream (its fields, with the records' own types)."""

    connections: list[_ConnectionChange] = msgspec.field(default_factory=list)
    state: list[_StateChange] = msgspec.field(default_factory=list)
    documents: list[_DocumentChange] = msgspec.field(default_factory=list)
    order: list[str] | None = None
    events: list[SyncEvent] = msgspec.field(default_factory=list)
    log: list[SyncEvent] | None = None
    touched: list[str] = msgspec.field(default_factory=list)
    replaces: bool = False
    # (never in the payload: a host's own journal only, `messages.H_TAKEN`; dropped if sent)
    taken: dict[str, str] = msgspec.field(default_factory=dict)


_decode_typed = msgspec.json.Decoder(_TypedChange).decode


def _decoded(payload: bytes) -> Change:
    """A change of the stream, checked whole; raises InvalidChange naming the fault."""
    try:
        t = _decode_typed(payload)
    except msgspec.ValidationError as e:
        raise InvalidChange(f"a record is not valid: {e}") from None
    except msgspec.MsgspecError as e:
        raise InvalidChange(f"the change does not decode: {e}") from None
    except RecursionError:
        raise InvalidChange("the change is nested too deeply") from None

    def here(rcs: Sequence[_ConnectionChange | _StateChange | _DocumentChange]) -> list:
        # `hand` dropped: a hand edit made on the host that published it is no edit of this
        # host's files, whose replay would take the record from them (`core.replayed`).
        return [RecordChange(rc.key, rc.value, rc.fields) for rc in rcs]

    return Change(
        connections=here(t.connections),
        state=here(t.state),
        documents=here(t.documents),
        order=t.order,
        events=t.events,
        log=t.log,
        touched=t.touched,
        replaces=t.replaces,
    )
