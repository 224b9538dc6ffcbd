"""Rate limits: a token bucket per client (`server.rate_limit`) and a harsher one for failed
authentication per remote address (guessing tokens must be slow)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ctsd.models import RateLimit

# Wrong tokens: this many per address within the window block the address until they age
# out of it. A blocked address gets one token check per BLOCKED_CHECK_S, right or wrong;
# other attempts are refused unchecked (and uncounted, so the block ends on time). Guessing
# is slowed to that pace, and a client with the right token still gets in on a retry. Only
# a presented, wrong token counts: no token (any web page can send those) never does.
AUTH_FAILURES = 10
AUTH_WINDOW_S = 60.0
BLOCKED_CHECK_S = 1.0


class Bucket:
    """`requests` per `window_s`, refilled continuously (no burst at window edges)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, capacity: float) -> None:
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self, capacity: float, window_s: float) -> bool:
        now = time.monotonic()
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * capacity / window_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Limiter:
    """One bucket per key (a bus connection, or a remote address for HTTP)."""

    def __init__(self, settings: Callable[[], RateLimit]) -> None:
        self.settings = settings
        self.buckets: dict[object, Bucket] = {}

    def allow(self, key: object) -> bool:
        rl = self.settings()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) > 10_000:
                self._prune(rl)
            bucket = self.buckets[key] = Bucket(rl.requests)
        return bucket.take(rl.requests, rl.window_s)

    def forget(self, key: object) -> None:
        self.buckets.pop(key, None)

    def _prune(self, rl: RateLimit) -> None:
        # Drop buckets that have refilled completely: they hold no information.
        now = time.monotonic()
        for key, b in list(self.buckets.items()):
            if b.tokens + (now - b.stamp) * rl.requests / rl.window_s >= rl.requests:
                del self.buckets[key]


class AuthFailures:
    """Failed authentications per remote address within a sliding window."""

    def __init__(
        self,
        limit: int = AUTH_FAILURES,
        window_s: float = AUTH_WINDOW_S,
        check_s: float = BLOCKED_CHECK_S,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.check_s = check_s
        self.seen: dict[str, list[float]] = {}
        self.last_check: dict[str, float] = {}  # blocked addresses only

    def _recent(self, addr: str) -> list[float]:
        cutoff = time.monotonic() - self.window_s
        times = [t for t in self.seen.get(addr, ()) if t > cutoff]
        if times:
            self.seen[addr] = times
        else:
            self.seen.pop(addr, None)
        return times

    def blocked(self, addr: str) -> bool:
        return len(self._recent(addr)) >= self.limit

    def admit(self, addr: str) -> bool:
        """May a token presented from `addr` be checked now? Always, unless the address is
        blocked: then once per `check_s`."""
        if not self.blocked(addr):
            self.last_check.pop(addr, None)
            return True
        now = time.monotonic()
        if now - self.last_check.get(addr, -self.check_s) < self.check_s:
            return False
        self.last_check[addr] = now
        return True

    def wrong_token(self, addr: str) -> bool:
        """Record a wrong token from `addr`; True when the address was already blocked (a
        blocked address is refused without counting, so it is let back in on time)."""
        if self.blocked(addr):
            return True
        self.failed(addr)
        return False

    def failed(self, addr: str) -> None:
        self._recent(addr)
        self.seen.setdefault(addr, []).append(time.monotonic())
