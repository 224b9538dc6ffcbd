"""Hand edits: watch the data directory and take every edit in.

    inotify (watchfiles) or a stat+hash poller → per-file worker → stable? → `store.ingest`

Taking a file in (read, decode, validate, diff, commit with `source: "file"`) is the store's
job (`Store.ingest`); this module decides *which* file to look at and *when* it is safe to
judge it:

- The directory is watched, never the file: editors save by rename, and a watch on the file
  goes deaf after the first save. Only the top level and `algorithms/` are watched (not
  `logs/`, which the daemon itself writes on every log line).
- A file that parses is taken in at once: a prefix of a JSON object or array never parses,
  so a valid read is never a half-written file. The common atomic-rename save costs no wait.
- A file that does not parse may be an in-place save caught between its truncate and its
  last write: it is judged (and reported invalid) only once it has been quiet for
  `SETTLE_S`.
- A file that disappears may be an editor's rename dance (`mv f f~; write f`): it is written
  back from memory only if it is still gone after `files.DELETE_GRACE_S`.
- The daemon's own writes come back as events too; `ingest` recognises them by their stamp.

Polling (settings `watch.polling`, for network filesystems where inotify sees nothing) is
our own: watchfiles' poller compares modification times only, so it misses edits that land
within one timestamp tick or keep the mtime (`cp -p`, `touch -r`). Ours compares size,
mtime, ctime and inode, and while a file's ctime is recent (a timestamp granularity could
hide a second edit) also a content hash. Switching mode in settings.json takes effect at
once: the watcher restarts in the new mode and re-checks every file, so nothing that changed
during the switch is missed."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup
from watchfiles._rust_notify import RustNotify

from ctsd import files, safefile
from ctsd.atomic import TEMP_PREFIX
from ctsd.models import WatchSettings

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.watch")

# watchfiles hands over a batch once no new event came for `step` ms or `debounce` ms after
# the first one. Latency sits between step and 2 × step; keep step well below debounce
# (an upstream issue misbehaves otherwise). step=1 keeps a hand edit's latency to a few ms.
STEP_MS = 1
DEBOUNCE_MS = 10
# The watch thread takes the GIL every step. While the daemon writes steadily (batch after
# batch of nothing but its own writes: the journal's appends, checkpoint rounds, which show
# as our temp files beside the data files) that is a GIL hand-off from a busy event loop
# every millisecond: after BUSY_AFTER such batches in a row, step and debounce are stretched
# until a batch holds an edit not of ours (or a second passes without events). A hand edit
# made under steady write load is seen some 10-20 ms later. BUSY_AFTER is well above the
# few own batches between two hand edits made one right after the other.
STEP_BUSY_MS = 10
DEBOUNCE_BUSY_MS = 20
BUSY_AFTER = 8
# Wake the watch thread this often even without events, so a mode switch is seen promptly.
RUST_TIMEOUT_MS = 1_000
INOTIFY_RETRY_S = 60.0  # polling in its stead (inotify failed): try it again this often
# RustNotify fails for good on a name that is not UTF-8 (an editor's debris, say): it is made
# again at once, this many times a minute at most, then polling stands in as for a failure.
UNDECODABLE_PER_MIN = 20
SETTLE_S = 0.05  # quiet time before a file that does not parse is called invalid
SETTLE_MAX_S = 2.0  # a file that never stops changing is judged anyway after this
# An empty file waits for a longer quiet: an in-place save's truncate, with the write still
# to come (a large file, a slow editor), is no mistake to tell every bot about.
SETTLE_EMPTY_S = 1.0
SETTLE_POLL_S = 0.005
LOOK_AGAIN = 4  # immediate re-reads of a file that changed while being read
# An in-place writer that opened a file before our rename replaced it writes into the old
# file: checked this often for its writer having closed it, taken anyway after this long
# (see Store.take_in_late).
LATE_CHECK_S = 0.05
LATE_MAX_AGE_S = 2.0
# Poller: while a file's ctime is this recent, equal stat results do not prove equal
# content (coarse timestamps on network filesystems): compare a content hash too.
POLL_HASH_WITHIN_NS = 2_000_000_000

_DEBRIS_SUFFIXES = (".swp", ".swx", ".swo", "~", ".tmp", ".bak", ".orig", ".part")


def is_debris(name: str) -> bool:
    """Editor and tool debris that must never be taken for a data file."""
    return (
        name == "4913"  # vim's probe file: can it create files here?
        or name.startswith((TEMP_PREFIX, ".#", "#", ".~"))  # ours, emacs locks/autosaves
        or name.endswith(_DEBRIS_SUFFIXES)
        or (name.startswith(".") and name.endswith((".swp", ".swx")))
    )


def relative(data_dir: Path, path: str | Path) -> str | None:
    """The data file `path` names (relative, '/'-separated), or None for anything else.
    String work, not pathlib: it runs for every event the watch sees, holding the GIL (the
    daemon's own writes make several per checkpoint round, and the journal one per append),
    and the paths watchfiles gives are absolute and normal already."""
    prefix = f"{data_dir}{os.sep}"
    path = os.fspath(path)
    if not path.startswith(prefix):
        return None
    parts = [p for p in path[len(prefix) :].split(os.sep) if p and p != "."]
    if not parts or is_debris(parts[-1]):
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == files.ALGORITHMS_DIR):
        name = "/".join(parts)
        return name if files.is_data_file(name) else None
    return None  # logs/, historical/, anything deeper


class _PumpStop:
    """What the watch thread's RustNotify asks every step: stop for a restart of the watcher
    (a mode switch, the daemon stopping), or because this pump is done with."""

    __slots__ = ("ended", "restart")

    def __init__(self, restart: anyio.Event) -> None:
        self.restart = restart
        self.ended = False

    def is_set(self) -> bool:
        return self.ended or self.restart.is_set()


def _is_a_limit(error: Exception) -> bool:
    """Is this the per-user inotify limit (too many instances, or watches)?"""
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENOSPC):
        return True
    return any(f"(os error {n})" in str(error) for n in (errno.EMFILE, errno.ENOSPC))


class Watcher:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.data_dir = store.data_dir
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._tg: TaskGroup | None = None
        self._restart = anyio.Event()
        self._stopping = False
        self.mode: WatchSettings | None = None
        # Why inotify is not in use though the settings ask for it (None: it is, or polling
        # was asked for): the watch polls meanwhile and `/health` says so.
        self.problem: str | None = None
        self.step_ms = STEP_MS  # the watch thread's step now (stretched under steady writes)
        self._undecodable: list[float] = []  # when a name not UTF-8 failed the watch

    def stop(self) -> None:
        """End the watch: its thread sees this within `step` ms and ends (a cancel alone would
        leave it running, abandoned, until then)."""
        self._stopping = True
        self._restart.set()

    # --- settings ----------------------------------------------------------------------------

    def _on_settings(self) -> None:
        # A change to settings.json (hand edit, bus, SIGHUP) may switch the watch mode.
        if self.store.settings.watch != self.mode:
            self._restart.set()

    # --- dispatch ----------------------------------------------------------------------------

    def notify(self, file: str) -> None:
        """Something happened to `file`: look at it (one worker per file, coalescing)."""
        if file in self._busy:
            self._again.add(file)  # the running worker looks once more when done
            return
        assert self._tg is not None
        self._busy.add(file)
        self._tg.start_soon(self._worker, file, name=f"ctsd-watch-{file}")

    async def _worker(self, file: str) -> None:
        try:
            while True:
                self._again.discard(file)
                try:
                    await self.handle(file)
                except Exception:  # a bad file must never stop the watcher
                    log.exception("hand_edit_failed", file=file)
                if file not in self._again:
                    return
        finally:
            self._busy.discard(file)

    async def handle(self, file: str) -> None:
        store = self.store
        path = store.path(file)
        while not await self._deleted(file, path):
            for _ in range(LOOK_AGAIN):
                before = _stat_key(path)
                if await store.ingest(file, report=False):
                    self._recheck_dependents(file)
                    return
                if _stat_key(path) == before:
                    break
                # Changed while we looked (the rest of an in-place save, or a write of ours
                # that made our read stale): look again at once, no settling needed.
            # Not valid as read and not changing right now: maybe an in-place save paused
            # between its truncate and its last write. Judge it (and report it) only once it
            # has stayed quiet for a while.
            await _settle(path)
            if os.path.lexists(path):
                await store.ingest(file)
                return
            # Gone as we looked (an editor's `mv f f~` under way): a deletion like any other,
            # judged after the grace, and a file back by then looked at anew.

    async def _deleted(self, file: str, path: Path) -> bool:
        """Is `file` deleted by hand: gone, and still gone after `files.DELETE_GRACE_S` (not
        an editor's rename dance)? Then it is written back from memory."""
        if os.path.lexists(path) or await _reappears(path, files.DELETE_GRACE_S):
            return False
        await self.store.ingest(file)
        return True

    def _recheck_dependents(self, file: str) -> None:
        # instances.json is judged against the algorithm files: one added (or fixed) by hand
        # may be what makes an invalid instances.json valid, without it being edited again.
        instances = files.document_file("instances")
        if file.startswith(f"{files.ALGORITHMS_DIR}/") and instances in self.store.problems:
            self.notify(instances)

    async def _late_loop(self) -> None:
        while True:
            await anyio.sleep(LATE_CHECK_S)
            if self.store.displaced:
                await self.store.take_in_late(LATE_MAX_AGE_S)
            for file in self.store.intake.due_again():  # (hand edits the door could not take)
                self.notify(file)

    def sweep(self) -> None:
        """Look at every data file (start, mode switch): catches what changed unseen."""
        for file in self.store.known_files():
            self.notify(file)

    # --- backends ----------------------------------------------------------------------------

    async def run(self) -> None:
        # watchfiles logs every batch at info ("1 change detected"), our own writes included.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        self.store.settings_listeners.append(self._on_settings)
        self.store.watch_again = self.notify
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._late_loop)
            while not self._stopping:
                self._restart = anyio.Event()
                self.mode = self.store.settings.watch
                log.info(
                    "watching",
                    data_dir=str(self.data_dir),
                    polling=self.mode.polling,
                    poll_interval_ms=self.mode.poll_interval_ms if self.mode.polling else None,
                )
                if self.mode.polling:
                    self.problem = None
                    await self._poll(self.mode.poll_interval_ms / 1000)
                    continue
                try:
                    await self._inotify()
                except RuntimeError as e:
                    if _undecodable(e) and self._again_after_undecodable(e):
                        continue  # a new watch, its sweep taking in what the batch held
                    await self._poll_instead(e)
                except OSError as e:  # an inotify limit reached, say
                    await self._poll_instead(e)

    def _again_after_undecodable(self, error: RuntimeError) -> bool:
        """A name in the data dir that is not UTF-8 failed the watch: watch again at once
        (True), unless it happened UNDECODABLE_PER_MIN times in the last minute."""
        now = time.monotonic()
        self._undecodable = [t for t in self._undecodable if now - t < 60.0] + [now]
        if len(self._undecodable) == 1:
            log.warning("watch_name_not_utf8", error=str(error), action="watching again")
        return len(self._undecodable) <= UNDECODABLE_PER_MIN

    def status(self) -> dict[str, Any]:
        """The `watch` check of `/health`: how hand edits are seen, and why not by inotify when
        the settings ask for it but it failed."""
        if self.problem is not None:
            return {"ok": False, "mode": "polling", "problem": self.problem}
        if failed := sorted(self.store.intake.failed):
            return {
                "ok": False,
                "mode": "polling" if self.mode is not None and self.mode.polling else "inotify",
                "problem": "hand edits not taken in yet, tried again: " + ", ".join(failed),
            }
        if self.mode is not None and self.mode.polling:
            return {"ok": True, "mode": "polling"}
        return {"ok": True, "mode": "inotify", "step_ms": self.step_ms}

    async def _poll_instead(self, error: Exception) -> None:
        """inotify could not be set up, or failed: hand edits are still taken in, by polling,
        and inotify is tried again after INOTIFY_RETRY_S (or at once on a mode switch)."""
        assert self.mode is not None
        interval_ms = self.mode.poll_interval_ms
        problem = f"inotify failed: {error}"
        if _is_a_limit(error):
            problem += (
                " (this user's inotify instances or watches are used up: raise "
                "fs.inotify.max_user_instances or fs.inotify.max_user_watches)"
            )
        problem += (
            f"; polling every {interval_ms} ms instead, trying inotify again every "
            f"{INOTIFY_RETRY_S:g} s"
        )
        if problem != self.problem:  # once, not at every retry
            log.error("watch_failed", error=str(error), polling_every_ms=interval_ms)
        self.problem = problem
        with anyio.move_on_after(INOTIFY_RETRY_S):
            await self._poll(interval_ms / 1000)

    async def _inotify(self) -> None:
        assert self.mode is not None
        dirs = [self.data_dir, self.data_dir / files.ALGORITHMS_DIR]
        for d in dirs:
            d.mkdir(mode=0o700, exist_ok=True)
        # RustNotify is the engine under watchfiles' `awatch` (documented as its Rust
        # backend), driven here from one long-lived thread of ours. awatch hands every batch
        # to the event loop through a fresh worker-thread call and filters it there; the
        # journal's own appends in this directory make such a batch every few ms under load.
        # The pump filters in its thread and wakes the loop only for a data file.
        notify = RustNotify(
            [str(d) for d in dirs],
            False,  # debug
            False,  # force_polling: our own poller does polling (see the module note)
            self.mode.poll_interval_ms,  # its own poller's, should it fall back to one
            False,  # recursive: logs/ and historical/ churn; only these two dirs hold data
            True,  # ignore_permission_denied
        )
        if repr(notify).startswith("RustNotify(Poll("):
            # A kernel without inotify (ENOSYS): watchfiles falls back to its own poller,
            # which compares modification times only; ours compares more (module note).
            notify.close()
            raise OSError(errno.ENOSYS, "this kernel offers no inotify")
        # The watch is set up once RustNotify exists: anything changed before it is caught
        # by this sweep, anything after by the watch.
        if self.problem is not None:
            log.info("watch_restored", mode="inotify")
            self.problem = None
        self.sweep()
        stop = _PumpStop(self._restart)
        loop = asyncio.get_running_loop()
        try:
            await anyio.to_thread.run_sync(self._pump, notify, stop, loop, abandon_on_cancel=True)
        finally:
            stop.ended = True  # a pump abandoned by a cancel sees it within `step` and ends

    def _pump(self, notify: RustNotify, stop: _PumpStop, loop: asyncio.AbstractEventLoop) -> None:
        """The watch thread: RustNotify's batches, data files only, handed to the loop (never
        waiting for it, so the thread always ends within a step of its stop)."""
        noise = 0  # batches in a row of the daemon's own writes only
        # The algorithms dir itself moved, deleted or made (`mv algorithms x; mkdir
        # algorithms`, an untar): its watch went with the old one, so nothing in the new one
        # would be seen. The watch is made again (its sweep takes in what changed).
        algorithms_dir = os.path.join(self.data_dir, files.ALGORITHMS_DIR)
        try:
            while True:
                busy = noise >= BUSY_AFTER
                self.step_ms = STEP_BUSY_MS if busy else STEP_MS
                raw = notify.watch(
                    DEBOUNCE_BUSY_MS if busy else DEBOUNCE_MS, self.step_ms, RUST_TIMEOUT_MS, stop
                )
                if raw == "stop":
                    return
                if isinstance(raw, str):  # "timeout" (nothing happened); "signal" (main only)
                    noise = 0
                    continue
                changed: set[str] = set()
                later: list[Callable[[], Any]] = []  # for the loop, with the batch
                ours = False  # a checkpoint round (our temp files) is in this batch
                for _, path in raw:
                    if name := relative(self.data_dir, path):
                        changed.add(name)
                    elif os.path.basename(path).startswith(TEMP_PREFIX):
                        ours = True
                    elif path == algorithms_dir:
                        log.info("watch_again", reason=f"{files.ALGORITHMS_DIR}/ was replaced")
                        later.append(stop.restart.set)
                    elif path.startswith(algorithms_dir) and path.endswith(".json"):
                        # a name no algorithm may have: logged (once) by the listing
                        later.append(self.store.known_files)
                noise = noise + 1 if ours or not changed else 0
                if changed:
                    later.append(functools.partial(self._notify_all, sorted(changed)))
                try:
                    for call in later:
                        loop.call_soon_threadsafe(call)
                except RuntimeError:  # the loop is closed: the daemon is stopping
                    return
        finally:
            self.step_ms = STEP_MS
            notify.close()

    def _notify_all(self, changed: list[str]) -> None:
        for file in changed:
            self.notify(file)

    async def _poll(self, interval: float) -> None:
        poller = Poller(self.store)
        await anyio.to_thread.run_sync(poller.scan)  # baseline first, then the sweep:
        self.sweep()  # what changed before the baseline is caught by the sweep
        while not self._restart.is_set():
            with anyio.move_on_after(interval):
                await self._restart.wait()
            if self._restart.is_set():
                return
            changed = await anyio.to_thread.run_sync(poller.scan)
            for file in changed:
                self.notify(file)


class Poller:
    """What each data file looked like at the last poll; `scan()` names those that changed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: dict[str, tuple[int, int, int, int] | None] = {}
        self.digests: dict[str, bytes] = {}

    def _files(self) -> list[str]:
        return sorted({*self.store.known_files(), *self.seen})

    def scan(self) -> list[str]:
        changed: list[str] = []
        now = time.time_ns()
        for file in self._files():
            path = self.store.path(file)
            try:
                st = os.lstat(path)  # the daemon never follows links in its data dir
            except (FileNotFoundError, NotADirectoryError):
                if self.seen.get(file, ()) is not None:
                    changed.append(file)
                self.seen[file] = None
                self.digests.pop(file, None)
                continue
            except OSError:
                continue
            key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            is_new = self.seen.get(file) != key
            self.seen[file] = key
            if now - st.st_ctime_ns < POLL_HASH_WITHIN_NS:
                # Equal stat results within one timestamp tick prove nothing: hash it.
                digest = safefile.digest(path)
                if digest is not None and digest != self.digests.get(file):
                    is_new = is_new or file in self.digests
                    self.digests[file] = digest
            else:
                self.digests.pop(file, None)
            if is_new:
                changed.append(file)
        return changed


async def _reappears(path: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await anyio.sleep(SETTLE_POLL_S)
        if os.path.lexists(path):
            return True
    return False


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


async def _settle(path: Path) -> None:
    """Return once `path` has not changed for SETTLE_S (SETTLE_EMPTY_S while empty), or
    after SETTLE_MAX_S."""
    start = time.monotonic()
    key = _stat_key(path)
    quiet_since = start
    while True:
        now = time.monotonic()
        quiet = SETTLE_EMPTY_S if key is not None and key[0] == 0 else SETTLE_S
        if now - quiet_since >= quiet or now - start >= SETTLE_MAX_S:
            return
        await anyio.sleep(SETTLE_POLL_S)
        current = _stat_key(path)
        if current != key:
            key, quiet_since = current, time.monotonic()


__all__ = ["Poller", "Watcher", "is_debris", "relative"]


def _undecodable(error: RuntimeError) -> bool:
    """watchfiles' error for a path it cannot make a string of."""
    return "Unable to decode path" in str(error)
