"""Rate limits: a token bucket per client against model extraction, counted in rows; and a limit
on failed authentications per peer address, checked before any key is looked at.

A few lines of our own: the rate-limit packages for Starlette (slowapi, limits) are not
dependencies of secquant, key their limits on routes rather than on rows of a batch, and would
add a storage backend for something that is per-process state here. The persistent query budget
(rows per window) lives in the database (see `store.Store.consume`).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """`burst` tokens, refilled continuously at `rate` tokens per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self.tokens = float(burst)
        self.stamp = clock()

    def wait(self, n: int) -> float:
        """0.0 if n tokens are there now, else the seconds until they will be (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (n - self.tokens) / self.rate

    def take(self, n: int) -> float:
        """Take n tokens; 0.0 if granted, else the seconds until n tokens will be there (nothing taken)."""
        wait = self.wait(n)
        if wait == 0.0:
            self.tokens -= n
        return wait


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


class FailureLimiter:
    """At most `per_minute` failed authentications per peer address (a bucket of that many, refilled
    evenly over a minute); once spent, the address is refused before its key is checked.

    IPv6 peers count per /64 (one host usually holds a whole /64). At most `max_tracked` addresses are
    remembered, least recently failed forgotten first, so the table cannot grow without bound.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_tracked: int = 65536) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute, self.clock, self.max_tracked = per_minute, clock, max_tracked
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(host: str | None) -> str:
        """The address a failure is counted against."""
        try:
            ip = ipaddress.ip_address(host or "")
        except ValueError:
            return host or "?"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def retry_after(self, host: str | None) -> float:
        """0.0 if `host` may try a key now, else the seconds until it may."""
        with self._lock:
            bucket = self._buckets.get(self.key(host))
            return 0.0 if bucket is None else bucket.wait(1)

    def failed(self, host: str | None) -> None:
        """Count one failed authentication from `host`."""
        k = self.key(host)
        with self._lock:
            bucket = self._buckets.pop(k, None)
            if bucket is None:
                bucket = TokenBucket(self.per_minute / 60.0, self.per_minute, self.clock)
            self._buckets[k] = bucket  # most recent last
            bucket.take(1)
            while len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)


def retry_after_header(seconds: float) -> str:
    """Retry-After wants whole seconds (RFC 9110); round up so a retry right then succeeds."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "86400"
