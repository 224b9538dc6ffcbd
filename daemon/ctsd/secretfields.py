"""Which fields hold secrets to encrypt, and the walkers that seal and open them.

Two files hold secrets: `connections.json` (each Connection's secret fields, bound to the
connection id) and `connection.json` (secret keys at any depth, bound to the file name and
the key's JSON path, e.g. `projectX.apiKey`). `is_secret_field` is the one predicate.

Walkers come in two shapes: typed Connections (what the store holds) and decoded JSON content
of a whole file (what offline tools read). Both copy on write: the input is never changed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ctsd import diagnose, redact
from ctsd.files import CONNECTIONS, Invalid, document_file
from ctsd.models import Connection
from ctsd.secretbox import (
    SecretBox,
    SecretError,
    field_aad,
    format_path,
    is_encrypted,
    record_aad,
    stored_key_id,
)

CONNECTION_DOC = document_file("connection")
SECRET_FILES: tuple[str, ...] = (CONNECTIONS, CONNECTION_DOC)
# Finding where a moved value came from costs one decryption per candidate: bounded, so a
# file of 10,000 swapped values cannot stall a start.
MAX_ORIGIN_TRIES = 200_000


def is_secret_field(name: str) -> bool:
    """Is a field of this name a secret to encrypt at rest? The same predicate that masks."""
    return redact.is_secret_key(name)


CONNECTION_SECRETS: tuple[str, ...] = tuple(
    f for f in Connection.__struct_fields__ if is_secret_field(f)
)
_CONNECTION_SECRET_AADS = tuple((f, field_aad(f)) for f in CONNECTION_SECRETS)

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Place:
    """Where one secret sits: file, JSON path, and the (record id, field) it is bound to."""

    file: str
    path: Path
    record_id: str
    field: str
    value: Any = field(repr=False)  # never printed

    def where(self) -> str:
        text = f"{self.file} {format_path(self.path)}"
        return text + (f" (connection {self.record_id})" if self.file == CONNECTIONS else "")


def document_field(path: Path) -> str:
    """The field name a document secret is bound to: its JSON path without the `$.`."""
    text = format_path(path)
    return text[2:] if text.startswith("$.") else text[1:]


# --- typed connections (the store's records) --------------------------------------------------


def seal_connection(box: SecretBox, conn: Connection) -> Connection:
    """The record as it goes to disk: plain-text secrets encrypted (when a key is set)."""
    if not box.encrypting:
        return conn
    changes = {}
    for name in CONNECTION_SECRETS:
        value = getattr(conn, name)
        if value and not is_encrypted(value):
            changes[name] = box.encrypt(conn.id, name, value)
    return msgspec.structs.replace(conn, **changes) if changes else conn


def open_connection(box: SecretBox, conn: Connection, index: int | None = None) -> Connection:
    """The record with its secrets in plain text; raises SecretError naming the file, the
    connection and the field (and `$[index]` when the record's place in the file is given)."""
    changes = {}
    for name in CONNECTION_SECRETS:
        value = getattr(conn, name)
        if is_encrypted(value):
            try:
                changes[name] = box.decrypt(conn.id, name, value)
            except SecretError as e:
                raise e.at(CONNECTIONS, None if index is None else (index, name)) from None
    return msgspec.structs.replace(conn, **changes) if changes else conn


def open_connections(
    box: SecretBox, conns: Sequence[Connection]
) -> tuple[list[Connection], list[SecretError]]:
    """Every record with its secrets in plain text, and every value that failed (located at
    `connections.json $[i].field`; such a record keeps the stored value)."""
    out: list[Connection] = []
    failed: list[tuple[SecretError, str]] = []
    replace = msgspec.structs.replace
    for i, conn in enumerate(conns):
        changes = None
        prefix = None
        for name, tail in _CONNECTION_SECRET_AADS:
            value = getattr(conn, name)
            if value is None or not value.startswith("enc:"):
                continue
            if prefix is None:
                prefix = record_aad(conn.id)
            plain = box.try_decrypt(prefix + tail, value)
            if plain is None:
                try:
                    box.decrypt(conn.id, name, value)  # raises, saying why
                except SecretError as e:
                    failed.append((e.at(CONNECTIONS, (i, name)), value))
                continue
            if changes is None:
                changes = {}
            changes[name] = plain
        out.append(replace(conn, **changes) if changes else conn)
    if not failed:
        return out, []
    places = [
        Place(CONNECTIONS, (i, name), c.id, name, getattr(c, name))
        for i, c in enumerate(conns)
        for name in CONNECTION_SECRETS
        if is_encrypted(getattr(c, name))
    ]
    return out, _explain_moved(box, failed, places)


# --- decoded files (offline tools) ------------------------------------------------------------


def secret_places(file: str, content: Any) -> Iterator[Place]:
    """Every secret value of a decoded file (unset ones — null or "" — are skipped)."""
    if file == CONNECTIONS:
        if not isinstance(content, list):
            return
        for i, rec in enumerate(content):
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                continue
            for key, value in rec.items():
                if is_secret_field(key) and value not in (None, ""):
                    yield Place(file, (i, key), rec["id"], key, value)
    elif file == CONNECTION_DOC:
        yield from _document_places(file, content, ())


def _document_places(file: str, obj: Any, path: Path, secret_list: bool = False) -> Iterator[Place]:
    """`secret_list`: `obj` is a list under a secret's name (`"backupApiKeys": [...]`): each
    of its values is a secret, as masking shows it (the list whole), bound to the list, not
    its index (removing one by hand must not make the ones after it fail to decrypt)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = (*path, key)
            if isinstance(value, dict | list):
                yield from _document_places(
                    file, value, sub, isinstance(value, list) and is_secret_field(key)
                )
            elif value not in (None, "") and (is_secret_field(key) or _sealed(value)):
                # (stored encrypted under a name an older version took for a secret's: still
                # opened and rekeyed, never left sealed under a key that may be dropped)
                yield Place(file, sub, file, document_field(sub), value)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            sub = (*path, i)
            if isinstance(value, dict | list):
                yield from _document_places(file, value, sub)
            elif value not in (None, "") and (secret_list or _sealed(value)):
                yield Place(file, sub, file, document_field(path), value)


def _sealed(value: Any) -> bool:
    """A whole `enc:v1:KEYID:…` value (not any text that starts with `enc:`)."""
    return isinstance(value, str) and stored_key_id(value) is not None


def set_paths(obj: Any, changes: Sequence[tuple[Path, Any]]) -> Any:
    """A copy of `obj` with each path set to its value; untouched containers are shared."""
    if not changes:
        return obj
    leaves: dict[Any, Any] = {}
    deeper: dict[Any, list[tuple[Path, Any]]] = defaultdict(list)
    for path, value in changes:
        if len(path) == 1:
            leaves[path[0]] = value
        else:
            deeper[path[0]].append((path[1:], value))
    new = list(obj) if isinstance(obj, list) else dict(obj)
    for key, value in leaves.items():
        new[key] = value
    for key, sub in deeper.items():
        new[key] = set_paths(obj[key], sub)
    return new


def seal_content(box: SecretBox, file: str, content: Any) -> tuple[Any, int]:
    """(content with every plain-text secret string encrypted, how many were)."""
    if not box.encrypting:
        return content, 0
    changes = [
        (p.path, box.encrypt(p.record_id, p.field, p.value))
        for p in secret_places(file, content)
        if isinstance(p.value, str) and not is_encrypted(p.value)
    ]
    return set_paths(content, changes), len(changes)


def open_content(box: SecretBox, file: str, content: Any) -> tuple[Any, list[SecretError]]:
    """(content with every secret in plain text, the values that failed — kept as stored)."""
    changes: list[tuple[Path, Any]] = []
    failed: list[tuple[SecretError, str]] = []
    places = [p for p in secret_places(file, content) if is_encrypted(p.value)]
    for p in places:
        try:
            changes.append((p.path, box.decrypt(p.record_id, p.field, p.value)))
        except SecretError as e:
            failed.append((e.at(file, p.path), p.value))
    return set_paths(content, changes), _explain_moved(box, failed, places)


def _explain_moved(
    box: SecretBox, failed: list[tuple[SecretError, str]], places: Sequence[Place]
) -> list[SecretError]:
    """Turn "does not authenticate" into "belongs to X" when the value decrypts as the value
    of another place in the same file (copied or swapped between records or fields)."""
    out: list[SecretError] = []
    tries = 0
    for err, stored in failed:
        found = None
        if err.reason == "tampered":
            kid = stored_key_id(stored)
            for p in places:
                if tries >= MAX_ORIGIN_TRIES:
                    break
                if (p.record_id, p.field) == (err.record_id, err.field):
                    continue
                if stored_key_id(p.value) != kid:
                    continue  # bound with the same key or not at all
                tries += 1
                if box.decrypts_as(stored, p.record_id, p.field):
                    found = p
                    break
        if found is None:
            out.append(err)
            continue
        origin = (
            f"connection {found.record_id}, field {found.field}"
            if found.file == CONNECTIONS
            else f"{found.file} {format_path(found.path)}"
        )
        out.append(
            SecretError(
                "moved",
                f"belongs to {origin}: it was copied or swapped from there, and a value only "
                "decrypts in the record and field it was written for",
                err.record_id,
                err.field,
                file=err.file,
                path=err.path,
            )
        )
    return out


@dataclass
class Survey:
    """What the secrets of a data dir look like, without a single value."""

    plain: list[Place] = field(default_factory=list)  # plain-text strings
    not_strings: list[Place] = field(default_factory=list)  # numbers/booleans: stay plain
    readable: Counter[str] = field(default_factory=Counter)  # key id → values that decrypt
    problems: list[SecretError] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (len(self.plain) + len(self.not_strings) + sum(self.readable.values())) + len(
            self.problems
        )


def survey(box: SecretBox, contents: dict[str, Any]) -> Survey:
    """Check every secret of the decoded files in `contents` (file → content)."""
    out = Survey()
    for file, content in contents.items():
        for p in secret_places(file, content):
            if not isinstance(p.value, str):
                out.not_strings.append(p)
            elif not is_encrypted(p.value):
                out.plain.append(p)
        _, problems = open_content(box, file, content)
        out.problems.extend(problems)
        bad = {e.path for e in problems}
        for p in secret_places(file, content):
            if is_encrypted(p.value) and p.path not in bad:
                out.readable[stored_key_id(p.value) or "?"] += 1
    return out


def check_placeholders(file: str, raw: bytes, decoded: Any) -> None:
    """At start (and in `ctsd verify`, a backup, a restore): a masked placeholder as a
    secret's value (a record pasted from an export or an answer while the daemon was
    stopped) is no secret: the file is invalid as it is, left as it is (taken as it was, the
    placeholder was stored and sealed in place of the secret). With a copy of the file, the
    start then takes it in against the copy, as a running daemon does: the stored secret is
    put back and the report cleared."""
    place = placeholder_in(file, decoded)
    if place is not None:
        raise Invalid(
            diagnose.at_path(
                file,
                raw,
                list(place.path),
                f"`{place.field}` holds the masked placeholder, not a secret (pasted from "
                "an export or an answer?): put the real value back",
            )
        )


def placeholder_in(file: str, decoded: Any) -> Any:
    """The first secret's place in `decoded` (the file as read) that holds a masked
    placeholder, or None."""
    content = msgspec.to_builtins(decoded) if file == CONNECTIONS else decoded
    # (exact ones only: a value that reads as one copied with a slip may have been stored by
    # an earlier version; one pasted while the daemon was down is judged by the door against
    # the file's copy, `bases`, which refuses it)
    return next((p for p in secret_places(file, content) if redact.is_placeholder(p.value)), None)
