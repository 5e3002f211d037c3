"""Per-key lanes: order within a key, concurrency across keys, retirement, drain (pure asyncio)."""

from __future__ import annotations

import asyncio

from shoal.session.lanes import Lanes


async def test_items_of_a_key_run_in_order_and_keys_run_concurrently() -> None:
    seen: dict[str, list[int]] = {}
    release = asyncio.Event()
    all_started = asyncio.Event()
    started: set[str] = set()

    async def process(key: str, item: int) -> None:
        started.add(key)
        if len(started) == 3:
            all_started.set()
        if item == 0:
            await release.wait()  # every key's first item blocks until all keys started
        seen.setdefault(key, []).append(item)

    lanes: Lanes[str, int] = Lanes(process, context=lambda key: key, idle=5.0)
    for item in range(5):
        for key in ("a", "b", "c"):
            lanes.submit(key, item)
    await asyncio.wait_for(all_started.wait(), 5)  # all three lanes are inside item 0 at once
    release.set()
    await lanes.drain()
    assert seen == {key: [0, 1, 2, 3, 4] for key in ("a", "b", "c")}
    assert len(lanes) == 0


async def test_an_idle_lane_is_retired_and_a_new_one_starts_fresh() -> None:
    contexts: list[dict[str, int]] = []

    def new_context(key: str) -> dict[str, int]:
        contexts.append({})
        return contexts[-1]

    done = asyncio.Event()

    async def process(ctx: dict[str, int], item: int) -> None:
        ctx["n"] = ctx.get("n", 0) + 1
        done.set()

    lanes: Lanes[dict[str, int], int] = Lanes(process, context=new_context, idle=0.05)
    lanes.submit("a", 1)
    await done.wait()
    await asyncio.sleep(0.3)  # > idle: nothing to await, the lane retires on its own
    assert len(lanes) == 0
    lanes.submit("a", 2)
    await lanes.drain()
    assert contexts == [{"n": 1}, {"n": 1}]


async def test_a_failing_item_does_not_stop_its_lane() -> None:
    seen: list[int] = []

    async def process(ctx: None, item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        seen.append(item)

    lanes: Lanes[None, int] = Lanes(process, context=lambda key: None, idle=5.0)
    for item in range(3):
        lanes.submit("a", item)
    await lanes.drain()
    assert seen == [0, 2]
