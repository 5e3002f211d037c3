"""Per-key serial lanes: items of one key run one at a time in arrival order, keys run concurrently.

A lane (one asyncio task and queue) is created when its key first gets an item and retired
after ``idle`` seconds without one — or at once when ``dormant(context)`` says its key has
nothing more to do (a hibernated session) — taking its per-key context (the cached session
state) with it. This is what lets one replica apply many sessions' commands at once while
each session's commands apply strictly in stream order (DESIGN §3.4).

Example::

    lanes = Lanes(process, context=lambda key: {}, idle=30.0)
    lanes.submit("ses_1", item)        # process(ctx_of_ses_1, item) runs after earlier ses_1 items
    await lanes.drain()                # finish everything queued, then stop
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Ctx = TypeVar("Ctx")


class _Stop:
    """Queued by :meth:`Lanes.drain` behind a lane's last item: finish up to here, then exit."""


_STOP = _Stop()


class _Lane(Generic[Ctx, Item]):
    def __init__(self, context: Ctx) -> None:
        self.context = context
        self.queue: asyncio.Queue[Item | _Stop] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class Lanes(Generic[Ctx, Item]):
    def __init__(
        self,
        process: Callable[[Ctx, Item], Awaitable[None]],
        *,
        context: Callable[[str], Ctx],
        idle: float,
        dormant: Callable[[Ctx], bool] = lambda ctx: False,
    ) -> None:
        self._process = process
        self._new_context = context
        self._idle = idle
        self._dormant = dormant
        self._lanes: dict[str, _Lane[Ctx, Item]] = {}
        self._closing = False

    def __len__(self) -> int:
        return len(self._lanes)

    def submit(self, key: str, item: Item) -> None:
        """Queue ``item`` behind every earlier item of ``key``."""
        if self._closing:
            raise RuntimeError("lanes are draining")
        lane = self._lanes.get(key)
        if lane is None:
            lane = _Lane[Ctx, Item](self._new_context(key))
            self._lanes[key] = lane
            lane.task = asyncio.create_task(self._run(key, lane), name=f"lane:{key}")
        lane.queue.put_nowait(item)

    async def _run(self, key: str, lane: _Lane[Ctx, Item]) -> None:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(lane.queue.get(), self._idle)
                except TimeoutError:
                    # No await between this check and the removal below: submit() cannot
                    # slip an item into a lane that is going away.
                    if lane.queue.empty():
                        break
                    continue
                if isinstance(item, _Stop):
                    break
                try:
                    await self._process(lane.context, item)
                except Exception:  # process() handles its own errors; keep the lane alive
                    log.exception("lane %s: item failed", key)
                # As with the idle timeout, no await between the check and the removal.
                if lane.queue.empty() and self._dormant(lane.context):
                    break
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    async def drain(self) -> None:
        """Stop taking items, let every lane finish what it holds, then return."""
        self._closing = True
        tasks = []
        for lane in list(self._lanes.values()):
            lane.queue.put_nowait(_STOP)
            if lane.task is not None:
                tasks.append(lane.task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self) -> list[Item]:
        """Stop every lane now and return the items that never started. Items not finished
        are the caller's to recover (a command left unacked comes back to the partition's
        next consumer)."""
        self._closing = True
        lanes = list(self._lanes.values())
        tasks = [lane.task for lane in lanes if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        left: list[Item] = []
        for lane in lanes:
            while not lane.queue.empty():
                item = lane.queue.get_nowait()
                if not isinstance(item, _Stop):
                    left.append(item)
        return left
