"""The consumer-lag sampler against a real nats-server: num_pending reaches /metrics."""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig
from prometheus_client import REGISTRY

from shoal.eventbus.metrics import sample_consumer_lag, stop_sampling


async def test_the_consumer_lag_is_sampled_into_a_gauge(
    js: JetStreamContext, subject_prefix: str
) -> None:
    stream = f"LAG_{subject_prefix}".replace(".", "_").replace("-", "_")
    subject = f"{subject_prefix}.lag"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    try:
        await js.add_consumer(stream, ConsumerConfig(durable_name="lagging"))
        for n in range(3):
            await js.publish(subject, str(n).encode())
        sampling = asyncio.create_task(sample_consumer_lag(js, stream, "lagging", 0.05))
        try:
            for _ in range(200):  # the sampler has no event to await: poll its gauge, 10 s
                if REGISTRY.get_sample_value("shoal_eventbus_consumer_pending") == 3:
                    break
                await asyncio.sleep(0.05)
            assert REGISTRY.get_sample_value("shoal_eventbus_consumer_pending") == 3
        finally:
            await stop_sampling(sampling)
    finally:
        await js.delete_stream(stream)
