"""Object stores against real backends: a temp directory and moto's S3 server."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from shoal.common.errors import BadRequest, Conflict, Unavailable
from shoal.common.settings import CommonSettings
from shoal.common.storage import (
    FilesystemObjectStorage,
    ObjectStorage,
    S3ObjectStorage,
    object_storage_from_settings,
    validate_key,
)
from shoal.devtools.embedded import free_port

_MD5_HELLO = "5d41402abc4b2a76b9719d911017c592"  # md5(b"hello")


def _s3(endpoint: str, bucket: str | None = None) -> S3ObjectStorage:
    return S3ObjectStorage(
        bucket=bucket or "t" + secrets.token_hex(6),
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
    )


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=["fs", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStorage]:
    if request.param == "fs":
        objects: ObjectStorage = FilesystemObjectStorage(tmp_path / "objects")
    else:
        s3 = _s3(request.getfixturevalue("s3_endpoint"))
        await s3.start()
        objects = s3
    yield objects
    await objects.close()


@pytest.fixture(params=["fs", "s3"])
async def unstarted(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStorage]:
    """A store not yet connected: a key check must refuse before any I/O (S3 starts lazily)."""
    objects: ObjectStorage
    if request.param == "fs":
        objects = FilesystemObjectStorage(tmp_path / "objects")
    else:
        objects = _s3(request.getfixturevalue("s3_endpoint"))
    yield objects
    await objects.close()


async def test_round_trip(store: ObjectStorage) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    await store.put("sessions/s1/a.txt", b"hello", "text/plain")

    got = await store.get("sessions/s1/a.txt")

    assert got is not None
    assert got.data == b"hello"
    assert got.content_type == "text/plain"
    assert got.size == 5
    assert got.etag == _MD5_HELLO
    assert got.modified >= before
    assert got.modified.tzinfo is not None


async def test_default_content_type_and_empty_object(store: ObjectStorage) -> None:
    await store.put("empty", b"")
    got = await store.get("empty")
    assert got is not None
    assert (got.data, got.size, got.content_type) == (b"", 0, "application/octet-stream")


async def test_put_overwrites(store: ObjectStorage) -> None:
    await store.put("k", b"one", "text/plain")
    await store.put("k", b"two!", "application/json")
    got = await store.get("k")
    assert got is not None
    assert (got.data, got.content_type, got.size) == (b"two!", "application/json", 4)


async def test_missing_key(store: ObjectStorage) -> None:
    assert await store.get("nope/nothing") is None
    assert await store.delete("nope/nothing") is False


async def test_delete(store: ObjectStorage) -> None:
    await store.put("a/b/c", b"x")
    assert await store.delete("a/b/c") is True
    assert await store.get("a/b/c") is None
    assert await store.delete("a/b/c") is False
    assert await store.list("") == []


async def test_list_by_prefix_in_key_order_with_limit(store: ObjectStorage) -> None:
    keys = ["s/1/b", "s/1/a", "s/1/sub/z", "s/10/a", "s/2/a", "t/a"]
    for key in keys:
        await store.put(key, key.encode())

    assert [i.key for i in await store.list("s/1/")] == ["s/1/a", "s/1/b", "s/1/sub/z"]
    # A prefix is a string prefix, not a directory: "s/1" matches "s/10/..." too.
    assert [i.key for i in await store.list("s/1")] == [
        "s/1/a",
        "s/1/b",
        "s/1/sub/z",
        "s/10/a",
    ]
    assert [i.key for i in await store.list("", limit=2)] == ["s/1/a", "s/1/b"]
    assert len(await store.list("")) == len(keys)
    assert await store.list("nothing/") == []

    (info,) = await store.list("s/2/")
    assert (info.size, info.etag) == (5, "63cf2135a5f44314a139dec7463948ec")  # md5(b"s/2/a")


async def test_s3_list_stops_at_limit(s3_endpoint: str) -> None:
    store = _s3(s3_endpoint)
    try:
        await asyncio.gather(*(store.put(f"p/{n:03}", b"") for n in range(25)))
        listed = await store.list("p/", limit=20)
        assert [i.key for i in listed] == [f"p/{n:03}" for n in range(20)]
        assert len(await store.list("p/")) == 25
    finally:
        await store.close()


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "../up",
        "a/../../up",
        "a/./b",
        "a//b",
        "a/",
        "nul\x00",
        "a\\b",
        ".shoal/x",
        ".shoal",
        "\ud800",
        "x" * 1025,
    ],
)
async def test_bad_keys_are_refused(unstarted: ObjectStorage, key: str) -> None:
    store = unstarted
    with pytest.raises(BadRequest):
        await store.put(key, b"x")
    with pytest.raises(BadRequest):
        await store.get(key)
    with pytest.raises(BadRequest):
        await store.delete(key)


@pytest.mark.parametrize("prefix", ["/abs", "../", "a/../", "a//", "nul\x00", ".shoal/"])
async def test_bad_prefixes_are_refused(unstarted: ObjectStorage, prefix: str) -> None:
    store = unstarted
    with pytest.raises(BadRequest):
        await store.list(prefix)


def test_validate_key_allows_ordinary_keys() -> None:
    for key in ["a", "sessions/s_1/transcript.json", "a/.hidden", "a/..b", "ünï/cödé"]:
        assert validate_key(key) == key


async def test_filesystem_stays_inside_root_and_leaves_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemObjectStorage(root)
    await asyncio.gather(*(store.put(f"d/{n}", bytes([n]) * 1000) for n in range(20)))
    await asyncio.gather(*(store.put("same", bytes([n]) * 1000) for n in range(20)))

    got = await store.get("same")
    assert got is not None
    assert len(set(got.data)) == 1  # one writer's bytes, never a mix
    assert _entries(root / ".shoal" / "tmp") == []


async def test_filesystem_prunes_empty_directories(tmp_path: Path) -> None:
    store = FilesystemObjectStorage(tmp_path)
    await store.put("a/b/c/d", b"x")
    await store.put("a/keep", b"y")
    assert await store.delete("a/b/c/d") is True
    assert not (tmp_path / "a" / "b").exists()
    assert (tmp_path / "a" / "keep").exists()
    # The directory a delete pruned is recreated by the next put.
    await store.put("a/b/c/d", b"z")
    assert [i.key for i in await store.list("a/")] == ["a/b/c/d", "a/keep"]


async def test_filesystem_key_cannot_also_be_a_directory(tmp_path: Path) -> None:
    store = FilesystemObjectStorage(tmp_path)
    await store.put("a", b"file")
    with pytest.raises(Conflict):
        await store.put("a/b", b"under a file")
    await store.put("c/d", b"x")
    with pytest.raises(Conflict):
        await store.put("c", b"over a directory")
    assert await store.get("c") is None


async def test_filesystem_refuses_a_symlink_out_of_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    root = tmp_path / "objects"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = FilesystemObjectStorage(root)
    with pytest.raises(BadRequest):
        await store.get("link/secret")


async def test_s3_creates_the_bucket_once_and_restarts_after_close(s3_endpoint: str) -> None:
    bucket = "t" + secrets.token_hex(6)
    first, second = _s3(s3_endpoint, bucket), _s3(s3_endpoint, bucket)
    try:
        # Two replicas starting at once both find or create the bucket.
        await asyncio.gather(first.start(), second.start())
        await first.put("k", b"hello")
        got = await second.get("k")
        assert got is not None
        assert got.etag == _MD5_HELLO

        await first.close()
        assert await first.get("k") is not None  # reopens on use
    finally:
        await first.close()
        await second.close()


def test_from_settings(tmp_path: Path) -> None:
    fs = object_storage_from_settings(
        CommonSettings(object_store="fs", object_store_path=tmp_path / "o")
    )
    assert isinstance(fs, FilesystemObjectStorage)
    assert fs.root == (tmp_path / "o").resolve()

    s3 = object_storage_from_settings(
        CommonSettings(
            object_store="s3",
            s3_bucket="b",
            s3_endpoint_url="http://127.0.0.1:9",
            s3_access_key_id=SecretStr("id"),
            s3_secret_access_key=SecretStr("key"),
        )
    )
    assert isinstance(s3, S3ObjectStorage)
    assert (s3.bucket, s3.endpoint_url) == ("b", "http://127.0.0.1:9")


async def test_s3_unreachable_is_unavailable() -> None:
    store = _s3(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(Unavailable) as caught:
            await store.put("k", b"x")
        assert caught.value.retryable
    finally:
        await store.close()
