"""Rate limits: a token bucket per client (`server.rate_limit`): per bus connection, per HTTP
keep-alive connection of a local peer, per address for other peers (`ctsd.guard.rate_key`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ctsd.models import RateLimit

# The HTTP requests the limit does not count: /health, and heartbeats (a POST to a
# connection's heartbeat; a document named `heartbeat` is a write like any other). The
# pattern takes a route's template (`{id}`) as well as a request's path, for the OpenAPI
# document.
_HEARTBEAT = re.compile(r"/api/connections/[^/]+/heartbeat")


def http_limited(method: str, path: str) -> bool:
    """Does an HTTP request count against `server.rate_limit`?"""
    if path == "/health":
        return False
    return not (method == "POST" and _HEARTBEAT.fullmatch(path) is not None)


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
    """One bucket per key (a bus connection, an HTTP connection or a remote address)."""

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

    def wait_s(self, key: object) -> float:
        """How long until `key` may send again (0 when it may now)."""
        rl = self.settings()
        bucket = self.buckets.get(key)
        if bucket is None:
            return 0.0
        now = time.monotonic()
        tokens = min(rl.requests, bucket.tokens + (now - bucket.stamp) * rl.requests / rl.window_s)
        return max(0.0, (1.0 - tokens) * rl.window_s / rl.requests)

    def forget(self, key: object) -> None:
        self.buckets.pop(key, None)

    def _prune(self, rl: RateLimit) -> None:
        # Drop buckets that have refilled completely: they hold no information.
        now = time.monotonic()
        for key, b in list(self.buckets.items()):
            if b.tokens + (now - b.stamp) * rl.requests / rl.window_s >= rl.requests:
                del self.buckets[key]
