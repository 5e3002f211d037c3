"""The API key format: recognisable, checksummed, and split into a public id and a secret.

``shoal_`` + 12-char id + ``_`` + 32-char secret + 6-char checksum, all base62. The id is not
secret (it names the row to look up); the secret carries 32 * log2(62) ~ 190 bits from
:mod:`secrets`; the checksum is the CRC32 of everything before it, so a mistyped key (any
single-character change, swap, insertion or deletion) is refused before any lookup — the
scheme of GitHub's ``ghp_`` tokens. Only an HMAC of the whole key is stored.

Example::

    key_id, key = generate_key()
    parse_key(key) == key_id                       # True
    parse_key(key[:-1] + "x")                      # None: checksum fails
    hash_key(pepper, key)                          # hex HMAC-SHA256, what the table holds
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PREFIX = "shoal_"
ID_LENGTH = 12
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6  # 62**6 > 2**32, so any CRC32 fits
KEY_LENGTH = len(PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH

_BASE62_SET = frozenset(BASE62)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(BASE62[digit])
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    """The 6-char base62 CRC32 of ``body`` (the key without its checksum)."""
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def generate_key() -> tuple[str, str]:
    """A new ``(key_id, key)``; the key is shown once and never stored."""
    key_id = _random_base62(ID_LENGTH)
    body = f"{PREFIX}{key_id}_{_random_base62(SECRET_LENGTH)}"
    return key_id, body + checksum(body)


def parse_key(key: str) -> str | None:
    """The key id of a well-formed key whose checksum matches, else ``None``."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return None
    key_id = key[len(PREFIX) : len(PREFIX) + ID_LENGTH]
    separator = key[len(PREFIX) + ID_LENGTH]
    rest = key[len(PREFIX) + ID_LENGTH + 1 :]
    if separator != "_" or not _BASE62_SET.issuperset(key_id) or not _BASE62_SET.issuperset(rest):
        return None
    body, check = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
    if not hmac.compare_digest(checksum(body), check):
        return None
    return key_id


def hash_key(pepper: bytes, key: str) -> str:
    """HMAC-SHA256 of the presented key under the server pepper, hex."""
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
