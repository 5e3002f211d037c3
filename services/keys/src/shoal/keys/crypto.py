"""Envelope encryption of users' secrets: AES-256-GCM data keys wrapped by key-encryption keys.

Each owner has one random 256-bit data key (DEK). A secret value is sealed with it under a
fresh random 96-bit nonce, with associated data that names the owner, the secret name and
the secret version, so a ciphertext copied to another row fails to open. The DEK is stored
only wrapped (AES-256-GCM again) by a key-encryption key (KEK) named by an id; the wrap's
associated data names the owner and the KEK id, so a wrapped DEK cannot be given to another
owner either. Rotating the KEK re-wraps DEKs; secret ciphertexts are never touched.

Random nonces are safe for about 2**32 seals per DEK (NIST SP 800-38D); one owner's puts
stay far below that.

Example::

    ring = KekRing({"k1": os.urandom(32)}, active="k1")
    dek = new_data_key()
    kek_id, wrapped = ring.wrap("alice", dek)
    nonce, ct = seal(dek, b"sk-...", owner="alice", name="OPENAI_API_KEY", version=1)
    open_sealed(ring.unwrap("alice", kek_id, wrapped), nonce, ct,
                owner="alice", name="OPENAI_API_KEY", version=1)      # b"sk-..."
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonces, random per encryption
TAG_BYTES = 16
KEK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEV_KEK_ID = "dev"

_SECRET_AD = b"shoal.secret.v1"
_WRAP_AD = b"shoal.dek.v1"
# Anyone who reads this file can derive the dev KEK, which is why production refuses it.
_DEV_KEK_SEED = b"shoal-development-kek-do-not-use-in-production"


class DecryptionError(Exception):
    """A ciphertext or wrapped key failed authentication (tampered, moved, or wrong key).

    Carries no key material and no plaintext; the caller decides what to report.
    """


class KekConfigError(ValueError):
    """The configured KEKs are malformed; the message never includes key material."""


def dev_kek() -> bytes:
    """The development KEK: fixed, derived from a public seed (never valid in production)."""
    return hashlib.sha256(_DEV_KEK_SEED).digest()


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _associated_data(*parts: str | int) -> bytes:
    """Length-prefixed encoding, so no two different tuples share an encoding."""
    out = bytearray()
    for part in parts:
        raw = str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def secret_ad(owner: str, name: str, version: int) -> bytes:
    return _SECRET_AD + _associated_data(owner, name, version)


def wrap_ad(owner: str, kek_id: str) -> bytes:
    return _WRAP_AD + _associated_data(owner, kek_id)


def seal(dek: bytes, value: bytes, *, owner: str, name: str, version: int) -> tuple[bytes, bytes]:
    """``(nonce, ciphertext || tag)`` of ``value`` bound to owner, name and version."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(dek).encrypt(nonce, value, secret_ad(owner, name, version))


def open_sealed(
    dek: bytes, nonce: bytes, ciphertext: bytes, *, owner: str, name: str, version: int
) -> bytes:
    """The plaintext, or :class:`DecryptionError` if anything was changed or moved."""
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise DecryptionError("malformed ciphertext")
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, secret_ad(owner, name, version))
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None


@dataclass(frozen=True)
class KekRing:
    """The KEKs this process knows, by id, and the active one used for new wraps.

    ``repr`` shows ids only.
    """

    keks: Mapping[str, bytes] = field(repr=False)
    active: str

    def __post_init__(self) -> None:
        for kek_id, key in self.keks.items():
            if not KEK_ID_RE.match(kek_id):
                raise KekConfigError("a KEK id must be 1..64 characters of A-Z a-z 0-9 _ -")
            if len(key) != KEY_BYTES:
                raise KekConfigError(f"KEK {kek_id} must be {KEY_BYTES} bytes")
        if self.active not in self.keks:
            raise KekConfigError(f"the active KEK {self.active!r} is not configured")

    @property
    def ids(self) -> list[str]:
        return sorted(self.keks)

    def has(self, kek_id: str) -> bool:
        return kek_id in self.keks

    def wrap(self, owner: str, dek: bytes, kek_id: str | None = None) -> tuple[str, bytes]:
        """``(kek_id, nonce || wrapped DEK || tag)`` under ``kek_id`` (default: the active KEK)."""
        kek_id = kek_id or self.active
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(self.keks[kek_id]).encrypt(nonce, dek, wrap_ad(owner, kek_id))
        return kek_id, nonce + wrapped

    def unwrap(self, owner: str, kek_id: str, wrapped: bytes) -> bytes:
        """The DEK; :class:`KeyError` if ``kek_id`` is unknown, :class:`DecryptionError` if bad."""
        kek = self.keks[kek_id]
        if len(wrapped) != NONCE_BYTES + KEY_BYTES + TAG_BYTES:
            raise DecryptionError("malformed wrapped key")
        nonce, body = wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:]
        try:
            return AESGCM(kek).decrypt(nonce, body, wrap_ad(owner, kek_id))
        except InvalidTag:
            raise DecryptionError("wrapped key failed authentication") from None

    def rewrap(
        self, owner: str, kek_id: str, wrapped: bytes, to_kek_id: str | None = None
    ) -> tuple[str, bytes]:
        """The same DEK wrapped under ``to_kek_id`` (default: the active KEK)."""
        return self.wrap(owner, self.unwrap(owner, kek_id, wrapped), to_kek_id)


def parse_keks(text: str, *, source: str) -> dict[str, bytes]:
    """``id:base64key`` entries separated by commas or newlines (``#`` starts a comment line)."""
    keks: dict[str, bytes] = {}
    entries = [
        entry.strip()
        for line in text.splitlines()
        if not line.strip().startswith("#")
        for entry in line.split(",")
    ]
    for number, entry in enumerate((e for e in entries if e), start=1):
        kek_id, sep, encoded = entry.partition(":")
        kek_id = kek_id.strip()
        if not sep or not KEK_ID_RE.match(kek_id):
            raise KekConfigError(f"{source} entry {number} is not id:base64key")
        try:
            key = base64.b64decode(
                encoded.strip().replace("-", "+").replace("_", "/"), validate=True
            )
        except (binascii.Error, ValueError):
            raise KekConfigError(f"{source} KEK {kek_id} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise KekConfigError(f"{source} KEK {kek_id} must decode to {KEY_BYTES} bytes")
        if kek_id in keks and not hmac.compare_digest(keks[kek_id], key):
            raise KekConfigError(f"{source} defines KEK {kek_id} twice with different keys")
        keks[kek_id] = key
    return keks


def kek_fingerprint_id(encoded: str) -> str:
    """An id for a bare base64 KEK: ``k`` + 12 hex digits of a SHA-256 of it (not reversible)."""
    return "k" + hashlib.sha256(b"shoal.kek-id\0" + encoded.strip().encode()).hexdigest()[:12]


def is_weak_kek(key: bytes) -> bool:
    """The dev KEK, or a key with almost no distinct bytes (zeros, a repeated character)."""
    return hmac.compare_digest(key, dev_kek()) or len(set(key)) < 8
