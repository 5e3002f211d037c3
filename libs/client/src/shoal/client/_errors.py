"""Errors the client raises."""

from __future__ import annotations

from typing import Any

_STATUS_BY_CODE = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
}


class ShoalAPIError(Exception):
    """The API answered with an error (``application/problem+json`` or an ``error`` frame).

    ``status`` is the HTTP status (for a WebSocket error frame, the status the same error has
    over HTTP), ``code`` the stable machine-readable code, ``detail`` the human sentence and
    ``problem`` the whole problem document (extension members included), ``retry_after`` the
    seconds of a ``Retry-After`` header, when the answer had one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        problem: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in (429, 502, 503, 504)

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> ShoalAPIError:
        code = str(frame.get("code") or "internal")
        return cls(_STATUS_BY_CODE.get(code, 500), code, str(frame.get("message") or ""), frame)


class ShoalConnectionClosed(Exception):
    """A socket was closed for a reason that reconnecting would not fix (e.g. 4401, 4404).

    ``code`` and ``reason`` are the close frame's (1006 when the connection just dropped).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed with {code}: {reason}")
        self.code = code
        self.reason = reason
