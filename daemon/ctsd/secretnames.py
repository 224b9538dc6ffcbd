"""Which names are secrets: the one list. A key of any document, a record's field and a
URL's query parameter are judged by it (`redact` masks documents and records by it,
`urlmask` a URL's query). Below both."""

from __future__ import annotations

import re

# Names are compared lowercased with everything but letters and digits removed, so that
# `api_key`, `apiKey`, `API-KEY` and `x-api-key` are one name. (Literal parts, and
# `private…key` checked by hand: a name is judged in one pass however long it is.)
_SECRET_PARTS = (
    "secret", "password", "passwd", "passphrase", "apikey", "accesskey", "privkey",
    "credential", "authorization",
)  # fmt: skip
# `token` is a secret only as the name's last word (`accessToken`, `x-auth-token`, `token2`),
# or before words that still name the value (`apiTokenValue`): in a trading app `tokens`,
# `maxTokens`, `tokenLogoSize` and `tokenAddress` are coins and their figures, which a UI
# must show and an export must carry back.
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # (digits split words, and drop)
_VALUE_WORDS = frozenset(
    {"value", "string", "str", "enc", "encrypted", "b64", "base", "hex", "raw", "plain", "text"}
)
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
    matter. Secrets: names containing `secret`, `password`/`passwd`, `passphrase`, `apikey`,
    `accesskey`, `private…key`/`privkey`, `credential` or `authorization`; names whose last
    word is a `token` (`refresh_token`, `csrfToken`; not `tokens` nor `tokenLogoSize`); and
    the names `username`, `pwd` and `pass`."""
    if not isinstance(name, str):
        return False
    judged = _JUDGED.get(name)  # (names repeat per record: this runs on every key masked)
    if judged is not None:
        return judged
    judged = _judge(name)
    if len(name) <= _CACHED_UP_TO and len(_JUDGED) < _CACHE_SIZE:  # (hostile ones: not kept)
        _JUDGED[name] = judged
    return judged


_JUDGED: dict[str, bool] = {}
_CACHE_SIZE = 4096


def _judge(name: str) -> bool:
    n = _norm(name)
    if n in _SECRET_NAMES or any(part in n for part in _SECRET_PARTS):
        return True
    private = n.find("private")
    if private != -1 and n.find("key", private + 7) != -1:
        return True
    if "token" not in n:
        return False
    words = [w.lower() for w in _WORDS.findall(name)]
    while words and words[-1] in _VALUE_WORDS:
        words.pop()
    return bool(words) and words[-1].endswith("token")


def is_secret_param(name: str) -> bool:
    """Is a URL query parameter of this name a secret? A secret key's name, or `key`, `sig`,
    `sign`, `auth`, `jwt`, `sid`, `session`, `sessionid`, `listenKey`, or one containing
    `signature` or `hmac`."""
    if is_secret_key(name):
        return True
    n = _norm(name)
    return n in _QUERY_NAMES or any(part in n for part in _QUERY_PARTS)
