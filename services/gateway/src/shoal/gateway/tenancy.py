"""Tenancy rules of the gateway: scopes, acting owners, API keys and users' secrets.

No transport here. Every route family needs a scope; ``admin`` may do everything for any
owner; ``read`` may use every ``GET`` (and follow sockets) but change nothing. Another owner's
resources look missing (404), never forbidden; a missing *scope* is 403 and says nothing about
any resource. Secret values pass through here on their way to or from the keys service and are
never logged, echoed in an error or kept.

Example::

    authorize_route(principal, "/v1/secrets/{name}", "PUT")     # Forbidden without the scope
    tenancy = Tenancy(bus, on_revoked=service.key_revoked)
    await tenancy.put_secret(principal, "OPENAI_API_KEY", value, owner=None)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from shoal.common.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from shoal.common.messaging import is_token
from shoal.gateway.views import SecretValue

ADMIN = "admin"
SESSIONS = "sessions"
JOBS = "jobs"
JOBS_WORK = "jobs:work"  # take jobs as a worker (/v1/workers/ws); nothing else
SECRETS = "secrets"
READ = "read"
KEYS = "keys"  # a route family, not a scope: every key may read and manage its owner's keys
SCOPES = frozenset({ADMIN, SESSIONS, JOBS, JOBS_WORK, SECRETS, READ})

SECRET_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"  # noqa: S105 - a name pattern
_SECRET_NAME_RE = re.compile(SECRET_NAME_PATTERN)
MAX_SECRET_BYTES = 64 * 1024  # UTF-8 bytes of a value (the keys service's limit too)
ALLOWED_SECRETS = "allowed_secrets"  # the session metadata member naming its runner's secrets

# Route families by path prefix (the route's template). A /v1 path matching none of them needs
# ``admin``: a route added without a family here fails closed.
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("/v1/sessions", SESSIONS),
    ("/v1/events", SESSIONS),
    ("/v1/ws-tickets", SESSIONS),
    ("/v1/secrets", SECRETS),
    ("/v1/keys", KEYS),
    ("/v1/jobs", JOBS),
    ("/v1/run", JOBS),
    ("/v1/schedules", JOBS),
    ("/v1/webhooks", JOBS),
    ("/v1/workers", JOBS_WORK),
)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Scoped(Protocol):
    """What the rules need of a caller (``service.Principal``)."""

    @property
    def owner(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    @property
    def scopes(self) -> tuple[str, ...]: ...


def route_family(path: str) -> str:
    """The family of a request path (``/v1/secrets/x`` -> ``secrets``); else ``admin``."""
    for prefix, family in _FAMILIES:
        if path == prefix or path.startswith(prefix + "/"):
            return family
    return ADMIN


def is_write(path: str, method: str) -> bool:
    """Whether a request may change something. The proxy reaches an agent's own server, whose
    GETs may act, so it always counts as a write."""
    if path.rstrip("/") == "/v1/ws-tickets":
        return False  # a ticket only stands for the key, with the key's own scopes
    parts = path.split("/")  # ["", "v1", "sessions", <id>, "proxy", ...]
    proxied = len(parts) > 4 and parts[2] == "sessions" and parts[4] == "proxy"
    return method.upper() not in _SAFE_METHODS or proxied


def allows(principal: Scoped, family: str, *, write: bool) -> bool:
    if ADMIN in principal.scopes:
        return True
    if family == KEYS:  # own owner's keys: any key may list, any but a read-only one manage
        return not write or any(s != READ for s in principal.scopes)
    if family in principal.scopes:
        return True
    return not write and READ in principal.scopes and family != ADMIN


def authorize(principal: Scoped, family: str, *, write: bool) -> None:
    """:class:`Forbidden` unless the key's scopes cover ``family`` (reading or writing)."""
    if not allows(principal, family, write=write):
        need = family if family != KEYS else "any scope but read"
        raise Forbidden(
            f"this API key lacks the scope for this request (needs {need})",
            detail={"required_scope": need, "write": write},
        )


def authorize_route(principal: Scoped, path: str, method: str) -> None:
    """The scope check of an HTTP route, by its template and method."""
    authorize(principal, route_family(path), write=is_write(path, method))


def acting_owner(principal: Scoped, requested: str | None) -> str:
    """The owner a request acts for: the key's own, or any an admin key names."""
    if requested is None or requested == principal.owner:
        return principal.owner
    if ADMIN not in principal.scopes:
        raise Forbidden("acting for another owner needs the admin scope")
    if not is_token(requested):
        raise BadRequest("owner must be 1..128 characters of A-Z a-z 0-9 _ -")
    return requested


def check_secret_name(name: object) -> str:
    # The name is not echoed: an odd one may be a value pasted into the wrong field.
    # "." and ".." would be path segments that URL clients rewrite.
    if not isinstance(name, str) or not _SECRET_NAME_RE.match(name) or name in (".", ".."):
        raise BadRequest(f"secret name must match {SECRET_NAME_PATTERN} and not be . or ..")
    return name


def check_secret_value(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("value must be a string")
    # len() bounds the bytes from below, so a long value is refused before it is encoded.
    if len(value) > MAX_SECRET_BYTES or len(value.encode()) > MAX_SECRET_BYTES:
        raise PayloadTooLarge(
            f"a secret value is at most {MAX_SECRET_BYTES} bytes",
            detail={"max_bytes": MAX_SECRET_BYTES},
        )
    return value


def allowed_secrets(metadata: dict[str, Any]) -> frozenset[str]:
    """Names a session's runner may read: ``metadata.allowed_secrets`` (none if absent)."""
    names = metadata.get(ALLOWED_SECRETS)
    if not isinstance(names, list):
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str))


def check_session_metadata(metadata: dict[str, Any]) -> None:
    """``allowed_secrets``, when given, is a list of valid secret names (at most 100)."""
    if ALLOWED_SECRETS not in metadata:
        return
    names = metadata[ALLOWED_SECRETS]
    if not isinstance(names, list) or len(names) > 100:
        raise BadRequest("metadata.allowed_secrets must be a list of at most 100 secret names")
    for name in names:
        check_secret_name(name)


class IssuedKey(msgspec.Struct, kw_only=True):
    """A key just issued: ``key`` is the secret, shown this once."""

    id: str | None = None
    key: str | None = None
    name: str | None = None
    owner: str | None = None
    scopes: list[str] | None = None
    created_at: str | None = None
    expires_at: str | None = None


class KeyView(msgspec.Struct, kw_only=True):
    """A key as listed: no secret, its dates (RFC 3339) and whether it was revoked."""

    id: str
    name: str
    owner: str
    scopes: list[str]
    created_at: str
    expires_at: str | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None


class SecretView(msgspec.Struct, kw_only=True):
    """A secret as listed: its name, version and dates, never its value."""

    name: str | None = None
    version: int | None = None
    created_at: str | None = None
    updated_at: str | None = None


class KeysBus(Protocol):
    """The keys service's RPCs (``bus.Bus.keys_rpc`` in production)."""

    async def keys_rpc(self, method: str, body: dict[str, Any]) -> dict[str, Any]: ...


def _actor(principal: Scoped) -> str:
    return f"key:{principal.key_id}"


class Tenancy:
    """API keys and secrets on behalf of a caller, through the keys service."""

    def __init__(self, bus: KeysBus, on_revoked: Callable[[str], None]) -> None:
        self._bus = bus
        self._on_revoked = on_revoked

    # -- API keys --
    async def create_key(
        self,
        principal: Scoped,
        *,
        name: str,
        scopes: list[str],
        owner: str | None = None,
        expires_in_seconds: int | None = None,
    ) -> IssuedKey:
        """Issue a key (shown once). A non-admin key issues only for its owner, only its scopes."""
        owner = acting_owner(principal, owner)
        unknown = sorted(set(scopes) - SCOPES)
        if not scopes or unknown:
            raise BadRequest(
                "scopes must be a non-empty subset of " + ", ".join(sorted(SCOPES)),
                detail={"unknown": unknown},
            )
        if ADMIN not in principal.scopes and not set(scopes) <= set(principal.scopes):
            raise Forbidden("a key can only issue keys with scopes it has itself")
        body: dict[str, Any] = {"name": name, "owner": owner, "scopes": sorted(set(scopes))}
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        data = await self._bus.keys_rpc("create", body)
        return msgspec.convert(data, IssuedKey)

    async def list_keys(self, principal: Scoped, owner: str | None) -> list[KeyView]:
        """The owner's keys; an admin key without ``owner`` lists every key."""
        if ADMIN in principal.scopes and owner is None:
            data = await self._bus.keys_rpc("list", {"owner": None})
        else:
            data = await self._bus.keys_rpc("list", {"owner": acting_owner(principal, owner)})
        return [msgspec.convert(k, KeyView) for k in data.get("keys") or [] if isinstance(k, dict)]

    async def revoke_key(self, principal: Scoped, key_id: str) -> None:
        """Revoke a key of the caller's owner (any key for admin); another owner's is 404."""
        if not is_token(key_id):
            raise NotFound("key not found")
        if ADMIN not in principal.scopes:
            # The revoke RPC does not know owners: the key must be in the caller's own list.
            own = await self._bus.keys_rpc("list", {"owner": principal.owner})
            own_ids = {k.get("id") for k in own.get("keys") or [] if isinstance(k, dict)}
            if key_id not in own_ids:
                raise NotFound("key not found")
        await self._bus.keys_rpc("revoke", {"id": key_id})
        self._on_revoked(key_id)  # this gateway at once; the broadcast reaches the others

    # -- secrets --
    async def put_secret(
        self, principal: Scoped, name: str, value: object, owner: str | None = None
    ) -> None:
        owner = acting_owner(principal, owner)
        body = {
            "owner": owner,
            "name": check_secret_name(name),
            "value": check_secret_value(value),
            "actor": _actor(principal),
        }
        await self._bus.keys_rpc("secrets.put", body)

    async def list_secrets(self, principal: Scoped, owner: str | None = None) -> list[SecretView]:
        """Names, versions and dates of the owner's secrets, never values."""
        data = await self._bus.keys_rpc("secrets.list", {"owner": acting_owner(principal, owner)})
        return [
            msgspec.convert(s, SecretView) for s in data.get("secrets") or [] if isinstance(s, dict)
        ]

    async def delete_secret(self, principal: Scoped, name: str, owner: str | None = None) -> None:
        body = {
            "owner": acting_owner(principal, owner),
            "name": check_secret_name(name),
            "actor": _actor(principal),
        }
        data = await self._bus.keys_rpc("secrets.delete", body)
        if not data.get("deleted"):
            raise NotFound("secret not found")

    async def session_secret(
        self, session_id: str, owner: str, metadata: dict[str, Any], name: object
    ) -> SecretValue:
        """A secret for a session's runner: only names in its ``allowed_secrets``.

        A name the session may not use is refused before the keys service is asked, so the
        answer (``forbidden``) is the same whether the owner has such a secret or not.
        """
        checked = check_secret_name(name)
        if checked not in allowed_secrets(metadata):
            raise Forbidden("this session may not read that secret")
        data = await self._bus.keys_rpc(
            "secrets.get", {"owner": owner, "name": checked, "actor": f"session:{session_id}"}
        )
        value = data.get("value") if isinstance(data, dict) else None
        return SecretValue(name=checked, value=value if isinstance(value, str) else None)
