"""One error hierarchy for the fleet: a stable ``code``, an HTTP status, and whether a retry helps.

Routes map a :class:`ShoalError` to ``application/problem+json``; message handlers map
``retryable`` to nak-with-delay and the rest to term (dead letter); RPC replies carry ``code``
so the caller re-raises the same class.

Example::

    raise NotFound("session not found", detail={"session_id": sid})
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *, detail: dict[str, Any] | None = None) -> None:
        self.message = message or self.title
        self.detail = detail or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The wire form used in RPC replies and dead letters."""
        return {"code": self.code, "message": self.message, "detail": self.detail}


class BadRequest(ShoalError):
    code = "bad_request"
    status = 400
    title = "Bad request"


class Unauthorized(ShoalError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class Forbidden(ShoalError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class NotFound(ShoalError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(ShoalError):
    code = "conflict"
    status = 409
    title = "Conflict"


class PayloadTooLarge(ShoalError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class RateLimited(ShoalError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"
    retryable = True


class Unavailable(ShoalError):
    code = "unavailable"
    status = 503
    title = "Service unavailable"
    retryable = True


class Timeout(ShoalError):
    code = "timeout"
    status = 504
    title = "Timed out"
    retryable = True


class Fenced(ShoalError):
    """A state write lost its compare-and-set: another replica owns the session now."""

    code = "fenced"
    status = 409
    title = "Write fenced by a newer owner"
    retryable = True


_BY_CODE: dict[str, type[ShoalError]] = {
    cls.code: cls
    for cls in (
        ShoalError,
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RateLimited,
        Unavailable,
        Timeout,
        Fenced,
    )
}


def error_from_dict(data: dict[str, Any]) -> ShoalError:
    """Rebuild an error received over the wire (an RPC reply) as the same class."""
    cls = _BY_CODE.get(str(data.get("code")), ShoalError)
    return cls(str(data.get("message") or cls.title), detail=dict(data.get("detail") or {}))
