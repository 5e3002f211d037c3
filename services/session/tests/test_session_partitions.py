"""Every partition of a replica is served, whatever the in-flight budget and batch size."""

from __future__ import annotations

import asyncio

from _session_support import Gateway, running

from shoal.common.messaging import partition
from shoal.session.config import SessionSettings


async def test_every_partition_is_served_with_the_default_budget(
    settings: SessionSettings, gateway: Gateway
) -> None:
    # 64 partitions with the default budget (2000) and batch (100): before the fix, idle long
    # polls held the budget and only 20 partitions ever pulled; the rest were never served.
    partitions = 64
    wide = settings.model_copy(update={"session_partitions": partitions})
    assert wide.max_in_flight < partitions * wide.fetch_batch
    ids: dict[int, str] = {}
    n = 0
    while len(ids) < partitions:
        candidate = f"ses_part{n}"
        ids.setdefault(partition(candidate, partitions), candidate)
        n += 1
    async with running(wide):
        replies = await asyncio.gather(*(gateway.create(sid) for sid in ids.values()))
    assert [r["ok"] for r in replies] == [True] * partitions
