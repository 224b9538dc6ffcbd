"""Precise errors for a bad data file: file:line:column, JSON path, and a did-you-mean.

msgspec reports a JSON path (`$[2].is_enabeld`) but no source position, and stdlib `json`
reports positions only for syntax errors. No maintained library maps a JSON path back to a
line and column, so `locate()` does it with a small scanner. It runs only when a file is
already known to be bad, so it is written for clarity, not speed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from json.decoder import scanstring
from typing import Any

import msgspec

from ctsd.timeutil import ID_PATTERN, TIMESTAMP_PATTERN
from ctsd.urlmask import mask_url_secrets

_WS = " \t\r\n"
_PATH_PART = re.compile(r"\[(\d+)\]|\.([^.\[]+)|\['((?:[^'\\]|\\.)*)'\]")
# An integer longer than int() converts from text (where the stdlib decoder gives up).
_LONG_INT = re.compile(rf"-?\d{{{sys.get_int_max_str_digits() + 1},}}")
_MSGSPEC_AT = re.compile(r"^(?P<msg>.*?) - at `(?P<path>\$[^`]*)`$", re.S)
_UNKNOWN = re.compile(r"unknown field `(?P<key>[^`]+)`")
_ENUM = re.compile(r"Invalid enum value '(?P<value>.*)'$", re.S)
_MISSING = re.compile(r"missing required field `(?P<key>[^`]+)`")
_BYTE = re.compile(r"\(byte (\d+)\)")
_STRUCTURAL = re.compile(r'["\[\]{},:]')


class FileProblem(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a file is invalid, and exactly where. `syntax`: it does not parse (its `path`
    says where it broke off, not a value the file holds there)."""

    file: str
    line: int
    column: int
    path: str
    message: str
    syntax: bool = False

    def __post_init__(self) -> None:
        # It may quote a value as typed (a host, a name that names nothing): a URL's
        # password in it never leaves (`/health`, `ctsd verify`, the answers that name it).
        msgspec.structs.force_setattr(self, "message", mask_url_secrets(self.message))

    def format(self) -> str:
        where = (
            f" (at {self.path})"
            if f"`{self.path}`" not in self.message and self.path != "$"
            else ""
        )
        return f"{self.file}:{self.line}:{self.column}: {self.message}{where}"


def parse_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for m in _PATH_PART.finditer(path.removeprefix("$")):
        if m.group(1) is not None:
            parts.append(int(m.group(1)))
        else:
            parts.append(m.group(2) if m.group(2) is not None else m.group(3))
    return parts


def format_path(parts: list[str | int]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def line_col(text: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _skip_value(text: str, i: int) -> int:
    i = _skip_ws(text, i)
    if i >= len(text):
        return i
    c = text[i]
    if c == '"':
        return scanstring(text, i + 1)[1]
    if c in "[{":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                i = scanstring(text, i + 1)[1]
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return i
    while i < len(text) and text[i] not in ",]}" + _WS:
        i += 1
    return i


def _find_key(text: str, i: int, name: str) -> tuple[int, int] | None:
    """In the object starting at `i`: (offset of the key, offset of its value), or None."""
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] == '"':
        key_start = i
        key, i = scanstring(text, i + 1)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        if key == name:
            return key_start, i
        i = _skip_ws(text, _skip_value(text, i))
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return None


def locate(text: str, parts: list[str | int], *, key: str | None = None) -> int:
    """Offset of the value at `parts` (or of `key` inside it); best effort on odd input."""
    i = _skip_ws(text, 0)
    try:
        for part in parts:
            if i >= len(text):
                return i
            if isinstance(part, int) and text[i] == "[":
                i = _skip_ws(text, i + 1)
                for _ in range(part):
                    i = _skip_ws(text, _skip_value(text, i))
                    if i < len(text) and text[i] == ",":
                        i = _skip_ws(text, i + 1)
            elif isinstance(part, str) and text[i] == "{":
                found = _find_key(text, i, part)
                if found is None:
                    return i
                i = found[1]
            else:
                return i
        if key is not None and i < len(text) and text[i] == "{":
            found = _find_key(text, i, key)
            if found is not None:
                return found[0]
    except (ValueError, IndexError):
        pass
    return i


def nearest(word: str, choices: list[str]) -> str | None:
    """The choice `word` was most likely meant to be: the same name in another case or with
    other separators (`exchangeId`, `API_KEY` for `exchange_id`, `api_key`), else the
    closest spelling. None when none is close (or the word is too long to be a slip)."""
    if len(word) > 256:
        return None
    norm = {_fold(c): c for c in reversed(choices)}  # (the first of equal folds wins)
    if (same := norm.get(_fold(word))) is not None:
        return same
    close = difflib.get_close_matches(_fold(word), list(norm), n=1, cutoff=0.6)
    return norm[close[0]] if close else None


def _fold(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _fields_at(root: Any, parts: list[str | int]) -> list[str]:
    """The field names of the Struct at `parts` of type `root`, for did-you-mean."""
    info = _type_at(root, parts)
    if isinstance(info, msgspec.inspect.StructType):
        return [f.encode_name for f in info.fields]
    return []


def _values_at(root: Any, parts: list[str | int]) -> list[str]:
    """The values the field at `parts` of type `root` takes, when they are a list of words."""
    info = _type_at(root, parts)
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(v) for v in info.values]
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(m.value) for m in info.cls]
    return []


def _type_at(root: Any, parts: list[str | int]) -> Any:
    """The type info at `parts` of type `root` (None: the path leaves what the type says)."""
    info = msgspec.inspect.type_info(root)
    for part in [*parts, None]:
        while isinstance(info, msgspec.inspect.UnionType):
            info = next(
                (t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)), info
            )
            if isinstance(info, msgspec.inspect.UnionType):
                break
        if part is None:
            break
        if isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        elif isinstance(info, msgspec.inspect.StructType):
            match = [f for f in info.fields if f.encode_name == part]
            if not match:
                return None
            info = match[0].type
        else:
            return None
    return info


# The stdlib decoder's syntax messages, several of which end in a dangling "at" (their position
# is given separately): said in full, with what usually causes them.
_SYNTAX = {
    "Expecting value": "expected a value (string, number, object, array, true, false or null)",
    "Expecting ',' delimiter": "expected `,` between two items, or the closing bracket",
    "Expecting ':' delimiter": "expected `:` after the key",
    "Expecting property name enclosed in double quotes": "expected a key in double quotes",
    "Unterminated string starting at": "this string has no closing quote",
    "Invalid control character at": (
        "a raw tab or line break inside a string (a missing closing quote?); write \\t or \\n"
    ),
    "Invalid \\escape": 'invalid escape in a string (a backslash must start \\" \\\\ \\/ \\b '
    "\\f \\n \\r \\t or \\uXXXX)",
    "Invalid \\uXXXX escape": "invalid \\uXXXX escape (four hex digits are needed)",
    "Extra data": "more after the end of the JSON value (a second value, or a stray character)",
    "Unexpected UTF-8 BOM (decode using utf-8-sig)": (
        "the file starts with a byte-order mark (BOM): save it as UTF-8 without one"
    ),
}
# A JSON string or number, to find the number out of range or the half of a surrogate pair
# that msgspec refuses but the stdlib decoder (which locates syntax errors) takes.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|(-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?)')
_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')  # (strings skipped)
_VALUE_ERRORS = re.compile(r"out of range|truncated|surrogate", re.IGNORECASE)
_ESCAPE_U = re.compile(r"\\(\\|u([0-9a-fA-F]{4}))")
# Patterns of the models, in words (msgspec quotes the regex itself, which reads badly).
_PATTERNS = {
    TIMESTAMP_PATTERN: "an ISO-8601 UTC timestamp like 2024-01-01T00:00:00.000Z",
    ID_PATTERN: "an id of 1 to 64 letters, digits, `_` or `-`",
}
_REGEX = re.compile(r"`str` matching regex '(?P<rx>(?:[^'\\]|\\.)*)'")


# What most likely caused a syntax error, by the character found where one was expected.
_CAUSES = {
    "}": " (a comma before `}` is not allowed)",
    "]": " (a comma before `]` is not allowed)",
    ",": " (two commas in a row?)",
    "": " (the file ends here: cut short?)",
}


def syntax_message(msg: str, text: str = "", pos: int = 0) -> str:
    """The stdlib decoder's message `msg` for `text` failing at `pos`, said in full, with
    its likely cause where the character found there tells it."""
    said = _SYNTAX.get(msg)
    if said is None:
        msg = msg.removesuffix(" at")
        return msg[:1].lower() + msg[1:]
    if msg.startswith("Expecting"):
        found = text[pos:].lstrip()[:1]
        cause = _CAUSES.get(found, "")
        if msg == "Expecting ',' delimiter" and found:
            cause = ""  # (a bracket or a comma there would not have failed)
        elif msg == "Expecting value" and found == "}":
            cause = " (a key with no value?)"
        said += cause
    return said


def _words_for_patterns(msg: str) -> str:
    def words(m: re.Match[str]) -> str:
        rx = m.group("rx").replace("\\\\", "\\")
        return _PATTERNS.get(rx, m.group(0))

    return _REGEX.sub(words, msg)


def _parse(error: str, root: Any) -> tuple[str, str, str | None, str]:
    """A msgspec ValidationError message on a value of type `root`: (message, path of the
    object it is about, the unknown field's name or None, did-you-mean text or "")."""
    m = _MSGSPEC_AT.match(error)
    msg, path = (m.group("msg"), m.group("path")) if m else (error, "$")
    msg = _words_for_patterns(msg)
    unknown = _UNKNOWN.search(msg)
    if unknown is None:
        enum = _ENUM.match(msg)
        values = _values_at(root, parse_path(path)) if enum else []
        if values:  # (which values are taken, and the one most likely meant)
            msg += " (one of " + ", ".join(f"`{v}`" for v in values) + ")"
            hint = nearest(enum.group("value"), values) if enum else None
            return msg, path, None, f"; did you mean `{hint}`?" if hint else ""
        return msg, path, None, ""
    key = unknown.group("key")
    hint = nearest(key, _fields_at(root, parse_path(path)))
    return msg, path, key, f"; did you mean `{hint}`?" if hint else ""


_CREDENTIAL_LIKE = re.compile(r"[A-Za-z0-9+/=_-]{16,}")


def shown_name(key: str, hint: str) -> str:
    """An unknown field's name as a message shows it: as typed, but for one that reads like
    a credential pasted where a name goes (long, letters and digits mixed, no field it
    could be a slip of), shown by its last 4 characters as `api_key` is: the message goes to
    the log, `/health` and the bus."""
    digits = sum(c.isdigit() for c in key)
    pasted = len(key) > 64 or (
        not hint and digits >= 2 and digits < len(key) and _CREDENTIAL_LIKE.fullmatch(key)
    )
    if not pasted:
        return f"`{key}`"
    return f"`…{key[-4:]}` (a name of {len(key)} characters, shown in part: a pasted secret?)"


def explain(error: str, root: Any) -> tuple[str, str]:
    """(message, JSON path) of a msgspec ValidationError message, for replies: a missing or
    unknown field's path names that field (msgspec names the object holding it), and an
    unknown field or a value not among a field's words gets a did-you-mean."""
    msg, path, key, hint = _parse(error, root)
    if key is not None:
        name = shown_name(key, hint)
        parts = parse_path(path) + ([key] if name == f"`{key}`" else [])  # (the object's)
        return f"unknown field {name}{hint}", format_path(parts)
    missing = _MISSING.search(msg)
    if missing:
        key = missing.group("key")
        return f"missing required field `{key}`", format_path([*parse_path(path), key])
    return msg + hint, path


def syntax_problem(file: str, raw: bytes) -> FileProblem | None:
    """A problem for bytes that are not UTF-8 JSON, else None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = line_col(raw[: e.start].decode("utf-8", "replace"), e.start)
        return FileProblem(file, line, col, "$", f"not UTF-8: {e.reason}")
    constants: list[str] = []
    try:
        json.loads(text, parse_constant=constants.append)  # (NaN, Infinity: no JSON values)
    except json.JSONDecodeError as e:
        msg = (
            "file is empty"
            if not text.strip()
            else f"invalid JSON: {syntax_message(e.msg, text, e.pos)}"
        )
        ch = text[e.pos] if e.msg == "Invalid control character at" else "\n"
        if ch not in "\t\n\r":  # (a NUL, say: no tab nor line break to blame)
            code = ord(ch)
            msg = f"invalid JSON: control character U+{code:04X} in a string; write \\u{code:04x}"
        # Where in the document it broke (`$[0]` for a trailing comma in the first record):
        # the path, as for every other problem, not `$` whatever the place.
        path = format_path(path_at(text, e.pos))
        return FileProblem(file, e.lineno, e.colno, path, msg, syntax=True)
    except RecursionError:
        return FileProblem(file, 1, 1, "$", "invalid JSON: nested too deeply")
    except ValueError:  # an integer past int()'s digit limit, which neither decoder holds
        long = _LONG_INT.search(text)
        return _at_offset(file, text, long.start() if long else 0, "number out of range")
    if constants:
        at = next((m for m in _CONSTANT.finditer(text) if m.group(1)), None)
        before = value_problem(text)
        if at is not None and before is not None and before[0] < at.start():
            return None  # a number out of range before it: named first (`from_decode_error`)
        word = at.group(1) if at else constants[0]
        why = f"invalid JSON: {word} is not a JSON value (strict JSON: write a number or null)"
        return _at_offset(file, text, at.start() if at else 0, why)
    return None


def _at_offset(file: str, text: str, offset: int, message: str) -> FileProblem:
    """A problem with a value at `offset` of JSON `text` the stdlib decoder took."""
    line, col = line_col(text, offset)
    return FileProblem(file, line, col, format_path(path_at(text, offset)), message)


def from_validation(file: str, raw: bytes, error: str, root: Any) -> FileProblem:
    """A problem for a msgspec ValidationError message on `raw` decoded as type `root`."""
    text = raw.decode("utf-8", "replace")
    msg, path, key, hint = _parse(error, root)
    parts = parse_path(path)
    if key is not None:
        offset = locate(text, parts, key=key)
        msg = f"unknown field {shown_name(key, hint)} at `{path}`{hint}"
    else:
        offset = locate(text, parts)
        msg = (msg[0].lower() + msg[1:] if msg else msg) + hint
    line, col = line_col(text, offset)
    return FileProblem(file, line, col, path, msg)


def at_path(file: str, raw: bytes, parts: list[str | int], message: str) -> FileProblem:
    """A problem found by the daemon's own checks (duplicate id, dangling reference...)."""
    text = raw.decode("utf-8", "replace")
    line, col = line_col(text, locate(text, parts))
    return FileProblem(file, line, col, format_path(parts), message)


def value_problem(text: str) -> tuple[int, str] | None:
    """(offset, message) of the first number msgspec cannot hold, or the first half of a
    UTF-16 surrogate pair written alone (`"\\ud83d"`: half an emoji, as some JavaScript
    makes it), in JSON `text` the stdlib decoder took; None if none."""
    for m in _TOKEN.finditer(text):
        number = m.group(1)
        if number is None:
            found = _lone_surrogate(m.group(0))
            if found is not None:
                return m.start() + found[0], found[1]
            continue
        # (integers of any size are held; the >4300-digit ones `syntax_problem` catches)
        if (m.group(2) or m.group(3)) and math.isinf(float(number)):
            return m.start(), f"number out of range: {number[:40]}"
    return None


def _lone_surrogate(string: str) -> tuple[int, str] | None:
    pending: tuple[int, str, int] | None = None  # a high half waiting for its low half
    for m in _ESCAPE_U.finditer(string):
        unit = m.group(2)
        code = int(unit, 16) if unit else None
        if pending is not None and (
            code is None or not 0xDC00 <= code <= 0xDFFF or m.start() != pending[2]
        ):
            break
        if code is not None and 0xD800 <= code <= 0xDBFF:
            pending = (m.start(), unit, m.end())
            continue
        if pending is not None:
            pending = None  # a whole pair
            continue
        if code is not None and 0xDC00 <= code <= 0xDFFF:
            return m.start(), _half(unit)
    return (pending[0], _half(pending[1])) if pending is not None else None


def _half(unit: str) -> str:
    return (
        f"\\u{unit} is half of a UTF-16 surrogate pair, written alone (a character such as "
        "an emoji cut in two): remove it or write the whole pair"
    )


def from_decode_error(file: str, raw: bytes, error: str) -> FileProblem:
    found = syntax_problem(file, raw)
    if found is not None:
        return found
    text = raw.decode("utf-8", "replace")
    # (only for what msgspec refuses and the stdlib decoder took: not for its NaN, say)
    value = value_problem(text) if _VALUE_ERRORS.search(error) else None
    if value is not None:
        return _at_offset(file, text, value[0], value[1])
    byte = _BYTE.search(error)
    line, col = line_col(
        text, len(raw[: int(byte.group(1))].decode("utf-8", "replace")) if byte else 0
    )
    return FileProblem(file, line, col, "$", error)


def path_at(text: str, offset: int) -> list[str | int]:
    """The JSON path of the value at `offset` in JSON `text` (a number msgspec refused, say:
    its errors name no path before they can hold the value)."""
    found = structure_problem(text, until=offset)
    return found[1] if found is not None else []


def structure_problem(
    text: str, max_depth: int = 0, too_deep: str = "", *, until: int = -1
) -> tuple[int, list[str | int], str] | None:
    """The first nesting past `max_depth` (message `too_deep`) or duplicate object key in
    JSON `text`, as (offset, JSON path, message), or None. With `until`, no problem is looked
    for: the path where `text` reaches that offset comes back (message "").

    No decoder reports where either is (msgspec keeps the last of two equal keys, stdlib
    `json` tells only that its hook saw them), so this walks the text itself, iteratively
    (nothing recurses, however deep the input). It runs only once a file is known to have
    such a problem, so it favours clarity over speed; on text that is not JSON it still
    returns, with whatever it found.
    """
    # One frame per open container: [is_object, keys seen (name → offset), the current key
    # or index, expecting a key next].
    stack: list[list[Any]] = []
    i, n = 0, len(text)
    try:
        while True:
            m = _STRUCTURAL.search(text, i)
            i = m.start() if m is not None else n
            if 0 <= until < i:
                return until, _path_of(stack), ""
            if m is None:
                return None
            c = text[i]
            top = stack[-1] if stack else None
            if c == '"':
                value, end = scanstring(text, i + 1)
                if until >= 0 and until < end:  # (inside this string)
                    return until, _path_of(stack), ""
                if top is not None and top[0] and top[3]:
                    first = top[1].get(value)
                    if first is not None and until < 0:
                        line, _col = line_col(text, first)
                        parts = [f[2] for f in stack[:-1]] + [value]
                        return i, parts, f"duplicate key `{value}` (first at line {line})"
                    top[1][value] = i
                    top[2], top[3] = value, False
                i = end
                continue
            if c in "[{":
                if until < 0 and len(stack) >= max_depth:
                    return i, [f[2] for f in stack], too_deep
                stack.append([c == "{", {}, 0, c == "{"])
            elif c in "]}":
                if stack:
                    stack.pop()
            elif c == "," and top is not None:
                if top[0]:
                    top[3] = True
                else:
                    top[2] += 1
            i += 1
            if i >= n:
                return None
    except (ValueError, IndexError):  # not JSON after all: nothing more to say
        return None


def _path_of(stack: list[list[Any]]) -> list[str | int]:
    """The path where the walk stands: in an object waiting for its next key (after `{` or
    a comma), the object's own (not its last key's, nor an index)."""
    parts = [f[2] for f in stack]
    return parts[:-1] if stack and stack[-1][0] and stack[-1][3] else parts


def structure_file_problem(
    file: str, raw: bytes, max_depth: int, too_deep: str
) -> FileProblem | None:
    """`structure_problem` of a file's bytes, located (line, column, JSON path)."""
    text = raw.decode("utf-8", "replace")
    found = structure_problem(text, max_depth, too_deep)
    if found is None:
        return None
    offset, parts, message = found
    line, col = line_col(text, offset)
    return FileProblem(file, line, col, format_path(parts), message)
