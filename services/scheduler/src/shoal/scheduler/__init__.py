"""Shoal scheduler service: durable timers (cron and jobs build on them).

Example::

    from shoal.scheduler import Scheduler   # the seam: set_timer(id, fire_at, subject, payload)
"""

from shoal.scheduler.service import Scheduler, TimerService, fire_msg_id

__all__ = ["Scheduler", "TimerService", "fire_msg_id"]
