"""The NATS connection every service holds: reconnects forever, logs state changes.

Example::

    nc = await connect_nats(settings, name="gateway")
    js = nc.jetstream()
"""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client as NATS

from shoal.common.errors import Unavailable
from shoal.common.settings import CommonSettings

log = logging.getLogger(__name__)


async def connect_nats(settings: CommonSettings, *, name: str) -> NATS:
    """Connect with unlimited reconnects; the first connect fails fast with :class:`Unavailable`."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    try:
        return await nats.connect(
            settings.nats_url,
            name=f"{name}@{settings.replica_name}",
            connect_timeout=settings.nats_connect_timeout.total_seconds(),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    except Exception as exc:  # nats raises several unrelated types on a failed first connect
        raise Unavailable(f"cannot connect to NATS at {settings.nats_url}: {exc}") from exc
