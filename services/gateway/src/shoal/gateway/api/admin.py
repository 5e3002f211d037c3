"""``/v1/admin``: where partitions and sessions live, for admin keys (the JSON of ``shoal admin``).

Every other key gets 403: ``/v1/admin`` belongs to no scope family but ``admin``
(``tenancy.route_family``), and the service checks the scope again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from shoal.gateway.api.deps import Caller, Service
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.views import plain

router = APIRouter(prefix="/admin", tags=["admin"])


class PartitionRow(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "partition": 3,
                    "owner": "session-0",
                    "epoch": 41,
                    "lease_revision": 977,
                    "lag": 0,
                    "in_flight": 1,
                }
            ]
        },
    )

    partition: int = Field(ge=0)
    owner: str | None = Field(description="The replica holding the lease; null while unowned")
    epoch: int | None = Field(description="Grows with every new owner")
    lease_revision: int | None
    lag: int | None = Field(description="Commands not yet delivered to the owner")
    in_flight: int | None = Field(description="Delivered, not yet acknowledged")


class SessionPlacement(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "session_id": "ses_01J9Z3",
                    "partition": 3,
                    "owner": "session-0",
                    "epoch": 41,
                    "revision": 12,
                    "applied_seq": 4410,
                    "event_seq": 9,
                    "ledger_seq": 1022,
                    "status": "idle",
                    "session_owner": "alice",
                }
            ]
        },
    )

    session_id: str
    partition: int = Field(ge=0)
    owner: str | None = Field(description="The replica holding the partition's lease")
    epoch: int | None
    revision: int = Field(description="The session-state KV revision")
    applied_seq: int = Field(description="SESSION_CMD sequence of the last applied command")
    event_seq: int
    ledger_seq: int
    status: str
    session_owner: str = Field(description="The user the session belongs to")


@router.get(
    "/partitions",
    response_model=list[PartitionRow],
    responses=problem_responses(401, 403, 503),
)
async def admin_partitions(caller: Caller, service: Service) -> list[dict[str, Any]]:
    """Owner, lease epoch and lag of every partition of the session command stream."""
    return [plain(row) for row in await service.admin_partitions(caller)]


@router.get(
    "/sessions/{session_id}",
    response_model=SessionPlacement,
    responses=problem_responses(401, 403, 404, 503),
)
async def admin_session(session_id: str, caller: Caller, service: Service) -> dict[str, Any]:
    """Partition, lease holder, KV revision and applied position of one session."""
    return plain(await service.admin_session(caller, session_id))
