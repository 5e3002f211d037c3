"""Prometheus metrics of the scheduler (registered once per process)."""

from prometheus_client import Counter

FIRED = Counter("shoal_scheduler_timers_fired_total", "Timers published to their subject")
PUBLISH_FAILURES = Counter(
    "shoal_scheduler_timer_publish_failures_total",
    "Timer publishes that failed and were rescheduled with backoff",
)
