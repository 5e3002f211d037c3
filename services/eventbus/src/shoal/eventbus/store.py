"""The eventbus's I/O: publishing to the DELIVER stream with a dedup id."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from nats.js import JetStreamContext
from nats.js.api import PubAck

from shoal.common.messaging import MSG_ID_HEADER
from shoal.eventbus.service import Delivery


class JetStreamDeliveries:
    """Publishes to DELIVER (``stream`` is asserted) and collects the stream's acks.

    A batch goes out back to back on one connection — so DELIVER stores it in the order given
    — and its acks are awaited together: one round trip per pulled batch instead of one per
    event (``publish_async``; its futures have no deadline of their own, so the wait is
    bounded here).
    """

    def __init__(self, js: JetStreamContext, stream: str, timeout: timedelta) -> None:
        self._js = js
        self._stream = stream
        self._timeout = timeout.total_seconds()

    async def publish_all(
        self, items: Sequence[tuple[Delivery, bytes, dict[str, str]]]
    ) -> list[bool | Exception]:
        futures: list[asyncio.Future[PubAck]] = []
        unsent: Exception | None = None
        try:
            # The client's pending-publish bound is waited for under this deadline, not with
            # publish_async's ``wait_stall``: on Python 3.11 that runs ``asyncio.wait_for``,
            # which wraps the wait in a task and yields to the loop on every publish, so the
            # client's flusher wrote each publish in a system call of its own. Without it a
            # batch is queued back to back and goes out in one write.
            async with asyncio.timeout(self._timeout):
                for delivery, body, headers in items:
                    futures.append(
                        await self._js.publish_async(
                            delivery.subject,
                            body,
                            stream=self._stream,
                            headers={**headers, MSG_ID_HEADER: delivery.msg_id},
                        )
                    )
        except Exception as exc:  # not sent: it and everything after it fail
            unsent = exc
        if futures:
            await asyncio.wait(futures, timeout=self._timeout)
        results = [_outcome(future) for future in futures]
        if unsent is not None:
            results += [unsent] * (len(items) - len(futures))
        return results


def _outcome(future: asyncio.Future[PubAck]) -> bool | Exception:
    if not future.done():
        future.cancel()  # frees its slot in the client's pending-publish bound
        return TimeoutError("DELIVER did not acknowledge in time")
    error = future.exception()
    if error is not None:
        return error if isinstance(error, Exception) else RuntimeError(repr(error))
    return bool(future.result().duplicate)
