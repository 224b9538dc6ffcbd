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
# A name with `token` in it is a secret (fail-safe: `tokenB64`, `token_v2`, `idTokenHint`,
# `apiTokens`, `GH_TOKENS`, `accesstokenvalue`), but where it plainly names coins or a
# figure about one, which a trading app's UI must show and an export must carry back:
# `tokens` alone or after a word of coins (`maxTokens`, `favoriteTokens`), `token` after one
# (`baseToken`, `selectedToken`), `token` followed by a word that describes it
# (`tokenLogoSize`, `tokenAddress`, `token_type`, `tokenId`) or by a pool's two coins'
# marks at the end (`token0`, `token1`, `tokenA`, `tokenB`; `token2` is a second credential).
# After a credential's word (`refreshTokenExpiresAt`, `apiTokenList`) it is a secret whatever
# follows.
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_ABOUT_A_TOKEN = frozenset({
    "logo", "icon", "image", "img", "size", "symbol", "symbols", "address", "addresses",
    "decimals", "decimal", "name", "type", "kind", "id", "ids", "count", "price", "prices",
    "amount", "amounts", "balance", "balances", "standard", "network", "chain", "contract",
    "expiry", "expires", "expiration", "expired", "ttl", "lifetime", "length", "limit",
    "limits", "max", "min", "usage", "used", "url", "uri", "endpoint", "prefix", "format",
    "scope", "scopes", "issued", "created", "updated", "at", "time", "timestamp", "date",
    "age", "color", "colour", "supply", "rank", "category", "label", "in", "out", "mint",
    "ticker", "quantity", "qty", "market", "volume", "usd", "info", "metadata", "list",
    "lists", "pair", "pairs", "names",
})  # fmt: skip
# Words that make a `token` or `tokens` after them a credential (`apiTokens`, `x-auth-token`).
_CREDENTIAL_WORDS = frozenset({
    "access", "refresh", "api", "auth", "bearer", "session", "id", "jwt", "csrf", "xsrf",
    "oauth", "bot", "client", "user", "device", "personal", "github", "gh", "gitlab", "slack",
    "discord", "telegram", "app", "service", "login", "security", "sso", "saml", "push",
})  # fmt: skip
# Words of coins before `tokens` or `token` (`maxTokens`, `baseToken`).
_COIN_WORDS = frozenset({
    "max", "min", "favorite", "favourite", "fav", "favorites", "watched", "watch", "supported",
    "listed", "top", "trending", "all", "selected", "hidden", "pinned", "popular", "base",
    "quote", "stable", "native", "wrapped", "known", "tracked", "allowed", "blocked",
    "excluded", "included", "available", "portfolio", "from", "to", "reward", "rewards",
    "fee", "gas", "held", "src", "dst", "sell", "buy", "lp", "staking", "collateral", "debt",
    "underlying", "deposit", "pay", "receive",
})  # fmt: skip
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
    `accesskey`, `private…key`/`privkey`, `credential`, `authorization` or `token` (but
    `tokens` of coins and words about a token: see `_token_is_secret`); and the names
    `username`, `pwd` and `pass`."""
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
    return _token_is_secret([w.lower() for w in _WORDS.findall(name)])


def _token_is_secret(words: list[str]) -> bool:
    found = [i for i, w in enumerate(words) if "token" in w]
    if not found:  # (written so no word split finds it: `_t_o_k_e_n`) fail-safe
        return True
    for i in found:
        word = words[i]
        before = words[i - 1] if i else None
        after = words[i + 1] if i + 1 < len(words) else None
        if before in _CREDENTIAL_WORDS:
            return True
        if word == "tokens":
            if (before is None or before in _COIN_WORDS) and (
                after is None or after in _ABOUT_A_TOKEN
            ):
                continue  # `tokens`, `maxTokens`, `tokensCount`: coins
            return True
        if word != "token":
            return True  # run together (`accesstoken`, `tokenvalue`): no telling
        if (
            after in _ABOUT_A_TOKEN
            or (after is None and before in _COIN_WORDS)
            or (after in ("0", "1", "a", "b") and i + 2 == len(words))
        ):
            continue  # `tokenLogoSize`, `baseToken`, `token0`, `tokenA`: about a coin
        return True
    return False


def is_secret_param(name: str) -> bool:
    """Is a URL query parameter of this name a secret? A secret key's name, or `key`, `sig`,
    `sign`, `auth`, `jwt`, `sid`, `session`, `sessionid`, `listenKey`, or one containing
    `signature` or `hmac`."""
    if is_secret_key(name):
        return True
    n = _norm(name)
    return n in _QUERY_NAMES or any(part in n for part in _QUERY_PARTS)
