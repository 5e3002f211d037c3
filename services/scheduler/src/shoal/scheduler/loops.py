"""A background pass run every interval, or again at once while it finds a full batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

log = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 1.0


class PeriodicPass:
    """Calls ``run()`` (which returns how many items it handled) every ``interval``; when a
    pass handles ``batch`` or more, the next one starts at once."""

    def __init__(
        self, name: str, run: Callable[[], Awaitable[int]], interval: timedelta, batch: int
    ) -> None:
        self._name = name
        self._run_once = run
        self._interval = interval.total_seconds()
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"scheduler-{self._name}")

    async def stop(self) -> None:
        # A pass cancelled mid-way rolls its transaction back: the rows stay as they were.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                handled = await self._run_once()
            except Exception:
                log.warning("%s pass failed", self._name, exc_info=True)
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            if handled < self._batch:
                await asyncio.sleep(self._interval)
