"""Rate limits against model extraction: a token bucket per client, counted in rows.

A few lines of our own: the rate-limit packages for Starlette (slowapi, limits) are not
dependencies of secquant, key their limits on routes rather than on rows of a batch, and would
add a storage backend for something that is per-process state here. The persistent query budget
(rows per window) lives in the database (see `store.Store.consume`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """`burst` tokens, refilled continuously at `rate` tokens per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self, n: int) -> float:
        """Take n tokens; 0.0 if granted, else the seconds until n tokens will be there (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (n - self.tokens) / self.rate


class RateLimiter:
    """Token buckets keyed by client id, re-created when the client's limits change."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[int, tuple[tuple[float, int], TokenBucket]] = {}
        self._lock = threading.Lock()

    def take(self, client_id: int, rate: float | None, burst: int | None, n: int) -> float:
        """0.0 when `n` rows may go now, else seconds to wait. No limit when `rate` is None."""
        if rate is None:
            return 0.0
        burst = int(burst) if burst else max(1, math.ceil(rate))
        with self._lock:
            cfg, bucket = self._buckets.get(client_id, (None, None))
            if cfg != (rate, burst):
                bucket = TokenBucket(rate, burst, self.clock)
                self._buckets[client_id] = ((rate, burst), bucket)
            return bucket.take(n)


def retry_after_header(seconds: float) -> str:
    """Retry-After wants whole seconds (RFC 9110); round up so a retry right then succeeds."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "86400"
