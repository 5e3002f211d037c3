"""``/v1/keys``: issue, list and revoke API keys (rules in :mod:`shoal.gateway.tenancy`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from shoal.gateway.api.deps import Caller, Service

router = APIRouter(prefix="/keys")


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1, max_length=8)
    owner: str | None = Field(default=None, min_length=1, max_length=128)
    expires_in_seconds: int | None = Field(default=None, ge=1, le=315_360_000)


@router.post("", status_code=201)
async def create_key(body: CreateKey, caller: Caller, service: Service) -> dict[str, Any]:
    """Issue a key; the answer's ``key`` is shown this once and never again."""
    return await service.tenancy.create_key(
        caller,
        name=body.name,
        scopes=body.scopes,
        owner=body.owner,
        expires_in_seconds=body.expires_in_seconds,
    )


@router.get("")
async def list_keys(
    caller: Caller,
    service: Service,
    owner: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> dict[str, Any]:
    """The caller's owner's keys (no secrets); an admin key: every key, or ``?owner=``."""
    return {"keys": await service.tenancy.list_keys(caller, owner)}


@router.delete("/{key_id}", status_code=204)
async def revoke_key(key_id: str, caller: Caller, service: Service) -> Response:
    """Revoke a key; every gateway refuses it within a second. Another owner's key is 404."""
    await service.tenancy.revoke_key(caller, key_id)
    return Response(status_code=204)
