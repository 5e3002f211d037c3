"""ContinuousPull against a real nats-server: every message once, in order, with few requests."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from shoal.common.messaging.pull import ContinuousPull


async def _stream(js: JetStreamContext, ack_wait: float = 30.0) -> tuple[str, str]:
    name = f"PULL_{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await js.add_consumer(
        name, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait)
    )
    return name, name.lower()


async def _drain(puller: ContinuousPull, count: int, within: float) -> list[Msg]:
    got: list[Msg] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        for msg in await puller.take(0.5):
            got.append(msg)
            await msg.ack()
    return got


async def test_a_steady_flow_arrives_once_in_order_with_one_request_per_half_batch(
    nc: NATS, js: JetStreamContext
) -> None:
    stream, prefix = await _stream(js)
    puller = ContinuousPull(nc, stream=stream, consumer="c", batch=50, expires=5.0)
    await puller.start()
    try:
        for i in range(1_000):
            await js.publish(f"{prefix}.x", str(i).encode())
        got = await _drain(puller, 1_000, within=20)
    finally:
        await puller.stop()
    assert [int(m.data) for m in got] == list(range(1_000))
    # nats-py's fetch would have sent at least one request per batch it returned; topping up
    # at half a batch costs about 1,000 / 25 requests.
    assert puller.requests <= 1_000 // 25 + 2


async def test_a_quiet_consumer_keeps_one_request_open_and_gets_a_late_message(
    nc: NATS, js: JetStreamContext
) -> None:
    stream, prefix = await _stream(js)
    puller = ContinuousPull(nc, stream=stream, consumer="c", batch=10, expires=0.3)
    await puller.start()
    try:
        assert await puller.take(1.0) == []  # three expiries, each followed by a new request
        assert puller.requests >= 3
        sent = asyncio.get_running_loop().time()
        await js.publish(f"{prefix}.x", b"late")
        got = await _drain(puller, 1, within=2)
        waited = asyncio.get_running_loop().time() - sent
    finally:
        await puller.stop()
    assert [m.data for m in got] == [b"late"]
    assert waited < 0.3  # taken by the open request, not by the next one


async def test_a_deleted_consumer_does_not_make_it_spin(nc: NATS, js: JetStreamContext) -> None:
    stream, _ = await _stream(js)
    await js.delete_consumer(stream, "c")
    puller = ContinuousPull(nc, stream=stream, consumer="c", batch=10, expires=5.0)
    await puller.start()
    try:
        for _ in range(3):
            assert await puller.take(0.2) == []
    finally:
        await puller.stop()
    assert puller.requests <= 3  # one per take at most, however fast the refusals come


async def test_messages_it_was_given_but_never_took_come_back_at_once_after_a_stop(
    nc: NATS, js: JetStreamContext
) -> None:
    stream, prefix = await _stream(js, ack_wait=30.0)  # handed back, not left to time out
    first = ContinuousPull(nc, stream=stream, consumer="c", batch=10, expires=5.0)
    await first.start()
    for i in range(5):
        await js.publish(f"{prefix}.x", str(i).encode())
    taken: list[Msg] = []
    while len(taken) < 2:
        taken += await first.take(2.0, limit=2 - len(taken))
    for msg in taken:
        await msg.ack()
    await asyncio.sleep(0.3)  # the other three reach it (pulled ahead, never taken)
    await first.stop()
    second = ContinuousPull(nc, stream=stream, consumer="c", batch=10, expires=5.0)
    await second.start()
    try:
        rest = await _drain(second, 3, within=5)
    finally:
        await second.stop()
    assert [int(m.data) for m in taken] == [0, 1]
    assert sorted(int(m.data) for m in rest) == [2, 3, 4]


async def test_linger_waits_for_a_fuller_batch_but_no_longer_than_asked(
    nc: NATS, js: JetStreamContext
) -> None:
    stream, prefix = await _stream(js)
    puller = ContinuousPull(nc, stream=stream, consumer="c", batch=10, expires=5.0)
    await puller.start()
    try:

        async def trickle() -> None:
            for n in range(4):
                await js.publish(f"{prefix}.x", str(n).encode())
                await asyncio.sleep(0.02)

        publishing = asyncio.create_task(trickle())
        first = await puller.take(2.0, linger=0.5)  # the first, then the three 20 ms apart
        await publishing
        assert [m.data for m in first] == [b"0", b"1", b"2", b"3"]
        for msg in first:
            await msg.ack()

        await js.publish(f"{prefix}.x", b"4")
        started = time.monotonic()
        alone = await puller.take(2.0, linger=0.1)  # nothing follows: back after the linger
        assert [m.data for m in alone] == [b"4"]
        assert 0.09 <= time.monotonic() - started < 1.0
        await alone[0].ack()

        for n in range(5, 8):
            await js.publish(f"{prefix}.x", str(n).encode())
        await asyncio.sleep(0.2)  # all three in hand: a full limit returns at once
        started = time.monotonic()
        full = await puller.take(2.0, limit=3, linger=5.0)
        assert [m.data for m in full] == [b"5", b"6", b"7"]
        assert time.monotonic() - started < 1.0
    finally:
        await puller.stop()
