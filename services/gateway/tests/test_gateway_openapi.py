"""The HTTP edges of the gateway: the OpenAPI document, request ids, CORS (real uvicorn, NATS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeKeys, FakeSessionService

from shoal.gateway.app import create_app
from shoal.gateway.config import GatewaySettings

if TYPE_CHECKING:
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        yield client


def test_openapi_documents_problems_ids_and_auth() -> None:
    document = create_app(GatewaySettings()).openapi()
    operations = [op for ops in document["paths"].values() for op in ops.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)), ids
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for operation in operations:
        assert operation["tags"], operation["operationId"]
        assert operation["security"][0] == {"bearerAuth": []}
        responses = operation["responses"]
        assert "422" not in responses
        assert "400" in responses or "401" in responses
        for status, response in responses.items():
            assert "X-Request-ID" in response["headers"]
            if status.isdigit() and int(status) >= 400:
                media = response["content"]["application/problem+json"]
                assert media["schema"] == {"$ref": "#/components/schemas/ProblemDetail"}
                assert media["example"]["status"] == int(status)
    for name in ("CreateSession", "SubmitPrompt", "CreateKey", "PutSecret", "ProblemDetail"):
        assert document["components"]["schemas"][name]["examples"], name


async def test_request_id_is_echoed_or_generated(
    keys: FakeKeys, sessions: FakeSessionService, http: httpx.AsyncClient
) -> None:
    given = await http.get("/v1/sessions/ses_missing", headers={**ALICE, "X-Request-ID": "abc-1"})
    assert given.status_code == 404
    assert given.headers["x-request-id"] == "abc-1"
    assert given.json()["request_id"] == "abc-1"

    made = await http.get("/v1/sessions/ses_missing", headers=ALICE)
    assert made.headers["x-request-id"].startswith("req_")
    assert made.json()["request_id"] == made.headers["x-request-id"]

    # Not safe to log as given (spaces, quotes, too long): replaced, never echoed.
    for unsafe in ('a b"c', "x" * 200):
        odd = await http.get("/v1/sessions/ses_x", headers={**ALICE, "X-Request-ID": unsafe})
        assert odd.status_code == 404
        assert odd.headers["x-request-id"].startswith("req_")
        assert odd.json()["request_id"] == odd.headers["x-request-id"]

    bad = await http.post("/v1/sessions", headers=ALICE, content=b"{")
    assert bad.status_code == 400
    assert bad.json()["request_id"] == bad.headers["x-request-id"]


async def test_cors_is_off_by_default(gateway: RunningGateway, http: httpx.AsyncClient) -> None:
    preflight = await http.options(
        "/v1/sessions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize(
    "settings_overrides",
    [{"cors_allow_origins": ["https://app.example"]}],
)
async def test_cors_allows_the_configured_origins(
    keys: FakeKeys,
    sessions: FakeSessionService,
    http: httpx.AsyncClient,
    settings_overrides: dict[str, Any],
) -> None:
    asked = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    preflight = await http.options(
        "/v1/sessions", headers={**asked, "Access-Control-Request-Headers": "authorization"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

    answer = await http.get("/v1/sessions/x", headers={**ALICE, "Origin": "https://app.example"})
    assert answer.status_code == 404
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()

    foreign = await http.options(
        "/v1/sessions", headers={**asked, "Origin": "https://evil.example"}
    )
    assert foreign.status_code == 400
    assert "access-control-allow-origin" not in foreign.headers
