"""Settings of the eventbus service (``SHOAL_*`` environment variables)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field

from shoal.common.settings import CommonSettings


class EventbusSettings(CommonSettings):
    service_name: str = "eventbus"
    # Durable consumer on SESSION_EVT (SHOAL_EVENTBUS_CONSUMER). Replicas sharing the name share
    # the work; a different name is an independent fan-out.
    eventbus_consumer: str = Field(default="eventbus", pattern=r"^[A-Za-z0-9_-]+$")
    # Where a *new* consumer starts (SHOAL_EVENTBUS_START): "all" replays the ledger so no event
    # is missed; "new" suits adding an eventbus to a fleet with a long ledger already.
    eventbus_start: Literal["all", "new"] = "all"
    eventbus_batch_size: int = Field(default=100, ge=1, le=1000)
    # Once an event arrived, wait this long for more to fill the batch (SHOAL_EVENTBUS_LINGER):
    # a batch costs one round of publishes and acks whatever its size. 0 = take what is there.
    eventbus_linger: timedelta = timedelta(milliseconds=5)
    # How long one pull waits for events; also the longest a graceful stop waits on a pull.
    eventbus_fetch_timeout: timedelta = timedelta(seconds=1)
    eventbus_ack_wait: timedelta = timedelta(seconds=30)
    # Redelivery delay after a failed publish to DELIVER (the server or stream is unhappy).
    eventbus_retry_delay: timedelta = timedelta(seconds=1)
    eventbus_publish_timeout: timedelta = timedelta(seconds=5)
