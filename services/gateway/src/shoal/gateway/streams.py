"""Rules of the event streams beyond one session's socket: the user and tag streams, positions.

No transport. The user stream is the EventBus view: every event of the caller's sessions, read
from the eventbus's ``DELIVER`` subject of the owner, positioned by the DELIVER stream sequence
(the ``seq`` of its frames, and what ``since`` / ``Last-Event-ID`` resume from). A tag stream
(``?tag=``) is the same over the owner's tag subject: the events of the caller's sessions
tagged so, with the same positions and resume rules.

Example::

    streams = EventStreams(bus, service)
    feed, gap = await streams.follow_user(principal, since=1200)   # gap: (1201, 1499) or None
    feed, gap = await streams.follow_user(principal, since=0, tag="team-a")
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from shoal.common.contracts import Tag
from shoal.common.errors import BadRequest
from shoal.gateway import tenancy
from shoal.gateway.service import EventFeed, GatewayService, Principal


class UserFeeds(Protocol):
    """What the user stream needs of NATS (``bus.Bus``)."""

    async def follow_user(self, owner: str, since: int) -> EventFeed: ...

    async def follow_tag(self, owner: str, tag: str, since: int) -> EventFeed: ...

    async def first_sequence(self, stream: str) -> int: ...


def parse_position(value: str | None, name: str = "since") -> int:
    """A resume position from a query parameter or ``Last-Event-ID`` (absent: 0)."""
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 19:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def parse_tag(value: str) -> str:
    """A tag from ``?tag=``, as sessions carry them (the contract's ``Tag``)."""
    try:
        return msgspec.convert(value, Tag)
    except msgspec.ValidationError:
        raise BadRequest("tag must be 1..64 characters of A-Z a-z 0-9 _ : -") from None


class EventStreams:
    def __init__(self, feeds: UserFeeds, service: GatewayService, deliver_stream: str) -> None:
        self._feeds = feeds
        self._service = service
        self._deliver_stream = deliver_stream

    async def follow_user(
        self, principal: Principal, since: int, tag: str | None = None
    ) -> tuple[EventFeed, tuple[int, int] | None]:
        """The owner's events after ``since`` (only its sessions tagged ``tag``, if given); and
        the positions retention already dropped.

        The DELIVER stream is shared by every user, so a dropped range may or may not have held
        events of this owner: it is reported either way, never skipped silently.
        """
        tenancy.authorize(principal, tenancy.SESSIONS, write=False)
        if tag is None:
            feed = await self._feeds.follow_user(principal.owner, since)
        else:
            feed = await self._feeds.follow_tag(principal.owner, parse_tag(tag), since)
        gap = None
        if since > 0:
            first = await self._feeds.first_sequence(self._deliver_stream)
            if since + 1 < first:
                gap = (since + 1, first - 1)
        return feed, gap
