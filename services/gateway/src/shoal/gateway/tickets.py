"""Short-lived, single-use tickets that stand for an API key on a browser's socket or SSE stream.

Browsers cannot set an ``Authorization`` header on a WebSocket or an ``EventSource``; they ask
``POST /v1/ws-tickets`` (with the key) for a ticket and put it in the URL (``?ticket=``). A URL
may end up in logs, so a ticket is worth little: it works once, within ``ws_ticket_ttl``, and
only its SHA-256 is stored (in a KV bucket, so any gateway replica redeems it).

Example::

    tickets = Tickets(store, settings)
    issued = await tickets.issue(principal)       # {"ticket": "wst_...", "expires_at": ...}
    principal = await tickets.redeem(issued["ticket"])   # a second redeem: Unauthorized
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any, Protocol

import msgspec

from shoal.common.clock import Clock, SystemClock, iso
from shoal.common.errors import Unauthorized
from shoal.gateway.config import GatewaySettings
from shoal.gateway.service import Principal, sha256_hex

TICKET_PREFIX = "wst_"


class TicketStore(Protocol):
    async def put_ticket(self, ticket_hash: str, value: bytes) -> None: ...

    async def take_ticket(self, ticket_hash: str) -> bytes | None: ...


class _Ticket(msgspec.Struct):
    key_id: str
    owner: str
    scopes: list[str]
    name: str
    expires: float  # unix seconds


class Tickets:
    def __init__(
        self, store: TicketStore, settings: GatewaySettings, clock: Clock | None = None
    ) -> None:
        self._store = store
        self._ttl = min(settings.ws_ticket_ttl, timedelta(minutes=5))
        self._clock = clock or SystemClock()

    async def issue(self, principal: Principal) -> dict[str, Any]:
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        expires = self._clock.now() + self._ttl.total_seconds()
        value = _Ticket(
            key_id=principal.key_id,
            owner=principal.owner,
            scopes=list(principal.scopes),
            name=principal.name,
            expires=expires,
        )
        await self._store.put_ticket(sha256_hex(ticket), msgspec.json.encode(value))
        return {
            "ticket": ticket,
            "expires_at": iso(expires),
            "expires_in": int(self._ttl.total_seconds()),
        }

    async def redeem(self, ticket: str) -> Principal:
        """The principal behind ``ticket``, consuming it; :class:`Unauthorized` if spent/expired."""
        if not ticket.startswith(TICKET_PREFIX) or len(ticket) > 128:
            raise Unauthorized("invalid ticket")
        raw = await self._store.take_ticket(sha256_hex(ticket))
        if raw is None:
            raise Unauthorized("invalid, used or expired ticket")
        try:
            value = msgspec.json.decode(raw, type=_Ticket)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Unauthorized("invalid ticket") from exc
        if self._clock.now() >= value.expires:
            raise Unauthorized("invalid, used or expired ticket")
        return Principal(
            key_id=value.key_id, owner=value.owner, scopes=tuple(value.scopes), name=value.name
        )
