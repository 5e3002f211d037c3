"""Rules of the event streams beyond one session's socket: the user stream and SSE positions.

No transport. The user stream is the EventBus view: every event of the caller's sessions, read
from the eventbus's ``DELIVER`` subject of the owner, positioned by the DELIVER stream sequence
(the ``seq`` of its frames, and what ``since`` / ``Last-Event-ID`` resume from).

Example::

    streams = EventStreams(bus, service)
    feed, gap = await streams.follow_user(principal, since=1200)   # gap: (1201, 1499) or None
"""

from __future__ import annotations

from typing import Protocol

from shoal.common.errors import BadRequest
from shoal.gateway import tenancy
from shoal.gateway.service import EventFeed, GatewayService, Principal


class UserFeeds(Protocol):
    """What the user stream needs of NATS (``bus.Bus``)."""

    async def follow_user(self, owner: str, since: int) -> EventFeed: ...

    async def first_sequence(self, stream: str) -> int: ...


def parse_position(value: str | None, name: str = "since") -> int:
    """A resume position from a query parameter or ``Last-Event-ID`` (absent: 0)."""
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 19:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


class EventStreams:
    def __init__(self, feeds: UserFeeds, service: GatewayService, deliver_stream: str) -> None:
        self._feeds = feeds
        self._service = service
        self._deliver_stream = deliver_stream

    async def follow_user(
        self, principal: Principal, since: int
    ) -> tuple[EventFeed, tuple[int, int] | None]:
        """The owner's events after ``since``; and the positions retention already dropped.

        The DELIVER stream is shared by every user, so a dropped range may or may not have held
        events of this owner: it is reported either way, never skipped silently.
        """
        tenancy.authorize(principal, tenancy.SESSIONS, write=False)
        feed = await self._feeds.follow_user(principal.owner, since)
        gap = None
        if since > 0:
            first = await self._feeds.first_sequence(self._deliver_stream)
            if since + 1 < first:
                gap = (since + 1, first - 1)
        return feed, gap
