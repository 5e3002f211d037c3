"""The rules of users' secrets: names, sizes, envelope encryption, audit, KEK rotation.

No transport here. A plaintext value lives only in the arguments and return values of
:meth:`SecretService.put` and :meth:`SecretService.get`: it is never logged, never put in an
error (messages are fixed strings), an audit event or an exception chain (``from None``).

Example::

    service = SecretService(SecretStore(db), settings.kek_ring(), audit, clock=clock)
    await service.put("alice", "OPENAI_API_KEY", "sk-...")
    row, value = await service.get("alice", "OPENAI_API_KEY")
    await service.rotate_kek("k2")       # re-wraps every data key under k2
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shoal.common.clock import Clock
from shoal.common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ShoalError,
    Unavailable,
)
from shoal.common.messaging import is_token
from shoal.keys.audit import (
    KEK_ROTATED,
    SECRET_DELETED,
    SECRET_PUT,
    SECRET_READ,
    Audit,
    emit_after_commit,
)
from shoal.keys.crypto import DecryptionError, KekRing, new_data_key, open_sealed, seal
from shoal.keys.store import DataKeyRow, SecretRow, SecretStore

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
NAME_RE = re.compile(NAME_PATTERN)
MAX_VALUE_BYTES = 64 * 1024
MAX_ACTOR_LENGTH = 200
ROTATE_BATCH = 100


class SecretIntegrityError(ShoalError):
    """A stored ciphertext or wrapped key failed authentication (tampering or corruption)."""

    title = "Secret could not be decrypted"


@dataclass(frozen=True, slots=True)
class RotationReport:
    to_kek_id: str
    rewrapped: int
    # data keys per KEK id after the run; {to_kek_id: n} alone means the rotation is complete
    by_kek: dict[str, int]
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return sum(n for kek_id, n in self.by_kek.items() if kek_id != self.to_kek_id)


def check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not is_token(owner):
        raise BadRequest("owner must be 1..128 characters of A-Z a-z 0-9 _ -")
    return owner


def check_name(name: object) -> str:
    # The name is not echoed back: an odd one may be a value pasted in the wrong field.
    # "." and ".." would be path segments in /v1/secrets/{name}, which URL clients rewrite.
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise BadRequest(f"secret name must match {NAME_PATTERN} and not be . or ..")
    return name


def check_value(value: object) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("value must be a string")
    if len(value) > MAX_VALUE_BYTES:  # cheap bound before encoding; each char is >= 1 byte
        raise PayloadTooLarge(
            f"a secret value is at most {MAX_VALUE_BYTES} bytes", detail={"limit": MAX_VALUE_BYTES}
        )
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise BadRequest("value must be valid Unicode text") from None
    if len(raw) > MAX_VALUE_BYTES:
        raise PayloadTooLarge(
            f"a secret value is at most {MAX_VALUE_BYTES} bytes", detail={"limit": MAX_VALUE_BYTES}
        )
    return raw


def check_actor(actor: object) -> str | None:
    """Who asks (e.g. ``key:<id>``, ``session:<id>``), recorded in audit events; optional."""
    if actor is None:
        return None
    if not isinstance(actor, str) or not 0 < len(actor) <= MAX_ACTOR_LENGTH:
        raise BadRequest(f"actor must be a string of 1..{MAX_ACTOR_LENGTH} characters")
    return actor


class SecretService:
    def __init__(self, store: SecretStore, ring: KekRing, audit: Audit, *, clock: Clock) -> None:
        self._store = store
        self._ring = ring
        self._audit = audit
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    def _unwrap(self, dk: DataKeyRow) -> bytes:
        if not self._ring.has(dk.kek_id):
            log.error("data key wrapped by a KEK that is not configured", extra=_dk_log(dk))
            raise Unavailable("a key-encryption key is not configured on this replica")
        try:
            return self._ring.unwrap(dk.owner, dk.kek_id, dk.wrapped_key)
        except DecryptionError:
            log.error("wrapped data key failed authentication", extra=_dk_log(dk))
            raise SecretIntegrityError() from None

    async def _data_key(self, owner: str) -> bytes:
        """The owner's DEK, created (wrapped by the active KEK) on the first put."""
        dk = await self._store.data_key(owner)
        if dk is None:
            kek_id, wrapped = self._ring.wrap(owner, new_data_key())
            dk = await self._store.insert_data_key(
                DataKeyRow(owner=owner, kek_id=kek_id, wrapped_key=wrapped, created_at=self._now())
            )
        return self._unwrap(dk)

    async def put(
        self, owner: str, name: str, value: str, *, actor: str | None = None
    ) -> SecretRow:
        """Store a new version of ``owner``'s secret ``name``."""
        owner, name, raw = check_owner(owner), check_name(name), check_value(value)
        dek = await self._data_key(owner)

        def sealer(version: int) -> tuple[bytes, bytes]:
            return seal(dek, raw, owner=owner, name=name, version=version)

        row = await self._store.put(owner, name, self._now(), sealer)
        await emit_after_commit(
            self._audit,
            SECRET_PUT,
            owner=owner,
            subject=name,
            data=_audit_data(version=row.version, actor=actor),
        )
        return row

    async def list_secrets(self, owner: str) -> list[SecretRow]:
        return await self._store.list_secrets(check_owner(owner))

    async def get(
        self, owner: str, name: str, *, actor: str | None = None
    ) -> tuple[SecretRow, str]:
        """The secret's row and value; another owner's secret is :class:`NotFound` too.

        The read is audited before the value is returned: if the event cannot be recorded,
        the value is not handed out (:class:`Unavailable`).
        """
        owner, name = check_owner(owner), check_name(name)
        found = await self._store.get(owner, name)
        if found is None:
            raise NotFound("secret not found")
        row, dk = found
        try:
            raw = open_sealed(
                self._unwrap(dk),
                row.nonce,
                row.ciphertext,
                owner=owner,
                name=name,
                version=row.version,
            )
        except DecryptionError:
            log.error(
                "secret failed authentication",
                extra={"owner": owner, "secret_name": name, "secret_version": row.version},
            )
            raise SecretIntegrityError() from None
        try:
            await self._audit.emit(
                SECRET_READ,
                owner=owner,
                subject=name,
                data=_audit_data(version=row.version, actor=actor),
            )
        except Exception:  # any publish failure: refuse rather than hand out an unaudited read
            log.error(
                "secret read refused: audit event not recorded",
                extra={"owner": owner, "secret_name": name},
                exc_info=True,
            )
            raise Unavailable("audit is unavailable; try again") from None
        return row, raw.decode()

    async def delete(self, owner: str, name: str, *, actor: str | None = None) -> bool:
        """Delete ``owner``'s secret ``name``; ``False`` if there was none."""
        owner, name = check_owner(owner), check_name(name)
        deleted = await self._store.delete(owner, name)
        if deleted:
            await emit_after_commit(
                self._audit,
                SECRET_DELETED,
                owner=owner,
                subject=name,
                data=_audit_data(actor=actor),
            )
        return deleted

    async def rotate_kek(self, to_kek_id: str | None = None) -> RotationReport:
        """Re-wrap every data key under ``to_kek_id`` (the active KEK), online and idempotent.

        Secrets are not re-encrypted: their DEKs do not change, so every ciphertext stays
        readable throughout, by any replica that knows the old and the new KEK. ``to_kek_id``
        must be this replica's active KEK, so new data keys are not created under another one
        while the rotation runs; deploy ``SHOAL_KEYS_ACTIVE_KEK`` everywhere first.
        """
        target = to_kek_id or self._ring.active
        if not self._ring.has(target):
            raise BadRequest("to_kek_id is not a configured KEK", detail={"to_kek_id": target})
        if target != self._ring.active:
            raise Conflict(
                "to_kek_id must be the active KEK (SHOAL_KEYS_ACTIVE_KEK) of every keys replica",
                detail={"to_kek_id": target, "active": self._ring.active},
            )

        def rewrap(dk: DataKeyRow) -> bytes:
            return self._ring.rewrap(dk.owner, dk.kek_id, dk.wrapped_key, target)[1]

        rewrapped, failures = await self._store.rewrap_all(target, rewrap, batch=ROTATE_BATCH)
        for failure in failures:
            log.error(
                "data key not re-wrapped",
                extra={"owner": failure.owner, "kek_id": failure.kek_id, "reason": failure.reason},
            )
        report = RotationReport(
            to_kek_id=target,
            rewrapped=rewrapped,
            by_kek=await self._store.count_by_kek(),
            failed=[{"owner": f.owner, "kek_id": f.kek_id, "reason": f.reason} for f in failures],
        )
        log.info(
            "kek rotation finished",
            extra={"to_kek_id": target, "rewrapped": rewrapped, "remaining": report.remaining},
        )
        await emit_after_commit(
            self._audit,
            KEK_ROTATED,
            owner=None,
            subject=target,
            data={"rewrapped": rewrapped, "remaining": report.remaining, "failed": len(failures)},
        )
        return report


def _dk_log(dk: DataKeyRow) -> dict[str, object]:
    return {"owner": dk.owner, "kek_id": dk.kek_id, "data_key_version": dk.version}


def _audit_data(*, version: int | None = None, actor: str | None = None) -> dict[str, object]:
    data: dict[str, object] = {}
    if version is not None:
        data["version"] = version
    if actor is not None:
        data["actor"] = actor
    return data
