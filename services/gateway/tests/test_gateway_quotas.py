"""Per-key rate limits and per-owner caps: the rules on a manual clock, then the gateway's answers
(429 + ``Retry-After`` over HTTP, on the direct prompt route, 1013 on a socket upgrade)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeKeys, FakeSessionService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalClient
from shoal.common.clock import ManualClock
from shoal.common.errors import RateLimited, Unavailable
from shoal.gateway.quotas import KeyBuckets, OwnerCounts, SessionQuota, TokenBucket

if TYPE_CHECKING:
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
BURST = 6


# -- the rules --
def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token per 0.5 s
    clock.advance(0.25)
    assert bucket.take() == pytest.approx(0.25)  # a refused request takes nothing
    clock.advance(0.25)
    assert bucket.take() == 0.0
    clock.advance(60)
    assert [bucket.take() for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


def test_key_buckets_limit_each_key_alone_and_say_when_to_retry() -> None:
    clock = ManualClock()
    buckets = KeyBuckets(rate=0.5, burst=2, max_keys=2, clock=clock)
    buckets.charge("k1")
    buckets.charge("k1")
    with pytest.raises(RateLimited) as caught:
        buckets.charge("k1")
    assert caught.value.status == 429
    assert caught.value.detail["retry_after"] == 2  # 1 token at 0.5/s
    buckets.charge("k2")  # another key is not affected
    buckets.charge("k3")  # past max_keys: the least recently used (k1) is forgotten
    assert len(buckets) == 2
    buckets.charge("k1")  # a full bucket again


def test_owner_counts_cap_and_release() -> None:
    sockets = OwnerCounts(cap=2, what="sockets")
    sockets.claim("alice")
    sockets.claim("alice")
    with pytest.raises(RateLimited, match="at most 2"):
        sockets.claim("alice")
    sockets.claim("bob")
    sockets.release("alice")
    sockets.claim("alice")
    assert sockets.held("alice") == 2
    unlimited = OwnerCounts(cap=0, what="sockets")
    for _ in range(100):
        unlimited.claim("alice")


async def test_session_quota_counts_once_per_ttl_plus_local_creations() -> None:
    clock = ManualClock()
    counts: list[str] = []
    live = {"alice": 1}

    async def count(owner: str, cap: int) -> int:
        counts.append(owner)
        return min(live.get(owner, 0), cap)

    quota = SessionQuota(cap=3, ttl=5.0, count=count, clock=clock)
    await quota.check("alice")
    quota.created("alice")
    await quota.check("alice")
    quota.created("alice")  # 3 now, from one count
    with pytest.raises(RateLimited) as caught:
        await quota.check("alice")
    assert caught.value.detail["retry_after"] == 5
    assert counts == ["alice"]
    live["alice"] = 2  # one was terminated; seen once the cached count expires
    clock.advance(5)
    await quota.check("alice")
    assert counts == ["alice", "alice"]


# -- the gateway --
@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # A bucket that does not refill within a test: the burst is all a key gets.
    return {
        "rate_limit_per_key": 0.01,
        "rate_limit_burst": BURST,
        "max_sockets_per_owner": 2,
        "max_sessions_per_owner": 2,
    }


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        yield client


def assert_rate_limited(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == "rate_limited"
    assert body["type"] == "urn:shoal:problem:rate_limited"
    assert int(response.headers["retry-after"]) == body["retry_after"] >= 1
    return body


async def test_http_routes_and_the_prompt_route_share_one_bucket_per_key(
    keys: FakeKeys, sessions: FakeSessionService, http: httpx.AsyncClient
) -> None:
    created = (await http.post("/v1/sessions", json={}, headers=ALICE)).json()  # 1
    path = f"/v1/sessions/{created['id']}"
    for _ in range(BURST - 2):  # 2..5
        assert (await http.get(path, headers=ALICE)).status_code == 200
    prompt = await http.post(f"{path}/prompts", json={"content": "hi"}, headers=ALICE)  # 6
    assert prompt.status_code == 202
    # The bucket is empty: the direct prompt route and a FastAPI route both say so.
    body = assert_rate_limited(
        await http.post(f"{path}/prompts", json={"content": "hi"}, headers=ALICE)
    )
    assert body["instance"] == f"{path}/prompts"
    assert body["limit_per_second"] == 0.01
    assert_rate_limited(await http.get(path, headers=ALICE))
    assert_rate_limited(await http.get("/v1/sessions", headers=ALICE))
    # Another key has a bucket of its own; a bad key is refused before any bucket.
    assert (await http.get("/v1/sessions", headers=BOB)).status_code == 200
    assert (
        await http.get("/v1/sessions", headers={"Authorization": "Bearer no"})
    ).status_code == 401


async def refusal(conn: ClientConnection) -> tuple[int, str] | None:
    """Ping an opened socket: None if it answers, else its close code and reason."""
    try:
        await conn.send('{"type":"ping"}')
        await asyncio.wait_for(conn.recv(), 10)
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (0, "")
    return None


async def test_socket_upgrades_are_charged_and_capped_per_owner(
    keys: FakeKeys, sessions: FakeSessionService, gateway: RunningGateway
) -> None:
    async with ShoalClient(gateway.base_url, "key-alice") as alice:
        created = await alice.create_session()  # 1 of the key's burst
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/ws"
    over_cap = (1013, "too many open sockets: at most 2 per owner")
    first = await connect(url, additional_headers=ALICE)  # 2
    second = await connect(url, additional_headers=ALICE)  # 3
    try:
        assert await refusal(first) is None
        assert await refusal(second) is None
        # Over the owner's cap of open sockets: refused with 1013 and a reason that says why.
        assert await refusal(await connect(url, additional_headers=ALICE)) == over_cap  # 4
    finally:
        await first.close()
        await second.close()
    # Closed sockets free their slots (counted off once their handlers end), then the key's
    # bucket runs dry: an upgrade is refused with 1013 and the limit.
    outcomes = []
    for _ in range(BURST):
        conn = await connect(url, additional_headers=ALICE)
        outcomes.append(await refusal(conn))
        await conn.close()
    assert None in outcomes
    code, reason = outcomes[-1] or (0, "")
    assert code == 1013
    assert reason.startswith("rate limit: at most 0.01 requests/s per API key")


async def test_live_sessions_are_capped_per_owner(
    keys: FakeKeys, sessions: FakeSessionService, http: httpx.AsyncClient
) -> None:
    first = await http.post("/v1/sessions", json={}, headers=BOB)
    assert first.status_code == 201, first.text
    assert (await http.post("/v1/sessions", json={}, headers=BOB)).status_code == 201
    body = assert_rate_limited(await http.post("/v1/sessions", json={}, headers=BOB))
    assert body["max_per_owner"] == 2
    assert "terminate one first" in body["detail"]


async def test_session_quota_caps_nothing_when_the_index_cannot_be_asked() -> None:
    async def unavailable(owner: str, cap: int) -> int:
        raise Unavailable("session service unavailable")

    quota = SessionQuota(cap=1, ttl=5.0, count=unavailable, clock=ManualClock())
    await quota.check("alice")
    quota.created("alice")
    await quota.check("alice")


def test_a_rate_of_zero_is_no_limit() -> None:
    buckets = KeyBuckets(rate=0.0, burst=1, max_keys=10, clock=ManualClock())
    for _ in range(1_000):
        buckets.charge("key_1")
    assert len(buckets) == 0
