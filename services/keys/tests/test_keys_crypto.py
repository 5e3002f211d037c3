"""Envelope encryption properties (hypothesis) and KEK configuration; no I/O."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from _keys_support import random_kek
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from shoal.keys.config import KeysSettings
from shoal.keys.crypto import (
    DEV_KEK_ID,
    NONCE_BYTES,
    DecryptionError,
    KekConfigError,
    KekRing,
    dev_kek,
    new_data_key,
    open_sealed,
    parse_keks,
    seal,
)

owners = st.from_regex(r"\A[A-Za-z0-9_-]{1,128}\Z")
names = st.from_regex(r"\A[A-Za-z0-9_.-]{1,128}\Z")
versions = st.integers(min_value=1, max_value=2**31 - 1)
values = st.binary(max_size=4096)
kek_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
deks = st.binary(min_size=32, max_size=32)


def ring_of(ids: list[str], active: str) -> KekRing:
    return KekRing({kek_id: os.urandom(32) for kek_id in ids}, active=active)


@given(dek=deks, value=values, owner=owners, name=names, version=versions)
def test_seal_round_trips(dek: bytes, value: bytes, owner: str, name: str, version: int) -> None:
    nonce, ct = seal(dek, value, owner=owner, name=name, version=version)
    assert len(nonce) == NONCE_BYTES
    assert open_sealed(dek, nonce, ct, owner=owner, name=name, version=version) == value


@given(value=values, data=st.data())
def test_any_flipped_byte_of_nonce_or_ciphertext_or_tag_fails(
    value: bytes, data: st.DataObject
) -> None:
    dek = new_data_key()
    nonce, ct = seal(dek, value, owner="alice", name="TOKEN", version=3)
    blob = nonce + ct  # the ciphertext ends with the 16-byte tag
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    flipped = bytearray(blob)
    flipped[index] ^= mask
    with pytest.raises(DecryptionError):
        open_sealed(
            dek,
            bytes(flipped[:NONCE_BYTES]),
            bytes(flipped[NONCE_BYTES:]),
            owner="alice",
            name="TOKEN",
            version=3,
        )


@given(value=values, data=st.data())
def test_a_truncated_or_extended_ciphertext_fails(value: bytes, data: st.DataObject) -> None:
    dek = new_data_key()
    nonce, ct = seal(dek, value, owner="alice", name="TOKEN", version=1)
    cut = data.draw(st.integers(min_value=0, max_value=len(ct) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=32))
    for bad in (ct[:cut], ct + extra):
        with pytest.raises(DecryptionError):
            open_sealed(dek, nonce, bad, owner="alice", name="TOKEN", version=1)


@given(
    value=values,
    place=st.tuples(owners, names, versions),
    other=st.tuples(owners, names, versions),
)
def test_another_owner_name_or_version_fails(
    value: bytes, place: tuple[str, str, int], other: tuple[str, str, int]
) -> None:
    """Associated data binds owner, name and version: a ciphertext moved anywhere else fails."""
    dek = new_data_key()
    owner, name, version = place
    nonce, ct = seal(dek, value, owner=owner, name=name, version=version)
    for moved in (
        (other[0], name, version),
        (owner, other[1], version),
        (owner, name, other[2]),
        other,
    ):
        if moved == place:
            continue
        with pytest.raises(DecryptionError):
            open_sealed(dek, nonce, ct, owner=moved[0], name=moved[1], version=moved[2])


@given(value=values)
def test_another_data_key_fails(value: bytes) -> None:
    nonce, ct = seal(new_data_key(), value, owner="a", name="n", version=1)
    with pytest.raises(DecryptionError):
        open_sealed(new_data_key(), nonce, ct, owner="a", name="n", version=1)


@given(dek=deks, owner=owners, data=st.data())
def test_any_flipped_byte_of_a_wrapped_key_fails(
    dek: bytes, owner: str, data: st.DataObject
) -> None:
    ring = ring_of(["k1"], "k1")
    kek_id, wrapped = ring.wrap(owner, dek)
    assert ring.unwrap(owner, kek_id, wrapped) == dek
    index = data.draw(st.integers(min_value=0, max_value=len(wrapped) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    flipped = bytearray(wrapped)
    flipped[index] ^= mask
    with pytest.raises(DecryptionError):
        ring.unwrap(owner, kek_id, bytes(flipped))


@given(dek=deks, owner=owners, other=owners)
def test_a_wrapped_key_cannot_be_given_to_another_owner_or_kek_id(
    dek: bytes, owner: str, other: str
) -> None:
    ring = ring_of(["k1", "k2"], "k1")
    kek_id, wrapped = ring.wrap(owner, dek)
    if other != owner:
        with pytest.raises(DecryptionError):
            ring.unwrap(other, kek_id, wrapped)
    # Relabelled as wrapped by another KEK: fails (the KEK id is bound in too).
    same_key = KekRing({"k1": ring.keks["k1"], "k9": ring.keks["k1"]}, active="k1")
    with pytest.raises(DecryptionError):
        same_key.unwrap(owner, "k9", wrapped)
    with pytest.raises(DecryptionError):
        ring.unwrap(owner, "k2", wrapped)


@settings(max_examples=50)
@given(
    ids=st.lists(kek_ids, min_size=2, max_size=5, unique=True),
    records=st.lists(st.tuples(owners, names, values, st.integers(min_value=0)), max_size=12),
    data=st.data(),
)
def test_rotation_keeps_every_record_readable(
    ids: list[str],
    records: list[tuple[str, str, bytes, int]],
    data: st.DataObject,
) -> None:
    """Data keys wrapped under a mix of KEKs, re-wrapped to one: every secret still opens,
    before and after, and then with the new KEK alone."""
    ring = ring_of(ids, ids[0])
    wrapped_by_owner: dict[str, tuple[str, bytes]] = {}
    sealed = []
    for owner, name, value, pick in records:
        if owner not in wrapped_by_owner:
            wrapped_by_owner[owner] = ring.wrap(owner, new_data_key(), ids[pick % len(ids)])
        kek_id, wrapped = wrapped_by_owner[owner]
        dek = ring.unwrap(owner, kek_id, wrapped)
        sealed.append((owner, name, value, *seal(dek, value, owner=owner, name=name, version=1)))

    def readable(r: KekRing, wrapped: dict[str, tuple[str, bytes]]) -> None:
        for owner, name, value, nonce, ct in sealed:
            dek = r.unwrap(owner, *wrapped[owner])
            assert open_sealed(dek, nonce, ct, owner=owner, name=name, version=1) == value

    readable(ring, wrapped_by_owner)
    target = data.draw(st.sampled_from(ids), label="target")
    rotated = {o: ring.rewrap(o, k, w, target) for o, (k, w) in wrapped_by_owner.items()}
    assert all(kek_id == target for kek_id, _ in rotated.values())
    readable(ring, rotated)
    readable(KekRing({target: ring.keks[target]}, active=target), rotated)
    # Idempotent in effect: re-wrapping again still yields the same DEKs.
    again = {o: ring.rewrap(o, k, w, target) for o, (k, w) in rotated.items()}
    readable(ring, again)


def test_nonces_are_not_reused() -> None:
    dek = new_data_key()
    nonces = {seal(dek, b"x", owner="a", name="n", version=1)[0] for _ in range(10_000)}
    assert len(nonces) == 10_000


# -- KEK configuration ---------------------------------------------------------------------------


def test_parse_keks_accepts_commas_newlines_comments_and_urlsafe_base64() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    text = (
        f"# rotated 2025-01\nk1:{base64.b64encode(k1).decode()},"
        f" k2:{base64.urlsafe_b64encode(k2).decode()}\n"
    )
    assert parse_keks(text, source="test") == {"k1": k1, "k2": k2}


@pytest.mark.parametrize(
    "text",
    [
        "nocolon",
        "bad id:" + base64.b64encode(bytes(range(32))).decode(),
        "k1:not base64!!",
        "k1:" + base64.b64encode(b"short").decode(),
        "k1:" + base64.b64encode(bytes(range(32))).decode() + ",k1:" + random_kek(),
    ],
)
def test_parse_keks_refuses_malformed_entries_without_echoing_them(text: str) -> None:
    with pytest.raises(KekConfigError) as caught:
        parse_keks(text, source="SHOAL_KEYS_KEKS")
    key_part = text.rpartition(":")[2]
    assert key_part not in str(caught.value)


def test_development_ring_has_the_dev_kek_active_alone() -> None:
    ring = KeysSettings(environment="development").kek_ring()
    assert ring.active == DEV_KEK_ID
    assert ring.keks[DEV_KEK_ID] == dev_kek()
    assert "keks" not in repr(ring)


def test_configured_keks_take_over_from_the_dev_kek_outside_production() -> None:
    ring = KeysSettings(environment="test", keys_keks=SecretStr(f"k1:{random_kek()}")).kek_ring()
    assert ring.active == "k1"
    assert ring.ids == sorted(["k1", DEV_KEK_ID])  # dev-wrapped data keys stay readable


def test_several_keks_need_an_active_one() -> None:
    keks = SecretStr(f"k1:{random_kek()},k2:{random_kek()}")
    with pytest.raises(ValidationError, match="SHOAL_KEYS_ACTIVE_KEK"):
        KeysSettings(keys_keks=keks)
    assert KeysSettings(keys_keks=keks, keys_active_kek="k2").kek_ring().active == "k2"
    with pytest.raises(ValidationError, match="not configured"):
        KeysSettings(keys_keks=keks, keys_active_kek="k3")


def test_keks_from_a_mounted_file_merge_with_the_environment(tmp_path: Path) -> None:
    kek_file = tmp_path / "keks"
    kek_file.write_text(f"k2:{random_kek()}\n")
    ring = KeysSettings(
        keys_keks=SecretStr(f"k1:{random_kek()}"), keys_kek_file=kek_file, keys_active_kek="k2"
    ).kek_ring()
    assert set(ring.ids) == {"k1", "k2", DEV_KEK_ID}
    with pytest.raises(ValidationError, match="cannot be read"):
        KeysSettings(keys_kek_file=tmp_path / "missing")


def test_a_bare_kek_from_the_chart_gets_a_stable_fingerprint_id() -> None:
    kek = random_kek()
    first = KeysSettings(keys_kek=SecretStr(kek)).kek_ring()
    second = KeysSettings(keys_kek=SecretStr(kek)).kek_ring()
    assert first.active == second.active != DEV_KEK_ID
    assert first.active.startswith("k")
    assert kek not in first.active


PEPPER = SecretStr("p" * 48)


@pytest.mark.parametrize(
    "keks",
    [
        None,
        f"dev:{base64.b64encode(dev_kek()).decode()}",
        f"k1:{base64.b64encode(dev_kek()).decode()}",
        f"k1:{base64.b64encode(bytes(32)).decode()}",
        f"k1:{base64.b64encode(b'a' * 32).decode()}",
    ],
)
def test_production_refuses_missing_or_placeholder_keks(keks: str | None) -> None:
    with pytest.raises(ValidationError) as caught:
        KeysSettings(
            environment="production",
            keys_pepper=PEPPER,
            keys_keks=SecretStr(keks) if keks is not None else None,
        )
    if keks is not None:
        assert keks.partition(":")[2] not in str(caught.value)
    assert "p" * 48 not in str(caught.value)


def test_production_accepts_real_keks_and_has_no_dev_kek() -> None:
    ring = KeysSettings(
        environment="production", keys_pepper=PEPPER, keys_keks=SecretStr(f"k1:{random_kek()}")
    ).kek_ring()
    assert ring.ids == ["k1"]
