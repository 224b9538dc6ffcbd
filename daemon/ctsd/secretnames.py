"""Which names are secrets: the one list. A key of any document, a record's field and a
URL's query parameter are judged by it (`redact` masks documents and records by it,
`urlmask` a URL's query). Below both."""

from __future__ import annotations

import functools
import re

# Names are compared lowercased with everything but letters and digits removed, so that
# `api_key`, `apiKey`, `API-KEY` and `x-api-key` are one name.
_SECRET_PART = re.compile(
    r"secret|passw(?:or)?d|passphrase|token|apikey|accesskey|private\w*key|privkey"
    r"|credential|authorization"
)
# Whole names only: `username` is the login half of the Project X credentials.
_SECRET_NAMES = frozenset({"username", "pwd", "pass"})
# Query parameters only: names that carry a credential in a URL (`?key=` of many HTTP APIs,
# an exchange's `listenKey`, a request's `signature`), but mean other things as a document's
# key (a setting's `key`, a `hotkey`).
_QUERY_NAMES = frozenset({"sig", "signature", "auth", "code"})
_NON_ALNUM = re.compile(r"[^a-z0-9]")


def _norm(name: str) -> str:
    return _NON_ALNUM.sub("", name.lower())


@functools.lru_cache(maxsize=4096)  # a pure function of the name; names repeat per record
def is_secret_key(name: str) -> bool:
    """Is a value under this key a secret, wherever it sits? Case and separators do not
    matter. Secrets: names containing `secret`, `password`/`passwd`, `passphrase`, `token`,
    `apikey`, `accesskey`, `private…key`/`privkey`, `credential` or `authorization`, and the
    names `username`, `pwd` and `pass`."""
    if not isinstance(name, str):
        return False
    n = _norm(name)
    return n in _SECRET_NAMES or _SECRET_PART.search(n) is not None


def is_secret_param(name: str) -> bool:
    """Is a URL query parameter of this name a secret? A secret key's name, one ending in
    `key`, or `sig`, `signature`, `auth` or `code` (an OAuth code)."""
    n = _norm(name)
    return is_secret_key(name) or n.endswith("key") or n in _QUERY_NAMES
