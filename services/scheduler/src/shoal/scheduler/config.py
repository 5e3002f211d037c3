"""Settings of the scheduler service (``SHOAL_*`` environment variables)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

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
    # Jobs: how often expired leases are redriven (and due schedules and webhooks looked for).
    scheduler_sweep_interval: timedelta = timedelta(seconds=1)
    # A job's input (and a worker's output) as JSON is at most this many bytes.
    scheduler_job_max_input_bytes: int = Field(default=256 * 1024, ge=1024, le=8 * 1024 * 1024)
    # A failed attempt is retried after base * 2^(failures-1), at most backoff_max.
    scheduler_job_backoff_base: timedelta = timedelta(seconds=1)
    scheduler_job_backoff_max: timedelta = timedelta(minutes=5)
    # A schedule with catch_up "skip" fires no firing later than this (the scheduler was down).
    scheduler_schedule_skip_grace: timedelta = timedelta(seconds=30)
