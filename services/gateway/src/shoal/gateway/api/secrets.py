"""``/v1/secrets``: users' secrets. Values go in, never out (a runner reads them on its socket).

Bodies are never logged or echoed: validation problems carry no input (problems.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict

from shoal.gateway.api.deps import Caller, Service

router = APIRouter(prefix="/secrets")

Owner = Annotated[str | None, Query(min_length=1, max_length=128)]


class PutSecret(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    value: str  # size checked by the rules: 413, not a schema error


@router.put("/{name}", status_code=204)
async def put_secret(
    name: str, body: PutSecret, caller: Caller, service: Service, owner: Owner = None
) -> Response:
    """Store a new version of the secret ``name`` (an admin key may name another ``owner``)."""
    await service.tenancy.put_secret(caller, name, body.value, owner)
    return Response(status_code=204)


@router.get("")
async def list_secrets(caller: Caller, service: Service, owner: Owner = None) -> dict[str, Any]:
    """Names, versions and dates of the owner's secrets — never values."""
    return {"secrets": await service.tenancy.list_secrets(caller, owner)}


@router.delete("/{name}", status_code=204)
async def delete_secret(
    name: str, caller: Caller, service: Service, owner: Owner = None
) -> Response:
    """Delete the secret ``name``; 404 if the owner has none by that name."""
    await service.tenancy.delete_secret(caller, name, owner)
    return Response(status_code=204)
