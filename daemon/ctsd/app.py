"""`ctsd serve`: the composition root. Builds every part with what it needs and runs them
under one task group; start-up, readiness, signals and shutdown.

    data dir → lock → store (load every file, set files edited while the daemon was down back
    to their copies, replay the journal) → token → prober, sweeper, watcher → [cluster mode:
    connect, apply what the stream holds beyond this host] → store starts (writes the files;
    takes in the edited ones) → web (bind) → READY … SIGTERM → web closes (bus clients 1001) →
    heartbeats flushed → store closes (every change in the files) → [the cluster connection
    closes] → exit
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from ctsd import __version__, livebackup, logs
from ctsd.atomic import ensure_dir
from ctsd.backup import interrupted_swap
from ctsd.bases import Bases, CopyUnusable
from ctsd.cluster.config import (
    ClusterConfigError,
    ClusterSettings,
    env_settings,
    load_cluster_settings,
)
from ctsd.config import Listen, is_loopback, resolve_listen
from ctsd.diagnose import FileProblem
from ctsd.errors import CtsdError
from ctsd.files import Invalid, document_file
from ctsd.lock import InstanceLock
from ctsd.models import Settings
from ctsd.notify import Notifier
from ctsd.probes import Prober
from ctsd.rekey import RekeyRefused, finish_pending
from ctsd.safefile import read_data_file, subdir_problem
from ctsd.secretbox import KeyFileError, SecretBox, configured_key, configured_key_path
from ctsd.services import Services
from ctsd.store import Store
from ctsd.sweeps import Sweeper
from ctsd.tokenfile import load_token
from ctsd.urlmask import mask_url_secrets
from ctsd.watch import Watcher

log = structlog.get_logger("ctsd.app")
SHUTDOWN_GRACE_S = 4.0  # inside the 5 s a stop may take
STATUS_EVERY_S = 2.0  # how often systemd's STATUS= is brought up to date, when it changed
# Cluster mode: how long the start waits to apply what the stream holds before READY; past
# it the daemon serves its files and applies the rest in the background.
CATCH_UP_S = 60.0  # CTSD_CLUSTER_CATCH_UP_S overrides it
CATCH_UP_MARGIN_S = 15.0  # the start's own work before and after the catch-up (EXTEND_TIMEOUT_USEC)


class StartError(Exception):
    """Start failed: the daemon exits 1 with this one-line reason on stderr (a URL's password
    in it masked: it may quote a setting, or an environment variable, as typed)."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_url_secrets(message))


@dataclass
class Daemon:
    svc: Services
    watcher: Watcher
    notifier: Notifier
    cluster: ClusterSettings | None = field(default=None)
    edited: list[str] = field(default_factory=list)  # files edited while it was down
    lock: InstanceLock | None = None
    # The address the flags, the environment and these settings name (`resolve_listen`).
    listen_of: Callable[[Settings], Listen] | None = None
    stopping: bool = False  # a stop signal was taken

    def status_line(self) -> str:
        s = self.svc.store
        line = (
            f"{len(s.connections)} connections, revision {s.revision}, "
            f"{len(s.problems)} invalid files"
        )
        cluster = s.committer_status()
        if cluster is not None:
            line += f", cluster {cluster['cluster']} {cluster['state']} (lag {cluster['lag']})"
        return line


def _prepare(data_dir: Path, host: str | None, port: int | None) -> tuple[Daemon, InstanceLock]:
    # What the command line and the environment say, checked before the data dir is touched:
    # a mistyped port or NATS URL leaves it as it was (no default files made first).
    try:
        resolve_listen(host, port, Settings())
        env_settings()
    except ClusterConfigError as e:
        raise StartError(f"cluster settings: {e}") from None
    except ValueError as e:
        raise StartError(f"start failed: {e}") from None
    try:
        if data_dir.exists() and not data_dir.is_dir():
            raise StartError(f"data dir {data_dir} is not a directory")
        if (why := interrupted_swap(data_dir)) is not None:
            raise StartError(why)
        ensure_dir(data_dir)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise StartError(f"data dir {data_dir} is not writable")
    except OSError as e:
        raise StartError(f"data dir {data_dir} unusable: {e.strerror}") from None
    lock = InstanceLock(data_dir)
    try:
        lock.acquire()
    except CtsdError as e:
        raise StartError(e.message) from None
    except OSError as e:
        raise StartError(f"cannot lock {lock.path}: {e.strerror}") from None
    try:
        # Before anything is read: what the load finds (invalid files, edits made while the
        # daemon was down) is in the log file too, not only on the console.
        logs_dir = data_dir / "logs"
        if (problem := subdir_problem(logs_dir)) is not None:
            raise StartError(f"{logs_dir} {problem}")
        ensure_dir(logs_dir)
        logs.add_file(logs_dir)
        livebackup.tidy(data_dir, max_age=0)
        box = _secrets_box(data_dir)
        store = Store(data_dir, box)
        copies = Bases(data_dir)
        store.load(copies)
        settings_file, on_file = document_file("settings"), store.settings
        file_doc = None if settings_file in store.problems else store.documents.get("settings")
        # A settings.json broken (or deleted) while the daemon was down cannot say whether this
        # host is in a cluster: its copy (the last valid version) says it, set back here.
        lost = settings_file in store.problems or settings_file in store.intake.created
        broken = lost and copies.has_copy(settings_file)
        edited = store.set_back(copies)  # files edited while it was down
        broken_set_back = broken and settings_file in edited  # its copy counts at this start
        store.replay()  # (settings changed through the door before a kill are in the journal)
        # This host's own keys as its settings.json holds them: an edit of them made while
        # it was down counts at this start (as for the listen address below); a broken file
        # counts as its copy (set back in memory).
        own = file_doc if settings_file in edited and file_doc is not None else None
        settings_doc = own if own is not None else store.documents.get("settings")
        problem = store.problems.get(settings_file)
        if problem is not None:
            # Whether, and as which host, this one is in a cluster must still be read: never
            # a start on its own (or under another host id) in its place.
            # (A value of the cluster section refused; a file that does not parse may break
            # off there too, and is read as written or as its copy below.)
            in_section = problem.path == "$.cluster" or problem.path.startswith(
                ("$.cluster.", "$.cluster[")
            )
            if in_section and not problem.syntax:
                raise StartError(f"cluster settings: {problem.format()}")
            kept = settings_doc if broken_set_back else None
            settings_doc = _cluster_as_written(store.disk.path(settings_file), problem, kept)
        cluster = load_cluster_settings(settings_doc)
        copies.later = cluster is None  # (`Bases.later`)
        _catch_up_s()
        # This host's own address: an edit of settings.json made while a cluster host was down
        # is taken in before the bind (after the catch-up), so it counts already; a broken
        # file counts as its copy.
        valid_edit = settings_file in edited and settings_file not in store.problems
        serves = on_file if valid_edit else store.settings
        if problem is not None and not broken_set_back:  # (no valid version: defaults)
            given = (host or os.environ.get("CTSD_HOST")) and (
                port is not None or os.environ.get("CTSD_PORT")
            )
            if not given:
                serves = _listen_as_written(store.disk.path(settings_file), problem)
        listen = resolve_listen(host, port, serves)
        token = load_token(data_dir)
        assert token is not None
    except StartError:
        lock.release()
        raise
    except ClusterConfigError as e:
        lock.release()
        raise StartError(f"cluster settings: {e}") from None
    except CopyUnusable as e:
        lock.release()
        raise StartError(str(e)) from None
    except (OSError, CtsdError, ValueError) as e:
        lock.release()
        raise StartError(f"start failed: {getattr(e, 'message', None) or e}") from None
    prober = Prober(store)
    sweeper = Sweeper(store, prober)
    svc = Services(store, sweeper, prober, token, listen, data_dir)
    watcher = Watcher(store)
    svc.watch_status = watcher.status
    listen_of = functools.partial(resolve_listen, host, port)
    return Daemon(svc, watcher, Notifier(), cluster, edited, listen_of=listen_of), lock


def _cluster_as_written(
    path: Path, problem: FileProblem, kept: dict[str, Any] | None
) -> dict[str, Any] | None:
    """settings.json is invalid at start (elsewhere than in its `cluster` section): that
    section, as written, still says whether this host is in a cluster. `kept`: the settings
    its copy holds (set back in memory), which count unless the file says otherwise. Raises
    StartError when the file may say otherwise, or says so: fix the file."""
    may_hold = StartError(
        f"cluster settings: {problem.format()}: the file may hold this host's cluster section "
        "(its host id); fix it"
    )
    try:
        raw, _ = read_data_file(path, "settings.json", private=False)  # (its mode: no matter)
        doc = json.loads(raw)
    except FileNotFoundError:
        return kept
    except (OSError, Invalid):  # no regular file, too large, unreadable: cannot tell
        if kept is not None or not os.environ.get("CTSD_CLUSTER_NATS_URLS", "").strip():
            return kept  # (nor does anything else say this host is in a cluster)
        raise may_hold from None
    except (ValueError, RecursionError):  # (not JSON, or nested past what json can read)
        if b'"cluster"' not in raw or (kept is not None and "cluster" in kept):
            return kept  # no cluster section to read, or its copy's to count
        raise may_hold from None
    if not isinstance(doc, dict):
        return kept  # (it names no section: its copy counts, as for one that does not parse)
    written = doc.get("cluster")
    if kept is None:
        return {"cluster": written} if written is not None else None
    if written != kept.get("cluster"):
        raise StartError(
            f"cluster settings: {problem.format()}: the file's cluster section is not the one "
            "this host last ran with; fix the file"
        )
    return kept


def _listen_as_written(path: Path, problem: FileProblem) -> Settings:
    """settings.json is invalid at a start that has no valid version of it (no copy): the
    daemon serves its defaults, but listens where the file says (`server.host`,
    `server.port`), as it would once fixed; the bots and frontends look for it there. Raises
    StartError when the file may name another address and it cannot be read."""
    cannot = StartError(
        f"{problem.format()}: the address to listen on (server.host, server.port) cannot be "
        "read from it: fix the file, or give --host and --port"
    )
    try:
        raw, _ = read_data_file(path, "settings.json", private=False)  # (its mode: no matter)
        doc = json.loads(raw)
    except FileNotFoundError:
        return Settings()
    except (OSError, Invalid):  # no regular file, too large, unreadable: cannot tell
        raise cannot from None
    except (ValueError, RecursionError):  # (not JSON, or nested past what json can read)
        if b'"server"' not in raw:
            return Settings()  # (it names no address: the defaults are what it says)
        raise cannot from None
    server = doc.get("server") if isinstance(doc, dict) else None
    if server is None:
        return Settings()
    address = {k: server[k] for k in ("host", "port") if k in server} if type(server) is dict else 0
    try:
        return msgspec.convert({"server": address}, type=Settings)
    except (msgspec.ValidationError, ValueError):
        raise cannot from None


def _catch_up_s() -> float:
    raw = os.environ.get("CTSD_CLUSTER_CATCH_UP_S", "").strip()
    try:
        value = float(raw) if raw else CATCH_UP_S
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ClusterConfigError(f"CTSD_CLUSTER_CATCH_UP_S={raw!r}: expected seconds, 0 < s ≤ 3600")
    return value


async def _join_cluster(d: Daemon) -> None:
    """Cluster mode: commit through the cluster and apply what the stream holds beyond this
    host before READY (the store closes the engine at shutdown)."""
    from ctsd.cluster import boots, streamid
    from ctsd.cluster.committer import ClusterCommitter
    from ctsd.cluster.engine import ClusterEngine
    from ctsd.cluster.errors import (
        ClusterError,
        ForeignData,
        NoSnapshot,
        SnapshotInvalid,
        SnapshotNotInstalled,
    )

    assert d.cluster is not None
    store = d.svc.store
    if store.box.key is None:
        log.warning(
            "cluster_secrets_plain_text",
            message="no secrets key: exchange keys go to every NATS node and every host as "
            "they are stored, in plain text (configure the same key on every host)",
        )
    engine = ClusterEngine(d.cluster)
    try:
        engine.earlier_boots = boots.remember(store.data_dir, engine.boot)
        engine.data_stream = streamid.read(store.data_dir)
        engine.keep_stream_id = functools.partial(streamid.write, store.data_dir)
    except OSError as e:  # (a full disk, say)
        await store.abandon()
        raise StartError(f"cannot write {store.data_dir / boots.NAME}: {e.strerror or e}") from None
    committer = ClusterCommitter(store, engine)
    store.committer = committer
    # The catch-up may take longer than the unit's start timeout: systemd is told, before
    # each step, how long it may take.
    wait_s = _catch_up_s()
    deadline = time.monotonic() + wait_s
    d.notifier.send(f"STATUS=catching up with cluster {d.cluster.name}")
    _extend_start(d.notifier, wait_s)
    interval = d.notifier.watchdog_interval()
    refused: str | None = None
    try:
        async with anyio.create_task_group() as tg:
            if interval:
                tg.start_soon(_watchdog, d.notifier, interval)
            # Ready or stalled within the wait: an empty host then knows whether it can start
            # from a snapshot, which the slow first server of a list must not decide.
            await engine.start(wait_s=wait_s)
            try:
                await committer.start_empty()
                since = committer.subscribe()
                left = max(1.0, deadline - time.monotonic())  # (a snapshot join may have used it)
                _extend_start(d.notifier, left)
                seq = await committer.catch_up(timeout=left)
                _extend_start(d.notifier, 0)  # the files written, hand edits taken in
                log.info("cluster_caught_up", cluster=d.cluster.name, since=since, applied_seq=seq)
                # The files are written only now: one edited while the daemon was down is taken
                # in first (the checkpointer's rule), and that must go through the cluster.
                await store.start()
                await store.take_in_edited(d.edited)
            except (SnapshotInvalid, NoSnapshot, SnapshotNotInstalled, ForeignData) as e:
                # Behind what the stream keeps, and no usable snapshot (or, behind or new, none
                # the disk takes): serving would mean serving a state the cluster left long ago,
                # or none at all. Nothing of the snapshot was applied. Or data of its own that
                # the cluster does not have: serving it as the cluster's would lie.
                refused = f"cluster {d.cluster.name}: {e}"
            except ClusterError as e:
                # Reads and subscriptions are served from the files; writes are refused while the
                # engine is out of reach or stalled (it keeps trying in the background).
                _extend_start(d.notifier, 0)
                log.warning("cluster_not_caught_up", cluster=d.cluster.name, reason=str(e))
                await store.start()
            tg.cancel_scope.cancel()
    except ExceptionGroup as group:
        # One failure, taken out of the task group's wrapping: an OSError (a full disk, say)
        # stops the start in one line naming it, never a traceback; anything else is a bug,
        # shown as itself.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        if isinstance(exc, OSError):
            await store.abandon()  # closes the engine; the files stay as they were
            where = f"{exc.filename}: " if exc.filename else ""
            raise StartError(
                f"cluster {d.cluster.name}: catching up failed: {where}{exc.strerror or exc}"
            ) from None
        raise exc from None
    if refused is not None:
        await store.abandon()  # closes the engine; the files stay as they were
        raise StartError(refused)
    committer.started()


def _secrets_box(data_dir: Path) -> SecretBox:
    """The configured secrets key (plain-text mode without one), and a rekey interrupted
    offline finished before any file is read. A configured key that cannot be used stops
    the start: never a daemon that looks healthy and cannot decrypt."""
    try:
        key = configured_key()
    except KeyFileError as e:
        raise StartError(str(e)) from None
    try:
        if finish_pending(data_dir):
            log.warning("rekey_finished", message="an interrupted rekey was completed")
    except RekeyRefused as e:
        raise StartError(e.problems[0]) from None
    if key is None:
        log.info("secrets_plain_text", message="no secrets key configured")
    else:
        log.info("secrets_encrypted_at_rest", key_id=key.id)
        _warn_key_readable()
    return SecretBox(key)


def _warn_key_readable() -> None:
    """The key file readable (or writable) by others: every secret is open to them. Said,
    not refused: the secrets it opens must stay readable by this daemon."""
    found = configured_key_path()
    try:
        mode = stat.S_IMODE(os.stat(found[0]).st_mode) if found is not None else 0
    except OSError:
        return
    if found is not None and mode & 0o077:
        log.warning(
            "secrets_key_file_readable",
            path=str(found[0]),
            mode=f"{mode:04o}",
            message="other users may read the secrets key: chmod 600 it, and consider a new "
            "key (`ctsd secrets rekey`)",
        )


IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _extend_start(notifier: Notifier, seconds: float) -> None:
    """systemd's start timeout moved to `seconds` from now, plus CATCH_UP_MARGIN_S for the
    start's own work: sent before each step of a cluster start, with that step's bound.
    systemd keeps the later of the deadlines it is sent, so none cuts another short, and a
    start that hangs is still stopped."""
    notifier.send(f"EXTEND_TIMEOUT_USEC={int((seconds + CATCH_UP_MARGIN_S) * 1_000_000)}")


async def _status(d: Daemon) -> None:
    """systemd's STATUS= (what `systemctl status` shows) kept current: the revision and the
    invalid files move on between READY and the next reload."""
    last = d.status_line()
    while not d.stopping:
        await anyio.sleep(STATUS_EVERY_S)
        line = d.status_line()
        if (
            line != last
            and not d.stopping
            and (d.notifier.send(f"STATUS={line}") or not d.notifier.full)
        ):
            last = line  # (one dropped for a full queue is sent again at the next look)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    # Sent from the event loop itself: a blocked loop stops the pings and systemd notices.
    while True:
        notifier.send("WATCHDOG=1")
        await anyio.sleep(interval)


async def _serve(d: Daemon) -> None:
    from ctsd.web.server import Web

    svc, store = d.svc, d.svc.store
    if d.cluster is None:
        await store.start()  # changes replayed from the journal reach the files first
        await store.take_in_edited(d.edited)
    else:
        await _join_cluster(d)  # starts the store once it has caught up
    web = Web(svc)
    try:
        await web.start()
    except (OSError, ValueError) as e:  # ValueError: a name the resolver cannot even encode
        await store.close()  # closes the cluster engine too
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise StartError(f"cannot listen on {svc.listen.host}:{svc.listen.port}: {why}") from None
    if d.lock is not None:
        d.lock.note_listen(svc.listen.host, web.port)
    if not is_loopback(svc.listen.host):
        log.warning(
            "non_loopback_bind",
            host=svc.listen.host,
            message="the bus is reachable from other hosts; keep the token secret",
        )
    if d.listen_of is not None:
        moved = _listen_moved(d.listen_of, store, svc.listen, web.port)
        store.settings_listeners.append(moved)
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.watcher.run, name="ctsd-watch")
        tg.start_soon(svc.sweeper.run, name="ctsd-sweeps")
        interval = d.notifier.watchdog_interval()
        if interval:
            tg.start_soon(_watchdog, d.notifier, interval)
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *IGNORED_SIGNALS
        ) as signals:
            log.info(
                "ready",
                version=__version__,
                host=svc.listen.host,
                port=web.port,  # (the one bound: `--port 0` binds a free one)
                data_dir=str(svc.data_dir),
                revision=store.revision,
                invalid_files=sorted(store.problems),
            )
            d.notifier.send("READY=1", f"STATUS={d.status_line()}", f"MAINPID={os.getpid()}")
            if d.notifier.enabled:
                tg.start_soon(_status, d, name="ctsd-status")
            reloading: asyncio.Task[None] | None = None
            again = [False]  # a SIGHUP during a reload: one more pass after it
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # In its own task: a SIGTERM that comes meanwhile is not held up by it.
                    if reloading is not None and not reloading.done():
                        again[0] = True
                    else:
                        reloading = asyncio.create_task(_reloads(d, again), name="ctsd-reload")
                    continue
                if signum in IGNORED_SIGNALS:
                    log.warning(
                        "signal_ignored",
                        signal=signal.Signals(signum).name,
                        hint="SIGHUP reloads, SIGTERM stops",
                    )
                    continue
                log.info("stopping", signal=signal.Signals(signum).name)
                d.stopping = True
                if reloading is not None and not reloading.done():
                    # (a take-in cut short is taken in again by the stop's last round)
                    reloading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reloading
                break
            # Still received while stopping, never left to their default actions: a second
            # Ctrl-C would interrupt the last writes, a SIGHUP would end the process.
            tg.start_soon(_while_stopping, signals)
            with anyio.move_on_after(SHUTDOWN_GRACE_S, shield=True):
                await web.shutdown()  # stop accepting; close bus clients with 1001
                await svc.sweeper.flush()  # heartbeats not yet on disk
                # Finish in-flight changes, close the cluster engine, every change to the files.
                await store.close()
                await svc.prober.aclose()
            if unwritten := sorted(store.checkpointer.dirty):  # (the grace ran out, the disk
                log.warning(  # refused, a file invalid on disk): said, not left to guess
                    "stopped_with_changes_in_the_journal",
                    files=unwritten,
                    message="acknowledged changes to these files are in the journal only; "
                    "the next start writes them",
                )
        # Leaving the receiver put the default actions back (the loop's way): ignored from
        # here, as the process ends. (A signal in the few statements between still acts.)
        for signum in (*_STOP_SIGNALS, *IGNORED_SIGNALS):
            signal.signal(signum, signal.SIG_IGN)
        d.notifier.send("STOPPING=1", "STATUS=stopping")
        d.watcher.stop()  # its thread ends within `step`, before the loop does
        tg.cancel_scope.cancel()
    log.info("stopped", revision=store.revision)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _while_stopping(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("already_stopping", signal=signal.Signals(signum).name)


def _listen_moved(
    listen_of: Callable[[Settings], Listen], store: Store, bound: Listen, port: int
) -> Callable[[], None]:
    """A settings listener: `server.host` or `server.port` changed (a hand edit, a client's
    save) to an address other than the one bound at start (`bound`, as configured; `port`
    the port it got) takes effect only at the next start; said once per address, so the
    admin does not take the change as made."""
    said = [bound]

    def check() -> None:
        try:
            want = listen_of(store.settings)
        except ValueError:
            return
        if want == said[-1]:
            return
        said.append(want)
        if want != bound:
            log.warning(
                "listen_address_not_applied",
                listening=f"{bound.host}:{port}",
                configured=f"{want.host}:{want.port}",
                message="server.host and server.port are bound at start: restart to move",
            )

    return check


async def _reloads(d: Daemon, again: list[bool]) -> None:
    """A reload, and one more for each SIGHUP that came during the last (edits made and
    signalled meanwhile are read again)."""
    while True:
        again[0] = False
        await _reload(d)
        if not again[0]:
            return


async def _reload(d: Daemon) -> None:
    d.notifier.send(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
    logs.reopen_files()  # (a log file moved away by logrotate: a new one)
    log.info("reloading")
    store = d.svc.store
    try:
        await store.reload_all()
    except Exception:  # a failed reload must not take the daemon (and the bus) down
        log.exception("reload_failed")
    # (each with where it is broken: a file still invalid logged no new file_invalid line)
    problems = {f: p.format() for f, p in sorted(store.problems.items())}
    log.info("reloaded", revision=store.revision, invalid_files=problems)
    # Logged first, as `ready` is at the start: whoever acts on READY=1 finds the line.
    d.notifier.send("READY=1", f"STATUS={d.status_line()}")


def _loop_options() -> dict[str, Any]:
    """The event loop: uvloop unless CTSD_EVENT_LOOP=asyncio (bench/store.py measures both)."""
    choice = os.environ.get("CTSD_EVENT_LOOP", "uvloop")
    if choice not in ("asyncio", "uvloop"):
        raise StartError(f"CTSD_EVENT_LOOP={choice!r}: expected asyncio or uvloop")
    return {"use_uvloop": choice == "uvloop"}


# Objects a young collection of the cyclic GC looks at before it runs again (CPython: 700).
# Every change leaves a few containers that outlive a young collection (its sync-log event
# stays in memory until the log is trimmed), so at the default the collector runs many
# times a second under load, each pass costing the event loop a fraction of a millisecond:
# a larger young generation finds the same (rare) cycles far less often. Records hold only
# scalars and are never tracked.
GC_YOUNG = 10_000


def _raise_open_file_limit() -> None:
    """The soft open-file limit up to the hard one (a shell's 1,024 is far below what
    `server.max_connections` may ask for; the unit sets both): connections beyond what it
    leaves room for are refused (`web.server.connection_budget`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # (1 << 20: the usual nr_open)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # (a hard limit above nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _start_failed(e: StartError) -> None:
    """The one line on stderr (at error priority when it is the journal's), and in the log
    (`logs/ctsd.log` when it was opened): an admin reading either finds why."""
    log.error("start_failed", reason=str(e))
    prefix = logs.priority_prefix(logging.ERROR) if logs.on_journald(sys.stderr) else ""
    print(f"{prefix}ctsd: {e}", file=sys.stderr)


def serve(data_dir: Path, host: str | None, port: int | None) -> int:
    os.umask(0o077)  # files we create (logs, temp files) are the owner's alone
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    # atomic.written_elsewhere probes with a read lease for an instant; a lease break sends
    # SIGIO, whose default action would kill the daemon.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    # A reload asked for before READY (logrotate, say) is no reason to end the process, which
    # is SIGHUP's default action: ignored until the daemon handles it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM before READY (a `systemctl stop` during a cluster catch-up): the way Ctrl-C
    # stops, exit 0, not killed by its default action. The running daemon's receiver takes
    # it over at READY.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (`launch` set its own)
    # A stray SIGUSR1/2 (a logrotate script written for another daemon) killed the daemon by
    # default: ignored, and logged once it runs.
    for ignored in IGNORED_SIGNALS:
        signal.signal(ignored, signal.SIG_IGN)
    _raise_open_file_limit()
    try:
        d, lock = _prepare(data_dir, host, port)
    except StartError as e:
        _start_failed(e)
        return 1
    except KeyboardInterrupt:  # (Ctrl-C while the files are read and the journal replayed)
        print("ctsd: interrupted while starting", file=sys.stderr)
        return 0
    d.lock = lock
    try:
        anyio.run(_serve, d, backend_options=_loop_options())
    except StartError as e:
        _start_failed(e)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before READY: what was written is crash-safe as ever. After the stop began,
        # one that came as the signal receiver closed (its default action back for a moment),
        # once the stop's last writes were done (or cut short by its grace, as they would be).
        if not d.stopping:
            print("ctsd: interrupted while starting", file=sys.stderr)
        return 0
    finally:
        d.notifier.close()
        lock.release()
    return 0
