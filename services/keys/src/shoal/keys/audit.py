"""Audit events of the keys service: what happened to keys and secrets, never a value.

Events are :class:`~shoal.common.messaging.Envelope` s published to JetStream on
``<prefix>.audit.<kind>`` and kept in the ``<PREFIX>_AUDIT`` stream, which this service
provisions at start-up. ``data`` holds ids, names, versions and counts only.

Example::

    await provision_stream(js, audit_stream_config(settings))
    await audit.emit(SECRET_PUT, owner="alice", subject="OPENAI_API_KEY", data={"version": 2})
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from shoal.common.clock import Clock
from shoal.common.messaging import Subjects
from shoal.keys.config import KeysSettings

log = logging.getLogger(__name__)

KEY_CREATED = "key.created"
KEY_ADMIN_USED = "key.admin_used"
KEY_REVOKED = "key.revoked"
SECRET_PUT = "secret.put"  # noqa: S105 - an event kind, not a secret
SECRET_READ = "secret.read"  # noqa: S105 - an event kind, not a secret
SECRET_DELETED = "secret.deleted"  # noqa: S105 - an event kind, not a secret
KEK_ROTATED = "kek.rotated"
KINDS = frozenset(
    {KEY_CREATED, KEY_ADMIN_USED, KEY_REVOKED, SECRET_PUT, SECRET_READ, SECRET_DELETED, KEK_ROTATED}
)

AUDIT_MAX_MSG_SIZE = 64 * 1024  # events are small; a large one would be a bug (or a leak)


def audit_stream_name(subjects: Subjects) -> str:
    return f"{subjects.prefix.upper()}_AUDIT"


def audit_subjects(subjects: Subjects) -> str:
    return f"{subjects.prefix}.audit.>"


def audit_stream_config(settings: KeysSettings) -> StreamConfig:
    """The AUDIT stream: every ``<prefix>.audit.>`` event, kept ``keys_audit_retention``."""
    subjects = Subjects(settings.subject_prefix)
    return StreamConfig(
        name=audit_stream_name(subjects),
        description="Audit events: keys created, admin scope used, revocations, secret access",
        subjects=[audit_subjects(subjects)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.keys_audit_retention.total_seconds(),
        max_msg_size=AUDIT_MAX_MSG_SIZE,
        duplicate_window=120.0,
        discard=DiscardPolicy.OLD,
    )


class Audit(Protocol):
    async def emit(
        self, kind: str, *, owner: str | None, subject: str, data: dict[str, Any]
    ) -> None:
        """Record one event; raises if it could not be recorded."""
        ...


class AdminUseThrottle:
    """Lets an admin key's use be audited at most once per ``interval`` (per replica).

    Bounded: entries older than the interval are dropped when the table grows past ``limit``.
    """

    def __init__(self, clock: Clock, interval: float, *, limit: int = 10_000) -> None:
        self._clock = clock
        self._interval = interval
        self._limit = limit
        self._last: dict[str, float] = {}

    def due(self, key_id: str) -> bool:
        now = self._clock.monotonic()
        last = self._last.get(key_id)
        if last is not None and now - last < self._interval:
            return False
        if len(self._last) >= self._limit:
            self._last = {k: t for k, t in self._last.items() if now - t < self._interval}
        self._last[key_id] = now
        return True


async def emit_after_commit(
    audit: Audit, kind: str, *, owner: str | None, subject: str, data: dict[str, Any]
) -> None:
    """Emit an event for a change already committed: a failure is logged, not raised.

    The change stands either way (there is no outbox yet), so the log line carries what the
    event would have — never a value.
    """
    try:
        await audit.emit(kind, owner=owner, subject=subject, data=data)
    except Exception:  # any publish failure; the caller's write is already committed
        log.error(
            "audit event not recorded",
            extra={"audit_kind": kind, "owner": owner or "", "audit_subject": subject},
            exc_info=True,
        )
