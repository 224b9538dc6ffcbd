"""`ctsd secrets rekey`: every secret re-encrypted under a new key, all or nothing.

The core, `rekey_contents`, is pure: file bytes in, file bytes out. It checks every file and
decrypts every value first, and refuses (changing nothing) if one fails.

Offline, the new files are written as one group, after an intent file (`DATA/.rekey-pending`)
that holds all of them. The group's renames are not one atomic step across files, so a crash
between two of them leaves a mix; the intent makes the mix temporary: `finish_pending` (run
by every offline command under the lock, and by the daemon before it loads) writes the rest.
Every value names its key id, so each one decrypts with exactly one of the two keys
throughout, and the files are the old set until the intent is durable and the new set once
it is finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ctsd import bases, files, safefile
from ctsd.atomic import ChangedOnDisk, fsync_dir, stamp_of, write_files
from ctsd.files import Invalid
from ctsd.offline import exclusive, owner_for, read_data_files
from ctsd.secretbox import Key, SecretBox
from ctsd.secretfields import SECRET_FILES, open_content, seal_content
from ctsd.timeutil import now_iso
from ctsd.verify import unwritten

INTENT = ".rekey-pending"


class RekeyIntent(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole new content of every file a rekey writes (its secrets all encrypted under
    the new key), with what each file held before, so that finishing it never overwrites a
    file changed since."""

    format: int = 1
    created_at: str
    new_key_id: str
    old_sha256: dict[str, str | None]  # None: the file did not exist
    files: dict[str, str]


class RekeyRefused(Exception):
    """Nothing was changed: every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Rekeyed:
    files: dict[str, bytes]  # only the files whose content changes
    values: int  # secret values now encrypted under the new key
    new_key_id: str


def rekey_contents(contents: dict[str, bytes], old: SecretBox, new: Key) -> Rekeyed:
    """Re-encrypt every secret in `contents` (file → bytes; the files that hold secrets)
    under `new`. Plain-text secrets are encrypted too. `old` decrypts what is there (give it
    every key the values may be under). Raises RekeyRefused with every problem: a file that
    is invalid or a value that does not decrypt."""
    problems: list[str] = []
    decoded: dict[str, Any] = {}
    for file, raw in contents.items():
        if file not in SECRET_FILES:
            raise ValueError(f"{file} holds no secrets")
        try:
            files.decode_file(file, raw)
        except Invalid as e:
            problems.append(f"{e.problem.format()} (fix the file first: `ctsd verify`)")
            continue
        decoded[file] = msgspec.json.decode(raw)
    opened: dict[str, Any] = {}
    for file, content in decoded.items():
        plain, errors = open_content(old, file, content)
        problems.extend(e.message for e in errors)
        opened[file] = plain
    if problems:
        raise RekeyRefused(problems)
    box = SecretBox(new)
    out: dict[str, bytes] = {}
    total = 0
    for file, plain in opened.items():
        sealed, count = seal_content(box, file, plain)
        total += count
        if count:
            out[file] = files.encode_document(sealed)
    return Rekeyed(out, total, new.id)


def _sha(raw: bytes | None) -> str | None:
    return hashlib.sha256(raw).hexdigest() if raw is not None else None


def _read(path: Path) -> bytes | None:
    """A file's bytes, None when it is not there. RekeyRefused when it cannot be read (not
    a regular file, no permission): never blocks on a FIFO, never follows a link."""
    try:
        fd, _st = safefile.open_regular(path)
    except FileNotFoundError:
        return None
    except safefile.NotRegular as e:
        raise RekeyRefused([f"{path} {e.reason}"]) from None
    except OSError as e:
        raise RekeyRefused([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        raw = safefile.read_fd(fd, limit=1 << 40)  # (the intent holds whole files)
    finally:
        os.close(fd)
    assert raw is not None
    return raw


def read_intent(data_dir: Path) -> RekeyIntent | None:
    """The record of an interrupted rekey, if there is one."""
    raw = _read(data_dir / INTENT)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=RekeyIntent)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RekeyRefused(
            [f"{data_dir / INTENT}: an interrupted rekey's record cannot be read ({e})"]
        ) from None


def finish_pending(data_dir: Path) -> bool:
    """Complete a rekey that was interrupted (call with the instance lock held, before the
    files are read). True when there was one. A file changed since the rekey began is never
    overwritten: that raises RekeyRefused and leaves everything, intent included, as it is."""
    intent_path = data_dir / INTENT
    intent = read_intent(data_dir)
    if intent is None:
        return False
    plan: list[tuple[Path, bytes]] = []
    for file, text in intent.files.items():
        if file not in SECRET_FILES:
            raise RekeyRefused([f"{intent_path}: names {file!r}, which holds no secrets"])
        new = text.encode()
        current = _read(data_dir / file)
        if current == new:
            continue
        if _sha(current) != intent.old_sha256.get(file):
            raise RekeyRefused(
                [
                    f"{data_dir / file}: changed since an interrupted rekey to key id "
                    f"{intent.new_key_id} began; finishing it would overwrite that change. "
                    f"Check the file, then delete {intent_path} to abandon the rekey (its "
                    "other files are already under the new key: run the rekey again)"
                ]
            )
        plan.append((data_dir / file, new))
    if plan:
        bases.drop(data_dir)  # the files change under the daemon's copies of them
        write_files(plan, owner=owner_for(data_dir))
    os.unlink(intent_path)
    fsync_dir(data_dir)
    return True


def rekey_offline(data_dir: Path, current: Key | None, new: Key) -> Rekeyed:
    """`ctsd secrets rekey` with no daemon running (DaemonRunning if one is)."""
    if current is not None and current.id == new.id:
        raise RekeyRefused(
            [f"the new key is the configured key (id {new.id}): give a new key file"]
        )
    with exclusive(data_dir):
        finish_pending(data_dir)
        # Stamps first: a save landing after them, even before the read, is never replaced.
        stamps = {f: stamp_of(data_dir / f) for f in SECRET_FILES}
        try:
            contents = read_data_files(data_dir, [f for f in SECRET_FILES])
            log = read_data_files(data_dir, [files.SYNC_LOG])
        except Invalid as e:  # (no private regular file, too large)
            raise RekeyRefused([f"{e.problem.format()}: fix it first (ctsd verify)"]) from None
        # A change still only in the journal, replayed at the next start, would bring back
        # secrets sealed under the old key.
        why = unwritten(data_dir, log, "a rekey")
        if why is not None:
            raise RekeyRefused([why])
        # Values already under the new key (a repeated run) decrypt too.
        old = SecretBox(current, also=[new])
        try:
            result = rekey_contents(contents, old, new)
        except RekeyRefused as e:
            if current is not None:
                raise
            # (`old` holds only the new key: it is no configured key to name)
            said = f"the configured key is {new.id}"
            instead = f"no key is configured (only the new key, id {new.id}, was given)"
            raise RekeyRefused([p.replace(said, instead) for p in e.problems]) from None
        if not result.files:
            return result
        paths = {data_dir / f: body for f, body in result.files.items()}
        expected = {data_dir / f: stamps[f] for f in result.files}
        intent = RekeyIntent(
            created_at=now_iso(),
            new_key_id=new.id,
            old_sha256={f: _sha(contents.get(f)) for f in result.files},
            files={f: body.decode() for f, body in result.files.items()},
        )
        owner = owner_for(data_dir)
        write_files([(data_dir / INTENT, msgspec.json.encode(intent) + b"\n")], owner=owner)
        bases.drop(data_dir)  # the files change under the daemon's copies of them
        try:
            write_files(list(paths.items()), expected=expected, owner=owner)
        except BaseException as e:
            # All or nothing: when every file still holds its old content, drop the intent so
            # it can never apply later (over a hand edit, or as a surprise); else keep it for
            # finish_pending.
            if all(_sha(_read(p)) == intent.old_sha256[p.name] for p in paths):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(data_dir / INTENT)
                fsync_dir(data_dir)
            if isinstance(e, ChangedOnDisk):
                raise RekeyRefused(
                    [f"{e.path}: changed while the rekey ran; nothing was changed, run it again"]
                ) from None
            raise
        os.unlink(data_dir / INTENT)
        fsync_dir(data_dir)
        return result
