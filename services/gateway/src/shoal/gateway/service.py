"""The gateway's rules: who may see what, how commands are stamped, what idempotency means.

No transport here (no FastAPI, no WebSocket): routes and socket handlers call these methods and
map the results (structs of ``views``); all I/O goes through a :class:`SessionBus` (``bus.Bus``
in production), whose RPC answers are converted to structs as they arrive.

Example::

    service = GatewayService(bus, settings)
    principal = await service.authenticate("sk_live_...")
    created = await service.create_session(principal, metadata={"repo": "x"})
    receipt = await service.submit_prompt(principal, created.id, "hello", idempotency_key="k1")
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Protocol

import msgspec

from shoal.common.clock import Clock, SystemClock, iso
from shoal.common.contracts import (
    IDLE_TIMEOUT_MAX,
    MAX_TAGS,
    PROMPT_TIMEOUT_MAX,
    Command,
    MessageComplete,
    PromptAbort,
    PromptSubmit,
    QuestionAnswer,
    QuestionAsk,
    RunnerConnect,
    RunnerDisconnect,
    RunnerError,
    RunnerHeartbeat,
    SessionCreate,
    SessionSnapshot,
    SessionTerminate,
    SessionUpdate,
    SessionView,
    Status,
    Tag,
    session_view,
)
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
from shoal.gateway.quotas import KeyBuckets, SessionQuota
from shoal.gateway.tenancy import Tenancy
from shoal.gateway.views import (
    Applied,
    CommandReceipt,
    CreatedSession,
    EventsPage,
    IndexPage,
    MessageAccepted,
    MessagesPage,
    PartitionRow,
    PromptReceipt,
    SecretValue,
    SessionPage,
    SessionPlacement,
    VerifiedKey,
    convert,
)

RUNNER_TOKEN_PREFIX = "srt_"  # noqa: S105 - a recognisable prefix, not a secret
ADMIN_SCOPE = "admin"
SOURCE = "gateway"

# What a runner's question may carry: it lives in the session's hot state until answered.
MAX_QUESTION_BYTES = 16 * 1024
MAX_QUESTION_OPTIONS = 32
MAX_ANSWER_BYTES = 64 * 1024
QUESTION_EXPIRES_MAX = 7 * 24 * 3600
MAX_ERROR_CHARS = 4096  # a runner's error message, cut beyond
# A list cursor is opaque to the gateway; the session service decodes and checks it.
MAX_CURSOR_CHARS = 512
LIST_PAGE_MAX = 100  # the session index's largest page


class QuestionFrame(msgspec.Struct, kw_only=True):
    """A runner's ``question`` frame (DESIGN §5; unknown members ignored): the gateway stamps
    what it leaves out."""

    type: str = "question"
    question_id: str | None = None
    content: str
    options: list[str] | None = None
    expires_in: Annotated[int, msgspec.Meta(ge=1, le=QUESTION_EXPIRES_MAX)] | None = None


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What became of a published command.

    ``duplicate``: JetStream dropped it as a copy of a command published moments ago (same id),
    so no new applied reply will come. ``applied``: the applied reply when it was awaited.
    """

    stream_seq: int
    duplicate: bool
    applied: Applied | None


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

    async def verify_key(self, key: str) -> Any: ...

    async def list_messages(self, session_id: str, after: int | None, limit: int) -> Any: ...

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

    async def session_rpc(self, method: str, body: dict[str, Any]) -> Any: ...

    async def read_events(
        self, session_id: str, after: int, limit: int
    ) -> tuple[list[SessionEventMsg], bool]: ...


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
        self._verifying: dict[str, asyncio.Future[Principal]] = {}  # key hash -> verification
        # Session id -> owner of sessions seen to exist. An owner never changes and a session is
        # never deleted (only terminated, which the session service enforces itself), so a
        # prompt needs no state read after the first: one round trip less per prompt.
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._buckets = KeyBuckets(
            settings.rate_limit_per_key,
            settings.rate_limit_burst,
            settings.rate_limit_keys,
            self._clock,
        )
        self._session_quota = SessionQuota(
            settings.max_sessions_per_owner,
            settings.session_count_ttl.total_seconds(),
            self._count_live_sessions,
            self._clock,
        )

    @property
    def settings(self) -> GatewaySettings:
        return self._settings

    # -- auth --
    async def authenticate(self, api_key: str | None) -> Principal:
        """The principal of an API key (cached ``auth_cache_ttl``), else :class:`Unauthorized`.

        Every route and socket upgrade authenticates here, so this is where a request is charged
        to its key's rate limit (:class:`RateLimited` past it). Requests that miss the cache
        together share one verification: when a busy key's entry expires, every request in
        flight would otherwise ask the keys service at once."""
        if not api_key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        key_hash = sha256_hex(api_key)
        principal = self._keys.get(key_hash)
        if principal is None:
            verifying = self._verifying.get(key_hash)
            if verifying is None:
                verifying = asyncio.ensure_future(self._verify(api_key, key_hash))
                self._verifying[key_hash] = verifying
                verifying.add_done_callback(lambda done: self._verified(key_hash, done))
            # Shielded: a caller that goes away does not cancel the others' verification.
            principal = await asyncio.shield(verifying)
        self._buckets.charge(principal.key_id)
        return principal

    async def _verify(self, api_key: str, key_hash: str) -> Principal:
        try:
            key = msgspec.convert(await self._bus.verify_key(api_key), VerifiedKey)
        except msgspec.ValidationError:
            raise Unauthorized("invalid API key") from None
        principal = Principal(
            key_id=key.key_id, owner=key.owner, scopes=tuple(key.scopes or ()), name=key.name or ""
        )
        if self._keys.is_revoked(principal.key_id):
            raise Unauthorized("invalid API key")  # verified just before its revocation
        self._keys.put(key_hash, principal, self._seconds_left(key.expires_at))
        return principal

    def _verified(self, key_hash: str, done: asyncio.Future[Principal]) -> None:
        if self._verifying.get(key_hash) is done:
            del self._verifying[key_hash]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone away

    def _seconds_left(self, expires_at: str | None) -> float | None:
        """Seconds until an RFC 3339 ``expires_at`` (None: no expiry), so no cache entry
        outlives its key."""
        if expires_at is None:
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
        self,
        principal: Principal,
        metadata: dict[str, Any] | None,
        *,
        tags: list[str] | None = None,
        idle_timeout: int | None = None,
        prompt_timeout: int | None = None,
    ) -> CreatedSession:
        """Create a session; the runner token is returned here once and stored only as a hash.

        Timeouts are seconds (``idle_timeout`` 1..30 days, ``prompt_timeout`` 1 s..1 day); left
        out, the gateway's ``session_idle_timeout`` / ``session_prompt_timeout`` apply.
        """
        self.authorize(principal, tenancy.SESSIONS, write=True)
        metadata = self._checked_metadata(metadata or {})
        await self._session_quota.check(principal.owner)
        payload = SessionCreate(
            metadata=metadata,
            tags=_checked_tags(tags or []),
            idle_timeout=_checked_seconds(
                "idle_timeout", idle_timeout, self._settings.session_idle_timeout, IDLE_TIMEOUT_MAX
            ),
            prompt_timeout=_checked_seconds(
                "prompt_timeout",
                prompt_timeout,
                self._settings.session_prompt_timeout,
                PROMPT_TIMEOUT_MAX,
            ),
        )
        session_id = new_id("ses")
        runner_token = RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(32)
        payload.runner_token_hash = sha256_hex(runner_token)
        envelope = self._command(Command.SESSION_CREATE, session_id, principal.owner, payload)
        self._session_quota.created(principal.owner)  # a create that times out still applies
        try:
            outcome = await self._bus.send_command(envelope, wait=True)
        except Timeout as exc:
            # The command is durable and will be applied; without the token the caller could
            # never attach a runner to that session, so it is handed back with the 504.
            raise Timeout(exc.message, detail={**exc.detail, "runner_token": runner_token}) from exc
        session = outcome.applied.session if outcome.applied else None
        if session is None:  # a duplicate cannot happen for a fresh id; keep the answer whole
            now = envelope.time
            session = SessionView(
                id=session_id,
                owner=principal.owner,
                status=Status.IDLE,
                created_at=now,
                updated_at=now,
                metadata=metadata,
                tags=payload.tags,
                idle_timeout=payload.idle_timeout,
                prompt_timeout=payload.prompt_timeout,
            )
        return CreatedSession(**msgspec.structs.asdict(session), runner_token=runner_token)

    async def _count_live_sessions(self, owner: str, cap: int) -> int:
        """``owner``'s sessions that are not terminated, from the session index, counted up to
        ``cap`` (one status at a time, so terminated sessions are never paged through)."""
        live = 0
        for status in Status:
            if status == Status.TERMINATED:
                continue
            cursor: str | None = None
            while live < cap:
                body = {"owner": owner, "status": status, "cursor": cursor, "limit": LIST_PAGE_MAX}
                index = convert(
                    await self._bus.session_rpc("list", body), IndexPage, "session index page"
                )
                live += len(index.sessions)
                cursor = index.next
                if cursor is None:
                    break
        return live

    def _checked_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        tenancy.check_session_metadata(metadata)
        size = len(dumps(metadata))
        if size > self._settings.max_metadata_bytes:
            raise PayloadTooLarge(
                "metadata too large",
                detail={"max_bytes": self._settings.max_metadata_bytes, "bytes": size},
            )
        return metadata

    async def list_sessions(
        self,
        principal: Principal,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        status: str | None = None,
        owner: str | None = None,
    ) -> SessionPage:
        """The caller's sessions, newest first (an admin key: everyone's, or ``owner``'s).

        The page comes from the session index (PostgreSQL, which follows the ledger within
        milliseconds); each session is then read from its live state, as ``GET`` answers it.
        """
        self.authorize(principal, tenancy.SESSIONS, write=False)
        page = limit if limit is not None else self._settings.sessions_page_default
        if not 1 <= page <= self._settings.sessions_page_max:
            raise BadRequest(f"limit must be between 1 and {self._settings.sessions_page_max}")
        if status is not None and status not in set(Status):
            raise BadRequest(
                "status must be one of " + ", ".join(Status), detail={"status": status}
            )
        if cursor is not None and not 0 < len(cursor) <= MAX_CURSOR_CHARS:
            raise BadRequest("cursor is not one this API handed out")
        if principal.is_admin and owner is None:
            scope: str | None = None  # every owner's
        else:
            scope = tenancy.acting_owner(principal, owner)
        index = convert(
            await self._bus.session_rpc(
                "list", {"owner": scope, "status": status, "cursor": cursor, "limit": page}
            ),
            IndexPage,
            "session index page",
        )
        snapshots = await asyncio.gather(*(self._bus.read_session(r.id) for r in index.sessions))
        sessions = [session_view(snap) for snap in snapshots if snap is not None]
        return SessionPage(sessions=sessions, next=index.next)

    async def terminate_session(
        self, principal: Principal, session_id: str, reason: str = ""
    ) -> SessionView:
        """End the session (idempotent: terminating a terminated session answers it again)."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        owner = await self.visible_owner(principal, session_id)
        payload = SessionTerminate(reason=reason or "terminated by the API")
        envelope = self._command(Command.SESSION_TERMINATE, session_id, owner, payload)
        outcome = await self._bus.send_command(envelope, wait=True)
        return await self._session_after(outcome, session_id)

    async def update_session(
        self, principal: Principal, session_id: str, update: SessionUpdate
    ) -> SessionView:
        """Change the session's tags and/or metadata (a field left out stays as it is)."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        if update.tags is None and update.metadata is None:
            raise BadRequest("nothing to update: send tags and/or metadata")
        checked = SessionUpdate(
            tags=_checked_tags(update.tags) if update.tags is not None else None,
            metadata=(
                self._checked_metadata(update.metadata) if update.metadata is not None else None
            ),
        )
        owner = await self.visible_owner(principal, session_id)
        envelope = self._command(Command.SESSION_UPDATE, session_id, owner, checked)
        outcome = await self._bus.send_command(envelope, wait=True)
        return await self._session_after(outcome, session_id)

    async def abort(
        self, principal: Principal, session_id: str, prompt_id: str | None = None
    ) -> CommandReceipt:
        """Stop the running prompt (only ``prompt_id`` if given); with none running, nothing."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        if prompt_id is not None and not is_token(prompt_id):
            raise BadRequest("prompt_id must be an id")
        owner = await self.visible_owner(principal, session_id)
        payload = PromptAbort(prompt_id=prompt_id or "")
        envelope = self._command(Command.PROMPT_ABORT, session_id, owner, payload)
        outcome = await self._bus.send_command(envelope, wait=True)
        return CommandReceipt(session_id=session_id, seq=_reply_seq(outcome))

    async def answer_question(
        self, principal: Principal, session_id: str, question_id: str, answer: str
    ) -> CommandReceipt:
        """Answer a pending question; the session answers 404 (unknown) or 409 (answered)."""
        self.authorize(principal, tenancy.SESSIONS, write=True)
        if not is_token(question_id):
            raise NotFound("question not found", detail={"question_id": question_id})
        if not isinstance(answer, str):
            raise BadRequest("answer must be a string")
        size = len(answer.encode())
        if size > MAX_ANSWER_BYTES:
            raise PayloadTooLarge(
                "answer too large", detail={"max_bytes": MAX_ANSWER_BYTES, "bytes": size}
            )
        owner = await self.visible_owner(principal, session_id)
        payload = QuestionAnswer(question_id=question_id, answer=answer)
        envelope = self._command(Command.QUESTION_ANSWER, session_id, owner, payload)
        outcome = await self._bus.send_command(envelope, wait=True)
        return CommandReceipt(
            session_id=session_id, seq=_reply_seq(outcome), question_id=question_id
        )

    async def _session_after(self, outcome: CommandOutcome, session_id: str) -> SessionView:
        """The session as the applied reply showed it (read back if the reply had none)."""
        if outcome.applied is not None and outcome.applied.session is not None:
            return outcome.applied.session
        return session_view(await self._read(session_id))

    async def get_session(self, principal: Principal, session_id: str) -> SessionView:
        self.authorize(principal, tenancy.SESSIONS, write=False)
        return session_view(await self.visible_session(principal, session_id))

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
    ) -> PromptReceipt:
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
            PromptSubmit(prompt_id=prompt_id, content=content),
            command_id=command_id,
        )
        outcome = await self._bus.send_command(envelope, wait=True)
        return PromptReceipt(prompt_id=prompt_id, session_id=session_id, seq=_reply_seq(outcome))

    # -- history --
    async def list_messages(
        self, principal: Principal, session_id: str, after: int | None, limit: int | None
    ) -> MessagesPage:
        self.authorize(principal, tenancy.SESSIONS, write=False)
        if after is not None and after < 0:
            raise BadRequest("after must be >= 0")
        page = limit if limit is not None else self._settings.messages_page_default
        if not 1 <= page <= self._settings.messages_page_max:
            raise BadRequest(f"limit must be between 1 and {self._settings.messages_page_max}")
        await self.visible_session(principal, session_id)
        data = await self._bus.list_messages(session_id, after, page)
        return convert(data, MessagesPage, "messages page")

    async def list_events(
        self, principal: Principal, session_id: str, after: int | None, limit: int | None
    ) -> EventsPage:
        """The session's ledger events with seq > ``after``, in seq order, read from SESSION_EVT
        (the source of truth: no projection lag, but only what the ledger's retention kept)."""
        self.authorize(principal, tenancy.SESSIONS, write=False)
        if after is not None and after < 0:
            raise BadRequest("after must be >= 0")
        page = limit if limit is not None else self._settings.events_page_default
        if not 1 <= page <= self._settings.events_page_max:
            raise BadRequest(f"limit must be between 1 and {self._settings.events_page_max}")
        await self.visible_session(principal, session_id)
        events, more = await self._bus.read_events(session_id, after or 0, page)
        return EventsPage(
            events=[msgspec.json.decode(e.raw) for e in events],
            next=events[-1].seq if more and events else None,
        )

    # -- admin --
    async def admin_partitions(self, principal: Principal) -> list[PartitionRow]:
        """Owner, epoch and lag per partition (``shoal admin partitions``): admin keys only."""
        self.authorize(principal, tenancy.ADMIN, write=False)
        rows = await self._bus.session_rpc("admin.partitions", {})
        return convert(rows, list[PartitionRow], "partitions answer")

    async def admin_session(self, principal: Principal, session_id: str) -> SessionPlacement:
        """Where a session lives and how far it is applied (``shoal admin session``)."""
        self.authorize(principal, tenancy.ADMIN, write=False)
        if not is_token(session_id):
            raise NotFound("session not found", detail={"session_id": session_id})
        found = await self._bus.session_rpc("admin.session", {"session_id": session_id})
        return convert(found, SessionPlacement, "session placement")

    async def follow(
        self, principal: Principal, session_id: str, since: int = 0
    ) -> tuple[SessionSnapshot, EventFeed]:
        """A client's event feed after ``since`` (history then live); ownership checked first."""
        self.authorize(principal, tenancy.SESSIONS, write=False)
        snapshot = await self.visible_session(principal, session_id)
        return snapshot, await self._bus.follow_session(session_id, since=since)

    # -- runner --
    async def follow_runner_events(self, session_id: str) -> EventFeed:
        """The session's new events, for its runner socket (subscribe before announcing it)."""
        return await self._bus.follow_session(session_id, new_only=True)

    async def runner_connect(self, snapshot: SessionSnapshot, connection_id: str) -> None:
        payload = RunnerConnect(connection_id=connection_id)
        envelope = self._command(Command.RUNNER_CONNECT, snapshot.id, snapshot.owner, payload)
        try:
            await self._bus.send_command(envelope, wait=True)
        except Timeout:
            pass  # durable: the session applies it later, and dispatches then

    async def runner_disconnect(
        self, snapshot: SessionSnapshot, connection_id: str, reason: str = "closed"
    ) -> None:
        """The runner socket ``connection_id`` is gone (``reason``: closed, replaced, ...)."""
        payload = RunnerDisconnect(connection_id=connection_id, reason=reason)
        envelope = self._command(Command.RUNNER_DISCONNECT, snapshot.id, snapshot.owner, payload)
        await self._bus.send_command(envelope, wait=False)

    async def runner_heartbeat(
        self, snapshot: SessionSnapshot, connection_id: str, prompt_id: str = ""
    ) -> None:
        """The runner is alive and working (on ``prompt_id``): keeps the prompt watchdog away.
        Not awaited by the session (``wait=False``); the socket throttles how often it is sent."""
        if prompt_id and not is_token(prompt_id):
            raise BadRequest("prompt_id must be an id")
        payload = RunnerHeartbeat(connection_id=connection_id, prompt_id=prompt_id)
        envelope = self._command(Command.RUNNER_HEARTBEAT, snapshot.id, snapshot.owner, payload)
        await self._bus.send_command(envelope, wait=False)

    async def runner_question(
        self,
        snapshot: SessionSnapshot,
        connection_id: str,
        frame: QuestionFrame | Mapping[str, Any],
    ) -> QuestionAsk:
        """A runner asks the user: the question as sent to the session, its id stamped here if
        the runner chose none and ``expires_at`` computed from ``expires_in``."""
        if not isinstance(frame, QuestionFrame):
            try:
                frame = msgspec.convert(frame, QuestionFrame)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"invalid question frame: {exc}") from None
        if frame.question_id is not None and not is_token(frame.question_id):
            raise BadRequest("question_id must be an id")
        if not frame.content:
            raise BadRequest("content must be a non-empty string")
        size = len(frame.content.encode()) + sum(len(o.encode()) for o in frame.options or ())
        if size > MAX_QUESTION_BYTES:
            raise PayloadTooLarge(
                "question too large", detail={"max_bytes": MAX_QUESTION_BYTES, "bytes": size}
            )
        if frame.options is not None and len(frame.options) > MAX_QUESTION_OPTIONS:
            raise BadRequest(f"at most {MAX_QUESTION_OPTIONS} options")
        now = self._clock.now()
        question = QuestionAsk(
            question_id=frame.question_id or new_id("q"),
            content=frame.content,
            options=frame.options,
            expires_at=iso(now + frame.expires_in) if frame.expires_in is not None else None,
        )
        envelope = self._command(
            Command.QUESTION_ASK,
            snapshot.id,
            snapshot.owner,
            question,
            # One question id, one command: a runner re-sending its frame asks once.
            command_id=derived_id("cmd", snapshot.id, "question", question.question_id),
        )
        await self._bus.send_command(envelope, wait=True)
        return question

    async def runner_error(
        self, snapshot: SessionSnapshot, connection_id: str, prompt_id: str, message: str
    ) -> RunnerError:
        """A runner's ``error`` frame: ``prompt_id`` failed ("" : the session itself did)."""
        if prompt_id and not is_token(prompt_id):
            raise BadRequest("prompt_id must be an id")
        if not isinstance(message, str) or not message:
            raise BadRequest("message must be a non-empty string")
        error = RunnerError(
            connection_id=connection_id, prompt_id=prompt_id, message=message[:MAX_ERROR_CHARS]
        )
        envelope = self._command(Command.RUNNER_ERROR, snapshot.id, snapshot.owner, error)
        await self._bus.send_command(envelope, wait=True)
        return error

    async def complete_message(
        self,
        snapshot: SessionSnapshot,
        prompt_id: object,
        content: object,
        message_id: object = None,
    ) -> MessageAccepted:
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
            MessageComplete(prompt_id=prompt_id, message_id=message_id, content=content),
            # Same message id -> same command id: a re-sent completion is dropped by JetStream.
            command_id=derived_id("cmd", snapshot.id, "complete", message_id),
        )
        await self._bus.send_command(envelope, wait=True)
        return MessageAccepted(prompt_id=prompt_id, message_id=message_id)

    async def runner_secret(self, snapshot: SessionSnapshot, name: object) -> SecretValue:
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
        data: msgspec.Struct,
        *,
        command_id: str | None = None,
    ) -> Envelope:
        """The envelope of a command; the contract's payload struct goes in as plain data."""
        return Envelope(
            id=command_id or new_id("cmd"),
            type=command,
            source=SOURCE,
            time=iso(self._clock.now()),
            subject=session_id,
            owner=owner,
            data=msgspec.to_builtins(data),
        )


def _checked_tags(tags: list[str]) -> list[str]:
    """Tags as the contract's ``Tag`` allows them, deduplicated in order; at most MAX_TAGS."""
    try:
        checked = msgspec.convert(tags, list[Tag])
    except msgspec.ValidationError as exc:
        raise BadRequest(
            "tags must be a list of 1..64 characters of A-Z a-z 0-9 _ : -",
            detail={"error": str(exc)},
        ) from None
    unique = list(dict.fromkeys(checked))
    if len(unique) > MAX_TAGS:
        raise BadRequest(f"at most {MAX_TAGS} tags", detail={"tags": len(unique)})
    return unique


def _checked_seconds(name: str, value: int | None, default: timedelta, maximum: int) -> int:
    if value is None:
        return int(default.total_seconds())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise BadRequest(f"{name} must be whole seconds from 1 to {maximum}", detail={name: value})
    return value


def _reply_seq(outcome: CommandOutcome) -> int | None:
    return outcome.applied.seq if outcome.applied is not None else None
