"""A URL's password masked wherever the URL sits in a text (`redact` masks by it, and
`errors` every error message: one quoting a value an operator typed may quote a URL).
Below `errors`, which `redact` imports."""

from __future__ import annotations

import re

MASK = "********"
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_TOKEN = re.compile(r"\S+")  # a URL written in text runs to a space (a password may hold quotes)


def mask_url_passwords(text: str) -> str:
    """`text` with the password of every URL in it masked (the same string when none):
    `scheme://user:password@host` shows as `scheme://user:********@host`.

    Within a token (text up to a space), what runs from the first `:` after a URL's `://` to
    the token's last `@` is masked: operators type passwords unescaped (`p@ss`, `a/b`,
    `a"b`, even `a://b`), and user names with an `@` (an email login) or a `/` (a domain).
    Always on the safe side: a port followed by a path holding an `@`
    (`http://host:5173/@vite/x`) is masked as if it were a password. One pass over the
    text: this runs on every string of every log line and answer, and a pattern that
    backtracks would let a long crafted string hold the event loop."""
    if "@" not in text or "://" not in text:
        return text  # the common case
    out: list[str] = []
    done = 0
    for token in _TOKEN.finditer(text):
        start, end = token.span()
        at = text.rfind("@", start, end)
        i = text.find("://", start, at) if at != -1 else -1
        while i != -1 and not _has_scheme(text, start, i):
            i = text.find("://", i + 3, at)
        colon = text.find(":", i + 3, at) if i != -1 else -1
        if colon != -1:
            out.append(text[done : colon + 1])
            out.append(MASK)
            done = at
    out.append(text[done:])
    return "".join(out)


def _has_scheme(text: str, start: int, i: int) -> bool:
    """Does a scheme (an ASCII letter, then letters, digits, `+`, `.` or `-`) end at `i`?
    (The scans back stop at a `:` or `/`, so they never cover the same text twice.)"""
    s = i
    while s > start and text[s - 1] in _SCHEME_CHARS:
        s -= 1
    while s < i and not (text[s].isascii() and text[s].isalpha()):
        s += 1
    return s < i
