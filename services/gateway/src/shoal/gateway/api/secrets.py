"""``/v1/secrets``: users' secrets. Values go in, never out (a runner reads them on its socket).

Bodies are never logged or echoed: validation problems carry no input (problems.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from shoal.gateway.api.deps import Caller, Service
from shoal.gateway.api.problems import problem_responses

router = APIRouter(prefix="/secrets", tags=["secrets"])

Owner = Annotated[
    str | None, Query(min_length=1, max_length=128, description="Another owner: admin keys only")
]
# The rules check the name (tenancy.check_secret_name: 400 without echoing it); the schema only
# documents it, so a bad name is a 400 problem rather than FastAPI's own answer.
Name = Annotated[
    str, Path(description="1-128 of A-Z a-z 0-9 _ . - (not . or ..)", examples=["GH_TOKEN"])
]


class PutSecret(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        hide_input_in_errors=True,
        json_schema_extra={"examples": [{"value": "ghp_example_token"}]},
    )

    value: str = Field(description="At most 64 KiB of UTF-8 (413 beyond)")


class SecretInfo(BaseModel):
    name: str
    version: int = Field(ge=1)
    created_at: str = Field(description="RFC 3339, UTC")
    updated_at: str = Field(description="RFC 3339, UTC")


class SecretList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "secrets": [
                        {
                            "name": "GH_TOKEN",
                            "version": 2,
                            "created_at": "2025-01-01T12:00:00.000Z",
                            "updated_at": "2025-01-02T08:30:00.000Z",
                        }
                    ]
                }
            ]
        }
    )

    secrets: list[SecretInfo]


@router.put(
    "/{name}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(400, 401, 403, 413, 503),
)
async def put_secret(
    name: Name, body: PutSecret, caller: Caller, service: Service, owner: Owner = None
) -> Response:
    """Store a new version of the secret ``name`` (an admin key may name another ``owner``)."""
    await service.tenancy.put_secret(caller, name, body.value, owner)
    return Response(status_code=204)


@router.get("", response_model=SecretList, responses=problem_responses(400, 401, 403, 503))
async def list_secrets(caller: Caller, service: Service, owner: Owner = None) -> dict[str, Any]:
    """Names, versions and dates of the owner's secrets — never values."""
    return {"secrets": msgspec.to_builtins(await service.tenancy.list_secrets(caller, owner))}


@router.delete(
    "/{name}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(400, 401, 403, 404, 503),
)
async def delete_secret(
    name: Name, caller: Caller, service: Service, owner: Owner = None
) -> Response:
    """Delete the secret ``name``; 404 if the owner has none by that name."""
    await service.tenancy.delete_secret(caller, name, owner)
    return Response(status_code=204)
