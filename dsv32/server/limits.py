"""Per-key limits: requests in flight, and tokens per minute counted as they are used.

A key's tokens are its prompt tokens (charged when a generation is admitted) plus its completion
tokens (charged as they are generated, every choice), over a sliding 60-second window kept in
one-second buckets. A new request is refused while the key's count is at or over its limit; one
admitted just under the limit runs to its end, so the count may pass the limit, and the key then
waits until enough of it has left the window (the `Retry-After` of the 429).
Everything here runs on the event loop: no locks.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

from .errors import APIError
from .keys import ApiKey

WINDOW_S = 60.0


class _Window:
    """Tokens used in the last WINDOW_S seconds, in one-second buckets [(second, tokens)]."""

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.total = 0

    def add(self, now: float, tokens: int) -> None:
        self.prune(now)
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])
        self.total += tokens

    def prune(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] + 1 + WINDOW_S <= now:
            self.total -= self.buckets.popleft()[1]

    def retry_after(self, now: float, limit: int) -> int:
        """Whole seconds until the count drops under `limit` (at least 1)."""
        left = self.total
        for second, tokens in self.buckets:
            left -= tokens
            if left < limit:
                return max(1, math.ceil(second + 1 + WINDOW_S - now))
        return 1


class KeyLimiter:
    """Requests in flight and the token window of every key, by name (a key reloaded with new
    limits keeps its counts)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}

    def acquire(self, key: ApiKey) -> None:
        """Take a request slot for `key`, or APIError 429 (`rate_limit_error`) with a Retry-After."""
        limits = key.limits
        if limits.tokens_per_minute is not None:
            window = self._windows.get(key.name)
            now = self.clock()
            if window is not None:
                window.prune(now)
                if window.total >= limits.tokens_per_minute:
                    raise APIError(
                        429, f"API key {key.name!r} used {window.total} tokens in the last minute (limit "
                             f"{limits.tokens_per_minute}); retry later", code="rate_limit_exceeded",
                        retry_after=window.retry_after(now, limits.tokens_per_minute))
        running = self.in_flight.get(key.name, 0)
        if limits.max_concurrent is not None and running >= limits.max_concurrent:
            raise APIError(429, f"API key {key.name!r} has {running} request(s) in flight (limit "
                                f"{limits.max_concurrent}); retry when one has finished",
                           code="concurrency_limit_exceeded")
        self.in_flight[key.name] = running + 1

    def release(self, key: ApiKey) -> None:
        left = self.in_flight.get(key.name, 0) - 1
        if left > 0:
            self.in_flight[key.name] = left
        else:
            self.in_flight.pop(key.name, None)

    def charge(self, name: str, tokens: int) -> None:
        """Count `tokens` used by the key named `name`."""
        if tokens > 0:
            self._windows.setdefault(name, _Window()).add(self.clock(), tokens)

    def used(self, name: str) -> int:
        """Tokens the key used in the last minute."""
        window = self._windows.get(name)
        if window is None:
            return 0
        window.prune(self.clock())
        return window.total
