"""The eventbus's rules: which delivery subjects an event goes to, under which dedup ids.

No transport here: the edge (handlers.py) pulls, calls :meth:`EventFanout.fan_out`, and acks
only after every delivery publish was acknowledged by the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from shoal.common.errors import BadRequest
from shoal.common.messaging import TRACEPARENT_HEADER, Envelope, Subjects, decode, is_token


@dataclass(frozen=True, slots=True)
class Delivery:
    target: str  # "user" or "tag": the metrics label
    subject: str
    msg_id: str  # Nats-Msg-Id: a redelivered event is dropped by DELIVER's duplicate window


@dataclass(frozen=True, slots=True)
class FanoutResult:
    deliveries: list[Delivery]
    duplicates: int


class DeliveryStore(Protocol):
    async def publish(self, delivery: Delivery, body: bytes, headers: dict[str, str]) -> bool:
        """Publish and wait for the server's ack; ``True`` if it was a duplicate."""
        ...


def tags_of(event: Envelope) -> list[str]:
    """The tags an event is also delivered under.

    A seam: nothing tags events yet. When sessions carry tags (e.g. in their metadata or the
    envelope), return them here; :meth:`EventFanout.deliveries` already routes them.
    """
    return []


class EventFanout:
    def __init__(self, subjects: Subjects, store: DeliveryStore) -> None:
        self._subjects = subjects
        self._store = store

    def deliveries(self, event: Envelope) -> list[Delivery]:
        """Every delivery of ``event``: its owner's stream, then one per tag."""
        if not event.id:
            raise BadRequest("event has no id")
        if event.owner is None or not is_token(event.owner):
            raise BadRequest("event has no owner usable as a subject token")
        out = [Delivery("user", self._subjects.deliver_user(event.owner), f"u:{event.id}")]
        for tag in tags_of(event):
            if not is_token(tag):
                raise BadRequest("event tag is not usable as a subject token")
            out.append(Delivery("tag", self._subjects.deliver_tag(tag), f"t:{tag}:{event.id}"))
        return out

    async def fan_out(self, raw: bytes, headers: Mapping[str, str]) -> FanoutResult:
        """Re-publish one ledger event, byte for byte, to each of its deliveries.

        Raises :class:`BadRequest` for an event that can never be delivered (terminate it).
        """
        event = decode(raw)
        deliveries = self.deliveries(event)
        forward = {k: v for k, v in headers.items() if k == TRACEPARENT_HEADER}
        duplicates = 0
        for delivery in deliveries:
            duplicates += await self._store.publish(delivery, raw, dict(forward))
        return FanoutResult(deliveries, duplicates)
