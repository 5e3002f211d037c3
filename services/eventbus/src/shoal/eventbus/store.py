"""The eventbus's I/O: publishing to the DELIVER stream with a dedup id."""

from __future__ import annotations

from datetime import timedelta

from nats.js import JetStreamContext

from shoal.common.messaging import MSG_ID_HEADER
from shoal.eventbus.service import Delivery


class JetStreamDeliveries:
    """Publishes to DELIVER and waits for the stream's ack (``stream`` is asserted)."""

    def __init__(self, js: JetStreamContext, stream: str, timeout: timedelta) -> None:
        self._js = js
        self._stream = stream
        self._timeout = timeout.total_seconds()

    async def publish(self, delivery: Delivery, body: bytes, headers: dict[str, str]) -> bool:
        ack = await self._js.publish(
            delivery.subject,
            body,
            timeout=self._timeout,
            stream=self._stream,
            headers={**headers, MSG_ID_HEADER: delivery.msg_id},
        )
        return bool(ack.duplicate)
