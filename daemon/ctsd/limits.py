"""Limits on what any door takes in (files, bus frames, HTTP bodies, import archives).

One definition of each, so that every door refuses the same thing with the same words:

- `MAX_FILE_BYTES`: a data file larger than this is invalid (checked on the open descriptor,
  before reading; the read itself is bounded too).
- `MAX_DEPTH`: how deeply a data file, or a document sent to the daemon, may nest arrays and
  objects. The seeds nest 4 levels; 64 leaves room for any trading app's settings while
  keeping every walk over the value (masking, comparing, encoding) far from Python's
  recursion limit.
- `MAX_MESSAGE_DEPTH`: the same for a whole message that carries a document inside an
  envelope (a bus frame `{"content": DOC}`, an HTTP body, an import archive
  `{"data": {"files": {FILE: DOC}}}`): the document's limit plus room for the envelope, so a
  document that may sit in a file may also be sent.

`check_depth(value, limit)` works on any decoded JSON value (dicts, lists, tuples, scalars);
no input, however deep, can make it raise (its quick pass recurses at most 256 levels, past
any limit a door uses; the walk that finds the path is iterative). It answers the JSON path
of the first container nested past `limit`, or None. `require_depth` raises the `CtsdError`
a door answers with.
"""

from __future__ import annotations

from typing import Any

from ctsd.diagnose import format_path
from ctsd.errors import CtsdError, ErrorCode

MAX_FILE_BYTES = 64 * 1024 * 1024  # far above 10,000 connections (~10 MB)
MAX_DEPTH = 64
MAX_MESSAGE_DEPTH = MAX_DEPTH + 8


def depth_message(limit: int) -> str:
    return f"nested deeper than {limit} levels of arrays and objects (the limit)"


def _children(value: Any) -> Any:
    return value.items() if isinstance(value, dict) else enumerate(value)


_CONTAINERS = (dict, list, tuple)
_FAST_UP_TO = 256  # `_within` recurses once per level: far below the interpreter's limit


def _within(value: Any, limit: int) -> bool:
    """Is no array or object in `value` (a container, level 1) nested deeper than `limit`?
    Several times quicker than the walk below, which keeps the path as it goes."""
    if limit < 1:
        return False
    for child in value.values() if isinstance(value, dict) else value:
        if isinstance(child, _CONTAINERS) and not _within(child, limit - 1):
            return False
    return True


def check_depth(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The JSON path (`$.a[0].b`) of the first array or object nested deeper than `limit`
    levels (the outermost container is level 1), or None when `value` is within it."""
    if not isinstance(value, _CONTAINERS):
        return None
    if limit < 1:
        return "$"
    if limit <= _FAST_UP_TO and _within(value, limit):
        return None  # (the common case, without building the path as it goes)
    # Depth-first with an explicit stack of iterators: the stack is the path.
    stack = [iter(_children(value))]
    keys: list[Any] = []
    while stack:
        for key, child in stack[-1]:
            if isinstance(child, _CONTAINERS):
                if len(stack) >= limit:
                    return format_path([*keys, key])
                stack.append(iter(_children(child)))
                keys.append(key)
                break
        else:
            stack.pop()
            if keys:
                keys.pop()
    return None


def require_depth(
    value: Any, limit: int = MAX_DEPTH, *, path: str = "$", code: ErrorCode = "invalid"
) -> None:
    """Raise `CtsdError(code)` naming the limit and the path (under `path`) when `value`
    nests deeper than `limit`."""
    found = check_depth(value, limit)
    if found is not None:
        raise CtsdError(code, depth_message(limit), path=path + found[1:])
