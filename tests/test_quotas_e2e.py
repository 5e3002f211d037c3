"""Per-key rate limits on the real fleet: one key floods the API and gets 429s with Retry-After,
while another owner's requests keep their latency (p50/p99 measured without and with the flood;
figures in bench/README.md)."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import httpx
import pytest

from shoal.client import ShoalClient
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

RATE = 20  # requests/s per key on this fleet (burst as deep)
CALM_RATE = 10  # the other owner's pace: half its limit
SAMPLES = 80


# Requests from 8 tasks for the given seconds; prints "started", then the statuses it got.
FLOODER = """
import asyncio, collections, json, sys, time
import httpx

async def main(base, path, key, seconds):
    statuses, retry_after = collections.Counter(), set()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        deadline = time.perf_counter() + seconds
        async def loop():
            while time.perf_counter() < deadline:
                response = await http.get(path, headers=headers)
                statuses[response.status_code] += 1
                if response.status_code == 429:
                    retry_after.add(response.headers.get("retry-after"))
        print("started", flush=True)
        await asyncio.gather(*(loop() for _ in range(8)))
    print(json.dumps({"statuses": statuses, "retry_after": sorted(retry_after, key=str)}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def paced_latencies(http: httpx.AsyncClient, path: str, key: str) -> list[float]:
    """``SAMPLES`` GETs at ``CALM_RATE``/s; each one's latency in ms (all must be 200)."""
    latencies = []
    started = time.perf_counter()
    for n in range(SAMPLES):
        # Pacing, not waiting for an event: a request every 1/CALM_RATE s.
        await asyncio.sleep(max(0.0, started + n / CALM_RATE - time.perf_counter()))
        sent = time.perf_counter()
        response = await http.get(path, headers=bearer(key))
        latencies.append((time.perf_counter() - sent) * 1000)
        assert response.status_code == 200, response.text
    return latencies


def p50_p99(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98]


async def test_a_flooding_key_is_limited_and_another_owner_keeps_its_latency(
    fleet: FleetFactory,
) -> None:
    running = await fleet(
        env={"SHOAL_RATE_LIMIT_PER_KEY": str(RATE), "SHOAL_RATE_LIMIT_BURST": str(RATE)}
    )
    async with ShoalClient(running.gateway_url, api_key=running.admin_key) as admin:
        flood_key = (await admin.create_key("flood", ["sessions"], owner="flood")).key
        calm_key = (await admin.create_key("calm", ["sessions"], owner="calm")).key
    assert flood_key
    assert calm_key
    async with httpx.AsyncClient(base_url=running.gateway_url, timeout=10) as http:
        flood_session = (await http.post("/v1/sessions", json={}, headers=bearer(flood_key))).json()
        calm_session = (await http.post("/v1/sessions", json={}, headers=bearer(calm_key))).json()
        calm_path = f"/v1/sessions/{calm_session['id']}"
        alone = await paced_latencies(http, calm_path, calm_key)

        # The flood runs in a process of its own, as another client would: it shares no event
        # loop with the measurement.
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOODER,
            running.gateway_url,
            f"/v1/sessions/{flood_session['id']}",
            flood_key,
            str(SAMPLES / CALM_RATE),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert flood.stdout is not None
            assert await flood.stdout.readline() == b"started\n"
            flood_started = time.perf_counter()
            flooded = await paced_latencies(http, calm_path, calm_key)
            report = json.loads(await flood.stdout.readline())
            flood_seconds = time.perf_counter() - flood_started
        finally:
            if flood.returncode is None:
                flood.kill()
            await flood.wait()
    statuses = {int(k): v for k, v in report["statuses"].items()}
    retry_afters = set(report["retry_after"])

    sent = sum(statuses.values())
    print(
        f"\nflood: {sent} requests in {flood_seconds:.1f} s, statuses {statuses}, "
        f"Retry-After {sorted(r or '' for r in retry_afters)}"
    )
    print("calm owner alone:   p50 {:.1f} ms, p99 {:.1f} ms".format(*p50_p99(alone)))
    print("calm owner flooded: p50 {:.1f} ms, p99 {:.1f} ms".format(*p50_p99(flooded)))
    # The flooding key was held to its rate: the rest of its requests were 429 with Retry-After.
    assert statuses.get(429, 0) > statuses.get(200, 0)
    assert statuses.get(200, 0) <= RATE + RATE * flood_seconds + 5  # burst + refill
    assert None not in retry_afters
    assert all(int(r or 0) >= 1 for r in retry_afters)
    # The other owner got every answer (200 above), none slowed past a loose bound: 2 shared
    # cores run the whole fleet, the flood and this client.
    alone_p50, _ = p50_p99(alone)
    flooded_p50, _ = p50_p99(flooded)
    assert flooded_p50 < 3 * alone_p50 + 20
