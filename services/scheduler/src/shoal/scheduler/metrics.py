"""Prometheus metrics of the scheduler (registered once per process)."""

from prometheus_client import Counter

FIRED = Counter("shoal_scheduler_timers_fired_total", "Timers published to their subject")
PUBLISH_FAILURES = Counter(
    "shoal_scheduler_timer_publish_failures_total",
    "Timer publishes that failed and were rescheduled with backoff",
)
JOBS_ENDED = Counter(
    "shoal_jobs_ended_total",
    "Jobs that reached a terminal status, by kind and outcome (succeeded, cancelled, dead)",
    ["kind", "outcome"],
)
JOBS_DEAD = Counter(
    "shoal_jobs_dead_total",
    "Jobs that ended dead (attempts used up or a non-retryable failure): dead letters",
    ["kind"],
)
