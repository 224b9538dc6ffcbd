"""Secrets at rest: AES-256-GCM per value, under a key the host supplies (never a prompt).

A stored secret reads `enc:v1:KEYID:DATA`: KEYID names the key (8 hex digits of a keyed hash,
which reveals nothing of the key) and DATA is base64 of nonce (12 bytes, fresh per value) ‖
ciphertext ‖ tag (16 bytes). The associated data binds the value to its record id and field,
so a value copied to another record or field does not decrypt.

The key comes from `CTSD_SECRETS_KEY_FILE`, else `$CREDENTIALS_DIRECTORY/ctsd-secrets-key`
(systemd's `LoadCredential[Encrypted]=`). A key file holds 32 bytes: raw, or as text — 64 hex
digits or base64 (44 characters, or 43 without padding) with surrounding whitespace allowed.
The forms cannot be confused: only a raw key is exactly 32 bytes long. No key configured:
secrets stay plain text.

Errors (`SecretError`) name the record, the field and what is wrong — never the value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ctsd.safefile import read_configured_file

KEY_FILE_ENV = "CTSD_SECRETS_KEY_FILE"
CREDENTIAL_NAME = "ctsd-secrets-key"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PREFIX = "enc:"
V1 = "enc:v1:"
_KEY_ID = re.compile(r"^[0-9a-f]{8}$")
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_HEX = re.compile(rb"^[0-9A-Fa-f]{64}$")
_KID_END = len(V1) + 8  # where the key id ends in `enc:v1:KEYID:DATA`
_KEY_ID_LABEL = b"ctsd secrets key id v1"
_AAD_LABEL = b"ctsd-secret/v1\n"
_TAG_LABEL = b"ctsd-tag/v1\n"

Reason = Literal[
    "no_key", "wrong_key", "bad_format", "not_base64", "truncated", "tampered", "moved"
]


class KeyFileError(Exception):
    """The configured key cannot be used: one line naming the file and the problem."""


class SecretError(Exception):
    """A stored secret that cannot be decrypted: which record and field, and why.

    `file` and `path` (JSON path parts inside the file) are set by the walkers that know
    where the value sits. The message never holds the value, plain or encrypted.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        record_id: str,
        field: str,
        *,
        file: str | None = None,
        path: tuple[str | int, ...] | None = None,
    ) -> None:
        self.reason: Reason = reason
        self.detail = detail
        self.record_id = record_id
        self.field = field
        self.file = file
        self.path = path
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = f"{self.file}: " if self.file else ""
        if self.path is not None:
            where += format_path(self.path)
            if self.record_id != self.file:
                where += f" (id {self.record_id})"
        else:
            where += f"record {self.record_id}, field {self.field}"
        return f"{where}: {self.detail}"

    def at(self, file: str, path: tuple[str | int, ...] | None) -> SecretError:
        return SecretError(
            self.reason, self.detail, self.record_id, self.field, file=file, path=path
        )


_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_path(parts: Iterable[str | int]) -> str:
    """`$.projectX.apiKey`, `$[3].api_key`; a key that is not a plain name is quoted, so two
    different places never share a path (the path is part of a value's associated data)."""
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _SIMPLE_KEY.match(p):
            out += f".{p}"
        else:
            out += f"[{json.dumps(p, ensure_ascii=False)}]"
    return out


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A 32-byte key and its id. `repr` never shows the material."""

    material: bytes = field(repr=False)
    id: str
    source: str

    @classmethod
    def from_material(cls, material: bytes, source: str) -> Key:
        if len(material) != KEY_BYTES:
            raise KeyFileError(f"{source}: a key is {KEY_BYTES} bytes, not {len(material)}")
        return cls(material, key_id(material), source)


def key_id(material: bytes) -> str:
    """8 hex digits of HMAC-SHA256(key, label): tells keys apart, reveals nothing of them."""
    return hmac.new(material, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:8]


def parse_key(raw: bytes, source: str) -> Key:
    """A key file's bytes: exactly 32 raw bytes, or 64 hex digits, or base64 of 32 bytes."""
    if len(raw) == KEY_BYTES:
        return Key.from_material(raw, source)
    text = raw.strip(b" \t\r\n")
    if _HEX.match(text):
        return Key.from_material(bytes.fromhex(text.decode()), source)
    if len(text) in (43, 44):
        padded = text + b"=" * (-len(text) % 4)
        for alt in (None, b"-_"):
            try:
                material = base64.b64decode(padded, altchars=alt, validate=True)
            except binascii.Error:
                continue
            if len(material) == KEY_BYTES:
                return Key.from_material(material, source)
    raise KeyFileError(
        f"{source}: not a secrets key: a key file holds {KEY_BYTES} bytes, raw or as text "
        f"(64 hex digits, or 44 characters of base64); this one holds {len(raw)} bytes — "
        "`ctsd secrets init` makes one"
    )


def load_key_file(path: Path, label: str | None = None) -> Key:
    source = label or str(path)
    try:
        raw = read_configured_file(path, 4096)  # a key file is small
    except OSError as e:
        raise KeyFileError(f"cannot read the secrets key {source}: {e.strerror or e}") from None
    except ValueError as e:
        raise KeyFileError(f"{source}: not a secrets key: {e}") from None
    return parse_key(raw, source)


def configured_key_path(environ: Mapping[str, str] | None = None) -> tuple[Path, str] | None:
    """(path, how it was configured) of the key file, or None when no key is configured."""
    env = os.environ if environ is None else environ
    explicit = env.get(KEY_FILE_ENV, "")
    if explicit:
        return Path(explicit), f"{KEY_FILE_ENV}={explicit}"
    creds = env.get("CREDENTIALS_DIRECTORY", "")
    if creds:
        path = Path(creds) / CREDENTIAL_NAME
        # A credential the unit does not load is simply absent: plain-text mode.
        if path.exists():
            return path, f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}"
    return None


def configured_key(environ: Mapping[str, str] | None = None) -> Key | None:
    """The host's key, or None (plain-text mode). A configured key that cannot be read is
    an error, never plain-text mode: the daemon must not start looking healthy without it."""
    found = configured_key_path(environ)
    if found is None:
        return None
    path, how = found
    return load_key_file(path, how if how.startswith("$") else str(path))


def new_key_text() -> bytes:
    """A fresh key as a key file's text: base64 and a newline (easy to paste, no binary)."""
    return base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"


# --- values -----------------------------------------------------------------------------------


def is_encrypted(value: object) -> bool:
    """Is this stored value in the encrypted form? (Anything starting with `enc:` claims to be,
    and is refused if it is not a valid one: a plain secret never starts that way.)"""
    return isinstance(value, str) and value.startswith(PREFIX)


def stored_key_id(value: str) -> str | None:
    """The key id of an `enc:v1:KEYID:…` value, None if it is not one."""
    if value.startswith(V1) and len(value) >= len(V1) + 9 and value[len(V1) + 8] == ":":
        kid = value[len(V1) : len(V1) + 8]
        return kid if _KEY_ID.match(kid) else None
    return None


def form_problem(stored: str) -> tuple[Reason, str] | None:
    """Why a stored `enc:` value is no encrypted value under any key, by its form alone (what
    `ctsd verify` checks without the key); None if it may be one."""
    if not stored.startswith(V1):
        # Nothing of it quoted: a plain secret that happens to start with `enc:` would show
        # its next characters (in /health, notices, logs, answers).
        return (
            "bad_format",
            "starts with `enc:` but is not `enc:v1:KEYID:DATA` (a version this ctsd reads)",
        )
    if stored_key_id(stored) is None:
        return "bad_format", "starts with `enc:v1:` but has no 8-hex-digit key id"
    data = stored[_KID_END + 1 :]
    if not _B64.match(data):
        return "not_base64", "its data is not base64"
    if len(data) % 4:
        return "truncated", "its data is cut short (base64 length is not a multiple of 4)"
    try:
        blob = binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return "not_base64", "its data is not base64"
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        return (
            "truncated",
            f"its data is cut short: {len(blob)} bytes, an encrypted value has at least "
            f"{NONCE_BYTES + TAG_BYTES}",
        )
    return None


def associated_data(record_id: str, field: str) -> bytes:
    # Record ids and paths never hold a newline (ids are checked; paths quote odd keys).
    return record_aad(record_id) + field_aad(field)


def record_aad(record_id: str) -> bytes:
    """The record's part of the associated data (computed once per record in a loop)."""
    return _AAD_LABEL + record_id.encode()


def field_aad(field: str) -> bytes:
    return b"\n" + field.encode()


class SecretBox:
    """Encrypts under one key, decrypts under any of the keys it holds (by key id).

    Holding two keys is what makes a rotation safe to interrupt: every value names its key.
    One AESGCM object per key, built once.
    """

    def __init__(self, key: Key | None, *, also: Iterable[Key] = ()) -> None:
        self.key = key
        keys = [k for k in (key, *also) if k is not None]
        self._ciphers: dict[str, AESGCM] = {k.id: AESGCM(k.material) for k in keys}
        self.key_ids: tuple[str, ...] = tuple(self._ciphers)

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None

    @property
    def encrypting(self) -> bool:
        return self.key is not None

    def encrypt(self, record_id: str, field: str, plaintext: str) -> str:
        if self.key is None:
            raise SecretError("no_key", "cannot encrypt: no key is configured", record_id, field)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.key.id].encrypt(
            nonce, plaintext.encode(), associated_data(record_id, field)
        )
        return f"{V1}{self.key.id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, record_id: str, field: str, stored: str) -> str:
        plain = self.try_decrypt(associated_data(record_id, field), stored)
        if plain is None:
            raise self._diagnose(record_id, field, stored)
        return plain

    def try_decrypt(self, aad: bytes, stored: str) -> str | None:
        """The plain value, or None when `stored` does not decrypt with `aad` (then `decrypt`
        says why). The path every good value takes, kept short: a start decrypts them all."""
        if not stored.startswith(V1):
            return None
        cipher = self._ciphers.get(stored[len(V1) : _KID_END])
        if cipher is None or stored[_KID_END : _KID_END + 1] != ":":
            return None
        try:
            blob = binascii.a2b_base64(stored[_KID_END + 1 :], strict_mode=True)
            return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad).decode()
        except (binascii.Error, InvalidTag, ValueError):
            return None  # ValueError: too short for a nonce and a tag; UnicodeDecodeError

    def tag(self, text: str) -> str:
        """A keyed hash of `text` (hex): what a digest of a file's bytes becomes before it
        leaves the host (a hand edit's, `messages.H_TAKEN`). A plain hash of bytes holding a
        secret typed in plain text would let anyone who sees it try guesses offline; under
        the key, only the hosts that hold it can. Without a key the secrets themselves go
        out in plain text: a plain hash then."""
        if self.key is None:
            return hashlib.sha256(text.encode()).hexdigest()
        return hmac.new(self.key.material, _TAG_LABEL + text.encode(), hashlib.sha256).hexdigest()

    def decrypts_as(self, stored: str, record_id: str, field: str) -> bool:
        """Does `stored` authenticate as the value of (record_id, field)? (Finds where a
        moved value came from; never raises.)"""
        try:
            self.decrypt(record_id, field, stored)
        except SecretError:
            return False
        return True

    def _diagnose(self, record_id: str, field: str, stored: str) -> SecretError:
        """Why `stored` does not decrypt as the value of (record_id, field)."""

        def fail(reason: Reason, detail: str) -> SecretError:
            return SecretError(reason, detail, record_id, field)

        bad = form_problem(stored)
        if bad is not None:
            return fail(*bad)
        kid = stored_key_id(stored)
        assert kid is not None  # (its form is right)
        if kid not in self._ciphers:
            if not self._ciphers:
                return fail(
                    "no_key",
                    f"is encrypted under key id {kid}, but no key is configured "
                    f"({KEY_FILE_ENV} or $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME})",
                )
            have = ", ".join(self.key_ids)
            return fail(
                "wrong_key", f"is encrypted under key id {kid}; the configured key is {have}"
            )
        blob = binascii.a2b_base64(stored[_KID_END + 1 :], strict_mode=True)
        try:
            plain = self._ciphers[kid].decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data(record_id, field)
            )
        except InvalidTag:
            return fail(
                "tampered",
                f"does not decrypt under key id {kid}: it was altered or cut short, or it "
                "belongs to another record or field",
            )
        try:
            plain.decode()
        except UnicodeDecodeError:  # authenticated, so only a foreign writer could cause it
            return fail("bad_format", "decrypts to bytes that are not UTF-8")
        return fail("bad_format", "cannot be read")  # unreachable: the fast path took it

    # The store's two calls: what goes to disk, and what comes back from it.

    def seal(self, record_id: str, field: str, value: str | None) -> str | None:
        """The stored form of a value about to be written: plain text is encrypted when a key
        is configured; unset values and values already encrypted are kept as they are."""
        if not value or self.key is None or is_encrypted(value):
            return value
        return self.encrypt(record_id, field, value)

    def open(self, record_id: str, field: str, value: str | None) -> str | None:
        """The plain value of a stored one (plain text typed by hand is returned as it is)."""
        if value is None or not is_encrypted(value):
            return value
        return self.decrypt(record_id, field, value)
