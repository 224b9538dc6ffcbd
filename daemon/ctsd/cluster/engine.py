"""The cluster's change stream on NATS JetStream: publish change groups, apply them in order.

One JetStream stream per cluster (`CTSD_<name>`) with one subject (`ctsd.<name>.chg`). Every
change group is ONE message, so a group is applied whole or not at all. Writes are ordered by
optimistic concurrency. A group that touches more than the records it names (an import, a
hand edit that reorders) is published with `Nats-Expected-Last-Sequence` = the stream sequence
its state is at; if another host's group got in first, the stream refuses it (`Conflict`), the
host applies what it missed and checks its change again against the newer state. A keyed
group (most: one connection updated) carries that sequence instead, and every host checks it
against the records changed since, at the same point of the stream (`keyed`): hosts writing
different records do not refuse each other. (`Nats-Expected-Last-Subject-Sequence` guards one
subject per message, and NATS 2.9 has no multi-message atomic publish, so per-record subjects
could not keep a group whole.)

Every host, the one that published included, applies the stream through one ordered consumer
(`subscribe_from`): strictly seq after seq, never twice, never with a gap it cannot explain.
A message it cannot validate, or that the apply callback refuses, stops the applying and
marks the engine `stalled` (skipping it would make this host's state differ from the others').

Messages carry headers `Ctsd-Cluster`, `Ctsd-Schema`, `Ctsd-Host`, `Nats-Msg-Id`
(`<host>:<local id>`: the stream drops a retried publish within its duplicate window) and
`Ctsd-Encoding: zlib` when the payload is compressed. The payload is opaque here: the store's
encoded change group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamState,
)

from ctsd.cluster import messages
from ctsd.cluster.config import ClusterSettings
from ctsd.cluster.errors import (
    ApplyFailed,
    BadMessage,
    Conflict,
    DuplicateHost,
    InvalidChange,
    PublishRefused,
    Stalled,
    StreamMismatch,
    StreamTrimmed,
    TooLarge,
    Unavailable,
)
from ctsd.cluster.messages import SCHEMA_VERSION, Change
from ctsd.models import DUPLICATE_WINDOW_S, NATS_CREDS_CREDENTIAL
from ctsd.models import ClusterState as State

log = structlog.get_logger("ctsd.cluster")


class StreamId(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which stream a data dir's applied seqs count in (kept by `cluster.streamid`)."""

    stream: str  # CTSD_<cluster name>
    created: str  # NATS's creation time of the stream, ISO 8601 ("" when it gave none)

    def shown(self) -> str:
        return f"{self.stream} (created {self.created or 'at an unknown time'})"


HEADER_ROOM = 1024  # bytes of max_payload kept for the headers
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's, until a server said otherwise
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
# A retry whose first attempt the stream is still storing (nats-server 2.11 and later; from
# 2.10.14 the answer is a duplicate ack with seq 0 instead): asked again shortly.
DUPLICATE_IN_PROCESS = 10158
IN_PROCESS_WAIT_S = 0.05
NO_LEADER = "the change stream has no leader (too few NATS nodes up)"
# Messages a host may be behind the stream and still take writes (each waits for them to be
# applied, well within publish_timeout_s); further behind, it refuses them at once.
FAR_BEHIND = 10_000
MAX_GAP_LOOKED_AT = 1000  # messages missing from the delivery checked one by one
SENT_IDS_KEPT = 4096
ATTEMPT_TIMEOUT_S = 1.0  # one publish request; retried (same msg id) until publish_timeout_s
# A stream leader whose replicas died still calls them `current` for about ten seconds (the
# NATS servers' own quorum-loss interval); their `active` (time since last heard) tells
# sooner. Replicas of a healthy stream are heard from every second or two.
REPLICA_SILENT_S = 5.0
# After a publish gave up, the stream's own description is not trusted for this long.
FAILED_HOLD_S = 10.0
# The consumer made again after a failure (a stream deleted by hand, storage lost, a disk
# refusing the journal): at once, then less often (but soon after it works again), the
# reason said once and again every CONSUMER_SAY_AGAIN_S while it lasts.
CONSUMER_RETRY_S = 0.1
CONSUMER_RETRY_MAX_S = 1.0
CONSUMER_SAY_AGAIN_S = 60.0


class _CannotCreate(Exception):
    """Internal: the stream is missing and the servers refused to create it (retried)."""


class _Restart(Exception):
    """Internal: drop the consumer and start again from the applied seq."""


class _NoLeader(_Restart):
    """Internal: the stream was described by a member that has no leader: from its own copy,
    which may be behind (it was, when the others died). Nothing is judged by it."""


ApplyCallback = Callable[[Change], Awaitable[None]]
OwnApplyCallback = Callable[[int], Awaitable[None]]  # the seq the own group got


class EngineStatus(msgspec.Struct, kw_only=True):
    """What `/health` and `ctsd status` show about the engine."""

    cluster: str
    host_id: str
    stream: str
    state: State
    reason: str | None
    server: str | None  # the NATS URL connected to
    applied_seq: int
    stream_last_seq: int | None
    lag: int | None
    stalled: str | None  # the Stalled kind when state is "stalled"

    @property
    def ok(self) -> bool:
        """Healthy: connected and applying (a lag is normal for a moment and not counted)."""
        return self.state == "connected"


def _is_reset(reason: str) -> bool:
    """A connection the server closed (as it does right after refusing the credentials)."""
    return any(s in reason.lower() for s in ("reset by peer", "broken pipe", "unexpected eof"))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ")


# --- the engine -----------------------------------------------------------------------------


YIELD_EVERY = 64  # stream messages applied in a row before the consumer yields the loop


class ClusterEngine:
    """The change stream of one cluster, seen from one host.

    Start: `await start()`, `subscribe_from(applied_seq, apply)`, `await catch_up()`.
    Write: `seq = await commit(group, expected_seq=applied_seq, local_id=..., apply_own=...)`
    (or `publish` + `wait_applied`: the change then comes back through `apply` like everyone
    else's).
    """

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        connect_timeout_s: float = 2.0,
        heartbeat_s: float = 1.0,
        refresh_s: float = 2.0,
        far_behind: int = FAR_BEHIND,
    ) -> None:
        self.settings = settings
        self._far_behind = far_behind
        self.stream = settings.stream
        self.subject = settings.subject
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_s = heartbeat_s
        self._refresh_s = refresh_s
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._connecting = False
        # The last connection was closed for a message over max_payload: the attempt it
        # cut short was not stored (the server refuses such a message whole).
        self._payload_refused = False
        self._state: State = "connecting"
        self._reason: str | None = "not connected yet"
        self._down_since: float | None = time.monotonic()
        self._last_error: str | None = None
        self._refused: str | None = None  # the servers' last authorization refusal
        self._ready = asyncio.Event()  # connected once and the stream ensured
        self._connected = asyncio.Event()  # the NATS connection is up right now
        self._settled = asyncio.Event()  # ready, or stalled before it could be
        self._closing = False
        self._stalled: Stalled | None = None
        self._resumed = asyncio.Event()
        self._resumes = 0  # how often `resume` set the applied seq (a snapshot installed)
        self._apply: ApplyCallback | None = None
        self._apply_lock = asyncio.Lock()  # one change applied at a time, in seq order
        self._applied = 0
        self._last_delivered = 0
        self._stream_last: int | None = None
        # When the stream was created (NATS's `created`): tells it from an earlier stream of the
        # same name, deleted and created again, whose snapshots must not be taken for its own.
        self.stream_created = ""
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self.boot = secrets.token_hex(8)  # this process's part of its message ids
        # The boot ids of the daemons that ran on this data dir before (`boots.remember`):
        # their messages are this host's own, however late they land (`_check_twin`).
        self.earlier_boots: frozenset[str] = frozenset()
        # The stream this data dir applied (`streamid`, set by the app): another stream is
        # never applied from this host's seq on; `keep_stream_id` makes the one it applies
        # durable before it applies any of it.
        self.data_stream: StreamId | None = None
        self.keep_stream_id: Callable[[StreamId], None] | None = None
        self._catch_up_target: int | None = None  # see `_behind`
        self._catch_up_pending = False  # the start's catch-up never saw the stream
        # The stream's last seq when this process first saw it (`_check_twin`).
        self._first_seen_last: int | None = None
        self._local_ids = itertools.count(1)
        self._sent_ids: OrderedDict[str, None] = OrderedDict()  # msg ids published lately
        self._check_now = asyncio.Event()  # look at the stream now (after a reconnect)
        self._write_failed_at = -1e9  # monotonic time a publish last gave up
        self.outages = 0  # times it stopped taking writes (however briefly)

    # --- state ------------------------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        """The stream seq up to which every change has been applied on this host."""
        return self._applied

    @property
    def state(self) -> State:
        return self._state

    @property
    def stalled_by(self) -> Stalled | None:
        """Why this host stopped applying the stream (None: it applies)."""
        return self._stalled

    @property
    def lag(self) -> int | None:
        if self._stream_last is None:
            return None
        return max(0, self._stream_last - self._applied)

    def _behind_reason(self) -> str | None:
        target = self._behind()
        if target is None:
            return None
        return (
            f"this host is catching up with the change stream: applied seq {self._applied} of "
            f"{target}; it takes writes once it is there"
        )

    def status(self) -> EngineStatus:
        server = None
        if self._nc is not None and self._nc.is_connected and self._nc.connected_url:
            url = self._nc.connected_url
            server = f"{url.scheme}://{url.hostname}:{url.port}"
        behind = self._behind_reason() if self._state == "connected" else None
        return EngineStatus(
            cluster=self.settings.name,
            host_id=self.settings.host_id,
            stream=self.stream,
            state="catching_up" if behind else self._state,
            reason=behind or self._reason,
            server=server,
            applied_seq=self._applied,
            stream_last_seq=self._stream_last,
            lag=self.lag,
            stalled=self._stalled.kind if self._stalled else None,
        )

    def _set_state(self, state: State, reason: str | None = None) -> None:
        if self._state == "closed" or (self._stalled is not None and state != "closed"):
            return
        if state in ("disconnected", "unavailable", "connecting"):
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.outages += 1
        else:
            self._down_since = None
        if (state, reason) != (self._state, self._reason):
            level = log.info if state == "connected" else log.warning
            level("cluster.state", state=state, reason=reason, cluster=self.settings.name)
        self._state = state
        self._reason = reason

    def stall(self, exc: Stalled) -> None:
        """Stop applying for `exc` (or say that it is why, when stalled for another reason
        that turned out to be this one)."""
        self._stalled = None
        self._stall(exc)

    def _stall(self, exc: Stalled) -> None:
        if self._stalled is not None:
            return
        log.error("cluster.stalled", kind=exc.kind, reason=str(exc), seq=exc.seq)
        self.outages += 1  # writes stop: hand edits refused meanwhile are taken in after it
        self._state = "stalled"
        self._reason = str(exc)
        self._stalled = exc
        self._resumed.clear()
        self._settled.set()
        self._fail_waiters(exc)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, wait_s: float | None = None) -> bool:
        """Connect (retrying in the background) and ensure the stream exists.

        Waits up to `wait_s` (default: the connect timeout) for the first connection; returns
        whether it is ready (False: not connected yet, or stalled). An unreachable engine is
        not an error here: `state`/`status()` say why, writes get `Unavailable`, and the
        background task keeps trying.
        """
        self._tasks.append(asyncio.create_task(self._connect_loop(), name="cluster-connect"))
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="cluster-refresh"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), wait_s or self._connect_timeout_s)
        return self._ready.is_set()

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks, *self._side_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._nc is not None:
            # Not while a stream message is being applied: closing the connection cancels
            # the subscription's task that applies it.
            async with self._apply_lock:
                with contextlib.suppress(Exception):
                    await self._nc.close()
        self._state = "closed"
        self._reason = "closed"
        self._fail_waiters(Unavailable("the cluster engine is closed"))

    async def _connect_loop(self) -> None:
        delay = 0.1
        self._connecting = True  # (errors meanwhile are the state's reason: `_on_error`)
        while not self._closing:
            try:
                self._nc = await nats.connect(
                    servers=list(self.settings.nats_urls),
                    name=f"ctsd {self.settings.host_id}",
                    connect_timeout=self._connect_timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    **(
                        self.settings.credentials.connect_options()
                        if self.settings.credentials
                        else {}
                    ),
                )
                self._connected.set()
                self._refused = None
                self._connecting = False
                break
            except Exception as exc:
                reason = self._last_error or self._with_credentials(_describe(exc))
                if self._refused is not None and _is_reset(reason):
                    reason = self._refused  # the server's refusal, not the close that follows
                self._set_state("disconnected", f"cannot connect to NATS: {reason}")
                self._last_error = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._js = self._nc.jetstream(timeout=ATTEMPT_TIMEOUT_S) if self._nc else None
        while not self._closing:
            try:
                await self._ensure_stream()
                break
            except StreamMismatch as exc:
                self._stall(exc)
                return
            except _CannotCreate as exc:
                self._set_state("unavailable", str(exc))
                await asyncio.sleep(1.0)
            except (nats.errors.Error, TimeoutError) as exc:
                self._set_state(
                    "unavailable", f"the JetStream API does not answer: {_describe(exc)}"
                )
                await asyncio.sleep(0.25)
        self._set_state("connected")
        self._ready.set()
        self._settled.set()

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        s = self.settings
        wanted = StreamConfig(
            name=self.stream,
            description=f"ctsd change stream of cluster {s.name} (schema {SCHEMA_VERSION})",
            subjects=[self.subject],
            retention=RetentionPolicy.LIMITS,
            max_msgs=s.max_msgs,
            max_bytes=s.max_bytes,
            max_age=s.max_age_s,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            discard=DiscardPolicy.OLD,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                info = await self._js.add_stream(wanted)
                log.info("cluster.stream_created", stream=self.stream, replicas=s.replicas)
            except nats.js.errors.APIError as exc:  # (400, or 500: replicas past the nodes)
                try:  # another host may have created it meanwhile
                    info = await self._js.stream_info(self.stream)
                except nats.js.errors.NotFoundError:
                    raise _CannotCreate(
                        f"cannot create stream {self.stream} ({s.replicas} replicas, "
                        f"max_bytes {s.max_bytes}): {exc.description}"
                    ) from None
        subjects = info.config.subjects or []
        if subjects != [self.subject]:
            raise StreamMismatch(
                f"stream {self.stream} exists with subjects {subjects}, not [{self.subject!r}]: "
                "it is not this cluster's change stream"
            )
        self.stream_created = info.created.isoformat() if info.created else ""
        if _from_leader(info):  # (else `_stream_info` notes it once a leader describes it)
            self._note_stream(info.state)

    def _with_credentials(self, reason: str) -> str:
        """An authorization error says which credentials were offered (the file, never its
        content), or that none were found and where they are looked for."""
        if "authorization" not in reason.lower():
            return reason
        creds = self.settings.credentials
        if creds is not None:
            return f"{reason} (with the {creds.kind.replace('_', '/')} from {creds.source})"
        return (
            f"{reason} (no credentials were offered: none is configured in "
            f"CTSD_CLUSTER_CREDS_FILE, nor is there a systemd credential {NATS_CREDS_CREDENTIAL})"
        )

    def _note_stream(self, state: StreamState) -> None:
        if self._first_seen_last is None:
            self._first_seen_last = state.last_seq
        self._stream_last = max(self._stream_last or 0, state.last_seq)
        if self._catch_up_pending:  # the start gave up before it saw the stream: now it has
            self._catch_up_pending = False
            self._catch_up_target = state.last_seq
        elif (
            self._catch_up_target is None
            and self._apply is not None
            and state.last_seq - self._applied > self._far_behind
        ):
            # Far behind (back from a partition, a snapshot installed, a slow host): a write
            # now would wait for the whole backlog, and be answered `unavailable` as it
            # lands. Refused at once, as after a start, until the backlog is applied.
            self._catch_up_target = state.last_seq

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = self._with_credentials(_describe(exc))
        if "authorization" in self._last_error.lower():
            self._refused = self._last_error
        elif self._refused is not None and _is_reset(self._last_error):
            self._last_error = self._refused  # the server's refusal, not the close after it
        if self._nc is None or self._connecting:  # being made (nats.connect retries forever)
            self._set_state("disconnected", f"cannot connect to NATS: {self._last_error}")
        elif not self._connected.is_set() and not self._closing:
            # Reconnecting: why it fails now (credentials the servers no longer take, say),
            # not the error that cut the connection (an EOF).
            self._set_state("disconnected", f"lost the NATS connection: {self._last_error}")
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.warning("cluster.slow_consumer", reason=self._last_error)

    async def _connected_and_ready(self) -> None:
        await self._ready.wait()
        await self._connected.wait()

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if not self._closing:
            self._set_state(
                "disconnected", f"lost the NATS connection: {self._last_error or 'closed'}"
            )

    async def _on_closed(self) -> None:
        """nats-py gives a connection up for good, reconnecting no more, after an error the
        server sends before closing it (a message over a max_payload lowered since the
        connection was made, say). The daemon is long-running: it connects again (to the
        config's URLs, with its credentials), and applies the stream from where it was."""
        if self._closing or self._connecting:  # (one connection is made at a time)
            return
        self._connected.clear()
        # The server's error that closed it (not passed to error_cb), else the last one seen.
        last = self._nc.last_error if self._nc is not None else None
        reason = _describe(last) if last is not None else self._last_error or "closed"
        self._payload_refused = "maximum payload" in reason.lower()
        log.warning("cluster.connection_closed", reason=reason, then="connecting again")
        self._set_state("disconnected", f"the NATS connection was closed ({reason}); connecting")
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._connect_loop(), name="cluster-connect"))

    async def _on_reconnected(self) -> None:
        self._connected.set()
        self._last_error = None
        self._refused = None
        if self._ready.is_set():
            # A NATS node answers; whether the stream has a quorum behind it is not known
            # yet: the stream is looked at now, and only that makes the host healthy again.
            self._set_state("unavailable", "reconnected to NATS; checking the change stream")
            self._check_now.set()

    async def _refresh_loop(self) -> None:
        """Keep stream_last_seq (the lag) fresh and notice a stream that stops answering."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self._refresh_s)
            self._check_now.clear()
            if not self._ready.is_set() or self._js is None or self._nc is None:
                continue
            if not self._nc.is_connected:
                continue
            try:
                info = await self._js.stream_info(self.stream)
            except (nats.errors.Error, TimeoutError) as exc:
                self._set_state(
                    "unavailable", f"stream {self.stream} does not answer: {_describe(exc)}"
                )
                continue
            if _from_leader(info):
                self._note_stream(info.state)
            # The stream's remaining node may still answer stream info while it has no
            # quorum: writes then fail, and /health must say so.
            no_quorum = _no_quorum(info)
            if no_quorum:
                self._set_state("unavailable", no_quorum)
            elif self._state == "unavailable" and not self._failed_lately():
                self._set_state("connected")

    def _failed_lately(self) -> bool:
        """Did a publish give up lately? For a while after nodes die, the one left may still
        describe the stream as it was (replicas current, a leader): a write that failed then
        outweighs what the stream says; a write that succeeds ends it at once."""
        return time.monotonic() - self._write_failed_at < FAILED_HOLD_S

    # --- publishing -------------------------------------------------------------------------

    def jetstream(self) -> JetStreamContext:
        """The JetStream context of the engine's connection (the snapshot bucket uses it)."""
        if not self._ready.is_set() or self._js is None:
            raise Unavailable(self._reason or "not connected to the cluster")
        return self._js

    async def founding_of_stream(self) -> str | None:
        """The founding object the stream's first message names (None: it names none).
        Raises Unavailable (also when the stream does not answer)."""
        js = self.jetstream()
        try:
            msg = await js.get_msg(self.stream, seq=1)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"stream {self.stream} does not answer: {_describe(exc)}") from None
        return (msg.headers or {}).get(messages.H_FOUNDING)

    async def stream_last_seq(self) -> int:
        """The seq of the stream's last message now (0: empty). Raises Unavailable."""
        return (await self.stream_bounds())[1]

    async def stream_bounds(self) -> tuple[int, int]:
        """The seqs of the stream's first and last messages now. Raises Unavailable."""
        self.jetstream()  # (Unavailable before the first connection)
        try:
            info = await self._stream_info()
        except (nats.errors.Error, TimeoutError, _NoLeader) as exc:
            raise Unavailable(f"stream {self.stream} does not answer: {_describe(exc)}") from None
        return info.state.first_seq, info.state.last_seq

    def new_local_id(self) -> str:
        """A local id never used before by this host (random per start + counter)."""
        return f"{self.boot}-{next(self._local_ids)}"

    def msg_id(self, local_id: str) -> str:
        """The stream's message id of this host's group `local_id` (`Nats-Msg-Id`)."""
        return f"{self.settings.host_id}:{local_id}"

    def check_writable(self) -> None:
        """Raise Unavailable now if a write could not go through (for a fast refusal)."""
        if self._stalled is not None:
            raise Unavailable(f"this host stopped applying the change stream: {self._stalled}")
        if self._state == "closed":
            raise Unavailable("the cluster engine is closed")
        if (behind := self._behind_reason()) is not None:
            raise Unavailable(behind)
        down = self._down_since
        if down is not None and time.monotonic() - down >= self.settings.publish_timeout_s:
            raise Unavailable(self._reason or "the cluster engine is not connected")

    async def publish(
        self,
        payload: bytes,
        expected_seq: int,
        local_id: str,
        *,
        retry: bool = False,
        keyed: bool = False,
        founding: str | None = None,
        taken: Mapping[str, str] | None = None,
    ) -> int:
        """Append one change group to the stream; returns its stream seq.

        `expected_seq` is the seq the group was computed against (`applied_seq` then); the
        stream refuses it with `Conflict` if anything was appended since, unless `keyed`: the
        message then carries it for the hosts to check (`keyed` module). `local_id` must
        never repeat on this host for another group; publishing the same group again with
        the same id stores it once and returns its seq. Pass `retry=True` when this process
        cannot know it was published before (a group kept across a restart). `founding`: the
        stream's first message (`messages.H_FOUNDING`). `taken`: the tags of the hand edits it
        took in (`messages.H_TAKEN`). Raises Conflict, Unavailable or PublishRefused.
        """
        self.check_writable()
        msg_id = self.msg_id(local_id)
        data, headers = messages.encode(
            payload,
            cluster=self.settings.name,
            host=self.settings.host_id,
            msg_id=msg_id,
            expected_seq=expected_seq,
            keyed=keyed,
            founding=founding,
            taken=taken,
        )
        maybe_sent = retry or msg_id in self._sent_ids
        self._check_size(data, headers, maybe_sent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout_s
        self._sent_ids[msg_id] = None
        if len(self._sent_ids) > SENT_IDS_KEPT:
            self._sent_ids.popitem(last=False)
        reason = "no answer"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._write_failed_at = time.monotonic()
                if self._state == "connected":
                    self._set_state("unavailable", f"the change stream takes no writes: {reason}")
                raise Unavailable(
                    f"the change stream did not take the change within "
                    f"{self.settings.publish_timeout_s:g} s: {reason}",
                    outcome_unknown=maybe_sent,
                )
            # Never hand a request to a connection that is down: the client would buffer it
            # and send it after reconnecting, long after this call gave up on it.
            if not self._ready.is_set() or not self._connected.is_set():
                try:
                    await asyncio.wait_for(self._connected_and_ready(), remaining)
                except TimeoutError:
                    reason = self._reason or "not connected"
                    continue
            try:
                self.check_writable()
            except Unavailable as exc:  # an earlier attempt may have been stored
                raise Unavailable(str(exc), outcome_unknown=maybe_sent) from None
            # Again: a connection made since may have brought a lower limit (one over it
            # would make the server drop the connection).
            self._check_size(data, headers, maybe_sent)
            assert self._js is not None
            try:
                ack = await self._js.publish(
                    self.subject,
                    data,
                    timeout=min(remaining, ATTEMPT_TIMEOUT_S),
                    stream=self.stream,
                    headers=dict(headers),
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    # A retry of a group that was stored (its answer lost, or the caller
                    # publishing it again) meets its own message at expected_seq + 1: a
                    # replicated stream checks the sequence before the duplicate window, so
                    # look (only then: it costs a request, and conflicts come in bursts).
                    ours = maybe_sent and await self._is_ours(expected_seq + 1, msg_id)
                    if ours is None:  # cannot tell now: never a conflict it may not be
                        reason = "whether the stream holds it already cannot be read now"
                        await asyncio.sleep(min(IN_PROCESS_WAIT_S, remaining))
                        continue
                    if ours:
                        self._stream_last = max(self._stream_last or 0, expected_seq + 1)
                        return expected_seq + 1
                    last = _last_seq(exc.description)
                    if last is not None:
                        self._stream_last = max(self._stream_last or 0, last)
                    raise Conflict(expected_seq, last) from None
                if exc.code == 503 or exc.code is None or exc.err_code == DUPLICATE_IN_PROCESS:
                    reason = _describe(exc)
                    await asyncio.sleep(min(IN_PROCESS_WAIT_S, remaining))
                    continue
                raise PublishRefused(
                    f"the change stream refused the change: {exc.description}"
                ) from None
            except (nats.errors.TimeoutError, TimeoutError) as exc:
                maybe_sent = True
                reason = f"no answer from the stream ({_describe(exc)})"
                continue
            except (
                nats.js.errors.NoStreamResponseError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                reason = (
                    f"the stream has no leader or the connection is down ({type(exc).__name__})"
                )
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                continue
            if ack.duplicate and not ack.seq:  # the first attempt is still being stored
                reason = "the stream is still storing an earlier attempt"
                await asyncio.sleep(min(IN_PROCESS_WAIT_S, max(0.0, deadline - loop.time())))
                continue
            if ack.stream != self.stream:
                raise PublishRefused(f"the change went to stream {ack.stream}, not {self.stream}")
            self._stream_last = max(self._stream_last or 0, ack.seq)
            if self._state == "unavailable":
                self._set_state("connected")  # the stream answers again
            return ack.seq

    def _check_size(self, data: bytes, headers: dict[str, str], maybe_sent: bool) -> None:
        """Raise TooLarge past the servers' limit as of the last (re)connect: raised in their
        config, it holds once the connection is made again."""
        limit = (self._nc.max_payload if self._nc else DEFAULT_MAX_PAYLOAD) - HEADER_ROOM
        if len(data) <= limit:
            return
        compressed = " compressed" if messages.H_ENCODING in headers else ""
        why = (
            f"the change group is {len(data)} bytes{compressed}; the NATS servers take at "
            f"most {limit} (raise max_payload in the nats-server config)"
        )
        if maybe_sent and not self._payload_refused:  # an earlier attempt may be stored
            raise Unavailable(why, outcome_unknown=True)
        raise TooLarge(why, limit)

    async def commit(
        self,
        payload: bytes,
        expected_seq: int,
        local_id: str,
        apply_own: OwnApplyCallback | None = None,
        timeout: float | None = 10.0,
        *,
        retry: bool = False,
        keyed: bool = False,
        founding: str | None = None,
        taken: Mapping[str, str] | None = None,
    ) -> int:
        """`publish`, then return once this host has applied the group; returns its seq.

        With `apply_own(seq)`, the publishing host applies its own group at once from what it
        already holds (no wait for the consumer, nothing to decode) when it is the next one in
        order here: the stream took it right after `expected_seq` (or, `keyed`, after changes
        this host has applied already). The consumer then skips it. Otherwise the group is
        applied when the consumer delivers it, as on every other host. If `apply_own` raises,
        the group is in the stream but not applied here: the engine stalls (ApplyFailed) and
        it is raised.
        """
        seq = await self.publish(
            payload,
            expected_seq,
            local_id,
            retry=retry,
            keyed=keyed,
            founding=founding,
            taken=taken,
        )
        if apply_own is not None:
            async with self._apply_lock:
                if self._applied == seq - 1 and self._stalled is None:
                    try:
                        await apply_own(seq)
                    except Exception as exc:
                        stall = ApplyFailed(
                            f"applying this host's own change seq {seq} failed: "
                            f"{type(exc).__name__}: {exc}",
                            seq=seq,
                        )
                        self._stall(stall)
                        raise stall from exc
                    self._mark_applied(seq)
                    return seq
        await self.wait_applied(seq, timeout)
        return seq

    async def _is_ours(self, seq: int, msg_id: str) -> bool | None:
        """Is the message at `seq` the one with `msg_id`? (a publish whose answer was lost)
        None: it cannot be read now (the same outage that lost the answer, say)."""
        assert self._js is not None
        try:
            msg = await self._js.get_msg(self.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, TimeoutError):
            return None
        return bool(msg.headers and msg.headers.get(messages.H_MSG_ID) == msg_id)

    # --- applying ---------------------------------------------------------------------------

    def subscribe_from(self, seq: int, apply: ApplyCallback) -> None:
        """Apply every message after `seq`, in order, through `apply` (the caller's door).

        `apply(change)` is awaited for one message at a time. It returns normally when the
        change is applied (durably: the caller records `change.seq` with it, and passes that
        seq here at the next start). Raising `InvalidChange` (cannot decode/validate) or any
        other exception stops the applying at that message: the engine turns `stalled`, the
        message is not counted as applied, and writes are refused; `resume()` retries it.
        """
        if self._apply is not None:
            raise RuntimeError("subscribe_from is called once")
        self._apply = apply
        self._applied = seq
        self._last_delivered = seq
        self._tasks.append(asyncio.create_task(self._consume_loop(), name="cluster-consume"))

    def resume(self, from_seq: int | None = None) -> None:
        """Start applying again after a stall (from `from_seq` after a snapshot was installed)."""
        if from_seq is not None:
            self._applied = from_seq
            self._last_delivered = from_seq
            self._resumes += 1
        if self._stalled is None:
            return
        log.info("cluster.resumed", applied_seq=self._applied)
        self._stalled = None
        # Through `_set_state`: an outage that began before the stall ends here too (its
        # start left behind would refuse every write as long down, until the next outage).
        if self._nc is not None and self._nc.is_connected:
            self._set_state("connected")
        else:
            self._set_state("disconnected", "not connected")
        self._resumed.set()

    async def wait_applied(self, seq: int, timeout: float | None = None) -> None:
        """Until every change up to `seq` is applied here. Raises Stalled, TimeoutError."""
        if self._applied >= seq:
            return
        if self._stalled is not None:
            raise self._stalled
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._waiter_ids), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if not future.done():
                future.cancel()

    def _wake_waiters(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._applied:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _fail_waiters(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a waiter that gave up must not warn

    async def catch_up(self, until: int | None = None, timeout: float | None = 30.0) -> int:
        """Apply everything the stream holds now (or up to `until`); returns the applied seq.

        Called at start, before READY. Raises StreamTrimmed (take a snapshot, then
        `resume(from_seq=...)`), another Stalled, or Unavailable (not connected, or not caught
        up within `timeout`).
        """
        if self._apply is None:
            raise RuntimeError("call subscribe_from before catch_up")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        try:
            await asyncio.wait_for(self._settled.wait(), left())
        except TimeoutError:
            self._catch_up_pending = True  # a backlog may wait once the stream answers
            raise Unavailable(self._reason or "not connected to the cluster") from None
        if self._stalled is not None:
            raise self._stalled
        if until is None:
            assert self._js is not None
            while True:
                applied = self._applied
                try:
                    info = await self._stream_info()
                    break
                except (nats.errors.Error, TimeoutError, _NoLeader) as exc:
                    if deadline is not None and loop.time() >= deadline:
                        self._catch_up_pending = True
                        raise Unavailable(
                            f"stream {self.stream} does not answer: {_describe(exc)}"
                        ) from None
                    await asyncio.sleep(0.25 if isinstance(exc, _NoLeader) else 0.05)
            self._check_history(info.state, applied)
            until = info.state.last_seq
        try:
            await self.wait_applied(until, left())
        except TimeoutError:
            # The daemon serves on, its writes refused until it is there (`_behind`): one
            # published now would wait for the whole backlog to be applied before its answer.
            self._catch_up_target = until
            raise Unavailable(
                f"catching up: applied seq {self._applied} of {until} within {timeout:g} s"
            ) from None
        return self._applied

    async def _stream_info(self) -> StreamInfo:
        """The stream's description, noted, from its leader (or a single server); raises
        _NoLeader for one from a member without a leader."""
        assert self._js is not None
        info = await self._js.stream_info(self.stream)
        if not _from_leader(info):
            raise _NoLeader(NO_LEADER)
        if info.created:  # (the stream may have been deleted and made again meanwhile)
            self.stream_created = info.created.isoformat()
        self._note_stream(info.state)
        return info

    def _check_history(self, state: StreamState, applied: int) -> None:
        """Raise (and stall) if the stream cannot continue from `applied`, this host's applied
        seq when the description was asked for."""
        ours, known = StreamId(self.stream, self.stream_created), self.data_stream
        if applied > 0 and known is not None and not _same_stream(known, ours):
            exc: Stalled = StreamMismatch(
                f"this host applied stream {known.shown()} up to seq {applied}, not stream "
                f"{ours.shown()}: this data dir belongs to another cluster, or the stream was "
                "deleted and made again"
            )
        elif applied > state.last_seq:
            exc = StreamMismatch(
                f"this host applied the change stream up to seq {applied}, but stream "
                f"{self.stream} ends at seq {state.last_seq}: it was deleted or made again, "
                "or this data dir belongs to another cluster"
            )
        elif state.first_seq > applied + 1 and state.last_seq > applied:
            exc = StreamTrimmed(applied, state.first_seq)
        else:
            if known != ours:
                self._keep_stream(ours)
            return
        self._stall(exc)
        raise exc

    def _keep_stream(self, sid: StreamId) -> None:
        if self.keep_stream_id is not None:
            try:
                self.keep_stream_id(sid)
            except OSError as e:  # (a full disk: only the check is lost meanwhile; tried again)
                log.warning("cluster.stream_id_not_kept", reason=e.strerror or str(e))
                return
        self.data_stream = sid

    async def _consume_loop(self) -> None:
        wait, said, said_at = CONSUMER_RETRY_S, None, 0.0  # (a failure that lasts)
        while not self._closing:
            await self._connected_and_ready()  # not a retry every 0.1 s while it is down
            if self._stalled is not None:
                await self._resumed.wait()
                continue
            began = time.monotonic()
            try:
                await self._consume()
            except Stalled as exc:
                self._stall(exc)
            except _NoLeader:  # (the state says so: no log line twice a second)
                await asyncio.sleep(0.5)
            except _Restart as exc:
                log.info("cluster.consumer_restart", reason=str(exc), applied_seq=self._applied)
                await asyncio.sleep(0.1)  # not a busy loop when every new consumer fails
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                now = time.monotonic()
                if now - began > CONSUMER_RETRY_MAX_S:
                    wait, said = CONSUMER_RETRY_S, None  # (it consumed for a while first)
                reason = _describe(exc)
                if reason != said or now - said_at > CONSUMER_SAY_AGAIN_S:
                    # (a stream deleted by hand: not 10 lines a second, nor a full disk
                    # said once and then never)
                    log.warning("cluster.consumer_retry", reason=reason, retry_in_s=wait)
                    said, said_at = reason, now
                await asyncio.sleep(wait)
                wait = min(wait * 2, CONSUMER_RETRY_MAX_S)
            else:
                wait, said = CONSUMER_RETRY_S, None

    async def _consume(self) -> None:
        assert self._nc is not None and self._js is not None
        nc, js = self._nc, self._js
        applied = self._applied  # before the request: own groups may be applied meanwhile
        resumes = self._resumes
        info = await self._stream_info()
        if self._resumes != resumes:
            return  # a snapshot installed meanwhile moved the applied seq: judge from there
        self._check_history(info.state, applied)
        # Messages are handled in the subscription's own task, one after the other, as they
        # come (`next_msg` would cost a task, a timer and a uuid per message). This task
        # watches it: the first error a message raised, or nothing (not even the consumer's
        # heartbeat) for 3 heartbeats.
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        last_seen = loop.time()
        busy = False  # a message is being handled: its time is not silence
        stopping = False
        handled = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal last_seen, handled, busy
            if stopping or failed.done():
                return  # a new consumer delivers it again, from the applied seq on
            busy = True
            try:
                await self._handle(msg)
            except Exception as exc:
                if not failed.done():
                    failed.set_exception(exc)
                return
            finally:
                busy = False
                last_seen = loop.time()
            handled += 1
            if handled % YIELD_EVERY == 0:
                # A catch-up applies thousands of queued messages, none of which need wait
                # for anything: the rest of the daemon gets the loop now and then.
                await asyncio.sleep(0)

        # Unbounded here: flow control bounds what the server sends ahead of the applying.
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=0, pending_bytes_limit=0)
        consumer: str | None = None
        try:
            config = ConsumerConfig(
                # `nats consumer report CTSD_<name>` shows each host's position by it
                description=f"ctsd {self.settings.host_id}",
                deliver_subject=inbox,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._applied + 1,
                ack_policy=AckPolicy.NONE,
                max_deliver=1,
                flow_control=True,
                idle_heartbeat=self._heartbeat_s,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=max(5.0, 5 * self._heartbeat_s),
            )
            self._last_delivered = self._applied
            last_seen = loop.time()
            consumer = (await js.add_consumer(self.stream, config)).name
            while not self._closing:
                window = 3 * self._heartbeat_s
                left = window if busy else last_seen + window - loop.time()
                if left <= 0:
                    raise _Restart("no message or heartbeat from the consumer")
                done, _ = await asyncio.wait([failed], timeout=left)
                if done:
                    failed.result()  # the error a message raised
        finally:
            stopping = True
            # A message being applied is finished first: cancelling it halfway would leave
            # the journal and memory apart.
            async with self._apply_lock:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if consumer is not None and nc.is_connected and not self._closing:
                # Best effort, in the background (the server drops it unused anyway).
                task = asyncio.create_task(self._delete_consumer(consumer))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
            error = failed.exception() if failed.done() else None
            if error is not None and not self._closing:
                # Raised above, or by the message that was being applied when this consumer
                # was given up (a restart): that error must not be lost.
                raise error from None

    async def _delete_consumer(self, name: str) -> None:
        if self._js is not None:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self.stream, name)

    async def _handle(self, msg: Msg) -> None:
        assert self._nc is not None
        headers = msg.headers or {}
        if not msg.data and headers.get("Status") == "100":
            if msg.reply:  # flow control: everything before it has been applied
                await self._nc.publish(msg.reply, b"")
                return
            stalled_reply = headers.get("Nats-Consumer-Stalled")
            if stalled_reply:
                await self._nc.publish(stalled_reply, b"")
            last = headers.get("Nats-Last-Stream")
            if last and last.isdigit() and int(last) > self._last_delivered:
                if await self._deleted_up_to(int(last)):
                    return
                raise _Restart(
                    f"the consumer delivered seq {last}, this host saw {self._last_delivered}"
                )
            return
        try:
            meta = msg.metadata
        except nats.errors.NotJSMessageError:
            return  # not from the stream (nothing else publishes to a fresh inbox)
        seq = meta.sequence.stream
        self._stream_last = max(self._stream_last or 0, seq + meta.num_pending)
        self._last_delivered = max(self._last_delivered, seq)
        async with self._apply_lock:
            if self._stalled is not None:  # stalled from outside the consumer (`commit`, say)
                raise _Restart(f"stalled: {self._stalled.kind}")
            if seq <= self._applied:
                return  # applied already (a restarted consumer, or `commit`'s own apply)
            if seq != self._applied + 1:
                await self._explain_gap(seq)
            change = messages.decode(
                msg.headers,
                msg.data,
                seq=seq,
                published_at=meta.timestamp,
                cluster=self.settings.name,
                host_id=self.settings.host_id,
            )
            change = await messages.inflated(self._check_twin(change))
            assert self._apply is not None
            try:
                await self._apply(change)
            except Stalled:
                raise  # the callback's own verdict (a host that may not join, say)
            except InvalidChange as exc:
                raise BadMessage(
                    f"message seq {seq} ({change.msg_id}, from host {change.host}) is not a "
                    f"valid change: {exc}; it was not applied",
                    seq=seq,
                ) from exc
            except Exception as exc:
                raise ApplyFailed(
                    f"applying message seq {seq} ({change.msg_id}, from host {change.host}) "
                    f"failed: {type(exc).__name__}: {exc}",
                    seq=seq,
                ) from exc
            self._mark_applied(seq)

    def _check_twin(self, change: Change) -> Change:
        """A message with this host's id that no daemon on this data dir published (its boot
        id is not one of theirs), put in the stream after this process started: another
        daemon runs with the same host id. Taken for this host's own, its changes would skip
        what makes another host's change local here: the applying stops at it until each has
        an id of its own. One from before this process started is applied as another
        host's."""
        if not change.own:
            return change
        boot = change.msg_id.partition(":")[2].rpartition("-")[0]
        if boot == self.boot or boot in self.earlier_boots:
            return change
        first = self._first_seen_last
        if first is None or change.seq <= first:
            # From before this process started: a twin since gone, or this host's own id
            # given to another daemon earlier. Applied as another host's change.
            return dataclasses.replace(change, own=False, taken={})
        raise DuplicateHost(
            f"message seq {change.seq} ({messages.short(change.msg_id)}) has this host's id "
            f"{self.settings.host_id!r} but another daemon published it: two daemons run as "
            "one host; give each its own (CTSD_HOST_ID or cluster.host_id) and restart them; "
            "it was not applied",
            seq=change.seq,
        )

    def _mark_applied(self, seq: int) -> None:
        self._applied = seq
        if self._catch_up_target is not None:
            self._behind()
        self._wake_waiters()

    def _behind(self) -> int | None:
        """The seq a start that timed out catching up, or a host found far behind, must reach
        before writes (None: there)."""
        target = self._catch_up_target
        if target is not None and self._applied >= target:
            self._catch_up_target = target = None
            log.info("cluster.caught_up", applied_seq=self._applied)
        return target

    async def _deleted_up_to(self, last: int) -> bool:
        """Were the messages after the last one delivered, up to `last`, deleted (by hand: a
        message no host could apply)? Then they are skipped: the stream still counts them
        in its last seq, and the consumer has nothing to deliver."""
        assert self._js is not None
        first = self._last_delivered + 1
        if last - first >= MAX_GAP_LOOKED_AT:
            return False
        info = await self._stream_info()
        if info.state.first_seq > first:
            return False  # trimmed, not deleted: the restart finds out (a snapshot)
        for s in range(first, last + 1):
            try:
                await self._js.get_msg(self.stream, seq=s)
            except nats.js.errors.NotFoundError:
                continue
            return False  # there after all: not delivered yet, or lost (restart)
        if await self._trimmed_past(first):  # meanwhile: not found since trimmed
            return False
        async with self._apply_lock:
            if self._applied != first - 1 or self._last_delivered >= first:
                return False
            log.warning(
                "cluster.deleted_messages_skipped",
                first=first,
                last=last,
                reason="deleted from the stream by hand",
            )
            self._last_delivered = last
            self._mark_applied(last)
        return True

    async def _trimmed_past(self, seq: int) -> bool:
        """Does the stream start after `seq` now? (Messages looked up one by one and not
        found were trimmed, then, not deleted by hand: a restart finds out, a snapshot.)"""
        return (await self._stream_info()).state.first_seq > seq

    async def _explain_gap(self, seq: int) -> None:
        """Messages between the applied seq and `seq` did not arrive: trimmed, deleted or lost?"""
        assert self._js is not None
        info = await self._stream_info()
        if info.state.first_seq > self._applied + 1:
            raise StreamTrimmed(self._applied, info.state.first_seq)
        missing = range(self._applied + 1, seq)
        if len(missing) > MAX_GAP_LOOKED_AT:
            raise _Restart(f"{len(missing)} messages before seq {seq} did not arrive")
        for s in missing:
            try:
                await self._js.get_msg(self.stream, seq=s)
            except nats.js.errors.NotFoundError:
                continue
            raise _Restart(f"seq {s} is in the stream but was not delivered")
        if await self._trimmed_past(self._applied + 1):  # meanwhile: not found since trimmed
            raise _Restart("the stream was trimmed while the gap was looked at")
        log.warning(
            "cluster.deleted_messages_skipped",
            first=missing.start,
            last=missing.stop - 1,
            reason="deleted from the stream by hand",
        )


def _from_leader(info: StreamInfo) -> bool:
    """Is this description the stream's own (its leader's, or a single server's)? A member
    left without a leader answers from its own copy, which may be behind."""
    return info.cluster is None or info.cluster.leader is not None


def _no_quorum(info: StreamInfo) -> str | None:
    """Why the stream cannot take writes now, from its cluster info (None: it can)."""
    cluster = info.cluster
    if cluster is None:
        return None  # a single server
    replicas = cluster.replicas or []
    if cluster.leader is None:
        return NO_LEADER
    up = 1 + sum(
        1
        for r in replicas
        if r.current and not r.offline and (r.active or 0) < REPLICA_SILENT_S * 1e9
    )
    total = 1 + len(replicas)
    if up * 2 <= total:
        return f"the change stream has {up} of {total} replicas current: no quorum"
    return None


def _last_seq(description: str | None) -> int | None:
    match = re.search(r"(\d+)\s*$", description or "")
    return int(match.group(1)) if match else None


__all__ = ["ApplyCallback", "ClusterEngine", "EngineStatus", "OwnApplyCallback"]


def _same_stream(a: StreamId, b: StreamId) -> bool:
    """The same stream: its name, and its creation time where both know it."""
    return a.stream == b.stream and (not a.created or not b.created or a.created == b.created)
