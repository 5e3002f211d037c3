"""The key format: generation, parsing, and that the checksum catches typos before any lookup."""

from __future__ import annotations

import base64
import math
import os
import string

import pytest
from pydantic import SecretStr, ValidationError

from shoal.keys.config import DEV_PEPPER, KeysSettings
from shoal.keys.keyformat import (
    BASE62,
    ID_LENGTH,
    KEY_LENGTH,
    PREFIX,
    SECRET_LENGTH,
    checksum,
    generate_key,
    hash_key,
    parse_key,
)

# Everything a typo could plausibly produce: base62 plus punctuation and whitespace.
_TYPO_ALPHABET = BASE62 + "_-.+/= " + string.punctuation


def test_generated_key_has_the_documented_shape() -> None:
    key_id, key = generate_key()
    assert len(key) == KEY_LENGTH == 57
    assert key.startswith(PREFIX + key_id + "_")
    assert len(key_id) == ID_LENGTH
    assert all(c in BASE62 for c in key[len(PREFIX) :].replace("_", ""))
    assert parse_key(key) == key_id
    assert SECRET_LENGTH * math.log2(62) >= 128


def test_keys_are_unique() -> None:
    keys = {generate_key()[1] for _ in range(2000)}
    assert len(keys) == 2000
    assert len({k[len(PREFIX) : len(PREFIX) + ID_LENGTH] for k in keys}) == 2000


def test_every_single_character_substitution_fails_the_parse() -> None:
    _, key = generate_key()
    tried = 0
    for i, original in enumerate(key):
        for replacement in _TYPO_ALPHABET:
            if replacement == original:
                continue
            typo = key[:i] + replacement + key[i + 1 :]
            assert parse_key(typo) is None, (i, replacement)
            tried += 1
    assert tried > KEY_LENGTH * 60


def test_deletions_insertions_and_swaps_fail_the_parse() -> None:
    _, key = generate_key()
    for i in range(len(key)):
        assert parse_key(key[:i] + key[i + 1 :]) is None
        assert parse_key(key[:i] + "x" + key[i:]) is None
        if i + 1 < len(key) and key[i] != key[i + 1]:
            swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            assert parse_key(swapped) is None, i


def test_parse_refuses_foreign_strings() -> None:
    for value in ("", "shoal_", "ghp_" + "a" * 53, "dev-admin-key", "x" * KEY_LENGTH):
        assert parse_key(value) is None


def test_checksum_is_fixed_width_base62() -> None:
    assert checksum("") == "000000"  # crc32("") == 0
    assert len(checksum("shoal_abc")) == 6


def test_hash_depends_on_pepper_and_key() -> None:
    _, key = generate_key()
    assert hash_key(b"a" * 32, key) != hash_key(b"b" * 32, key)
    assert hash_key(b"a" * 32, key) == hash_key(b"a" * 32, key)
    assert len(hash_key(b"a" * 32, key)) == 64


def test_development_uses_the_dev_pepper() -> None:
    assert KeysSettings(environment="development").pepper() == DEV_PEPPER.encode()


@pytest.mark.parametrize("pepper", [None, "", "changeme", DEV_PEPPER, "short-but-real"])
def test_production_refuses_a_missing_or_placeholder_pepper(pepper: str | None) -> None:
    with pytest.raises(ValidationError, match="SHOAL_KEYS_PEPPER"):
        KeysSettings(
            environment="production",
            keys_pepper=SecretStr(pepper) if pepper is not None else None,
            keys_kek=SecretStr(base64.b64encode(os.urandom(32)).decode()),
        )


def test_production_accepts_a_real_pepper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_ENVIRONMENT", "production")
    monkeypatch.setenv("SHOAL_KEYS_PEPPER", "p" * 48)
    monkeypatch.setenv("SHOAL_KEYS_KEK", base64.b64encode(os.urandom(32)).decode())
    assert KeysSettings().pepper() == b"p" * 48
