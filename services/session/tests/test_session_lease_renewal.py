"""Lease renewal under NATS trouble, against a real nats-server: a members bucket that does not
answer does not hold the renewals up, and a renewal whose ack was lost (it was stored) is
recognised as ours instead of dropping the partition."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _session_support import running
from nats.errors import TimeoutError as NatsTimeout

from shoal.session import metrics
from shoal.session.app import SessionRuntime
from shoal.session.config import SessionSettings
from shoal.session.store import LeaseStore, LeaseValue, MemberStore


def _drops() -> float:
    return sum(
        s.value
        for m in metrics.PARTITIONS_DROPPED.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


def _epochs(runtime: SessionRuntime) -> dict[int, int]:
    return {p: lease.epoch for p, lease in runtime.worker.held().items()}


async def test_a_hanging_heartbeat_does_not_cost_the_leases(
    settings: SessionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    heartbeat = MemberStore.heartbeat
    hanging = asyncio.Event()

    async def slow_heartbeat(self: MemberStore, *args: Any, **kwargs: Any) -> None:
        if hanging.is_set():
            hanging.clear()
            # Longer than a lease is trusted (2 s TTL less the margin): the members stream
            # electing a leader while a renewal waited behind this would lose every partition.
            await asyncio.sleep(2.5)
        await heartbeat(self, *args, **kwargs)

    monkeypatch.setattr(MemberStore, "heartbeat", slow_heartbeat)
    async with running(settings) as app:
        runtime: SessionRuntime = app.state.session
        before, drops = _epochs(runtime), _drops()
        assert len(before) == settings.session_partitions
        hanging.set()
        await asyncio.sleep(3.5)
        assert _epochs(runtime) == before
        assert _drops() == drops


async def test_a_renewal_stored_but_unacknowledged_is_adopted(
    settings: SessionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = LeaseStore.write
    lose_ack, ack_lost_once = asyncio.Event(), asyncio.Event()
    lost: list[int] = []

    async def ack_lost(self: LeaseStore, partition: int, value: LeaseValue, **kw: Any) -> Any:
        revision = await write(self, partition, value, **kw)
        if lose_ack.is_set() and partition == 0 and revision is not None and value.epoch:
            lose_ack.clear()
            lost.append(revision)
            ack_lost_once.set()
            raise NatsTimeout  # stored, but the ack never came back
        return revision

    monkeypatch.setattr(LeaseStore, "write", ack_lost)
    async with running(settings) as app:
        runtime: SessionRuntime = app.state.session
        before, drops = _epochs(runtime), _drops()
        lose_ack.set()
        async with asyncio.timeout(5):
            await ack_lost_once.wait()
        await asyncio.sleep(1.0)  # several renewals after the lost ack
        assert _epochs(runtime) == before
        assert _drops() == drops
        assert runtime.worker.held()[0].revision > lost[0]  # renewing on from the adopted one
