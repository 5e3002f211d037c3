"""Injectable time: services take a :class:`Clock`; tests pass a :class:`ManualClock`.

Example::

    clock = ManualClock(start=1_700_000_000.0)
    clock.advance(30)          # lease and timer rules see 30 s pass, no sleep
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (for timestamps and deadlines)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (for measuring intervals and TTLs)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds


def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, the form every envelope and API response uses."""
    return (
        datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
