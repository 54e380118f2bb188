"""Per-instance limits: a token bucket per caller, and a budget of request bytes in work.

Rate limit (`RateLimiter`):

Each caller (the API key's name, or the client address when the app runs without keys) gets a
bucket of `per_minute` tokens that refills continuously at `per_minute / 60` tokens a second; a
request takes one token, and a request that finds less than one is refused with the number of
seconds until the next token (the 429's Retry-After). Bursts up to a minute's quota pass, the
sustained rate is capped.

The state lives in this process: with N instances a caller gets up to N times the limit. A
global limit belongs in front of the app (API Management `rate-limit-by-key`, see
docs/OPERATIONS.md). The number of buckets is bounded (least recently used ones are dropped, a
dropped bucket is simply full again), so a flood of distinct addresses cannot grow memory.

Bytes in work (`BodyBudget`): parsing and scoring a JSON body costs memory in proportion to its
size (up to about 17 times for the worst shape found that `api.parse_json` lets through, in
docs/OPERATIONS.md), so the sum of the bodies an instance works on at once is bounded. A request
reserves its body's size before its body is read; one that does not fit waits, first come first
served, and is refused when the wait would exceed a bound. Waiting costs nothing: the body is
not read yet (uvicorn stops reading the socket), and in Azure the Functions host holds it anyway.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

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


class BudgetFull(Exception):
    """No room in the budget within the wait: the caller answers 503 with Retry-After."""

    def __init__(self, wanted: int, in_use: int, capacity: int) -> None:
        super().__init__(f"{wanted} bytes wanted, {in_use} of {capacity} in use")
        self.wanted = wanted
        self.in_use = in_use
        self.capacity = capacity


class Reservation:
    """Bytes held in a `BodyBudget` until `release`; `shrink` gives back what the body turned
    out not to need."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: BodyBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def shrink(self, size: int) -> None:
        size = max(0, size)
        if size < self.size:
            self._budget._give_back(self.size - size)
            self.size = size

    def release(self) -> None:
        """Give everything back (idempotent)."""
        self.shrink(0)


class BodyBudget:
    """At most `capacity` bytes of request bodies in work at once, per process.

    `await budget.acquire(n, wait)` holds `n` bytes (at most `capacity`: a larger request is
    refused earlier by the body limit) until the returned reservation is released; a
    reservation that does not fit waits in arrival order (a large request is not starved by
    small ones) and raises `BudgetFull` after `wait` seconds. `reserve` is the same as an async
    context manager. Used from one event loop at a time (the app's): no lock.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int, wait: float) -> Reservation:
        size = min(max(size, 1), self.capacity)
        if not self._waiters and self.in_use + size <= self.capacity:
            self.in_use += size  # the common case: room at once, nothing awaited
        else:
            await self._wait_for(size, wait)
        return Reservation(self, size)

    @asynccontextmanager
    async def reserve(self, size: int, wait: float) -> AsyncIterator[Reservation]:
        reservation = await self.acquire(size, wait)
        try:
            yield reservation
        finally:
            reservation.release()

    async def _wait_for(self, size: int, wait: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            if future.done():  # granted just as the wait ended: keep it
                return
            self._waiters.remove(entry)
            self._wake()  # a smaller request behind this one may fit now
            raise BudgetFull(size, self.in_use, self.capacity) from None
        except BaseException:  # cancelled (client gone): give back what may have been granted
            if future.done() and not future.cancelled():
                self._give_back(size)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()
            raise

    def _give_back(self, size: int) -> None:
        self.in_use -= size
        self._wake()

    def _wake(self) -> None:
        """Grant waiting reservations in arrival order while the first one fits."""
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            if future.done():  # cancelled while queued
                continue
            self.in_use += size
            future.set_result(None)
