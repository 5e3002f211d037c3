"""JetStreamDeliveries against a real nats-server: one write per batch, a bounded stall."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import TooManyStalledMsgsError

from shoal.common.messaging import Catalog, Subjects, provision
from shoal.eventbus.config import EventbusSettings
from shoal.eventbus.service import Delivery
from shoal.eventbus.store import JetStreamDeliveries


def items(subject: str, count: int) -> list[tuple[Delivery, bytes, dict[str, str]]]:
    return [(Delivery("user", subject, f"{subject}:{i}"), b"{}", {}) for i in range(count)]


async def test_a_batch_goes_out_in_one_write(
    nc: NATS, nats_url: str, subject_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = EventbusSettings(
        environment="test", nats_url=nats_url, subject_prefix=subject_prefix, log_json=False
    )
    subjects = Subjects(subject_prefix)
    await provision(nc.jetstream(), Catalog.from_settings(settings))
    store = JetStreamDeliveries(nc.jetstream(), subjects.deliver_stream, timedelta(seconds=5))
    await store.publish_all(items(subjects.deliver_user("warm"), 1))  # the reply subscription
    await nc.flush()
    # Spy on the client's socket writes (its transport is nats-py's own, not public API).
    writes: list[int] = []
    transport: Any = nc._transport
    original = transport.writelines

    def counting(data: Any) -> None:
        writes.append(len(data))
        original(data)

    monkeypatch.setattr(transport, "writelines", counting)
    results = await store.publish_all(items(subjects.deliver_user("alice"), 50))
    assert results == [False] * 50
    assert len(writes) == 1, f"50 publishes took {len(writes)} writes"


async def test_a_stalled_publish_fails_within_the_deadline(nc: NATS, subject_prefix: str) -> None:
    # A core subscriber that never answers holds every ack back; one publish may be pending.
    subject = f"{subject_prefix}.stall.alice"
    silent = await nc.subscribe(subject)
    await nc.flush()
    store = JetStreamDeliveries(
        nc.jetstream(publish_async_max_pending=1), "NOSTREAM", timedelta(seconds=0.3)
    )
    started = time.monotonic()
    results = await store.publish_all(items(subject, 3))
    assert time.monotonic() - started < 2.0
    assert isinstance(results[0], TimeoutError)  # sent, never acknowledged
    assert all(isinstance(r, TooManyStalledMsgsError) for r in results[1:])  # never sent
    await silent.unsubscribe()
