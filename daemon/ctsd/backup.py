"""`ctsd backup` and `ctsd restore`: one archive of every data file, and putting one back.

An archive is a gzip-compressed tar: `manifest.json` first (format, time, ctsd version, the
revision, the key ids its secrets need, and path/size/sha256 of every file), then each data
file as `data/<path>`, exactly as stored — secrets stay encrypted when a key is set.
Unpacked by hand (`tar xzf`), `data/` is a data dir.

Reading an archive checks everything before anything is touched: only regular files with
plain relative names, no duplicates, sizes within limits, the manifest's checksums, and every
file decoded and validated as the daemon would. A restore then builds the new dir beside the
data dir and swaps the two names in one atomic step (`renameat2(RENAME_EXCHANGE)`): at every
instant the data dir path holds the old content or the new. The old dir is kept beside it as
`DATA.before-restore-TIME`.
"""

from __future__ import annotations

import bz2
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import msgspec

from ctsd import __version__, files, journal
from ctsd.atomic import DIR_MODE, FILE_MODE, exchange, fsync_dir, write_files
from ctsd.diagnose import FileProblem
from ctsd.lock import InstanceLock
from ctsd.models import SyncEvent, Timestamp
from ctsd.offline import NoDataDir, exclusive, owner_for, read_data_files
from ctsd.rekey import finish_pending
from ctsd.safefile import read_data_file, resolved
from ctsd.secretbox import SecretBox, is_encrypted, stored_key_id
from ctsd.secretfields import SECRET_FILES, seal_content, secret_places, survey
from ctsd.timeutil import format_ts
from ctsd.verify import check_contents, unwritten

FORMAT = 1
MANIFEST = "manifest.json"
DATA_PREFIX = "data/"
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 512 * 1024 * 1024
# All an archive may unpack to: its members, its manifest, and a header block or two each.
MAX_READ_BYTES = MAX_TOTAL_BYTES + MAX_MANIFEST_BYTES + MAX_MEMBERS * 4 * tarfile.BLOCKSIZE
STAGING_MARK = ".restore-staging"  # inside a dir being built; never in a finished one
# What a restore carries over from the dir it replaces: the host's own, not data.
CARRIED_FILES = (".token", ".cluster-boots")
CARRIED_DIRS = ("logs", "historical")

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class ManifestFile(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Sha256


class Manifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: int
    created_at: Timestamp
    ctsd_version: str
    revision: Annotated[int, msgspec.Meta(ge=0)]
    key_ids: list[str]  # keys the encrypted secrets are under (ids only)
    files: list[ManifestFile]


class ArchiveError(Exception):
    """The archive cannot be made or restored: one clear message; nothing was changed."""


@dataclass(frozen=True)
class Archive:
    manifest: Manifest
    contents: dict[str, bytes]


# --- what goes in -----------------------------------------------------------------------------


def revision_of(contents: dict[str, bytes]) -> int:
    """The highest sync-log id (0 when there is none)."""
    raw = contents.get(files.SYNC_LOG)
    if raw is None:
        return 0
    events = files.decode_table(files.SYNC_LOG, raw)
    return events[-1].id if events else 0


def key_ids_of(contents: dict[str, bytes]) -> list[str]:
    ids: set[str] = set()
    for file in SECRET_FILES:
        if file in contents:
            for place in secret_places(file, msgspec.json.decode(contents[file])):
                if is_encrypted(place.value):
                    ids.add(stored_key_id(place.value) or "?")
    return sorted(ids)


def _problems_text(problems: list[FileProblem], limit: int = 5) -> str:
    lines = [p.format() for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"(and {len(problems) - limit} more)")
    return "\n  ".join(lines)


def make_manifest(contents: dict[str, bytes], revision: int, created: dt.datetime) -> Manifest:
    return Manifest(
        format=FORMAT,
        created_at=format_ts(created),
        ctsd_version=__version__,
        revision=revision,
        key_ids=key_ids_of(contents),
        files=[
            ManifestFile(path, len(raw), hashlib.sha256(raw).hexdigest())
            for path, raw in sorted(contents.items())
        ],
    )


def write_archive(contents: dict[str, bytes], manifest: Manifest, out: BinaryIO) -> None:
    """The archive's bytes into `out` (the manifest first, then the files, sorted)."""
    mtime = int(dt.datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp())

    def add(tar: tarfile.TarFile, name: str, body: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(body)
        info.mode = FILE_MODE
        info.mtime = mtime
        tar.addfile(info, io.BytesIO(body))

    # Level 6: JSON shrinks about tenfold; level 9 costs twice the time for a few percent.
    with (
        gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=mtime, filename="") as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        add(tar, MANIFEST, msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
        for path in sorted(contents):
            add(tar, DATA_PREFIX + path, contents[path])


def archive_of(
    contents: dict[str, bytes], revision: int, *, created: dt.datetime | None = None
) -> tuple[Manifest, bytes]:
    """The archive of `contents` (relative path → bytes, as stored), in memory (compressed, a
    tenth of the data dir: small enough to hold). Refuses (ArchiveError) a set of files the
    daemon would not load, since it could never be restored."""
    problems = check_contents(contents)
    if problems:
        raise ArchiveError(
            f"the data files have problems; fix them first (`ctsd verify`):\n  "
            f"{_problems_text(problems)}"
        )
    manifest = make_manifest(contents, revision, created or dt.datetime.now(dt.UTC))
    buf = io.BytesIO()
    write_archive(contents, manifest, buf)
    return manifest, buf.getvalue()


def build_archive(
    contents: dict[str, bytes],
    revision: int,
    out_path: Path,
    *,
    created: dt.datetime | None = None,
) -> Manifest:
    """Write the archive of `contents` (see `archive_of`) atomically, mode 0600: a temp file
    beside `out_path`, fsync, rename, fsync the dir."""
    manifest, body = archive_of(contents, revision, created=created)
    write_files([(out_path, body)])
    return manifest


def archive_offline(data_dir: Path) -> tuple[Manifest, bytes]:
    """The archive of the data dir with no daemon running, in memory: the lock is held while
    the files are read, so no daemon starts in between (DaemonRunning if one runs)."""
    with exclusive(data_dir):
        finish_pending(data_dir)
        try:
            contents = read_data_files(data_dir)
        except files.Invalid as e:  # (no private regular file, too large)
            raise ArchiveError(f"{e.problem.format()}: fix it first (`ctsd verify`)") from None
        why = unwritten(data_dir, contents, "a backup")
        if why is not None:  # the files alone would miss acknowledged changes
            raise ArchiveError(why)
    return archive_of(contents, revision_of(contents))


def backup_offline(data_dir: Path, out_path: Path) -> Manifest:
    """`ctsd backup -o FILE` with no daemon running (see `archive_offline`)."""
    manifest, body = archive_offline(data_dir)
    write_files([(out_path, body)])
    return manifest


# --- what comes out ---------------------------------------------------------------------------


def _member_name(name: str) -> str:
    """The member's name if it is a plain relative path, else ArchiveError."""
    if not name or "\\" in name or "\0" in name:
        raise ArchiveError(f"member {name!r}: not a plain relative path")
    if name.startswith("/") or posixpath.isabs(name):
        raise ArchiveError(f"member {name!r}: absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise ArchiveError(f"member {name!r}: path goes outside the archive (`..`)")
    if posixpath.normpath(name) != name or "." in parts or "" in parts:
        raise ArchiveError(f"member {name!r}: not a plain relative path")
    return name


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
    tarfile.CONTTYPE: "a contiguous file",
}
_READ_ERRORS = (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    MemoryError,
    RecursionError,  # (a chain of hundreds of pax headers)
    ValueError,  # (a pax number that is none, or of more digits than int() takes)
)


class _CappedReads:
    """An archive's unpacked bytes, no read larger than `cap`: tarfile reads a pax or GNU
    long-name header whole, of the size the header claims (gigabytes), before any member is
    looked at; no read of a backup's is larger than a member may be."""

    def __init__(self, path: Path, inner: BinaryIO, raw: BinaryIO, cap: int) -> None:
        self.path, self.inner, self.raw, self.cap = path, inner, raw, cap
        self.total = 0  # bytes read in all: headers count too (tarfile keeps them)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.cap:
            raise ArchiveError(
                f"{self.path}: a tar header or member claims more than {self.cap:,} bytes"
            )
        self.total += size
        if self.total > MAX_READ_BYTES:
            raise ArchiveError(f"{self.path}: more than {MAX_READ_BYTES:,} bytes unpacked")
        return self.inner.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> None:  # (tarfile leaves a file object it was given open)
        self.inner.close()
        self.raw.close()

    def __enter__(self) -> _CappedReads:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


MAX_EXTENDED_HEADER = 64 * 1024  # a pax or GNU long-name header (a long name needs little)


class _Headers(tarfile.TarInfo):
    """tarfile's reading of a member's header, refusing the extended headers no backup needs:
    a global pax header (tarfile keeps it for the whole read and copies it into every member
    after it: one of tiny records cost a gigabyte and seconds per member), and a pax or
    long-name header over MAX_EXTENDED_HEADER."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.XGLTYPE:
            raise ArchiveError("a global pax header: not a ctsd backup")
        extended = (
            tarfile.XHDTYPE,
            tarfile.SOLARIS_XHDTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        )
        if self.type in extended and self.size > MAX_EXTENDED_HEADER:
            raise ArchiveError(
                f"an extended tar header of {self.size:,} bytes (over {MAX_EXTENDED_HEADER:,})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]

    # A sparse member in pax form: tarfile reads its map, of any length, into memory as the
    # header is read (a few KB of archive cost hundreds of MB), and takes its "real size" for
    # the member's. No backup holds one: refused before any of it is read.
    def _proc_gnusparse_00(self, *_args: Any) -> None:
        raise ArchiveError("a sparse file: not a ctsd backup")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    def _apply_pax_info(self, pax_headers: dict[str, str], *args: Any) -> None:
        if any(key.startswith("GNU.sparse.") for key in pax_headers):
            raise ArchiveError("a sparse file: not a ctsd backup")
        super()._apply_pax_info(pax_headers, *args)  # type: ignore[misc]


def _open_tar(path: Path) -> tuple[tarfile.TarFile, _CappedReads]:
    """The archive at `path` (plain, gzip, xz or bzip2), unpacked here so that its reads are
    capped (`_CappedReads`)."""
    raw = open(path, "rb")  # noqa: SIM115 - closed with the tar
    try:
        magic = raw.read(6)
        raw.seek(0)
        inner: BinaryIO = raw
        if magic.startswith(b"\x1f\x8b"):
            inner = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        elif magic.startswith(b"\xfd7zXZ\x00"):
            inner = lzma.LZMAFile(raw)  # type: ignore[assignment]  # noqa: SIM115
        elif magic.startswith(b"BZh"):
            inner = bz2.BZ2File(raw)  # type: ignore[assignment]
        capped = _CappedReads(path, inner, raw, files.MAX_FILE_BYTES + tarfile.BLOCKSIZE)
        try:
            tar = tarfile.open(fileobj=capped, mode="r:", tarinfo=_Headers)  # noqa: SIM115
            return tar, capped
        except BaseException:
            inner.close()
            raise
    except BaseException:
        raw.close()
        raise


def read_archive(path: Path) -> Archive:
    """Read and verify a whole archive in memory (bounded); ArchiveError on any problem."""
    try:
        size = os.stat(path).st_size
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ArchiveError(f"{path}: not a regular file")
        tar, capped = _open_tar(path)
    except ArchiveError:
        raise
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file") from None
    except PermissionError:
        raise ArchiveError(f"{path}: permission denied") from None
    except _READ_ERRORS:
        raise ArchiveError(
            f"{path}: not a ctsd backup (not a tar archive, plain or compressed)"
        ) from None
    if size == 0:
        raise ArchiveError(f"{path}: empty file, not a ctsd backup")
    manifest_raw: bytes | None = None
    contents: dict[str, bytes] = {}
    seen: set[str] = set()
    total = 0
    try:
        with capped, tar:
            for count, member in enumerate(iter(tar.next, None), 1):
                tar.members.clear()  # (each keeps its pax headers: not held past its turn)
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"{path}: more than {MAX_MEMBERS} members")
                name = _member_name(
                    member.name.removesuffix("/") if member.isdir() else member.name
                )
                if name in seen:
                    raise ArchiveError(f"member {name!r}: appears twice")
                seen.add(name)
                if member.isdir():
                    if name not in ("data", f"data/{files.ALGORITHMS_DIR}"):
                        raise ArchiveError(f"member {name!r}: a directory a backup does not hold")
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    kind = _KINDS.get(member.type, f"of type {member.type!r}")
                    raise ArchiveError(
                        f"member {name!r}: is {kind}; a backup holds only regular files"
                    )
                limit = MAX_MANIFEST_BYTES if name == MANIFEST else files.MAX_FILE_BYTES
                if member.size > limit:
                    raise ArchiveError(
                        f"member {name!r}: {member.size:,} bytes, over the limit of {limit:,}"
                    )
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise ArchiveError(f"{path}: more than {MAX_TOTAL_BYTES:,} bytes unpacked")
                if name != MANIFEST:
                    rel = name.removeprefix(DATA_PREFIX)
                    if not name.startswith(DATA_PREFIX) or not files.is_data_file(rel):
                        raise ArchiveError(f"member {name!r}: not a ctsd data file")
                stream = tar.extractfile(member)
                body = stream.read(member.size + 1) if stream is not None else b""
                if len(body) != member.size:
                    raise ArchiveError(f"{path}: truncated inside member {name!r}")
                if name == MANIFEST:
                    manifest_raw = body
                else:
                    contents[name.removeprefix(DATA_PREFIX)] = body
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: truncated or corrupt archive ({type(e).__name__})") from None
    if manifest_raw is None:
        raise ArchiveError(f"{path}: no {MANIFEST}: not a ctsd backup")
    manifest = _decode_manifest(manifest_raw)
    _check_against_manifest(manifest, contents)
    problems = check_contents(contents)
    if problems:
        raise ArchiveError(
            f"{path}: holds files the daemon would refuse:\n  {_problems_text(problems)}"
        )
    if revision_of(contents) != manifest.revision:
        raise ArchiveError(
            f"{MANIFEST}: revision {manifest.revision}, but the sync log in the archive ends "
            f"at {revision_of(contents)}"
        )
    return Archive(manifest, contents)


def _decode_manifest(raw: bytes) -> Manifest:
    try:
        head = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise ArchiveError(f"{MANIFEST}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArchiveError(f"{MANIFEST}: nested too deeply") from None
    if isinstance(head, dict) and isinstance(head.get("format"), int) and head["format"] > FORMAT:
        raise ArchiveError(
            f"{MANIFEST}: archive format {head['format']}, made by a newer ctsd; this one reads "
            f"format {FORMAT}"
        )
    try:
        manifest = msgspec.convert(head, type=Manifest, strict=True)
    except msgspec.ValidationError as e:
        raise ArchiveError(f"{MANIFEST}: {e}") from None
    if manifest.format != FORMAT:
        raise ArchiveError(f"{MANIFEST}: unknown archive format {manifest.format}")
    return manifest


def _check_against_manifest(manifest: Manifest, contents: dict[str, bytes]) -> None:
    listed: dict[str, ManifestFile] = {}
    for entry in manifest.files:
        if entry.path in listed:
            raise ArchiveError(f"{MANIFEST}: lists {entry.path!r} twice")
        listed[entry.path] = entry
    for missing in sorted(set(listed) - set(contents)):
        raise ArchiveError(f"{MANIFEST}: lists {missing!r}, which the archive does not hold")
    for extra in sorted(set(contents) - set(listed)):
        raise ArchiveError(f"member 'data/{extra}': not listed in {MANIFEST}")
    for path, raw in contents.items():
        entry = listed[path]
        if len(raw) != entry.size:
            raise ArchiveError(
                f"data/{path}: {len(raw)} bytes, the manifest says {entry.size}: damaged"
            )
        if hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise ArchiveError(f"data/{path}: checksum does not match the manifest: damaged")


def check_secrets(archive: Archive, box: SecretBox) -> None:
    """Refuse an archive whose secrets the configured key cannot read: restored, the daemon
    would not start."""
    decoded = {
        f: msgspec.json.decode(archive.contents[f]) for f in SECRET_FILES if f in archive.contents
    }
    problems = survey(box, decoded).problems
    if problems:
        lines = [e.message for e in problems[:5]]
        if len(problems) > 5:
            lines.append(f"(and {len(problems) - 5} more)")
        need = ", ".join(archive.manifest.key_ids) or "none"
        raise ArchiveError(
            "the archive's secrets do not decrypt with the configured key "
            f"({box.key_id or 'none configured'}; the archive needs key id {need}):\n  "
            + "\n  ".join(lines)
        )


# --- restore ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    data_dir: Path
    kept: Path | None  # the previous content, or None when there was none
    tidied: list[str]  # what was left of an interrupted restore, and what became of it
    revision: int = 0  # the restored dir's: the archive's, or on from the data dir's
    sealed: int = 0  # the archive's plain-text secrets encrypted under the configured key


def revision_before(data_dir: Path) -> int:
    """The highest revision a data dir gave out: its sync log's, or its journal's (0 when
    neither is there). Raises ArchiveError when the journal is there but cannot be read:
    the revision is then unknown, and ids its subscribers saw could be given again."""
    revision = 0
    with contextlib.suppress(OSError, files.Invalid):
        raw, _st = read_data_file(data_dir / files.SYNC_LOG, files.SYNC_LOG)
        revision = revision_of({files.SYNC_LOG: raw})
    try:
        read = journal.read_journal(data_dir / journal.NAME)
        scan = journal.scan_journal(read[0], journal.NAME, None) if read is not None else None
    except journal.JournalError as e:
        raise ArchiveError(
            f"{e}: the data dir's revision is unknown, and the restore could give ids again "
            f"that subscribers have seen; fix it, or move {data_dir / journal.NAME} aside "
            "(ids then go on from the sync log's)"
        ) from None
    if scan is not None:  # (None: an empty file)
        ids = [e.id for c in scan.changes for e in [*c.events, *(c.log or [])]]
        revision = max(revision, scan.base_revision, *ids)
    return revision


def _going_on(contents: dict[str, bytes], before: int, revision: int) -> dict[str, bytes]:
    """The archive's files with the sync log going on from the revision the data dir had
    given out (`before`): ids are never given twice, so a subscriber resuming from one of
    the old ids cannot miss the events after it. One `import` event (mode `restore`) on top
    of the archive's log, as a restore through the daemon makes."""
    if before <= revision:
        return contents
    log = list(files.decode_table(files.SYNC_LOG, contents.get(files.SYNC_LOG, b"[]")))
    data = {
        "mode": "restore",
        "files": sorted(contents),
        "archive_revision": revision,
        "source": "cli",
    }
    log.append(
        SyncEvent(
            id=before + 1,
            connection_id=None,
            action="import",
            data=data,
            created_at=format_ts(dt.datetime.now(dt.UTC)),
        )
    )
    return {**contents, files.SYNC_LOG: files.encode_table(log)}


def _sealed(contents: dict[str, bytes], box: SecretBox | None) -> tuple[dict[str, bytes], int]:
    """The archive's plain-text secrets encrypted under the configured key, as the daemon's
    next start would encrypt them (so a keyed data dir never holds them in plain text until
    then); how many were."""
    if box is None or not box.encrypting:
        return contents, 0
    out, total = dict(contents), 0
    for file in SECRET_FILES:
        if file in contents:
            sealed, count = seal_content(box, file, msgspec.json.decode(contents[file]))
            if count:
                out[file], total = files.encode_document(sealed), total + count
    return out, total


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _siblings(real: Path, infix: str) -> list[Path]:
    prefix = f"{real.name}.{infix}-"
    return sorted(p for p in real.parent.iterdir() if p.name.startswith(prefix))


def _free_name(parent: Path, base: str) -> Path:
    path = parent / base
    n = 1
    while os.path.lexists(path):
        path = parent / f"{base}.{n}"
        n += 1
    return path


def interrupted_swap(real: Path) -> str | None:
    """Why `real` (the data dir) must not be made anew: it is missing and an interrupted
    restore left its dirs beside it (on a filesystem without an atomic swap, a kill between
    the two renames leaves the data dir path missing); a start would serve an empty one."""
    if os.path.lexists(real):
        return None
    try:
        left = [p.name for p in _siblings(real, "restoring") if p.is_dir()]
    except OSError:  # (no parent dir to list: nothing was left there)
        return None
    if not left:
        return None
    return (
        f"data dir {real} is missing and an interrupted restore left {', '.join(left)} beside "
        "it: run the restore again (it tidies up), or move the data you want back to "
        f"{real} yourself"
    )


def tidy_interrupted_restore(real: Path) -> list[str]:
    """After a restore was killed: a dir still being built is removed; a swapped-out old dir
    gets its `before-restore` name; the mark left in a swapped-in dir goes. Call with the
    lock held. Returns what was done, for the operator."""
    done: list[str] = []
    for sibling in _siblings(real, "restoring"):
        if not sibling.is_dir() or sibling.is_symlink():
            continue
        if (sibling / STAGING_MARK).exists() or not any(sibling.iterdir()):
            shutil.rmtree(sibling)
            done.append(f"removed {sibling} (an interrupted restore's unfinished copy)")
        else:
            stamp = sibling.name.rsplit("-", 1)[-1]
            kept = _free_name(real.parent, f"{real.name}.before-restore-{stamp}")
            os.rename(sibling, kept)
            done.append(f"kept the data from before an interrupted restore in {kept}")
    mark = real / STAGING_MARK
    if mark.exists():
        os.unlink(mark)
        fsync_dir(real)
    if done:
        fsync_dir(real.parent)
    return done


def _write_new(path: Path, body: bytes, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: Path, owner: tuple[int, int] | None) -> None:
    path.mkdir(mode=DIR_MODE)
    if owner is not None:
        os.chown(path, *owner)


def _carry_tree(src: Path, dst: Path, owner: tuple[int, int] | None) -> None:
    """Hard-link a non-data tree (logs, caches) into the new dir; copy where a link fails."""
    if not src.is_dir() or src.is_symlink():
        return
    _mkdir(dst, owner)
    for entry in os.scandir(src):
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            _carry_tree(Path(entry.path), target, owner)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)
                if owner is not None:
                    os.chown(target, *owner)


def _carried(real: Path, name: str) -> bytes | None:
    """A file of the data dir the restore keeps (the token, the boot ids), None if missing.
    Read as the daemon reads its files: a link is never followed, a FIFO never waited on (a
    restore runs as root in a dir the daemon's user owns: a `.token` linked to /etc/shadow
    was copied into the new dir)."""
    try:
        return read_data_file(real / name, name, private=False)[0]
    except FileNotFoundError:
        return None
    except files.Invalid as e:
        raise ArchiveError(f"{real / name}: {e.problem.message}; move it aside") from None


def restore_offline(data_dir: Path, archive_path: Path, box: SecretBox | None) -> Restored:
    """`ctsd restore` with no daemon running (DaemonRunning if one runs): with the lock held
    throughout, read and verify the whole archive (ArchiveError; with `box`, its secrets must
    decrypt with that key), then replace the data dir atomically."""
    try:
        real = resolved(data_dir)  # a StateDirectory may be a symlink to the real dir
    except OSError as e:
        raise NoDataDir(f"{data_dir}: {e.strerror}") from None

    def verified() -> Archive:
        archive = read_archive(archive_path)
        if box is not None:
            check_secrets(archive, box)
        return archive

    # No data dir yet: check the archive before creating one (no daemon can use it yet).
    early = None if real.exists() else verified()
    if early is not None:
        real.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        real.mkdir(mode=DIR_MODE)
    with exclusive(real):
        if (real / files.CLUSTER_BOOTS).exists():
            # Its files would be ones no other host has, its next start refused them as data
            # of its own the cluster lacks: the running daemon publishes a restore instead.
            # (Told by the data dir alone: the cluster settings may be in the unit's
            # environment only, which this shell does not have.)
            raise ArchiveError(
                f"{data_dir} is a cluster host's (it holds {files.CLUSTER_BOOTS}): restore "
                "through its running daemon (`ctsd restore` with it running), which restores "
                "every host; a host taken out of its cluster: remove its cluster settings and "
                f"{files.CLUSTER_BOOTS} first"
            )
        archive = early or verified()
        tidied = tidy_interrupted_restore(real)
        before = revision_before(real)
        owner = owner_for(real)
        stamp = _stamp()
        staging = _free_name(real.parent, f"{real.name}.restoring-{stamp}")
        _mkdir(staging, owner)
        try:
            _write_new(staging / STAGING_MARK, b"", owner)
            fsync_dir(real.parent)
            if any(f.startswith(f"{files.ALGORITHMS_DIR}/") for f in archive.contents):
                _mkdir(staging / files.ALGORITHMS_DIR, owner)
            contents = _going_on(archive.contents, before, archive.manifest.revision)
            contents, sealed = _sealed(contents, box)
            for rel, body in sorted(contents.items()):
                _write_new(staging / rel, body, owner)
            for name in CARRIED_FILES:
                if (body := _carried(real, name)) is not None:
                    _write_new(staging / name, body, owner)
            for name in CARRIED_DIRS:
                _carry_tree(real / name, staging / name, owner)
        except BaseException:
            # (a disk filling up: the copy of the whole data dir must not stay behind)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        new_lock = InstanceLock(staging)  # a daemon starting right after the swap must wait
        new_lock.acquire()
        try:
            if owner is not None:
                os.chown(staging / ".lock", *owner)
            if (staging / files.ALGORITHMS_DIR).is_dir():
                fsync_dir(staging / files.ALGORITHMS_DIR)
            fsync_dir(staging)
            kept = _free_name(real.parent, f"{real.name}.before-restore-{stamp}")
            if exchange(staging, real):
                fsync_dir(real.parent)
                os.rename(staging, kept)  # now holds the old content
            else:
                # No atomic swap on this filesystem: two renames, and a window between them
                # in which the data dir path is missing (never half-applied).
                os.rename(real, kept)
                os.rename(staging, real)
            os.chmod(kept, DIR_MODE)
            os.unlink(real / STAGING_MARK)
            fsync_dir(real)
            fsync_dir(real.parent)
        finally:
            new_lock.release()
    previous: Path | None = kept
    if {p.name for p in kept.iterdir()} <= {".lock"}:
        shutil.rmtree(kept)  # there was no data dir before: nothing to keep
        fsync_dir(real.parent)
        previous = None
    return Restored(archive.manifest, real, previous, tidied, revision_of(contents), sealed)
