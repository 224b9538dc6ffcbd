"""Secrets sealed on their way into the store: what the change path calls.

Every secret that enters memory through the door (bus, HTTP, CLI, a hand edit) passes here
before it is installed, so memory, the journal and the data files hold only the stored form
(`enc:v1:KEYID:…` when a key is configured). A plain value equal to what the stored one
decrypts to keeps the stored one (no needless change, no new nonce); a value that claims to
be encrypted must decrypt in its own place, else the change is refused naming the field.

A `Sealer` is made per group of changes (it remembers what it encrypted, so the same value
is not checked twice) and may be switched to a new key by a rekey within its group.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS
from ctsd.models import Connection
from ctsd.secretbox import (
    SecretBox,
    SecretError,
    associated_data,
    format_path,
    is_encrypted,
)
from ctsd.secretfields import (
    CONNECTION_DOC,
    CONNECTION_SECRETS,
    Place,
    open_connection,
    open_connections,
    open_content,
    seal_connection,
    seal_content,
    secret_places,
    set_paths,
)

log = structlog.get_logger("ctsd.secrets")

CONNECTION_DOC_NAME = "connection"


def _get(obj: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        if isinstance(part, int):
            if not isinstance(obj, list) or part >= len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[part] if isinstance(part, int) else obj.get(part)
    return obj


class Sealer:
    def __init__(self, box: SecretBox) -> None:
        self.box = box
        self._made: set[str] = set()  # values this sealer encrypted (known good)
        self.rotated: SecretBox | None = None  # set by a rekey in this group

    # --- one value ----------------------------------------------------------------------

    def _value(self, record_id: str, field: str, new: Any, old: Any, where: str) -> Any:
        """The stored form of `new` (a secret about to be stored at record/field)."""
        if not isinstance(new, str) or not new or new == old or new in self._made:
            return new
        if is_encrypted(new):
            try:
                plain = self.box.decrypt(record_id, field, new)
            except SecretError as e:
                raise CtsdError("invalid", f"`{field}` {e.detail}", path=where) from None
            current = f"enc:v1:{self.box.key_id}:"
            if (
                is_encrypted(old)
                and (old.startswith(current) or not self.box.encrypting)
                and self.box.try_decrypt(associated_data(record_id, field), old) == plain
            ):
                return old  # the same secret encrypted again (a buffer read before a rekey,
                # saved after it): no change, no event telling bots their key changed
            if self.box.encrypting and not new.startswith(current):
                # under a key kept for reading only (during a rekey): stored under the new one
                return self._encrypt(record_id, field, plain)
            return new
        if not self.box.encrypting:
            return new
        if (
            is_encrypted(old)
            and old.startswith(f"enc:v1:{self.box.key_id}:")
            and self.box.try_decrypt(associated_data(record_id, field), old) == new
        ):
            return old
        return self._encrypt(record_id, field, new)

    def _encrypt(self, record_id: str, field: str, plain: str) -> str:
        out = self.box.encrypt(record_id, field, plain)
        self._made.add(out)
        return out

    # --- records and documents ------------------------------------------------------------

    def connection(
        self, new: Connection, old: Connection | None, path: str = "$.connection"
    ) -> tuple[Connection, bool]:
        """(`new` with its secrets in stored form, whether a plain value was taken in)."""
        changes: dict[str, Any] = {}
        plain = False
        for name in CONNECTION_SECRETS:
            value = getattr(new, name)
            if not value:
                continue
            before = getattr(old, name) if old is not None else None
            stored = self._value(new.id, name, value, before, f"{path}.{name}")
            if stored is not value:
                changes[name] = stored
                plain |= not is_encrypted(value)
        if not changes:
            return new, False
        return msgspec.structs.replace(new, **changes), plain

    def document(
        self, name: str, new: dict[str, Any], old: dict[str, Any] | None, path: str = "$"
    ) -> tuple[dict[str, Any], bool]:
        """(a document with its secrets in stored form, whether a plain value was taken in).
        Only `connection.json` holds encrypted secrets; the other documents are the trading
        app's and stay as written."""
        if name != CONNECTION_DOC_NAME:
            return new, False
        changes = []
        plain = False
        moved = self._moved_from(old)
        for p in secret_places(CONNECTION_DOC, new):
            if not isinstance(p.value, str):
                continue
            before = _get(old, p.path) if old is not None else None
            where = path + format_path(p.path)[1:]
            origin = moved.get(p.value) if is_encrypted(p.value) else None
            opened = None
            if (
                origin is not None
                and origin.path != p.path
                and origin.path[-1:] == p.path[-1:]
                and self.box.try_decrypt(associated_data(p.record_id, p.field), p.value) is None
            ):
                # A stored value that moved with its item (an account added before it, the
                # export's placeholder paired back): bound to its old place, sealed anew.
                opened = self.box.try_decrypt(
                    associated_data(origin.record_id, origin.field), p.value
                )
            if opened is not None:
                stored = self._encrypt(p.record_id, p.field, opened)
            else:  # (one that does not open where it came from either: refused, named)
                stored = self._value(p.record_id, p.field, p.value, before, where)
            if stored is not p.value:
                changes.append((p.path, stored))
                plain |= not is_encrypted(p.value)
        return (set_paths(new, changes), plain) if changes else (new, False)

    @staticmethod
    def _moved_from(old: dict[str, Any] | None) -> dict[str, Place]:
        """Each encrypted value of the stored document, by its text: where a value sent
        verbatim came from."""
        if old is None:
            return {}
        return {
            p.value: p
            for p in secret_places(CONNECTION_DOC, old)
            if isinstance(p.value, str) and is_encrypted(p.value)
        }

    def rotate(self, box: SecretBox) -> None:
        """From now on, seal under `box` (a rekey; it also reads the old key's values)."""
        self.box = self.rotated = box
        self._made.clear()

    def keys(self) -> tuple[SecretBox, SecretBox | None]:
        """The key in use, to set back (`restore`) when a request that rotated it is refused:
        the group's later requests must not seal under a key the store will not adopt."""
        return self.box, self.rotated

    def restore(self, keys: tuple[SecretBox, SecretBox | None]) -> None:
        if (self.box, self.rotated) != keys:
            self.box, self.rotated = keys
            self._made.clear()

    # --- reading -------------------------------------------------------------------------

    def open_connection(self, conn: Connection) -> Connection:
        return open_connection(self.box, conn)

    def open_document(self, content: dict[str, Any]) -> dict[str, Any]:
        opened, problems = open_content(self.box, CONNECTION_DOC, content)
        if problems:
            raise problems[0]
        return opened  # type: ignore[no-any-return]


# --- at start ---------------------------------------------------------------------------------


def secure_loaded(box: SecretBox, committed: Any, invalid: set[str]) -> set[str]:
    """At start, after the files are loaded and the journal replayed: every stored secret
    must decrypt (else the start fails, naming the file and JSON path of each that does not:
    a daemon that cannot read its secrets must not look healthy), and plain-text ones are
    encrypted in memory. Returns the files to write back (encrypted) before the door opens."""
    problems: list[SecretError] = []
    if CONNECTIONS not in invalid:
        problems += open_connections(box, list(committed.connections.values()))[1]
    doc = committed.documents.get(CONNECTION_DOC_NAME)
    if doc is not None and CONNECTION_DOC not in invalid:
        problems += open_content(box, CONNECTION_DOC, doc)[1]
    if problems:
        more = f" (and {len(problems) - 1} more: `ctsd secrets status` lists them)"
        raise CtsdError(
            "invalid",
            f"cannot decrypt the stored secrets: {problems[0].message}"
            + (more if len(problems) > 1 else ""),
        )
    if not box.encrypting:
        return set()
    touched: set[str] = set()
    count = 0
    for cid, conn in committed.connections.items():
        sealed = seal_connection(box, conn)
        if sealed is not conn:
            committed.connections[cid] = sealed
            count += sum(getattr(sealed, f) != getattr(conn, f) for f in CONNECTION_SECRETS)
    if count:
        touched.add(CONNECTIONS)
        log.warning("secrets_encrypted", file=CONNECTIONS, values=count)
    # Sealed in memory even when the file is invalid on disk (what the journal gave it):
    # the journal carries it on until the file is fixed, and must not carry it in plain text.
    if doc is not None:
        sealed_doc, n = seal_content(box, CONNECTION_DOC, doc)
        if n:
            committed.documents[CONNECTION_DOC_NAME] = sealed_doc
            touched.add(CONNECTION_DOC)
            log.warning("secrets_encrypted", file=CONNECTION_DOC, values=n)
    return touched
