"""The streams and KV buckets of the fleet, declared once, and their idempotent provisioning.

Every service calls :func:`provision` at start-up. It creates what is missing, updates what
an older release declared differently (keeping the data), and refuses only a change that
would silently move data — a different partition count on ``SESSION_CMD``.

Example::

    js = nc.jetstream()
    await provision(js, Catalog.from_settings(settings))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from shoal.common.errors import Conflict
from shoal.common.messaging.subjects import Subjects
from shoal.common.settings import CommonSettings

log = logging.getLogger(__name__)

KV_VALUE_LIMIT = 1024 * 1024  # the hot state must stay below the server's 1 MiB message limit
COMMAND_DEDUP_WINDOW = timedelta(minutes=2)
# Re-published events must land inside this window to be dropped as duplicates (DESIGN §3.3).
EVENT_DEDUP_WINDOW = timedelta(minutes=10)
# The longest a WebSocket ticket can live: the bucket forgets it after that whatever its expiry.
WS_TICKET_MAX_AGE = timedelta(minutes=5)


@dataclass(frozen=True)
class Catalog:
    subjects: Subjects
    partitions: int
    replicas: int = 1
    event_retention: timedelta = timedelta(days=30)
    streams: list[StreamConfig] = field(default_factory=list)
    buckets: list[KeyValueConfig] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Catalog:
        s = Subjects(settings.subject_prefix)
        p = settings.session_partitions
        r = settings.stream_replicas
        retention = settings.event_retention.total_seconds()
        streams = [
            StreamConfig(
                name=s.session_cmd_stream,
                description="Commands to sessions, partitioned by a hash of the session id",
                subjects=[s.session_cmd_ingest],
                subject_transform=SubjectTransform(
                    src=s.session_cmd_ingest, dest=s.session_cmd_transform_dest(p)
                ),
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=r,
                duplicate_window=COMMAND_DEDUP_WINDOW.total_seconds(),
                max_msg_size=KV_VALUE_LIMIT,
                metadata={"shoal.partitions": str(p)},
            ),
            StreamConfig(
                name=s.session_evt_stream,
                description="The per-session ledger of events",
                subjects=[s.session_evt_all],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=r,
                max_age=retention,
                duplicate_window=EVENT_DEDUP_WINDOW.total_seconds(),
                max_msg_size=KV_VALUE_LIMIT,
                allow_direct=True,
                # Gateways follow live events here: only what the stream stored (a fenced or
                # duplicate publish is not re-published), with its stream sequence in headers.
                republish=RePublish(
                    src=s.session_evt_all, dest=s.session_live_all, headers_only=False
                ),
            ),
            StreamConfig(
                name=s.deliver_stream,
                description="Eventbus output: events per user and per tag",
                subjects=[s.deliver_all],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=r,
                max_age=timedelta(hours=24).total_seconds(),
                duplicate_window=EVENT_DEDUP_WINDOW.total_seconds(),
                discard=DiscardPolicy.OLD,
                allow_direct=True,
                republish=RePublish(src=s.deliver_all, dest=s.deliver_live_all, headers_only=False),
            ),
            StreamConfig(
                name=s.jobs_stream,
                description="Async jobs for workers",
                subjects=[s.jobs_all],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=r,
                duplicate_window=COMMAND_DEDUP_WINDOW.total_seconds(),
            ),
        ]
        buckets = [
            KeyValueConfig(
                bucket=s.session_state_bucket,
                description="Hot state of each session (small; history lives in the ledger)",
                history=1,
                max_value_size=KV_VALUE_LIMIT,
                storage=StorageType.FILE,
                replicas=r,
            ),
            KeyValueConfig(
                bucket=s.session_leases_bucket,
                description="Which session replica owns which partition",
                history=1,
                storage=StorageType.FILE,
                replicas=r,
                limit_marker_ttl=timedelta(seconds=60).total_seconds(),
            ),
            KeyValueConfig(
                bucket=s.session_members_bucket,
                description="Live session replicas (TTL heartbeats)",
                history=1,
                storage=StorageType.FILE,
                replicas=r,
                limit_marker_ttl=timedelta(seconds=60).total_seconds(),
            ),
            KeyValueConfig(
                bucket=s.ws_tickets_bucket,
                description="Single-use WebSocket/SSE tickets for browsers (gateway)",
                history=1,
                ttl=WS_TICKET_MAX_AGE.total_seconds(),
                storage=StorageType.MEMORY,
                replicas=r,
            ),
        ]
        return cls(s, p, r, settings.event_retention, streams, buckets)


def _as_dict(config: StreamConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _partitions_of(config: StreamConfig) -> str | None:
    return (config.metadata or {}).get("shoal.partitions")


async def provision_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    """Create ``wanted`` or bring an existing stream up to it without losing messages."""
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream %s", wanted.name)
        return
    current = info.config
    have, want = _partitions_of(current), _partitions_of(wanted)
    if have is not None and want is not None and have != want:
        raise Conflict(
            f"stream {wanted.name} was created with {have} partitions; "
            f"SHOAL_SESSION_PARTITIONS={want} would move sessions. Keep {have}.",
            detail={"stream": wanted.name, "partitions": int(have)},
        )
    # Only the fields we declare are compared; server-filled defaults are left alone.
    diff = {
        k: v
        for k, v in _as_dict(wanted).items()
        if v is not None and k != "metadata" and _as_dict(current).get(k) != v
    }
    merged_meta = {**(current.metadata or {}), **(wanted.metadata or {})}
    if merged_meta != (current.metadata or {}):
        diff["metadata"] = merged_meta
    if not diff:
        return
    if "retention" in diff:
        # The server cannot change retention in place; refusing is safer than recreating.
        raise Conflict(
            f"stream {wanted.name} has retention {current.retention}, want {wanted.retention}"
        )
    await js.update_stream(replace(current, **diff))
    log.info("updated stream %s: %s", wanted.name, sorted(diff))


async def provision_bucket(js: JetStreamContext, wanted: KeyValueConfig) -> None:
    """Create a KV bucket if missing; an existing one keeps its data and settings."""
    try:
        await js.key_value(wanted.bucket)
    except BucketNotFoundError:
        await js.create_key_value(wanted)
        log.info("created bucket %s", wanted.bucket)


async def provision(js: JetStreamContext, catalog: Catalog) -> None:
    """Idempotently create or update every stream and bucket of the catalog."""
    for stream in catalog.streams:
        await provision_stream(js, stream)
    for bucket in catalog.buckets:
        await provision_bucket(js, bucket)
