"""Issue 4's must-holds on real processes: the fleet as OS processes (``shoal run``), real NATS.

1. >= 5,000 events, >= 20 random disconnects with resume: every seq exactly once, in order.
2. Two gateways; SIGKILL the one a client reads from while events flow: it resumes on the other.
3. Restarting the session and eventbus services closes none of 200 open sockets.
4. A client that reads nothing: the gateway's memory stays bounded; it gets 4408 + resume seq.
5. Security battery: each refusal has its documented close code; a foreign key sees nothing.

Events are appended straight to a session's ledger (what the session service would publish)
after the session is created through the API (commits of up to three events, as the session
service writes them), so the tests reach thousands of events in
seconds; the eventbus fans them out like any other. ``-m chaos`` runs the long versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalClient
from shoal.common.messaging import (
    LEDGER_SEQ_HEADER,
    MSG_ID_HEADER,
    Envelope,
    Subjects,
    encode_commit,
)
from shoal.devtools.embedded import free_port
from shoal.devtools.supervisor import Fleet, FleetFactory, ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Ledger:
    """Appends events to one session's ledger, in seq order, as the session service does."""

    def __init__(self, nc: NATS, prefix: str, session_id: str, owner: str, last_seq: int) -> None:
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self.session_id = session_id
        self.owner = owner
        self.seq = last_seq

    async def append(self, count: int, *, size: int = 0, pace: float = 0.0) -> None:
        """``count`` events (``size`` bytes of padding each), ``pace`` s between batches of 50;
        written as the session service writes them: commits of up to three events."""
        pad = "p" * size
        commit: list[Envelope] = []
        for n in range(count):
            self.seq += 1
            commit.append(
                Envelope(
                    id=f"{self.session_id}:direct:{self.seq}",
                    type="message.delta.stored",
                    source="test",
                    time="2025-01-01T00:00:00Z",
                    subject=self.session_id,
                    owner=self.owner,
                    seq=self.seq,
                    data={"n": n, "pad": pad},
                )
            )
            if len(commit) == 3 or n == count - 1:
                await self.js.publish(
                    self.subjects.session_commit(self.session_id),
                    encode_commit(commit),
                    stream=self.subjects.session_evt_stream,
                    headers={MSG_ID_HEADER: commit[0].id, LEDGER_SEQ_HEADER: str(self.seq)},
                )
                commit = []
            if pace and n % 50 == 49:
                await asyncio.sleep(pace)


async def _session_ledger(client: ShoalClient, nc: NATS, prefix: str) -> tuple[str, Ledger]:
    session = await client.create_session({"purpose": "streaming"})
    # Let the session's own first events land before appending after them.
    async with asyncio.timeout(10):
        while (current := await client.get_session(session.id)).last_seq < 1:  # noqa: ASYNC110 - polling the HTTP API
            await asyncio.sleep(0.05)
    return session.id, Ledger(nc, prefix, session.id, current.owner, current.last_seq)


async def _extra_gateway(running: Fleet, name: str, log_dir: Path) -> ServiceProcess:
    """Another ``shoal run gateway`` on the fleet's NATS, on its own port."""
    base = running["gateway"]
    port = free_port()
    spec = dataclasses.replace(
        base.spec,
        name=name,
        http_port=port,
        env={**base.spec.env, "SHOAL_HTTP_PORT": str(port), "SHOAL_INSTANCE_ID": name},
    )
    proc = ServiceProcess(spec, log_dir=log_dir, death_signal=signal.SIGKILL)
    await proc.start()
    async with httpx.AsyncClient(timeout=2) as http, asyncio.timeout(60):
        while not await proc.probe(http):
            assert proc.running, proc.log_tail()
            await asyncio.sleep(0.1)
    return proc


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- 1. thousands of events, random disconnects, exactly once in order --
async def _disconnect_and_resume(
    fleet: FleetFactory, nc: NATS, subject_prefix: str, total: int, disconnects: int
) -> None:
    running = await fleet()
    rng = random.Random(4)  # noqa: S311 - reproducible disconnect points
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session_id, ledger = await _session_ledger(client, nc, subject_prefix)
        total += ledger.seq
        points = sorted(rng.sample(range(ledger.seq + 1, total), disconnects))
        writer = asyncio.create_task(ledger.append(total - ledger.seq, pace=0.005))
        seen: list[int] = []
        clean = abrupt = 0
        started = time.perf_counter()
        events = None
        try:
            async with asyncio.timeout(240):
                while not seen or seen[-1] < total:
                    if events is None:
                        events = client.connect_session(session_id, since=seen[-1] if seen else 0)
                        await events.__aenter__()
                    event = await anext(events)
                    seen.append(event.seq)
                    if points and event.seq >= points[0]:
                        points.pop(0)
                        if rng.random() < 0.5:
                            # The connection drops (no close frame): the stream reconnects
                            # and resumes from its last seq on its own.
                            events.drop()
                            abrupt += 1
                        else:  # the client goes away and comes back later with since
                            await events.aclose()
                            events = None
                            clean += 1
            await writer
        finally:
            writer.cancel()
            if events is not None:
                await events.aclose()
        reconnects = clean + abrupt
    elapsed = time.perf_counter() - started
    expected = list(range(1, total + 1))
    lost = len(set(expected) - set(seen))
    duplicated = len(seen) - len(set(seen))
    print(
        f"\nresume: events={total} reconnects={reconnects} (abrupt {abrupt}) "
        f"lost={lost} duplicated={duplicated} in {elapsed:.1f}s"
    )
    assert seen == expected
    assert reconnects >= disconnects


async def test_disconnects_at_random_points_lose_nothing(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    await _disconnect_and_resume(fleet, nc, subject_prefix, total=5_000, disconnects=20)


@pytest.mark.chaos
@pytest.mark.timeout(900)
async def test_disconnects_at_random_points_lose_nothing_long(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    await _disconnect_and_resume(fleet, nc, subject_prefix, total=50_000, disconnects=200)


# -- 2. a gateway dies under a reading client --
async def test_client_resumes_on_another_gateway_after_sigkill(
    fleet: FleetFactory, nc: NATS, subject_prefix: str, tmp_path: Path
) -> None:
    running = await fleet()
    second = await _extra_gateway(running, "gateway-b", tmp_path / "gateway-b")
    try:
        async with ShoalClient(running.gateway_url, running.admin_key) as client:
            session_id, ledger = await _session_ledger(client, nc, subject_prefix)
            total = ledger.seq + 3_000
            writer = asyncio.create_task(ledger.append(3_000, pace=0.01))
            seen: list[int] = []
            killed_at = 0
            events = client.connect_session(session_id, fallback_urls=[second.url])
            async with events, asyncio.timeout(120):
                async for event in events:
                    seen.append(event.seq)
                    if not killed_at and event.seq >= total - 2_000:
                        running["gateway"].kill()  # SIGKILL while events flow
                        killed_at = event.seq
                    if event.seq >= total:
                        break
            await writer
    finally:
        await second.stop()
    lost = len(set(range(1, total + 1)) - set(seen))
    duplicated = len(seen) - len(set(seen))
    print(
        f"\nfailover: events={total} killed gateway at seq {killed_at}, "
        f"reconnects={events.reconnects} lost={lost} duplicated={duplicated}"
    )
    assert killed_at
    assert events.reconnects >= 1
    assert seen == list(range(1, total + 1))


# -- 3. backends restart under 200 open sockets --
async def test_backend_restarts_close_no_socket(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    running = await fleet()
    key = running.admin_key
    async with ShoalClient(running.gateway_url, key) as client:
        session = await client.create_session({"purpose": "restarts"})
        ws_base = running.gateway_url.replace("http://", "ws://")
        headers = {"Authorization": f"Bearer {key}"}
        urls = [f"{ws_base}/v1/sessions/{session.id}/ws"] * 100 + [f"{ws_base}/v1/events/ws"] * 100
        conns: list[ClientConnection] = []
        for url in urls:
            conns.append(await connect(url, additional_headers=headers, compression=None))
        closed: list[int] = []
        prompts_seen = [0] * len(conns)

        async def read(index: int, conn: ClientConnection) -> None:
            try:
                async for raw in conn:
                    frame = json.loads(raw)
                    if frame.get("type") == "event" and frame["event"]["type"] == "prompt.queued":
                        prompts_seen[index] += 1
            except ConnectionClosed as exc:
                closed.append(exc.rcvd.code if exc.rcvd else 1006)
            else:
                closed.append(1000)

        readers = [asyncio.create_task(read(i, c)) for i, c in enumerate(conns)]
        try:
            for name in ("session", "eventbus"):
                started = time.perf_counter()
                await running[name].stop()
                await running[name].start()
                await running.wait_ready(60)
                print(f"\nrestarted {name} in {time.perf_counter() - started:.1f}s")
            receipt = await client.submit_prompt(session.id, "after the restarts")
            async with asyncio.timeout(30):
                while min(prompts_seen) < 1:  # noqa: ASYNC110 - 200 readers, one condition
                    await asyncio.sleep(0.05)
            assert receipt.prompt_id
        finally:
            for conn in conns:
                await conn.close()
            await asyncio.gather(*readers, return_exceptions=True)
    early = [c for c in closed if c != 1000]
    print(f"restarts: sockets={len(conns)} closed by the gateway={len(early)}")
    assert early == []
    assert min(prompts_seen) >= 1  # every socket, session and user alike, still delivers


# -- 4. a slow client --
async def test_slow_client_bounded_memory_and_4408(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    running = await fleet(env={"SHOAL_WS_LAG_GRACE": "PT2S"})
    pid = running["gateway"].pid
    assert pid is not None
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session_id, ledger = await _session_ledger(client, nc, subject_prefix)
        url = running.gateway_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"
        baseline = _rss_kib(pid)
        # A client that reads nothing (its own and the kernel's buffers fill up first).
        stuck = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {running.admin_key}"},
            compression=None,
            max_queue=1,
            max_size=None,
        )
        peak = baseline
        size, count = 32 * 1024, 3_000  # ~96 MiB through the ledger

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_kib(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            await ledger.append(count, size=size)
            await asyncio.sleep(4)  # still not reading, past the 2 s lag grace
            frames: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed) as caught:
                await _read_slowly(stuck, frames)
        finally:
            sampler.cancel()
        close = caught.value.rcvd
        assert close is not None
        seqs = [f["seq"] for f in frames if f.get("type") == "event"]
        growth_mib = (peak - baseline) / 1024
        print(
            f"\nslow client: {count} events of {size // 1024} KiB, received {len(seqs)} before "
            f"{close.code} {close.reason!r}; gateway RSS {baseline // 1024} -> peak "
            f"{peak // 1024} MiB (+{growth_mib:.0f} MiB)"
        )
        assert close.code == 4408
        assert close.reason == f"lagging: resume from seq {seqs[-1]}"
        assert seqs == list(range(1, seqs[-1] + 1))
        assert growth_mib < 64, "the gateway buffered what the client did not read"
        # The documented recovery: resume from the seq in the reason, with nothing lost.
        resumed = []
        async with client.connect_session(session_id, since=seqs[-1]) as events:
            async with asyncio.timeout(60):
                async for event in events:
                    resumed.append(event.seq)
                    if event.seq == ledger.seq:
                        break
        assert resumed == list(range(seqs[-1] + 1, ledger.seq + 1))


async def _read_slowly(conn: ClientConnection, frames: list[dict[str, Any]]) -> None:
    async with asyncio.timeout(60):
        async for raw in conn:
            await asyncio.sleep(0.001)
            frames.append(json.loads(raw))


# -- 5. security battery --
async def _refusal(url: str, headers: dict[str, str], send: str | None = None) -> int:
    conn = await connect(url, additional_headers=headers, compression=None, max_size=None)
    try:
        if send is not None:
            await conn.send(send)
        async with asyncio.timeout(10):
            async for _ in conn:
                pass
    except ConnectionClosed:
        pass
    return conn.close_code or 1006


async def test_security_battery(fleet: FleetFactory, nc: NATS, subject_prefix: str) -> None:
    running = await fleet(env={"SHOAL_WS_RATE_LIMIT": "20", "SHOAL_WS_RATE_BURST": "40"})
    ws_base = running.gateway_url.replace("http://", "ws://")
    admin = {"Authorization": f"Bearer {running.admin_key}"}
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session_id, ledger = await _session_ledger(client, nc, subject_prefix)
        mine = await client.create_key("mine", ["sessions"], owner="admin")
        other = await client.create_key("other", ["sessions"], owner="tenant-b")
        assert mine.key
        assert other.key
        url = f"{ws_base}/v1/sessions/{session_id}/ws"
        results: dict[str, tuple[int, int]] = {}

        async def check(name: str, expected: int, got: int) -> None:
            results[name] = (expected, got)

        await check("no key", 4401, await _refusal(url, {}))
        await check("bad key", 4401, await _refusal(url, {"Authorization": "Bearer shoal_x"}))
        await check(
            "foreign origin", 4403, await _refusal(url, {**admin, "Origin": "https://evil.example"})
        )
        await check(
            "oversize frame",
            1009,
            await _refusal(url, admin, json.dumps({"type": "ping", "pad": "x" * (1 << 20)})),
        )
        flood = await connect(url, additional_headers=admin, compression=None)
        try:
            for _ in range(500):
                await flood.send('{"type":"ping"}')
        except ConnectionClosed:
            pass
        with pytest.raises(ConnectionClosed):
            await _read_slowly(flood, [])
        await check("flood", 1008, flood.close_code or 1006)
        await check(
            "other owner's key",
            4404,
            await _refusal(url, {"Authorization": f"Bearer {other.key}"}),
        )
        used = await client.create_ws_ticket()
        ticket_url = f"{url}?ticket={used.ticket}"
        first = await connect(ticket_url, compression=None)
        await first.close()
        await check("ticket reused", 4401, await _refusal(ticket_url, {}))

        # A revoked key is refused on every new socket within a second.
        await client.revoke_key(mine.id)
        revoked = {"Authorization": f"Bearer {mine.key}"}
        deadline = time.monotonic() + 3
        while (code := await _refusal(f"{url}?since=999999", revoked)) != 4401:
            assert time.monotonic() < deadline, code
            await asyncio.sleep(0.1)
        await check("revoked key", 4401, code)

        # The other owner's user stream gets nothing of this session, live or replayed.
        spy = await connect(
            f"{ws_base}/v1/events/ws",
            additional_headers={"Authorization": f"Bearer {other.key}"},
            compression=None,
        )
        await ledger.append(20)
        async with client.connect_events() as own:
            async with asyncio.timeout(20):
                async for event in own:
                    if event.subject == session_id and event.seq == ledger.seq:
                        break
        leaked: list[str] = []
        try:
            async with asyncio.timeout(1):
                async for raw in spy:
                    leaked.append(str(raw))
        except TimeoutError:
            pass
        await spy.close()
    print("\nsecurity battery (expected, got):")
    for name, (expected, got) in results.items():
        print(f"  {name:20s} {expected} {got}")
    print(f"  foreign user stream leaked {len(leaked)} frames")
    assert all(expected == got for expected, got in results.values()), results
    assert leaked == []
