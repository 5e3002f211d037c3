"""Webhooks: owners' signing secrets and the delivery of job callbacks. No transport.

A job that ends with a ``callback_url`` owes a delivery (``callback_due_at``). The pass leases
due deliveries (moves ``callback_due_at`` past the send timeout, ``SKIP LOCKED``), sends them
outside any transaction, and records each result on the job (``deliveries``): a 2xx ends it,
anything else is retried with backoff up to ``max_deliveries`` attempts. A replica that dies
mid-send leaves the lease to run out, and another replica sends again: a receiver may see a
delivery twice (``Shoal-Job-Id`` and the job's status identify it).

Example::

    secret = await webhooks.signing_secret("alice")      # {"secret": "whsec_…", …}
    sent = await webhooks.deliver_due()
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shoal.common.clock import Clock, iso
from shoal.common.messaging import dumps
from shoal.common.observability import start_span
from shoal.scheduler.job_service import job_trace
from shoal.scheduler.job_store import JobStore, callbacks_due
from shoal.scheduler.jobs import Job
from shoal.scheduler.webhook_store import SigningSecret, SigningSecretStore, WebhookSender
from shoal.scheduler.webhooks import lease_delivery, record_delivery, signature_header


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    timeout: timedelta
    max_deliveries: int
    backoff_base: timedelta
    backoff_max: timedelta
    rotation_overlap: timedelta


def _public_secret(secret: SigningSecret, now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "secret": secret.secret,
        "created_at": iso(secret.created_at.timestamp()),
    }
    if secret.previous_until is not None and secret.previous_until > now:
        out["previous_expires_at"] = iso(secret.previous_until.timestamp())
    return out


class WebhookService:
    def __init__(
        self,
        jobs: JobStore,
        secrets: SigningSecretStore,
        sender: WebhookSender,
        clock: Clock,
        policy: DeliveryPolicy,
        *,
        batch_size: int = 50,
    ) -> None:
        self._jobs = jobs
        self._secrets = secrets
        self._sender = sender
        self._clock = clock
        self._policy = policy
        self._batch_size = batch_size

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    async def signing_secret(self, owner: str) -> dict[str, Any]:
        now = self._now()
        return _public_secret(await self._secrets.get_or_create(owner, now), now)

    async def rotate(self, owner: str) -> dict[str, Any]:
        """A new secret; callbacks carry a second signature with the old one for the overlap."""
        now = self._now()
        rotated = await self._secrets.rotate(owner, now, now + self._policy.rotation_overlap)
        return _public_secret(rotated, now)

    async def deliver_due(self) -> int:
        """Send every due callback (one batch, concurrently); how many were due."""
        now = self._now()
        until = now + self._policy.timeout + timedelta(seconds=5)
        leased = await self._jobs.sweep(
            callbacks_due(now),
            limit=self._batch_size,
            rule=lambda job: lease_delivery(job, until=until),
        )
        await asyncio.gather(*(self._deliver(after) for _, after in leased))
        return len(leased)

    async def _deliver(self, job: Job) -> None:
        # Each delivery runs in its own task (gather), so its span is the current one only there;
        # the POST carries its traceparent.
        with start_span("scheduler.webhook", job_trace(job), **{"shoal.job_id": job.id}):
            await self._deliver_in_span(job)

    async def _deliver_in_span(self, job: Job) -> None:
        assert job.callback_url is not None  # only jobs with a callback owe deliveries
        now = self._now()
        secret = await self._secrets.get_or_create(job.owner, now)
        keys = [secret.secret]
        if secret.previous and secret.previous_until and secret.previous_until > now:
            keys.append(secret.previous)
        body = dumps(job.to_public())
        header = signature_header(keys, int(now.timestamp()), body)
        result = await self._sender.post(job.callback_url, body, header, job.id)
        lease = job.callback_due_at
        policy = self._policy

        def record(current: Job) -> Job | None:
            if current.callback_due_at != lease:
                return None  # the lease ran out and another replica took the delivery over
            return record_delivery(
                current,
                at=self._now(),
                status=result.status,
                error=result.error,
                max_deliveries=policy.max_deliveries,
                base=policy.backoff_base,
                cap=policy.backoff_max,
            )

        await self._jobs.update(job.id, record)
