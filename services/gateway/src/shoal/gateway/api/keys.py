"""``/v1/keys``: issue, list and revoke API keys (rules in :mod:`shoal.gateway.tenancy`)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from shoal.gateway.api.deps import Caller, Service
from shoal.gateway.api.problems import problem_responses

router = APIRouter(prefix="/keys", tags=["keys"])

_KEY_EXAMPLE: dict[str, Any] = {
    "id": "key_01J9Z6",
    "name": "ci",
    "owner": "alice",
    "scopes": ["sessions"],
    "created_at": "2025-01-01T12:00:00.000Z",
    "expires_at": "2025-01-02T12:00:00.000Z",
}


class CreateKey(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "ci", "scopes": ["sessions"], "expires_in_seconds": 86400}]
        },
    )

    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(
        min_length=1,
        max_length=8,
        description=(
            "A subset of admin, sessions, jobs, jobs:work (take jobs on /v1/workers/ws, nothing "
            "else), secrets, read (without admin: of its own)"
        ),
    )
    owner: str | None = Field(
        default=None, min_length=1, max_length=128, description="Another owner: admin keys only"
    )
    expires_in_seconds: int | None = Field(default=None, ge=1, le=315_360_000)


class CreatedKey(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_KEY_EXAMPLE, "key": "shoal_sk_Zm9vYmFy…"}]}
    )

    id: str
    key: str = Field(description="The secret key: shown here once, never again")
    name: str
    owner: str
    scopes: list[str]
    created_at: str = Field(description="RFC 3339, UTC")
    expires_at: str | None


class KeyInfo(BaseModel):
    id: str
    name: str
    owner: str
    scopes: list[str]
    created_at: str = Field(description="RFC 3339, UTC")
    expires_at: str | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None


class KeyList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"keys": [{**_KEY_EXAMPLE, "last_used_at": None, "revoked_at": None}]}]
        }
    )

    keys: list[KeyInfo]


@router.post(
    "",
    status_code=201,
    response_model=CreatedKey,
    responses=problem_responses(400, 401, 403, 503),
)
async def create_key(body: CreateKey, caller: Caller, service: Service) -> dict[str, Any]:
    """Issue a key; the answer's ``key`` is shown this once and never again."""
    issued = await service.tenancy.create_key(
        caller,
        name=body.name,
        scopes=body.scopes,
        owner=body.owner,
        expires_in_seconds=body.expires_in_seconds,
    )
    answer: dict[str, Any] = msgspec.to_builtins(issued)
    return answer


@router.get("", response_model=KeyList, responses=problem_responses(400, 401, 403, 503))
async def list_keys(
    caller: Caller,
    service: Service,
    owner: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> dict[str, Any]:
    """The caller's owner's keys (no secrets); an admin key: every key, or ``?owner=``."""
    return {"keys": msgspec.to_builtins(await service.tenancy.list_keys(caller, owner))}


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 403, 404, 503),
)
async def revoke_key(key_id: str, caller: Caller, service: Service) -> Response:
    """Revoke a key; every gateway refuses it within a second. Another owner's key is 404."""
    await service.tenancy.revoke_key(caller, key_id)
    return Response(status_code=204)
