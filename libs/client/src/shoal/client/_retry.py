"""Which HTTP requests the client retries, and when: a policy over stamina's backoff.

Only requests that are safe to send twice are retried: GET, HEAD, PUT and DELETE, and a POST
that carries an idempotency key (the gateway derives the prompt id from it, so a retry queues
the prompt once). They are retried on 429 and 503 answers (after ``Retry-After`` when the
answer has one) and on connection errors, with exponential backoff and jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from shoal.client._errors import ShoalAPIError

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is capped, not slept through blindly

# Errors where the request may not have reached the gateway, or its answer was lost on the way.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    httpx.NetworkError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard the client retries a request that may be retried (``attempts`` in total).

    ``timeout`` bounds the whole series in seconds; waits grow from ``wait_initial`` to
    ``wait_max`` seconds, plus up to ``wait_jitter`` seconds of jitter.
    """

    attempts: int = 5
    timeout: float = 30.0
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_jitter: float = 0.5


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def should_retry(exc: Exception) -> bool | float:
    """stamina's backoff hook: retry or not, or the seconds a ``Retry-After`` asked for."""
    if isinstance(exc, ShoalAPIError):
        if exc.status not in RETRY_STATUSES:
            return False
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER)
        return True
    return isinstance(exc, CONNECTION_ERRORS)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delay-seconds form; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None
