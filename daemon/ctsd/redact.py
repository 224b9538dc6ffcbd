"""Secrets never leave: everything that masks by the one definition of a secret.

A key is a secret by its name, at any depth of any document (`secretnames.is_secret_key`).
Logs, bus replies and events, HTTP responses, the sync log and exports all mask through
`mask()`; the log pipeline runs `structlog_processor`. Nothing else decides what a secret is.

Shown values: a set secret reads `MASK`; `api_key`-like keys of 12 characters or more may
show their last four as `"…abcd"`, so an operator can tell keys apart; an unset one (null or
"") reads null. Booleans are never secrets (`"savePassword": true` is a switch, not a
password). A secret holding an object is walked instead: its own keys decide.

`connection_settings` is a JSON *string* holding an object: secrets inside it are masked too,
and the string shown is that object re-serialized with them masked.

A URL's password is a secret wherever the URL sits (`"base_url": "https://me:pw@host"`, or a
log message quoting one): it shows as `https://me:********@host`; so are its query values
named as secrets (`?api_key=********`, `urlmask`).

A placeholder sent back (`MASK`, the `"…abcd"` shown for that secret, or a URL sent back as
shown) keeps the stored secret: `restore_placeholders(sent, stored, path)` puts the stored
values back, or refuses with `invalid` where nothing is stored. A placeholder is never stored.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from ctsd.errors import CtsdError
from ctsd.limits import MAX_MESSAGE_DEPTH, require_depth
from ctsd.secretnames import is_secret_key as is_secret_key
from ctsd.urlmask import MASK as MASK  # (below `errors`, which masks every message by it)
from ctsd.urlmask import holds_masked_url
from ctsd.urlmask import mask_url_secrets as mask_url_secrets

# A connection record's `api_key` may show its last four characters (which key is this?):
# `mask_record` only. Every other secret, the Project X `apiKey` of connection.json or a key
# named api_key in a document included, shows only as set.
SHOW_TAIL = "api_key"
SETTINGS_STRING_KEY = "connection_settings"  # a JSON string holding an object


def mask_value(field: str, value: Any, *, record: bool = False) -> Any:
    """How the secret `value` of key `field` is shown (`record`: a field of a connection)."""
    if value is None or value == "":
        return None  # unset
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("enc:"):
        return MASK  # encrypted at rest: its tail is ciphertext, which tells nothing apart
    if record and field == SHOW_TAIL and isinstance(value, str) and len(value) >= 12:
        return "…" + value[-4:]
    return MASK


def _is_container(value: Any) -> bool:
    return isinstance(value, dict | list | tuple)


def _dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _mask_settings_string(text: str) -> str:
    """`connection_settings` shown: its secrets masked inside the string. A string that is
    not JSON cannot be looked into, so it is not shown at all."""
    try:
        inner = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return MASK
    masked = mask(inner)
    return text if masked == inner else _dumps(masked)


def _shown(key: Any, value: Any) -> tuple[Any, bool]:
    """(what a value under `key` shows as, whether it still needs walking)."""
    if isinstance(key, str):
        if key == SETTINGS_STRING_KEY and isinstance(value, str):
            return _mask_settings_string(value), False
        if is_secret_key(key) and not isinstance(value, dict):
            return mask_value(key, value), False
    if isinstance(value, str):
        return mask_url_secrets(value), False
    return value, _is_container(value)


def mask(obj: Any) -> Any:
    """A copy of a JSON-like value with every secret masked, at any depth.

    Iterative: no input, however deep, makes it raise (the log processor runs it on every
    line). Tuples come back as lists, as they would encode."""
    if not _is_container(obj):
        return obj
    root: Any = {} if isinstance(obj, dict) else []
    work = [(obj, root)]  # (source container, its copy to fill)
    while work:
        src, dst = work.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, value in items:
            shown, walk = _shown(key if isinstance(src, dict) else None, value)
            if walk:
                copy: Any = {} if isinstance(shown, dict) else []
                work.append((shown, copy))
                shown = copy
            if isinstance(dst, dict):
                dst[key] = shown
            else:
                dst.append(shown)
    return root


def mask_if_needed(obj: dict[str, Any]) -> dict[str, Any]:
    """`mask(obj)`, or `obj` itself when nothing in it can need masking (`_plain`): a look
    without a copy, for the data of every event made (most are field names and numbers:
    masking them copied everything to change nothing)."""
    return obj if _plain(obj, 0) else mask(obj)


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})


def _plain(node: Any, depth: int) -> bool:
    """No secret's name, no `connection_settings`, no string that may hold a URL, nothing but
    JSON's own types, at most 32 deep (deeper: not looked at, masked)."""
    values = node
    if isinstance(node, dict):  # (one nested deeper is a dict exactly, or masked below)
        for key in node:
            if key == SETTINGS_STRING_KEY or is_secret_key(key):
                return False
        values = node.values()
    for value in values:
        kind = type(value)
        if kind is str:
            if "://" in value:
                return False
        elif kind is dict or kind is list or kind is tuple:
            if depth >= 32 or not _plain(value, depth + 1):
                return False
        elif kind not in _SCALAR_TYPES:
            return False
    return True


@functools.lru_cache(maxsize=64)
def _secret_fields(kind: type[msgspec.Struct]) -> tuple[str, ...]:
    return tuple(f for f in kind.__struct_fields__ if is_secret_key(f))


def mask_record(record: msgspec.Struct) -> dict[str, Any]:
    """`mask(msgspec.to_builtins(record))` for a record of scalar fields only (a connection):
    the secret fields are known from the type, so nothing is walked (a reply to every update
    shows its record)."""
    out: dict[str, Any] = msgspec.to_builtins(record)
    secret = _secret_fields(type(record))
    for field, value in out.items():
        if field in secret:
            out[field] = mask_value(field, value, record=True)
        elif field == SETTINGS_STRING_KEY and isinstance(value, str):
            out[field] = _mask_settings_string(value)
        elif isinstance(value, str):
            out[field] = mask_url_secrets(value)
    return out


def may_hold_placeholders(sent: Any) -> bool:
    """Could `restore_placeholders` change anything in `sent`? False for an object of plain
    values none of which is a placeholder (most updates): no need to walk it, nor to build
    what is stored to compare against."""
    if not isinstance(sent, dict) or SETTINGS_STRING_KEY in sent:
        return True
    return any(
        _is_container(v)
        or is_placeholder(v)
        or is_slipped_placeholder(v)
        or _holds_masked_url(v)
        or (v is None and is_secret_key(k))  # (null for a secret stored "": kept)
        for k, v in sent.items()
    )


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and (value == MASK or (value.startswith("…") and len(value) == 5))


def is_slipped_placeholder(value: Any) -> bool:
    """A value that reads as a placeholder copied with a slip: a space around it, a star too
    many or too few, `...` typed for `…` before the tail, a tail cut short. Stored as a
    secret, it would replace the real one and still read masked, so the loss would not
    show."""
    if not isinstance(value, str) or is_placeholder(value) or len(value) > 64:
        return False
    s = value.strip()
    if len(s) >= 3 and s.count("*") == len(s):
        return True
    # (`...` alone is no slip: seed 000's example record holds it as "a key goes here")
    for lead in ("…", "..."):
        rest = s[len(lead) :]
        if s.startswith(lead) and 0 < len(rest) <= 4 and rest.isalnum():
            return True
    return False


def _holds_masked_url(value: Any) -> bool:
    return isinstance(value, str) and holds_masked_url(value)


def _restore_url_passwords(
    key: Any, sent: str, stored: Any, path: str, unset: list[str] | None
) -> str:
    """A string holding a URL sent back with its password masked: the stored string, when it
    shows as exactly that; else refused (the URL changed, so which password it keeps is not
    known). Where none is stored and `unset` is given (an import): the URL without what was
    masked, its path added to `unset`."""
    if isinstance(stored, str) and mask_url_secrets(stored) == sent:
        return stored
    name = key if isinstance(key, str) else path
    if (
        not isinstance(stored, str)
        or holds_masked_url(stored)
        or mask_url_secrets(stored) == stored
    ):
        if unset is not None:
            unset.append(path)
            return sent.replace(f":{MASK}@", "@").replace(f"={MASK}", "=")
        raise _refuse(name, path, "no URL password is stored there")
    raise _refuse(name, path, "the stored URL is not the one shown")


_MOVED = "the URL `%s` beside it changed (a secret is kept only for the address it was given for)"


def _refuse(key: str, path: str, why: str) -> CtsdError:
    # Never quote a value: the message names the field only.
    return CtsdError(
        "invalid",
        f"`{key}` holds the masked placeholder, not a secret, and {why}; send the real value",
        path=path,
    )


def _key_part(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key) else f"{path}['{key}']"


def _id_of(item: Any) -> str | int | None:
    rid = item.get("id") if isinstance(item, dict) else None
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None


class _Prints:
    """The fingerprints of one walk's array items (`_fingerprint`): each node's, by object id
    (the trees stay alive while the walk runs), and the classes they name."""

    __slots__ = ("classes", "nodes")

    def __init__(self) -> None:
        self.nodes: dict[int, tuple[int, bool]] = {}
        self.classes: dict[Any, int] = {}


def _pairs(sent: list[Any], stored: Any, prints: _Prints) -> list[Any]:
    """The stored counterpart of each sent list item: by `id` when the items carry one and
    it names one item on each side (a record moved in an array is still that record), else
    by what the items show (`_shown_items`; `prints`: the fingerprints known so far)."""
    if not isinstance(stored, list | tuple):
        return [None] * len(sent)
    ids = [_id_of(x) for x in sent]
    if ids and None not in ids and len(set(ids)) == len(ids):
        by_id = {_id_of(x): x for x in stored}
        if len(by_id) == len(stored) and None not in by_id:
            return [by_id.get(i) for i in ids]
    return _shown_items(sent, stored, prints)


def _shown_items(
    sent: list[Any], stored: list[Any] | tuple[Any, ...], prints: _Prints
) -> list[Any]:
    """Items without ids (`{"name": "a", "password": "********"}`) paired by what they show
    (`_fingerprint`: all of it, secrets aside), each stored item taken once: first the item
    at the same index that shows the same, then the one untaken item that does (an export
    imported after an item was added before it: by position each account took the password
    of the one before). An item edited (it shows what none does) keeps the one at its index
    only when it is the one item left holding a placeholder and that stored item the one
    left untaken. Else none: its placeholder is unset, or refused, never another's secret."""
    signs = [_fingerprint(x, prints)[0] for x in stored]
    shown_stored = set(signs)
    out: list[Any] = [None] * len(sent)
    taken = [False] * len(stored)
    left: list[int] = []
    for i, item in enumerate(sent):
        if i < len(stored) and signs[i] == _fingerprint(item, prints)[0]:
            out[i], taken[i] = stored[i], True
        else:
            left.append(i)
    free: dict[int, list[int]] = {}
    for j, sign in enumerate(signs):
        if not taken[j]:
            free.setdefault(sign, []).append(j)
    later = []
    for i in left:
        sign, holds = _fingerprint(sent[i], prints)
        found = free.get(sign, [])
        if len(found) == 1 and not taken[found[0]]:
            out[i], taken[found[0]] = stored[found[0]], True
        elif holds and sign not in shown_stored:
            later.append(i)  # (edited: it shows what no stored item does, and needs a secret)
    untaken = [j for j in range(len(stored)) if not taken[j]]
    if len(later) == 1 and untaken == later:
        out[later[0]] = stored[later[0]]
    return out


def _fingerprint(item: Any, prints: _Prints) -> tuple[int, bool]:
    """(the class of all an item shows, whether it holds a placeholder). Two items are of one
    class exactly when they show the same: every name and value at any depth, its secrets'
    values left out, URLs' passwords masked (no hash: nothing collides). Computed once per
    node for the whole walk (`prints`, by object id; the trees stay alive while it runs): a
    deep document is paired level by level without walking any subtree twice."""
    nodes, classes = prints.nodes, prints.classes
    stack: list[tuple[Any, bool]] = [(item, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in nodes:
            continue
        if isinstance(node, dict | list | tuple) and not ready:
            stack.append((node, True))
            stack.extend((v, False) for v in (node.values() if isinstance(node, dict) else node))
            continue
        if isinstance(node, dict):
            shown = []
            holds = False
            for k, v in node.items():
                cls, held = nodes[id(v)]
                if k == SETTINGS_STRING_KEY and isinstance(v, str):
                    # (shown re-serialized with its secrets masked: as shown, both sides)
                    cls = classes.setdefault(("cs", _mask_settings_string(v)), len(classes))
                    held = MASK in v
                elif _hidden(k) and not isinstance(v, dict | bool):
                    # (as masking shows it: an object walked, a switch as it is, a secret
                    # set or unset)
                    unset = v is None or v == ""
                    cls = classes.setdefault(("unset",) if unset else ("set",), len(classes))
                shown.append((str(k), cls))
                holds = holds or held
            key: Any = ("{", tuple(sorted(shown)))
        elif isinstance(node, list | tuple):
            key = ("[", tuple(nodes[id(v)][0] for v in node))
            holds = any(nodes[id(v)][1] for v in node)
        else:
            value = mask_url_secrets(node) if isinstance(node, str) else node
            key = (type(node).__name__, repr(value))
            holds = is_placeholder(node) or (isinstance(node, str) and _holds_masked_url(node))
        nodes[id(node)] = (classes.setdefault(key, len(classes)), holds)
    return nodes[id(item)]


def _hidden(key: Any) -> bool:
    return isinstance(key, str) and is_secret_key(key)


def _restore_settings_string(
    sent: str, stored: Any, path: str, unset: list[str] | None = None
) -> str:
    if sent == MASK and isinstance(stored, str) and _mask_settings_string(stored) == MASK:
        return stored  # shown whole as the mask (it does not decode): sent back as shown
    try:
        inner = msgspec.json.decode(sent)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return sent  # not JSON: the validation that follows says so
    old: Any = None
    if isinstance(stored, str):
        try:
            old = msgspec.json.decode(stored)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            old = None
    restored = restore_placeholders(inner, old, path, unset=unset)
    if restored is inner:
        return sent
    # Sent back exactly as shown: keep the stored string byte for byte.
    return stored if isinstance(stored, str) and restored == old else _dumps(restored)


def restore_placeholders(
    sent: Any,
    stored: Any,
    path: str = "$",
    *,
    records: bool = False,
    unset: list[str] | None = None,
) -> Any:
    """`sent` with every placeholder under a secret key replaced by the secret stored at the
    same place in `stored` (None: nothing is stored, as for a new record). `unset` (an
    import): a placeholder where nothing is stored becomes null (unset) and its path is
    added to the list, instead of refusing the whole.

    The same place: the same key of the matching object; in arrays, the item with the same
    `id` (else the same index); inside `connection_settings`, the same key of the stored
    string's object. A `"…abcd"` placeholder must match the stored secret's last four. Raises
    `CtsdError("invalid", path=...)` naming the field where nothing (or something else) is
    stored, and for a value nested deeper than a message may be. Returns `sent` itself when
    it holds no placeholder; never changes `sent`.
    """
    if not _is_container(sent):
        return sent
    require_depth(sent, MAX_MESSAGE_DEPTH, path=path)
    # Iterative, like mask(); containers are copied only on the way to a restored value.
    out, changed = _restore_walk(sent, stored, path, records, unset)
    return out if changed else sent


_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and _URL_START.match(value) is not None


def _moved_url(sent: dict[Any, Any], stored: Any) -> str | None:
    """The key of a URL beside the secrets of `sent` that is not the stored one (changed,
    added or removed), or None. A secret sent back as a placeholder is kept only for the
    address it was given for: else a client holding the token, not the secret, could point
    `projectX.apiUrl` at its own server and have the daemon log in there with it."""
    if not isinstance(stored, dict):
        return None  # nothing stored: every placeholder is refused anyway
    for key in {*sent, *stored}:
        if not isinstance(key, str) or is_secret_key(key):
            continue
        now, was = sent.get(key), stored.get(key)
        if (_is_url(now) or _is_url(was)) and (
            not (_is_url(now) and _is_url(was)) or mask_url_secrets(now) != mask_url_secrets(was)
        ):
            return key
    return None


def _restore_walk(
    sent: Any, stored: Any, path: str, records: bool, unset: list[str] | None
) -> tuple[Any, bool]:
    # Frames: [source, stored counterpart, path, copy or None, parent frame, key in parent,
    # the key of a URL that moved in this object or one around it]
    root: list[Any] = [sent, stored, path, None, None, None, None]
    work = [root]
    prints = _Prints()  # (of array items: see `_shown_items`)
    while work:
        frame = work.pop()
        src, old, where, moved = frame[0], frame[1], frame[2], frame[6]
        if isinstance(src, dict):
            olds: list[Any] = [old.get(k) if isinstance(old, dict) else None for k in src]
            items = list(src.items())
            moved = moved or _moved_url(src, old)
        else:
            olds = _pairs(list(src), old, prints)
            items = list(enumerate(src))
        for (key, value), counterpart in zip(items, olds, strict=True):
            sub = _key_part(where, key) if isinstance(key, str) else f"{where}[{key}]"
            new = value
            if isinstance(key, str) and key == SETTINGS_STRING_KEY and isinstance(value, str):
                new = _restore_settings_string(value, counterpart, sub, unset)
            elif value is None and counterpart == "" and is_secret_key(key):
                new = counterpart  # unset both ways (shown null): an export imports back as is
            elif isinstance(key, str) and is_placeholder(value) and is_secret_key(key):
                if counterpart is None or counterpart == "" or is_placeholder(counterpart):
                    if unset is None:
                        raise _refuse(key, sub, "no secret is stored there")
                    unset.append(sub)
                    _set(frame, key, None)
                    continue
                # A tail is only ever shown for api_key: for another secret it would be a way
                # to guess its last four, answered "matches" or not. A value encrypted since
                # (a key configured after an export) shows none: any tail keeps it, as
                # "********" does, which tells nothing of it either.
                # Only a connection record's own `api_key` shows one (`records`: `sent` is
                # such a record, or a list of them), never one deeper (a document's, one in
                # `connection_settings`), where a tail answered "matches" or not would be
                # the same oracle.
                parent = frame[4]
                at_record = records and (
                    parent is None or (parent[4] is None and isinstance(parent[0], list))
                )
                encrypted = isinstance(counterpart, str) and counterpart.startswith("enc:")
                if value != MASK and (
                    key != SHOW_TAIL
                    or not at_record
                    or (not encrypted and mask_value(SHOW_TAIL, counterpart, record=True) != value)
                ):
                    raise _refuse(key, sub, "it does not match the stored secret")
                if moved is not None:
                    raise _refuse(key, sub, _MOVED % moved)
                new = counterpart
            elif (
                isinstance(key, str)
                and is_slipped_placeholder(value)
                and value != counterpart  # (stored so by an earlier version: kept)
                and is_secret_key(key)
            ):
                raise CtsdError(
                    "invalid",
                    f"`{key}` reads as the masked placeholder copied with a slip (a space, a "
                    "star too many, `...` for `…`), not as a secret: send `********` exactly to "
                    "keep the stored secret, or the real value",
                    path=sub,
                )
            elif _holds_masked_url(value):
                if moved is not None and moved != key:
                    raise _refuse(key if isinstance(key, str) else sub, sub, _MOVED % moved)
                new = _restore_url_passwords(key, value, counterpart, sub, unset)
            elif _is_container(value):
                work.append([value, counterpart, sub, None, frame, key, moved])
                continue
            if new is not value:
                _set(frame, key, new)
    return (root[3], True) if root[3] is not None else (sent, False)


def _set(frame: list[Any], key: Any, value: Any) -> None:
    """Put `value` at `key` of the frame's copy, copying the containers on its way up."""
    while True:
        if frame[3] is None:
            frame[3] = dict(frame[0]) if isinstance(frame[0], dict) else list(frame[0])
            frame[3][key] = value
            parent, pkey = frame[4], frame[5]
            if parent is None:
                return
            frame, key, value = parent, pkey, frame[3]
            continue
        frame[3][key] = value
        return


def structlog_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Mask secret fields anywhere in a log event (keys of the event and nested values)."""
    return mask(event_dict)


# In a file's bytes, what every masked placeholder holds: the mask, or the ellipsis of a
# key's last four (as UTF-8, or escaped as JSON may write it).
_MASK_MARKS = (MASK.encode(), "…".encode(), b"\\u2026")


def bytes_may_hold_placeholder(raw: bytes) -> bool:
    """Might these bytes of a file hold a masked placeholder? (Quick, never too lenient.)"""
    return any(mark in raw for mark in _MASK_MARKS)
