"""The session index's pages (``rpc("session", "list")``): the query and its keyset cursor.

Newest first, ordered by ``(created_at, id)`` descending. A cursor names the last session of a
page; the next page holds the sessions strictly before it in that order, so sessions created
meanwhile (always newer, or placed by their own creation time) never shift a page or repeat
one. The cursor is opaque to callers: base64url of ``["<created_at>", "<id>"]``.

Example::

    query = parse_sessions_query({"owner": "alice", "limit": 2})
    rows = await history.list_sessions(query.owner, query.status, query.before, query.limit + 1)
    page, next_cursor = sessions_page(rows, query.limit)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol, TypeVar

import msgspec

from shoal.common.contracts import Status
from shoal.common.errors import BadRequest

SESSIONS_DEFAULT_LIMIT = 20
SESSIONS_MAX_LIMIT = 100


class _ListBody(msgspec.Struct, kw_only=True):
    owner: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    status: Status | None = None
    cursor: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] = SESSIONS_DEFAULT_LIMIT


@dataclass(frozen=True, slots=True)
class SessionsQuery:
    """One page request: ``owner`` None = every owner's; ``before`` the previous page's last."""

    owner: str | None
    status: str | None
    before: tuple[datetime, str] | None
    limit: int


def parse_sessions_query(body: dict[str, Any]) -> SessionsQuery:
    """Validate an RPC body; ``limit`` above the maximum is lowered to it, not refused."""
    try:
        data = msgspec.convert(body, _ListBody)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid session.list query: {exc}") from exc
    return SessionsQuery(
        owner=data.owner,
        status=str(data.status) if data.status is not None else None,
        before=decode_cursor(data.cursor) if data.cursor is not None else None,
        limit=min(data.limit, SESSIONS_MAX_LIMIT),
    )


def encode_cursor(created_at: datetime, session_id: str) -> str:
    raw = msgspec.json.encode([created_at.isoformat(), session_id])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` a cursor names; :class:`BadRequest` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, session_id = msgspec.json.decode(raw, type=tuple[str, str])
        moment = datetime.fromisoformat(created_at)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("cursor is not one this API handed out") from None
    if moment.tzinfo is None or not session_id:
        raise BadRequest("cursor is not one this API handed out")
    return moment, session_id


class _Keyed(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


_R = TypeVar("_R", bound=_Keyed)


def sessions_page(rows: list[_R], limit: int) -> tuple[list[_R], str | None]:
    """Cut ``rows`` (fetched with ``limit + 1``) to a page and the cursor of the next one."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id)
