"""GcPacer: the young generations are collected on a clock, even in a steady state."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from shoal.common.service import GcPacer


async def _churn(old: list[list[int]], rounds: int) -> int:
    """A steady state: each new tracked object replaces (frees) one made long ago, so CPython's
    allocation count stays near zero. The young generation's size at the end."""
    for i in range(rounds):
        for j in range(500):
            old[(i * 500 + j) % len(old)] = []
        await asyncio.sleep(0.005)
    return len(gc.get_objects(generation=0))


async def test_the_young_generation_stays_small_in_a_steady_state() -> None:
    old: list[list[int]] = [[] for _ in range(30_000)]
    gc.collect()  # the old lists are in the oldest generation now
    seen: list[int] = []

    def started(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(started)
    try:
        # Without the pacer the young generation grows with the churn: the count never
        # reaches the threshold, so nothing collects it.
        unpaced = await _churn(old, 40)
        assert unpaced > 15_000
        pacer = GcPacer(young=0.01, full=0.1, middle_every=3)
        pacing = asyncio.create_task(pacer.run())
        await asyncio.sleep(0.05)
        paced = await _churn(old, 40)
        pacing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pacing
    finally:
        gc.callbacks.remove(started)
    assert paced < 5_000
    assert {0, 1, 2} <= set(seen)
    assert pacer.passes[0] > pacer.passes[1] > 0
    assert pacer.passes[2] >= 1


def test_the_pacer_refuses_a_clock_that_never_ticks() -> None:
    with pytest.raises(ValueError, match="young must be > 0"):
        GcPacer(young=0, full=60)


async def test_full_passes_come_from_the_clock_only() -> None:
    generations: list[int] = []

    def started(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    def promote_many() -> list[list[int]]:
        # Survivors of young passes, as many as a quarter of the old objects: what makes
        # CPython start a full pass on its own.
        kept = [[] for _ in range(len(gc.get_objects()) // 2 + 100_000)]
        for _ in range(30):
            gc.collect(0)
            gc.collect(1)
        return kept

    before = gc.get_threshold()
    gc.callbacks.append(started)
    kept = []
    try:
        kept.append(promote_many())
        unpaced = generations.count(2)
        generations.clear()
        pacer = GcPacer(young=60, full=3600)
        pacing = asyncio.create_task(pacer.run())
        await asyncio.sleep(0)
        kept.append(promote_many())
        paced = generations.count(2)
        pacing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pacing
    finally:
        gc.callbacks.remove(started)
    assert unpaced >= 1  # CPython's own policy, the control
    assert paced == 0
    assert gc.get_threshold() == before  # the pacer gave CPython its thresholds back
