"""Durable timers: the :class:`Scheduler` seam and its PostgreSQL-backed implementation.

A timer is ``(id, fire_at, subject, payload)``: at ``fire_at`` the payload is published to
``subject`` with JetStream, ``Nats-Msg-Id = <id>:<fire_at in ms>``, so a timer fired twice
(a replica died between the publish and the delete) is stored once by the target stream.
The W3C trace context current when the timer was armed is stored with it; the firing is a
``scheduler.fire`` span in that trace, and the published message carries its ``traceparent``.
Time comes from the injected :class:`~shoal.common.clock.Clock`. No transport here.

Example::

    await scheduler.set_timer("ses_1-idle", fire_at, subjects.session_command("ses_1"), raw)
    await scheduler.cancel("ses_1-idle")
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from shoal.common.clock import Clock
from shoal.common.errors import BadRequest, ShoalError
from shoal.common.messaging import Subjects, is_token
from shoal.common.observability import inject_trace, start_span
from shoal.scheduler.store import Timer, TimerStore

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 1024 * 1024
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_.\-:]+$")  # no wildcards, no whitespace


class Scheduler(Protocol):
    """Durable timers: what sessions (idle, question expiry, watchdog) and jobs build on."""

    async def set_timer(
        self, timer_id: str, fire_at: datetime, subject: str, payload: bytes
    ) -> None:
        """Arm (or re-arm, replacing) timer ``timer_id`` to publish ``payload`` at ``fire_at``."""
        ...

    async def cancel(self, timer_id: str) -> bool:
        """Disarm ``timer_id``; ``False`` if there was no such pending timer."""
        ...


class TimerPublisher(Protocol):
    async def publish(
        self, subject: str, payload: bytes, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish with JetStream (``headers`` added to the message's, e.g. ``traceparent``)
        and wait for the ack; raise a :class:`ShoalError` if not."""
        ...


def fire_msg_id(timer_id: str, fire_at: datetime) -> str:
    """The dedup id of one firing: the same timer at the same time is one message."""
    return f"{timer_id}:{round(fire_at.timestamp() * 1000)}"


@dataclass(frozen=True, slots=True)
class FireResult:
    fired: int
    failed: int
    claimed: int


class TimerService:
    """:class:`Scheduler` over the ``timers`` table; :meth:`fire_due` is called by the loop."""

    def __init__(
        self,
        store: TimerStore,
        publisher: TimerPublisher,
        subjects: Subjects,
        clock: Clock,
        *,
        batch_size: int = 100,
        retry_max_delay: timedelta = timedelta(seconds=60),
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._subjects = subjects
        self._clock = clock
        self._batch_size = batch_size
        self._retry_max_delay = retry_max_delay.total_seconds()
        self._on_change = on_change or (lambda: None)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    def _check_subject(self, subject: str) -> None:
        tokens = subject.split(".")
        if (
            not subject.startswith(self._subjects.prefix + ".")
            or len(tokens) < 2
            or not all(_SUBJECT_TOKEN.match(t) for t in tokens)
        ):
            raise BadRequest(
                f"subject must be a literal subject under {self._subjects.prefix}.",
                detail={"subject": subject},
            )

    async def set_timer(
        self,
        timer_id: str,
        fire_at: datetime,
        subject: str,
        payload: bytes,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Arm ``timer_id``; ``trace`` (``traceparent``/``tracestate``) is the context the
        firing continues, the current one when not given."""
        if not is_token(timer_id):
            raise BadRequest("timer id must be 1..128 characters of A-Z a-z 0-9 _ -")
        if fire_at.tzinfo is None:
            raise BadRequest("fire_at must carry a time zone")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise BadRequest("payload too large")
        self._check_subject(subject)
        at = fire_at.astimezone(UTC)
        context = dict(trace) if trace is not None else inject_trace({})
        await self._store.upsert(
            Timer(
                id=timer_id,
                subject=subject,
                payload=payload,
                fire_at=at,
                due_at=at,
                created_at=self._now(),
                traceparent=context.get("traceparent"),
                tracestate=context.get("tracestate"),
            )
        )
        self._on_change()

    async def cancel(self, timer_id: str) -> bool:
        return await self._store.delete(timer_id)

    def _retry_delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(2.0 ** min(attempts, 30), self._retry_max_delay))

    async def fire_due(self) -> FireResult:
        """Publish every timer due by the clock (one batch); delete those the stream took.

        The batch's publishes are in flight together (each awaits its own ack): a burst of
        due timers costs about one round trip per batch, not one per timer.
        """
        now = self._now()
        fired = failed = 0
        async with self._store.claim_due(now, self._batch_size) as claim:
            outcomes = await asyncio.gather(
                *(self._publish(timer) for timer in claim.timers), return_exceptions=True
            )
            for timer, outcome in zip(claim.timers, outcomes, strict=True):
                if isinstance(outcome, ShoalError):
                    failed += 1
                    log.warning(
                        "timer publish failed; retrying later",
                        extra={"timer_id": timer.id, "attempts": timer.attempts + 1},
                    )
                    claim.retry(timer, now + self._retry_delay(timer.attempts), outcome.message)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    fired += 1
                    claim.fired(timer)
            claimed = len(claim.timers)
        return FireResult(fired=fired, failed=failed, claimed=claimed)

    async def _publish(self, timer: Timer) -> None:
        # Each firing runs in its own task (gather), so its span is the current one only there.
        with start_span(
            "scheduler.fire", timer.trace_headers, **{"shoal.timer_id": timer.id}
        ) as span:
            try:
                await self._publisher.publish(
                    timer.subject,
                    timer.payload,
                    fire_msg_id(timer.id, timer.fire_at),
                    inject_trace({}),
                )
            except ShoalError as exc:
                span.set_attribute("error.type", exc.code)
                raise
