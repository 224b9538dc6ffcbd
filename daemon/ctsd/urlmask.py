"""A URL's secrets masked wherever the URL sits in a text: its password, and the values of
its query parameters named as secrets (`redact` masks by it, and `errors` every error
message: one quoting a value an operator typed may quote a URL). Below `errors`, which
`redact` imports."""

from __future__ import annotations

import re
from urllib.parse import unquote

from ctsd.secretnames import is_secret_param

MASK = "********"
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_TOKEN = re.compile(r"\S+")  # a URL written in text runs to a space (a password may hold quotes)
_PORT = re.compile(r"\d*(?:[/?#]|$)")  # what follows `host:` (tried up to a token's end)
_NOT_USER = re.compile(r"[\[\]]")  # before a `:` that is no user's: an IPv6 host
# `name=value` of a query: the value runs to the next parameter, or to a quote or `<>` after
# its first character (the end of a URL quoted in a text).
_PARAM = re.compile(r"[?&;#]([^=&;#?\s]*)=([^&;#?\s][^&;#?\s\"'<>]*)?")
MAX_DECODES = 3  # percent-decodings of a parameter's value looked through, nested ones in all
_MASKED_PARAM = re.compile(r"[?&;#][^=&;#?\s]*=\*{8}(?:[&;#?\s\"'<>]|$)")


def mask_url_secrets(text: str) -> str:
    """`text` with the secrets of every URL in it masked (`_masked`)."""
    return _masked(text, 0)


def _masked(text: str, decoded: int) -> str:
    """`text` with the secrets of every URL in it masked (the same string when none):
    `scheme://user:password@host/p?token=abc` shows as
    `scheme://user:********@host/p?token=********`.

    Passwords: within a token (text up to a space), what runs from the first `:` after a
    URL's `://` to the token's last `@` is masked: operators type passwords unescaped
    (`p@ss`, `a/b`, `a"b`, even `a://b`), and user names with an `@` (an email login) or a
    `/` (a domain). A token with no `@` after that `:` (no port after it, not in an IPv6
    host) is a password with a space in it: masked on to the last `@` on its line before the
    next `://` (a path holding a `:` before a later `@` is masked too: the safe side). Always
    on the safe side: a port followed by a path holding an `@` (`http://host:5173/@vite/x`)
    is masked as if it were a password. A user name alone (`https://desk@host`) is shown: it
    tells accounts apart.

    Query: the value of every parameter whose name is a secret's
    (`secretnames.is_secret_param`: `token`, `access_token`, `api_key`, `key`,
    `X-Amz-Signature`...) is masked, up to the next `&`, `;`, `#` or `?` (a URL in a
    parameter: its own are looked at too; a percent-encoded one holding a secret is masked
    whole), or a quote or `<>` (the end of a URL quoted in a text), in the fragment too
    (`#access_token=`). After a masked password, parameters are
    looked for from its @ on.

    One pass over the text: this runs on every string of every log line and answer, and a
    pattern that backtracks would let a long crafted string hold the event loop."""
    if "://" not in text or ("@" not in text and "=" not in text):
        return text  # the common case
    out: list[str] = []
    done = 0
    ahead: dict[str, int] = {}  # the next of each needle found so far: each scan resumes

    def next_at(needle: str, pos: int) -> int:
        found = ahead.get(needle)
        if found is None or -1 < found < pos:
            found = ahead[needle] = text.find(needle, pos)
        return len(text) if found == -1 else found

    for token in _TOKEN.finditer(text):
        start, end = max(token.start(), done), token.end()
        if start >= end:
            continue  # (within a password with a space, masked already)
        at = text.rfind("@", start, end)
        stop = end if at == -1 else at
        i = text.find("://", start, stop)
        while i != -1 and not _has_scheme(text, start, i):
            i = text.find("://", i + 3, stop)
        if i == -1:
            continue
        spans: list[tuple[int, int]] = []  # what to mask, in order
        params_to = end
        colon = text.find(":", i + 3, stop)
        if colon != -1 and at != -1:
            spans.append((colon + 1, at))
        elif colon != -1 and not (
            _PORT.match(text, colon + 1, end) or _NOT_USER.search(text, i + 3, colon)
        ):  # a password with a space (the `:` is no port's, nor in an IPv6 host)
            limit = min(next_at("\n", end), next_at("://", end))
            if next_at("@", end) < limit:
                at = text.rfind("@", end, limit)
                spans.append((colon + 1, at))
                params_to = _TOKEN.match(text, at).end()  # type: ignore[union-attr]
        if spans:
            # The query may have begun in what was masked (a `?` in a password, an @ in the
            # query): its parameters are looked for from the @ on.
            params_from = spans[-1][1]
        else:
            params_from = min(_find(text, "?", i + 3, end), _find(text, "#", i + 3, end))
        for m in _PARAM.finditer(text, params_from, params_to):
            if m.group(2) and _secret_param(m.group(1), m.group(2), decoded):
                spans.append((m.start(2), m.end(2)))
        for a, b in spans:
            out.append(text[done:a])
            out.append(MASK)
            done = b
    out.append(text[done:])
    return "".join(out)


def holds_masked_url(text: str) -> bool:
    """Does `text` hold a URL as `mask_url_secrets` shows it, a secret of it masked?"""
    return "://" in text and (f":{MASK}@" in text or _MASKED_PARAM.search(text) is not None)


def query_secrets(url: str) -> list[str]:
    """The values of `url`'s query and fragment parameters named as secrets, as written and
    decoded: what a server's error text may quote back of a request made to it (the probes
    scrub them, as they scrub the URL's password)."""
    start = min(_find(url, "?", 0, len(url)), _find(url, "#", 0, len(url)))
    found: list[str] = []
    for m in _PARAM.finditer(url, start):
        if m.group(2) and _secret_param(m.group(1), m.group(2)):
            found += {m.group(2), unquote(m.group(2))}
    return found


def _secret_param(name: str, value: str, decoded: int = 0) -> bool:
    """A query parameter's value is masked whole when its name is a secret's, or when it is
    a percent-encoded URL holding a secret (`?next=https%3A%2F%2Fu%3Apw%40h`): decoded, it
    is masked like any URL. `decoded`: how often the text it sits in was decoded already."""
    return is_secret_param(unquote(name)) or _hides_secret(value, decoded)


def _hides_secret(value: str, decoded: int) -> bool:
    """Decoded at most `MAX_DECODES` times in all, nested URLs included: `%25` repeated
    shrinks by only two characters a pass, so decoding until nothing changes would take
    as many passes (each over the whole value) as it is long."""
    inner = value
    while "%" in inner and decoded < MAX_DECODES:
        inner, decoded = unquote(inner), decoded + 1
        if "://" in inner:
            return _masked(inner, decoded) != inner
    return False


def _find(text: str, needle: str, start: int, end: int) -> int:
    found = text.find(needle, start, end)
    return end if found == -1 else found


def _has_scheme(text: str, start: int, i: int) -> bool:
    """Does a scheme (an ASCII letter, then letters, digits, `+`, `.` or `-`) end at `i`?
    (The scans back stop at a `:` or `/`, so they never cover the same text twice.)"""
    s = i
    while s > start and text[s - 1] in _SCHEME_CHARS:
        s -= 1
    while s < i and not (text[s].isascii() and text[s].isalpha()):
        s += 1
    return s < i
