"""The eventbus's rules: which delivery subjects an event goes to, under which dedup ids.

No transport here: the edge (handlers.py) pulls, calls :meth:`EventFanout.prepare` for each
ledger message (a commit of one command's events: one DELIVER message per event), publishes
every delivery of a pulled batch through a :class:`DeliveryStore`, and acks a ledger message
only after every one of its delivery publishes was acknowledged by the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal.common.contracts import tags_from_header
from shoal.common.errors import BadRequest
from shoal.common.messaging import (
    TRACEPARENT_HEADER,
    Envelope,
    Subjects,
    decode,
    is_token,
    ledger_raw_events,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    target: str  # "user" or "tag": the metrics label
    subject: str
    msg_id: str  # Nats-Msg-Id: a redelivered event is dropped by DELIVER's duplicate window


@dataclass(frozen=True, slots=True)
class Fanout:
    """One event's publishes: the same bytes to each delivery, with its trace header."""

    deliveries: list[Delivery]
    body: bytes
    headers: dict[str, str]


class DeliveryStore(Protocol):
    async def publish_all(
        self, items: Sequence[tuple[Delivery, bytes, dict[str, str]]]
    ) -> list[bool | Exception]:
        """Publish every item in order, back to back, then wait for the server's acks.

        Per item: ``True`` if it was a duplicate, ``False`` if stored, or the error.
        """
        ...


TAG_RE = re.compile(r"^[A-Za-z0-9_:-]{1,64}$")  # contracts.Tag: one subject token


def tags_of(event: Envelope, headers: Mapping[str, str]) -> list[str]:
    """The tags an event is also delivered under: its session's tags, which the session
    service sets on every ledger event (header ``Shoal-Tags``)."""
    return tags_from_header(headers)


class EventFanout:
    def __init__(self, subjects: Subjects) -> None:
        self._subjects = subjects

    def deliveries(self, event: Envelope, headers: Mapping[str, str]) -> list[Delivery]:
        """Every delivery of ``event``: its owner's stream, then one per tag of its session
        (``<prefix>.deliver.tag.<owner>.<tag>``: a tag is followed within one owner)."""
        if not event.id:
            raise BadRequest("event has no id")
        if event.owner is None or not is_token(event.owner):
            raise BadRequest("event has no owner usable as a subject token")
        out = [Delivery("user", self._subjects.deliver_user(event.owner), f"u:{event.id}")]
        for tag in tags_of(event, headers):
            if not TAG_RE.match(tag):
                raise BadRequest("event tag is not usable as a subject token")
            subject = self._subjects.deliver_tag(event.owner, tag)
            out.append(Delivery("tag", subject, f"t:{tag}:{event.id}"))
        return out

    def prepare(self, data: bytes, headers: Mapping[str, str]) -> list[Fanout]:
        """What re-publishing each event of one ledger message (a commit, or an older single
        event), byte for byte, to each delivery takes; one :class:`Fanout` per event, in order.

        Raises :class:`BadRequest` for a message that can never be delivered (terminate it).
        """
        forward = {k: v for k, v in headers.items() if k == TRACEPARENT_HEADER}
        return [
            Fanout(self.deliveries(decode(raw), headers), raw, forward)
            for raw in ledger_raw_events(data)
        ]
