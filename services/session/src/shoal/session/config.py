"""Settings of the session service (``SHOAL_*`` environment variables).

Example::

    settings = SessionSettings(lease_ttl=timedelta(seconds=4))   # SHOAL_LEASE_TTL=4
    settings.member_id                   # this replica's name in the members bucket
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal

from pydantic import Field, model_validator

from shoal.common.settings import CommonSettings


class SessionSettings(CommonSettings):
    """The session service's knobs on top of :class:`CommonSettings`."""

    service_name: str = "session"

    # How replicas pick the partitions they want: "leases" = rendezvous hashing over the live
    # members; "static" = replica i of n wants p with p % n == i (a StatefulSet). Either way a
    # partition is pulled only under its lease, so two replicas never pull one partition.
    partition_assignment: Literal["leases", "static"] = "leases"
    replica_index: int = Field(default=0, ge=0)
    replica_count: int = Field(default=1, ge=1)

    # Lease and membership timing. A dead replica's partitions move after at most lease_ttl
    # (+ one renew_interval to notice); a live one renews every renew_interval, so it survives
    # lease_ttl / renew_interval - 1 missed renewals (event-loop stalls, a NATS reconnect)
    # before losing a lease it did not mean to lose. 4 s / 1 s: failover in ~4-5 s, and three
    # missed beats tolerated. Whole seconds: the server's per-message TTL has 1 s resolution.
    # On a NATS cluster the TTL must also outlast a leader election of the leases bucket
    # (several seconds when a server dies): the chart and `shoal up --nats-cluster` use 10 s.
    lease_ttl: timedelta = timedelta(seconds=4)
    member_ttl: timedelta = timedelta(seconds=4)
    renew_interval: timedelta = timedelta(seconds=1)

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
    # When the state snapshot is written (SHOAL_SESSION_SNAPSHOT_MODE). lazy (default): the
    # ledger is the truth (every commit carries its command); the snapshot is written after
    # the reply, coalesced per session, and recovery re-applies the ledger's tail after it.
    # eager: every command CAS-writes it before the reply (a state write on the hot path).
    # Creation, hibernation and termination write it before the reply in both modes.
    session_snapshot_mode: Literal["eager", "lazy"] = "lazy"

    # Durable timers (idle hibernation, question expiry, the prompt watchdog) are set through
    # the scheduler service. Off: no timer is set (nothing hibernates, expires or times out);
    # for deployments or tests without a scheduler, where every command would wait for one.
    session_timers: bool = True

    # The PostgreSQL projection of SESSION_EVT (history + session index). Off means this
    # replica runs no projection consumer; the messages RPC is served either way.
    projection_enabled: bool = True
    projection_batch: int = Field(default=200, ge=1, le=1000)
    # Once an event arrived, wait this long for more (SHOAL_PROJECTION_LINGER): one transaction
    # per batch, so history lags the ledger by up to this much more. 0 = take what is there.
    projection_linger: timedelta = timedelta(milliseconds=10)

    @model_validator(mode="after")
    def _index_within_count(self) -> SessionSettings:
        if self.replica_index >= self.replica_count:
            raise ValueError(
                f"SHOAL_REPLICA_INDEX={self.replica_index} must be below "
                f"SHOAL_REPLICA_COUNT={self.replica_count}"
            )
        for name in ("lease_ttl", "member_ttl"):
            ttl: timedelta = getattr(self, name)
            if ttl.total_seconds() < 1 or ttl.total_seconds() != int(ttl.total_seconds()):
                raise ValueError(f"SHOAL_{name.upper()} must be a whole number of seconds >= 1")
            if ttl < 2 * self.renew_interval:
                raise ValueError(
                    f"SHOAL_{name.upper()} must be at least twice SHOAL_RENEW_INTERVAL, or one "
                    "late renewal loses it"
                )
        return self

    @property
    def member_id(self) -> str:
        """This replica's key in the members bucket (a KV-safe form of its replica name)."""
        return re.sub(r"[^A-Za-z0-9_=-]", "_", self.replica_name)

    def owned_partitions(self) -> list[int]:
        """The partitions this replica wants under the static assignment."""
        return [
            p
            for p in range(self.session_partitions)
            if p % self.replica_count == self.replica_index
        ]
