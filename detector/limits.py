"""Per-instance rate limit: a token bucket per caller.

Each caller (the API key's name, or the client address when the app runs without keys) gets a
bucket of `per_minute` tokens that refills continuously at `per_minute / 60` tokens a second; a
request takes one token, and a request that finds less than one is refused with the number of
seconds until the next token (the 429's Retry-After). Bursts up to a minute's quota pass, the
sustained rate is capped.

The state lives in this process: with N instances a caller gets up to N times the limit. A
global limit belongs in front of the app (API Management `rate-limit-by-key`, see
docs/OPERATIONS.md). The number of buckets is bounded (least recently used ones are dropped, a
dropped bucket is simply full again), so a flood of distinct addresses cannot grow memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_BUCKETS = 10_000


class RateLimiter:
    """Token buckets by key. `check(key)` -> 0.0 when allowed, else seconds to wait."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._max = max_buckets
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def check(self, key: str) -> float:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                wait = 0.0
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        """Whole seconds for the Retry-After header (at least 1)."""
        return str(max(1, math.ceil(wait)))
