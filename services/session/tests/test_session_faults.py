"""The single-writer invariants, proven on real processes under faults.

Session replicas run as OS processes (``python -m shoal.common.cli run session``) against a real
nats-server and PostgreSQL; commands go straight to JetStream; the audit reads the SESSION_EVT
ledger and the session-state bucket back. Each test prints
``sent / applied / lost / duplicated / reordered`` and the failover time.

``make test`` runs the short version of each (``-m "not chaos"``); ``make test-chaos`` the long
one (>= 300 sessions x 20 commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from _cluster import (
    Cluster,
    Load,
    all_owned_by,
    audit,
    held_unacked,
    wait_drained,
    wait_owners,
)
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shoal.common.messaging import Subjects
from shoal.devtools.embedded import EmbeddedNats, free_port
from shoal.session.ownership import assign, moved

PARTITIONS = 64
SHORT = {"sessions": 40, "commands": 10}
LONG = {"sessions": 300, "commands": 20}
SCALES = [
    pytest.param(SHORT, id="short"),
    pytest.param(LONG, id="long", marks=[pytest.mark.chaos, pytest.mark.timeout(900)]),
]

ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster(
    nats_url: str, database_url: str, subject_prefix: str, tmp_path: Path
) -> AsyncIterator[ClusterFactory]:
    made: list[Cluster] = []

    async def make(*names: str, nats_url: str = nats_url) -> Cluster:
        c = Cluster(
            nats_url=nats_url,
            database_url=database_url,
            prefix=subject_prefix,
            partitions=PARTITIONS,
            log_dir=tmp_path / f"cluster{len(made)}",
            # With durable timers on: every command also sets or cancels the session's timers
            # through a scheduler process, and the invariants must hold all the same.
            # SHOAL_SESSION_SNAPSHOT_MODE in the test's environment runs them with that mode.
            env={
                "SHOAL_SESSION_TIMERS": "true",
                "SHOAL_SESSION_SNAPSHOT_MODE": os.environ.get(
                    "SHOAL_SESSION_SNAPSHOT_MODE", "lazy"
                ),
            },
        )
        made.append(c)
        await c.start_scheduler()
        await c.start(*names)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.close()


def settled(*members: str) -> Callable[[dict[int, str]], bool]:
    """The leases match the rendezvous assignment over ``members`` exactly."""
    expected = assign(members, PARTITIONS)
    return lambda owners: owners == expected


def _sessions(n: int, tag: str) -> list[str]:
    return [f"ses_{tag}{i}" for i in range(n)]


def _assert_exact(report: Any) -> None:
    assert report.lost == 0
    assert report.duplicated == 0
    assert report.reordered == 0
    assert report.bad_seq == 0
    assert report.applied == report.sent


@pytest.mark.parametrize("scale", SCALES)
async def test_sigkill_one_of_three_then_add_a_fourth(
    scale: dict[str, int],
    cluster: ClusterFactory,
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
) -> None:
    c = await cluster("s-a", "s-b", "s-c")
    await wait_owners(js, subjects, PARTITIONS, condition=settled("s-a", "s-b", "s-c"))
    load = Load(nc, js, subjects, _sessions(scale["sessions"], "k"), scale["commands"], pace=0.02)
    sending = asyncio.create_task(load.run())
    try:
        await load.wait_sent(0.4)
        c.replicas["s-b"].kill()
        await c.replicas["s-b"].wait()
        _, failover = await wait_owners(
            js, subjects, PARTITIONS, condition=all_owned_by({"s-a", "s-c"}, PARTITIONS)
        )
        await c.start("s-d")
        await sending
    finally:
        if not sending.done():
            sending.cancel()
    drain = await wait_drained(js, subjects)
    await wait_owners(
        js,
        subjects,
        PARTITIONS,
        condition=lambda o: (
            all_owned_by({"s-a", "s-c", "s-d"}, PARTITIONS)(o) and "s-d" in o.values()
        ),
    )
    report = await audit(js, subjects, load.sent)
    print(report.line("sigkill+scale", failover=failover, drain=drain))
    _assert_exact(report)


async def test_sigkill_one_of_three_with_150_sessions_prompted_concurrently(
    cluster: ClusterFactory, nc: NATS, js: JetStreamContext, subjects: Subjects
) -> None:
    """150 sessions x 20 prompts, every session prompting at once, a replica SIGKILLed at 40%:
    the killed replica's commits whose snapshots never landed are recovered from the ledger."""
    c = await cluster("s-a", "s-b", "s-c")
    await wait_owners(js, subjects, PARTITIONS, condition=settled("s-a", "s-b", "s-c"))
    load = Load(nc, js, subjects, _sessions(150, "c"), 21, pace=0.0)  # create + 20 prompts
    sending = asyncio.create_task(load.run())
    try:
        await load.wait_sent(0.4)
        c.replicas["s-b"].kill()
        await c.replicas["s-b"].wait()
        _, failover = await wait_owners(
            js, subjects, PARTITIONS, condition=all_owned_by({"s-a", "s-c"}, PARTITIONS)
        )
        await sending
    finally:
        if not sending.done():
            sending.cancel()
    drain = await wait_drained(js, subjects)
    report = await audit(js, subjects, load.sent)
    print(report.line("sigkill 150x20", failover=failover, drain=drain))
    _assert_exact(report)


@pytest.mark.parametrize("scale", SCALES)
async def test_a_paused_replica_is_fenced_when_it_wakes(
    scale: dict[str, int],
    cluster: ClusterFactory,
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
) -> None:
    c = await cluster("s-a", "s-b")
    await wait_owners(js, subjects, PARTITIONS, condition=settled("s-a", "s-b"))
    # Five times the sessions of the other tests: commands must queue up in s-a to be in hand
    # when it stops, and one replica now drains a few hundred in well under a second.
    load = Load(
        nc, js, subjects, _sessions(5 * scale["sessions"], "z"), scale["commands"], concurrency=256
    )
    sending = asyncio.create_task(load.run())
    try:
        # SIGSTOP while it has commands in hand, half-way through their I/O: what a long GC
        # pause or a frozen VM does to a writer. Its gauge is read before the stop, and it can
        # finish them in between: the server's count of what it holds unacked decides.
        for _ in range(20):
            await c.wait_metric("s-a", "shoal_session_commands_in_flight", at_least=5, within=30.0)
            c.replicas["s-a"].pause()
            paused_at = time.monotonic()
            in_hand = await held_unacked(js, subjects, "s-a", PARTITIONS)
            if in_hand > 0:
                break
            c.replicas["s-a"].resume()
        else:
            raise AssertionError("s-a was never stopped with commands in hand")
        _, failover = await wait_owners(
            js, subjects, PARTITIONS, condition=all_owned_by({"s-b"}, PARTITIONS)
        )
        await load.wait_sent(0.6)  # s-b writes the sessions s-a was writing
        c.replicas["s-a"].resume()
        paused = time.monotonic() - paused_at
        await sending
    finally:
        c.replicas["s-a"].resume()
        if not sending.done():
            sending.cancel()
    drain = await wait_drained(js, subjects)
    await c.wait_ready("s-a", 30.0)
    fenced = await c.metric("s-a", "shoal_session_fenced_writes_total")
    by_fence = {
        f: await c.metric("s-a", f'shoal_session_fenced_writes_total{{fence="{f}"}}')
        for f in ("lease", "ledger", "state")
    }
    dropped = await c.metric("s-a", "shoal_session_partitions_dropped_total")
    report = await audit(js, subjects, load.sent)
    print(
        report.line("sigstop", failover=failover, paused=paused, drain=drain)
        + f" in_hand={in_hand:.0f} fenced_writes={fenced:.0f} "
        + " ".join(f"{k}={v:.0f}" for k, v in by_fence.items())
        + f" partitions_dropped={dropped:.0f}"
    )
    _assert_exact(report)
    assert fenced > 0, "the woken replica should have had writes fenced"


@pytest.mark.parametrize("scale", SCALES)
async def test_rolling_restart_under_load_loses_nothing(
    scale: dict[str, int],
    cluster: ClusterFactory,
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
) -> None:
    names = ["s-a", "s-b", "s-c"]
    c = await cluster(*names)
    await wait_owners(js, subjects, PARTITIONS, condition=settled(*names))
    load = Load(nc, js, subjects, _sessions(scale["sessions"], "r"), scale["commands"], pace=0.1)
    sending = asyncio.create_task(load.run())
    handoffs: list[float] = []
    try:
        await load.wait_sent(0.1)
        for name in names:
            started = time.monotonic()
            code = await c.replicas[name].stop(grace=20.0)  # SIGTERM: drain, release
            assert code == 0, c.replicas[name].log_tail(30)
            handoffs.append(time.monotonic() - started)
            await c.start(f"{name}-2")
        await sending
    finally:
        if not sending.done():
            sending.cancel()
    drain = await wait_drained(js, subjects)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.all_replied.wait(), 30.0)
    report = await audit(js, subjects, load.sent)
    print(
        report.line("rolling", slowest_sigterm=max(handoffs), drain=drain)
        + f" replies_ok={len(load.replies_ok)}/{load.total} errors={len(load.replies_err)}"
        + f" publish_errors={load.publish_errors}"
    )
    _assert_exact(report)
    assert load.replies_err == {}
    assert load.publish_errors == 0
    assert len(load.replies_ok) == load.total


@pytest.mark.parametrize("scale", SCALES)
async def test_nats_restart_loses_no_acknowledged_command(
    scale: dict[str, int],
    cluster: ClusterFactory,
    subjects: Subjects,
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(
        port=free_port(),
        store_dir=tmp_path / "nats-always",
        sync_always=True,
        log_file=tmp_path / "nats-always.log",
    )
    server.start()
    nc2: NATS | None = None
    try:
        c = await cluster("s-a", "s-b", nats_url=server.url)
        nc2 = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js2 = nc2.jetstream()
        await wait_owners(
            js2, subjects, PARTITIONS, condition=all_owned_by({"s-a", "s-b"}, PARTITIONS)
        )
        load = Load(
            nc2, js2, subjects, _sessions(scale["sessions"], "n"), scale["commands"], pace=0.02
        )
        sending = asyncio.create_task(load.run())
        try:
            await load.wait_sent(0.4)
            down_at = time.monotonic()
            server.kill()  # SIGKILL: only what was fsynced before its ack survives
            await asyncio.to_thread(server.start)  # the load keeps trying meanwhile
            await sending
            recovered = time.monotonic() - down_at
        finally:
            if not sending.done():
                sending.cancel()
        drain = await wait_drained(js2, subjects, within=180.0)
        report = await audit(js2, subjects, load.sent)
        print(
            report.line("nats-restart", outage_until_all_sent=recovered, drain=drain)
            + f" publish_retries={load.publish_errors}"
        )
        _assert_exact(report)
        assert all(p.running for p in c.replicas.values())
    finally:
        if nc2 is not None:
            await nc2.close()
        server.stop()


async def test_scaling_two_to_three_moves_about_a_third(
    cluster: ClusterFactory, nc: NATS, js: JetStreamContext, subjects: Subjects
) -> None:
    c = await cluster("s-a", "s-b")
    before, _ = await wait_owners(js, subjects, PARTITIONS, condition=settled("s-a", "s-b"))
    load = Load(nc, js, subjects, _sessions(40, "s"), 10, pace=0.05)
    sending = asyncio.create_task(load.run())
    try:
        await load.wait_sent(0.3)
        expected = assign(["s-a", "s-b", "s-c"], PARTITIONS)
        await c.start("s-c")
        after, settle = await wait_owners(
            js, subjects, PARTITIONS, condition=lambda o: o == expected
        )
        await sending
    finally:
        if not sending.done():
            sending.cancel()
    await wait_drained(js, subjects)
    n = moved(before, after)
    report = await audit(js, subjects, load.sent)
    print(
        report.line("scale 2->3", rebalance=settle)
        + f" moved={n}/{PARTITIONS} ({n / PARTITIONS:.0%})"
    )
    assert 0.2 * PARTITIONS <= n <= 0.5 * PARTITIONS
    assert all(after[p] == "s-c" for p in range(PARTITIONS) if before[p] != after[p])
    _assert_exact(report)
