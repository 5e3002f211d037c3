"""Settings of the session service (``SHOAL_*`` environment variables).

Example::

    settings = SessionSettings(replica_index=1, replica_count=3)
    settings.owned_partitions()          # [1, 4, 7, ...] of SHOAL_SESSION_PARTITIONS
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, model_validator

from shoal.common.settings import CommonSettings


class SessionSettings(CommonSettings):
    """The session service's knobs on top of :class:`CommonSettings`."""

    service_name: str = "session"

    # Static partition assignment until leases arrive: replica i owns every partition p with
    # p % replica_count == i. The default (0 of 1) owns them all.
    replica_index: int = Field(default=0, ge=0)
    replica_count: int = Field(default=1, ge=1)

    # How long the server waits for an ack before redelivering a command. A lane that is
    # still retrying a command's I/O signals progress so this does not expire under it.
    ack_wait: timedelta = timedelta(seconds=30)
    # Unacknowledged commands per partition consumer (server side bound).
    max_ack_pending: int = Field(default=1000, ge=1)
    # Commands fetched but not yet committed across all lanes of this replica (memory bound).
    max_in_flight: int = Field(default=2000, ge=1)
    fetch_batch: int = Field(default=100, ge=1, le=1000)
    # Long-poll duration of one fetch; also how quickly a fetch loop notices shutdown.
    fetch_timeout: timedelta = timedelta(seconds=2)
    # A session lane with nothing to do for this long is retired (its cached state dropped).
    lane_idle: timedelta = timedelta(seconds=30)

    # The PostgreSQL projection of SESSION_EVT (history + session index). Off means this
    # replica runs no projection consumer; the messages RPC is served either way.
    projection_enabled: bool = True
    projection_batch: int = Field(default=200, ge=1, le=1000)

    @model_validator(mode="after")
    def _index_within_count(self) -> SessionSettings:
        if self.replica_index >= self.replica_count:
            raise ValueError(
                f"SHOAL_REPLICA_INDEX={self.replica_index} must be below "
                f"SHOAL_REPLICA_COUNT={self.replica_count}"
            )
        return self

    def owned_partitions(self) -> list[int]:
        """The partitions this replica pulls under the static assignment."""
        return [
            p
            for p in range(self.session_partitions)
            if p % self.replica_count == self.replica_index
        ]
