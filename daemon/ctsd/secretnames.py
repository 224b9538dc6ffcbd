"""Which names are secrets: the one list. A key of any document, a record's field and a
URL's query parameter are judged by it (`redact` masks documents and records by it,
`urlmask` a URL's query). Below both."""

from __future__ import annotations

import re

# Names are compared lowercased with everything but letters and digits removed, so that
# `api_key`, `apiKey`, `API-KEY` and `x-api-key` are one name. (Literal parts, and
# `private…key` checked by hand: a name is judged in one pass however long it is.)
_SECRET_PARTS = (
    "secret", "password", "passwd", "passphrase", "token", "apikey", "accesskey", "privkey",
    "credential", "authorization",
)  # fmt: skip
# Whole names only: `username` is the login half of the Project X credentials.
_SECRET_NAMES = frozenset({"username", "pwd", "pass"})
# Query parameters only: names that carry a credential in a URL (`?key=` of many HTTP APIs,
# an exchange's `listenKey`, a signed URL's `X-Amz-Signature`), but may mean other things as
# a document's key.
_QUERY_NAMES = frozenset(
    {"key", "sig", "sign", "auth", "jwt", "sid", "session", "sessionid", "listenkey"}
)
_QUERY_PARTS = ("signature", "hmac")
_CACHED_UP_TO = 128  # longer names (hostile ones) are judged without being cached
_NON_ALNUM = re.compile(r"[^a-z0-9]")


def _norm(name: str) -> str:
    return _NON_ALNUM.sub("", name.lower())


def is_secret_key(name: str) -> bool:
    """Is a value under this key a secret, wherever it sits? Case and separators do not
    matter. Secrets: names containing `secret`, `password`/`passwd`, `passphrase`, `token`,
    `apikey`, `accesskey`, `private…key`/`privkey`, `credential` or `authorization`, and the
    names `username`, `pwd` and `pass`."""
    if not isinstance(name, str):
        return False
    judged = _JUDGED.get(name)  # (names repeat per record: this runs on every key masked)
    if judged is not None:
        return judged
    judged = _judge(_norm(name))
    if len(name) <= _CACHED_UP_TO and len(_JUDGED) < _CACHE_SIZE:  # (hostile ones: not kept)
        _JUDGED[name] = judged
    return judged


_JUDGED: dict[str, bool] = {}
_CACHE_SIZE = 4096


def _judge(n: str) -> bool:
    if n in _SECRET_NAMES or any(part in n for part in _SECRET_PARTS):
        return True
    private = n.find("private")
    return private != -1 and n.find("key", private + 7) != -1


def is_secret_param(name: str) -> bool:
    """Is a URL query parameter of this name a secret? A secret key's name, or `key`, `sig`,
    `sign`, `auth`, `jwt`, `sid`, `session`, `sessionid`, `listenKey`, or one containing
    `signature` or `hmac`."""
    if is_secret_key(name):
        return True
    n = _norm(name)
    return n in _QUERY_NAMES or any(part in n for part in _QUERY_PARTS)
