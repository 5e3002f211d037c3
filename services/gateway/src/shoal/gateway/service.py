"""The gateway's rules: who may see what, how commands are stamped, what idempotency means.

No transport here (no FastAPI, no WebSocket): routes and socket handlers call these methods and
map the results; all I/O goes through a :class:`SessionBus` (``bus.Bus`` in production).

Example::

    service = GatewayService(bus, settings)
    principal = await service.authenticate("sk_live_...")
    created = await service.create_session(principal, metadata={"repo": "x"})
    receipt = await service.submit_prompt(principal, created["id"], "hello", idempotency_key="k1")
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shoal.common.clock import Clock, SystemClock, iso
from shoal.common.contracts import Command, SessionSnapshot, Status, public_session
from shoal.common.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Timeout,
    Unauthorized,
)
from shoal.common.messaging import Envelope, dumps, is_token, new_id
from shoal.gateway import tenancy
from shoal.gateway.config import GatewaySettings
from shoal.gateway.tenancy import Tenancy

RUNNER_TOKEN_PREFIX = "srt_"  # noqa: S105 - a recognisable prefix, not a secret
ADMIN_SCOPE = "admin"
SOURCE = "gateway"


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What became of a published command.

    ``duplicate``: JetStream dropped it as a copy of a command published moments ago (same id),
    so no new applied reply will come. ``data``: the applied reply's data when it was awaited.
    """

    stream_seq: int
    duplicate: bool
    data: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class SessionEventMsg:
    """One event read from the ledger: its per-session ``seq``, decoded envelope and raw JSON."""

    seq: int
    envelope: Envelope
    raw: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """Positions ``first``..``last`` the ledger no longer holds (retention): said, never skipped."""

    first: int
    last: int


class EventFeed(Protocol):
    """Events of one session in ledger order (``fanout.LiveFeed`` in production)."""

    async def next(self) -> SessionEventMsg | Gap: ...

    async def close(self) -> None: ...


class SessionBus(Protocol):
    """The I/O the rules need (implemented by :class:`shoal.gateway.bus.Bus`)."""

    async def verify_key(self, key: str) -> dict[str, Any]: ...

    async def list_messages(
        self, session_id: str, after: int | None, limit: int
    ) -> dict[str, Any]: ...

    async def read_session(self, session_id: str) -> SessionSnapshot | None: ...

    async def send_command(self, envelope: Envelope, *, wait: bool) -> CommandOutcome: ...

    async def follow_session(
        self,
        session_id: str,
        *,
        new_only: bool = False,
        event_type: str | None = None,
        since: int = 0,
    ) -> EventFeed: ...

    async def keys_rpc(self, method: str, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind an API key."""

    key_id: str
    owner: str
    scopes: tuple[str, ...]
    name: str = ""

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def may_see(self, snapshot: SessionSnapshot) -> bool:
        return self.is_admin or snapshot.owner == self.owner


class KeyCache:
    """Verified keys for a few seconds (bounded, LRU), keyed by the key's SHA-256, never the key."""

    def __init__(self, ttl_seconds: float, max_entries: int, clock: Clock) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        # Key ids revoked while this process ran (bounded): a verify answer that was already
        # on its way when the revocation broadcast arrived must not be cached or trusted.
        self._revoked: OrderedDict[str, None] = OrderedDict()

    def get(self, key_hash: str) -> Principal | None:
        hit = self._entries.get(key_hash)
        if hit is None:
            return None
        expires, principal = hit
        if self._clock.monotonic() >= expires:
            del self._entries[key_hash]
            return None
        self._entries.move_to_end(key_hash)
        return principal

    def put(self, key_hash: str, principal: Principal, ttl: float | None = None) -> None:
        """Trust ``principal`` for ``ttl`` seconds (at most the cache's TTL; <= 0: not at all)."""
        ttl = self._ttl if ttl is None else min(ttl, self._ttl)
        if ttl <= 0 or principal.key_id in self._revoked:
            return
        self._entries[key_hash] = (self._clock.monotonic() + ttl, principal)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop_key_id(self, key_id: str) -> int:
        """Forget every entry of ``key_id`` (a revocation); returns how many were dropped."""
        self._revoked[key_id] = None
        self._revoked.move_to_end(key_id)
        while len(self._revoked) > self._max:
            self._revoked.popitem(last=False)
        stale = [h for h, (_, p) in self._entries.items() if p.key_id == key_id]
        for key_hash in stale:
            del self._entries[key_hash]
        return len(stale)

    def is_revoked(self, key_id: str) -> bool:
        return key_id in self._revoked

    def __len__(self) -> int:
        return len(self._entries)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def derived_id(prefix: str, *parts: str) -> str:
    """A token-safe id that is a pure function of ``parts`` (retries get the same id)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{prefix}_{digest[:32]}"


class GatewayService:
    """Auth, ownership, command stamping and idempotency for the gateway's routes and sockets."""

    def __init__(
        self, bus: SessionBus, settings: GatewaySettings, clock: Clock | None = None
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._clock = clock or SystemClock()
        self._keys = KeyCache(
            settings.auth_cache_ttl.total_seconds(), settings.auth_cache_size, self._clock
        )
        self.tenancy = Tenancy(bus, on_revoked=self.key_revoked)
        # Session id -> owner of sessions seen to exist. An owner never changes and a session is
        # never deleted (only terminated, which the session service enforces itself), so a
        # prompt needs no state read after the first: one round trip less per prompt.
        self._owners: OrderedDict[str, str] = OrderedDict()

    @property
    def settings(self) -> GatewaySettings:
        return self._settings

    # -- auth --
    async def authenticate(self, api_key: str | None) -> Principal:
        """The principal of an API key (cached ``auth_cache_ttl``), else :class:`Unauthorized`."""
        if not api_key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        key_hash = sha256_hex(api_key)
        cached = self._keys.get(key_hash)
        if cached is not None:
            return cached
        data = await self._bus.verify_key(api_key)
        try:
            principal = Principal(
                key_id=str(data["key_id"]),
                owner=str(data["owner"]),
                scopes=tuple(str(s) for s in data.get("scopes") or ()),
                name=str(data.get("name") or ""),
            )
        except KeyError as exc:
            raise Unauthorized("invalid API key") from exc
        if self._keys.is_revoked(principal.key_id):
            raise Unauthorized("invalid API key")  # verified just before its revocation
        self._keys.put(key_hash, principal, self._seconds_left(data.get("expires_at")))
        return principal

    def _seconds_left(self, expires_at: object) -> float | None:
        """Seconds until an RFC 3339 ``expires_at`` (None: no expiry), so no cache entry
        outlives its key."""
        if not isinstance(expires_at, str):
            return None
        try:
            moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        except ValueError:
            return 0.0  # unreadable: do not cache
        return moment.timestamp() - self._clock.now()

    def authorize(self, principal: Principal, family: str, *, write: bool) -> None:
        """:class:`Forbidden` without the scope; :class:`Unauthorized` for a key revoked since
        it was verified (e.g. a socket ticket issued just before the revocation)."""
        if self._keys.is_revoked(principal.key_id):
            raise Unauthorized("API key revoked")
        tenancy.authorize(principal, family, write=write)

    def key_revoked(self, key_id: str) -> None:
        """A ``keys.revoked`` broadcast: stop trusting that key at once."""
        self._keys.drop_key_id(key_id)

    async def authenticate_runner(
        self, session_id: str, runner_token: str | None
    ) -> SessionSnapshot:
        """The session a runner token belongs to; :class:`NotFound` / :class:`Unauthorized` else."""
        snapshot = await self._read(session_id)
        if not runner_token or not snapshot.runner_token_hash:
            raise Unauthorized("missing runner token")
        if not hmac.compare_digest(sha256_hex(runner_token), snapshot.runner_token_hash):
            raise Unauthorized("invalid runner token")
        return snapshot

    # -- sessions --
    async def create_session(
        self, principal: Principal, metadata: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Create a session; the runner token is returned here once and stored only as a hash."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        metadata = metadata or {}
        tenancy.check_session_metadata(metadata)
        size = len(dumps(metadata))
        if size > self._settings.max_metadata_bytes:
            raise PayloadTooLarge(
                "metadata too large",
                detail={"max_bytes": self._settings.max_metadata_bytes, "bytes": size},
            )
        session_id = new_id("ses")
        runner_token = RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(32)
        envelope = self._command(
            Command.SESSION_CREATE,
            session_id,
            principal.owner,
            {"metadata": metadata, "runner_token_hash": sha256_hex(runner_token)},
        )
        try:
            outcome = await self._bus.send_command(envelope, wait=True)
        except Timeout as exc:
            # The command is durable and will be applied; without the token the caller could
            # never attach a runner to that session, so it is handed back with the 504.
            raise Timeout(exc.message, detail={**exc.detail, "runner_token": runner_token}) from exc
        session = dict((outcome.data or {}).get("session") or {})
        if not session:  # a duplicate cannot happen for a fresh id; keep the answer well-formed
            now = envelope.time
            session = {
                "id": session_id,
                "owner": principal.owner,
                "status": Status.IDLE,
                "created_at": now,
                "updated_at": now,
                "metadata": metadata,
            }
        session["runner_token"] = runner_token
        return session

    async def get_session(self, principal: Principal, session_id: str) -> dict[str, Any]:
        self.authorize(principal, tenancy.SESSIONS, write=False)
        return public_session(await self.visible_session(principal, session_id))

    async def visible_session(self, principal: Principal, session_id: str) -> SessionSnapshot:
        """The snapshot if ``principal`` may see it; a foreign session looks like a missing one."""
        snapshot = await self._read(session_id)
        if not principal.may_see(snapshot):
            raise NotFound("session not found", detail={"session_id": session_id})
        return snapshot

    async def visible_owner(self, principal: Principal, session_id: str) -> str:
        """The session's owner if ``principal`` may see it (cached: an owner never changes)."""
        owner = self._owners.get(session_id)
        if owner is None:
            owner = (await self._read(session_id)).owner
            self._owners[session_id] = owner
            if len(self._owners) > self._settings.owner_cache_size:
                self._owners.popitem(last=False)
        else:
            self._owners.move_to_end(session_id)
        if not (principal.is_admin or owner == principal.owner):
            raise NotFound("session not found", detail={"session_id": session_id})
        return owner

    # -- prompts --
    async def submit_prompt(
        self,
        principal: Principal,
        session_id: str,
        content: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a prompt. With an ``idempotency_key`` a retry gets the same ``prompt_id``."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        if not isinstance(content, str) or not content:
            raise BadRequest("content must be a non-empty string")
        size = len(content.encode())
        if size > self._settings.max_prompt_bytes:
            raise PayloadTooLarge(
                "prompt too large",
                detail={"max_bytes": self._settings.max_prompt_bytes, "bytes": size},
            )
        if idempotency_key is not None and not (
            0 < len(idempotency_key) <= self._settings.max_idempotency_key_chars
        ):
            raise BadRequest(
                "idempotency_key must have 1 to "
                f"{self._settings.max_idempotency_key_chars} characters"
            )
        owner = await self.visible_owner(principal, session_id)
        if idempotency_key is None:
            prompt_id, command_id = new_id("prm"), new_id("cmd")
        else:
            # Same owner + session + key -> same prompt id and the same Nats-Msg-Id, so a retry
            # within the stream's duplicate window is dropped by JetStream and a later one by
            # the session service (it remembers recent prompt ids).
            prompt_id = derived_id("prm", owner, session_id, idempotency_key)
            command_id = derived_id("cmd", owner, session_id, idempotency_key)
        envelope = self._command(
            Command.PROMPT_SUBMIT,
            session_id,
            owner,
            {"prompt_id": prompt_id, "content": content},
            command_id=command_id,
        )
        outcome = await self._bus.send_command(envelope, wait=True)
        seq = outcome.data.get("seq") if outcome.data else None
        # The receipt as every caller answers it (HTTP 202, the socket's prompt.accepted).
        return {
            "prompt_id": prompt_id,
            "session_id": session_id,
            "status": "queued",
            "seq": seq if isinstance(seq, int) else None,
        }

    # -- history --
    async def list_messages(
        self, principal: Principal, session_id: str, after: int | None, limit: int | None
    ) -> dict[str, Any]:
        self.authorize(principal, tenancy.SESSIONS, write=False)
        if after is not None and after < 0:
            raise BadRequest("after must be >= 0")
        page = limit if limit is not None else self._settings.messages_page_default
        if not 1 <= page <= self._settings.messages_page_max:
            raise BadRequest(f"limit must be between 1 and {self._settings.messages_page_max}")
        await self.visible_session(principal, session_id)
        data = await self._bus.list_messages(session_id, after, page)
        return {"messages": list(data.get("messages") or []), "next": data.get("next")}

    async def follow(
        self, principal: Principal, session_id: str, since: int = 0
    ) -> tuple[SessionSnapshot, EventFeed]:
        """A client's event feed after ``since`` (history then live); ownership checked first."""
        self.authorize(principal, tenancy.SESSIONS, write=False)
        snapshot = await self.visible_session(principal, session_id)
        return snapshot, await self._bus.follow_session(session_id, since=since)

    # -- runner --
    async def follow_dispatches(self, session_id: str) -> EventFeed:
        """New ``prompt.dispatched`` events (subscribe before announcing the runner)."""
        return await self._bus.follow_session(
            session_id, new_only=True, event_type="prompt.dispatched"
        )

    async def runner_connect(self, snapshot: SessionSnapshot, connection_id: str) -> None:
        envelope = self._command(
            Command.RUNNER_CONNECT, snapshot.id, snapshot.owner, {"connection_id": connection_id}
        )
        try:
            await self._bus.send_command(envelope, wait=True)
        except Timeout:
            pass  # durable: the session applies it later, and dispatches then

    async def runner_disconnect(self, snapshot: SessionSnapshot, connection_id: str) -> None:
        envelope = self._command(
            Command.RUNNER_DISCONNECT, snapshot.id, snapshot.owner, {"connection_id": connection_id}
        )
        await self._bus.send_command(envelope, wait=False)

    async def complete_message(
        self, snapshot: SessionSnapshot, prompt_id: Any, content: Any, message_id: Any = None
    ) -> dict[str, Any]:
        """A runner's final answer; a runner-chosen ``message_id`` makes a re-send safe."""
        if not isinstance(prompt_id, str) or not is_token(prompt_id):
            raise BadRequest("prompt_id must be an id")
        if not isinstance(content, str):
            raise BadRequest("content must be a string")
        if message_id is None:
            message_id = new_id("msg")
        elif not isinstance(message_id, str) or not is_token(message_id):
            raise BadRequest("message_id must be an id")
        envelope = self._command(
            Command.MESSAGE_COMPLETE,
            snapshot.id,
            snapshot.owner,
            {"prompt_id": prompt_id, "message_id": message_id, "content": content},
            # Same message id -> same command id: a re-sent completion is dropped by JetStream.
            command_id=derived_id("cmd", snapshot.id, "complete", message_id),
        )
        await self._bus.send_command(envelope, wait=True)
        return {"prompt_id": prompt_id, "message_id": message_id}

    async def runner_secret(self, snapshot: SessionSnapshot, name: object) -> dict[str, Any]:
        """A secret for the session's runner (``secret.get``): only its ``allowed_secrets``."""
        current = await self._read(snapshot.id)  # fresh: a terminated session reads nothing
        if current.status == Status.TERMINATED:
            raise Forbidden("the session is terminated")
        return await self.tenancy.session_secret(current.id, current.owner, current.metadata, name)

    # -- helpers --
    async def _read(self, session_id: str) -> SessionSnapshot:
        snapshot = await self._bus.read_session(session_id) if is_token(session_id) else None
        if snapshot is None:
            raise NotFound("session not found", detail={"session_id": session_id})
        return snapshot

    def _command(
        self,
        command: Command,
        session_id: str,
        owner: str,
        data: dict[str, Any],
        *,
        command_id: str | None = None,
    ) -> Envelope:
        return Envelope(
            id=command_id or new_id("cmd"),
            type=command,
            source=SOURCE,
            time=iso(self._clock.now()),
            subject=session_id,
            owner=owner,
            data=data,
        )
