"""Settings of the scheduler service (``SHOAL_*`` environment variables)."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

from pydantic import Field, SecretStr, model_validator

from shoal.common.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    service_name: str = "scheduler"
    # How often the loop looks for due timers when nothing wakes it (SHOAL_SCHEDULER_POLL_INTERVAL);
    # the latest a timer fires, plus the publish.
    scheduler_poll_interval: timedelta = timedelta(seconds=1)
    # Timers claimed per transaction; a full batch is followed by another at once.
    scheduler_batch_size: int = Field(default=100, ge=1, le=10_000)
    scheduler_publish_timeout: timedelta = timedelta(seconds=2)
    # A timer whose publish fails is retried after 1, 2, 4 ... s, at most this long apart.
    scheduler_retry_max_delay: timedelta = timedelta(seconds=60)
    # Jobs RPCs answered at once per process (queue-group members; each holds a DB connection
    # while it runs, so keep it at or below the pool: SHOAL_DATABASE_POOL_SIZE + 10 overflow).
    scheduler_rpc_concurrency: int = Field(default=8, ge=1, le=64)
    # Jobs: how often expired leases are redriven (and due schedules and webhooks looked for).
    scheduler_sweep_interval: timedelta = timedelta(seconds=1)
    # A job's input (and a worker's output) as JSON is at most this many bytes.
    scheduler_job_max_input_bytes: int = Field(default=256 * 1024, ge=1024, le=8 * 1024 * 1024)
    # A failed attempt is retried after base * 2^(failures-1), at most backoff_max.
    scheduler_job_backoff_base: timedelta = timedelta(seconds=1)
    scheduler_job_backoff_max: timedelta = timedelta(minutes=5)
    # A schedule with catch_up "skip" fires no firing later than this (the scheduler was down).
    scheduler_schedule_skip_grace: timedelta = timedelta(seconds=30)
    # Webhooks. Signing secrets are stored under this AES-256 key (base64 of 32 bytes); unset,
    # a fixed development key is used, which production refuses.
    scheduler_webhook_secrets_key: SecretStr | None = None
    # Callbacks to private, loopback or link-local addresses: unset = allowed only when
    # SHOAL_ENVIRONMENT=development (shoal up), refused otherwise (SSRF guard).
    scheduler_webhooks_allow_private: bool | None = None
    scheduler_webhook_timeout: timedelta = timedelta(seconds=10)
    scheduler_webhook_max_deliveries: int = Field(default=8, ge=1, le=50)
    scheduler_webhook_backoff_base: timedelta = timedelta(seconds=1)
    scheduler_webhook_backoff_max: timedelta = timedelta(hours=1)
    # After a rotation, callbacks are signed with the old secret too (a second v1) this long.
    scheduler_webhook_rotation_overlap: timedelta = timedelta(hours=24)

    @model_validator(mode="after")
    def _webhook_key_in_production(self) -> SchedulerSettings:
        if self.environment == "production" and self.scheduler_webhook_secrets_key is None:
            raise ValueError("set SHOAL_SCHEDULER_WEBHOOK_SECRETS_KEY (base64 of 32 bytes)")
        return self

    @property
    def webhooks_allow_private(self) -> bool:
        if self.scheduler_webhooks_allow_private is not None:
            return self.scheduler_webhooks_allow_private
        return self.environment == "development"

    def webhook_secrets_key(self) -> bytes:
        """The AES-256 key of signing secrets (a fixed one outside production when unset)."""
        if self.scheduler_webhook_secrets_key is None:
            return hashlib.sha256(b"shoal development webhook secrets key").digest()
        key = base64.b64decode(self.scheduler_webhook_secrets_key.get_secret_value())
        if len(key) != 32:
            raise ValueError("SHOAL_SCHEDULER_WEBHOOK_SECRETS_KEY must be base64 of 32 bytes")
        return key
