"""What one API key may ask of the gateway and what one owner may hold open.

Pure rules over an injected :class:`Clock`: a token bucket per API key id (requests per second
with a burst), a cap on an owner's open sockets (counted by the socket hub) and a cap on an
owner's live sessions (counted from the session index, cached for a few seconds). Over a limit
the caller gets :class:`RateLimited` with ``retry_after`` (seconds) in its detail.

Example::

    buckets = KeyBuckets(rate=20.0, burst=40, max_keys=10_000, clock=SystemClock())
    buckets.charge("key_1")        # raises RateLimited(detail={"retry_after": 1, ...}) when dry
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from shoal.common.clock import Clock
from shoal.common.errors import RateLimited, Timeout, Unavailable

log = logging.getLogger(__name__)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a request takes one."""

    __slots__ = ("_burst", "_clock", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = self._burst
        self._updated = clock.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is (none taken)."""
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


def retry_after_seconds(wait: float) -> int:
    """A wait as ``Retry-After`` says it: whole seconds, at least 1."""
    return max(1, math.ceil(wait))


class KeyBuckets:
    """One :class:`TokenBucket` per API key id, the least recently used dropped beyond
    ``max_keys`` (a dropped key starts again with a full bucket)."""

    def __init__(self, rate: float, burst: int, max_keys: int, clock: Clock) -> None:
        self._rate = rate
        self._burst = burst
        self._max = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def charge(self, key_id: str) -> None:
        """One request of ``key_id``: :class:`RateLimited` when its bucket is dry (rate 0: none)."""
        if self._rate <= 0:
            return
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(self._rate, self._burst, self._clock)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key_id)
        wait = bucket.take()
        if wait > 0.0:
            raise RateLimited(
                f"rate limit: at most {self._rate:g} requests/s per API key",
                detail={"retry_after": retry_after_seconds(wait), "limit_per_second": self._rate},
            )

    def __len__(self) -> int:
        return len(self._buckets)


class OwnerCounts:
    """Open things per owner (sockets), capped at ``cap`` each (0: no cap)."""

    def __init__(self, cap: int, what: str) -> None:
        self._cap = cap
        self._what = what
        self._counts: dict[str, int] = {}

    def claim(self, owner: str) -> None:
        """Count one more for ``owner``; :class:`RateLimited` if that would pass the cap."""
        held = self._counts.get(owner, 0)
        if self._cap and held >= self._cap:
            raise RateLimited(
                f"too many open {self._what}: at most {self._cap} per owner",
                detail={"retry_after": 1, "max_per_owner": self._cap},
            )
        self._counts[owner] = held + 1

    def release(self, owner: str) -> None:
        held = self._counts.get(owner, 0) - 1
        if held > 0:
            self._counts[owner] = held
        else:
            self._counts.pop(owner, None)

    def held(self, owner: str) -> int:
        return self._counts.get(owner, 0)


class SessionQuota:
    """A cap on an owner's live sessions. ``count(owner, cap)`` asks the session index (it stops
    counting at ``cap``); the answer is trusted for ``ttl`` seconds, plus the sessions this
    gateway created since, so a burst of creations costs one count. An index that cannot be
    asked (unavailable, timed out) caps nothing."""

    def __init__(
        self,
        cap: int,
        ttl: float,
        count: Callable[[str, int], Awaitable[int]],
        clock: Clock,
        max_owners: int = 10_000,
    ) -> None:
        self._cap = cap
        self._ttl = ttl
        self._count = count
        self._clock = clock
        self._max = max_owners
        self._cached: OrderedDict[str, tuple[float, int]] = OrderedDict()

    async def check(self, owner: str) -> None:
        """:class:`RateLimited` if ``owner`` already holds ``cap`` live sessions."""
        if not self._cap:
            return
        hit = self._cached.get(owner)
        if hit is None or self._clock.monotonic() >= hit[0]:
            try:
                live = await self._count(owner, self._cap)
            except (Unavailable, Timeout) as exc:
                # The cap protects the fleet; it must not make creation depend on the index.
                log.warning("live sessions of %s not counted (%s): not capped", owner, exc.code)
                return
            hit = (self._clock.monotonic() + self._ttl, live)
            self._cached[owner] = hit
            self._cached.move_to_end(owner)
            while len(self._cached) > self._max:
                self._cached.popitem(last=False)
        if hit[1] >= self._cap:
            raise RateLimited(
                f"too many live sessions: at most {self._cap} per owner; terminate one first",
                detail={"retry_after": retry_after_seconds(self._ttl), "max_per_owner": self._cap},
            )

    def created(self, owner: str) -> None:
        """A session of ``owner`` was created here: count it until the next fresh count."""
        hit = self._cached.get(owner)
        if hit is not None:
            self._cached[owner] = (hit[0], hit[1] + 1)
