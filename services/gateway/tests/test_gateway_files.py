"""Session files (``/v1/sessions/{id}/files``) on the in-process gateway, against both object
stores: a directory on disk and moto's S3 server (real NATS, fake keys and session services).

The cross-owner battery against the real fleet is in tests/test_tenancy_e2e.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
from gateway_fakes import FakeSessionService
from nats.aio.client import Client as NATS
from tenancy_fakes import FakeTenantKeys

from shoal.client import ShoalAPIError, ShoalClient
from shoal.common.messaging import Subjects
from shoal.common.storage import FilesystemObjectStorage, S3ObjectStorage
from shoal.gateway.api.files import session_files
from shoal.gateway.config import GatewaySettings

if TYPE_CHECKING:
    from conftest import RunningGateway

pytestmark = pytest.mark.timeout(60)

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
ADMIN = {"Authorization": "Bearer key-admin"}
MAX_FILE = 64 * 1024
MAX_BODY = 4 * 1024  # below MAX_FILE: an upload is capped by its own limit, not this one


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings_overrides(
    store: str, tmp_path: Path, request: pytest.FixtureRequest, subject_prefix: str
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "max_file_bytes": MAX_FILE,
        "max_body_bytes": MAX_BODY,
        "object_store": store,
        "object_store_path": tmp_path / "objects",
    }
    if store == "s3":
        values.update(
            s3_endpoint_url=request.getfixturevalue("s3_endpoint"),
            s3_bucket=f"files-{subject_prefix}",
            s3_access_key_id="testing",
            s3_secret_access_key="testing",  # noqa: S106 - moto accepts any
        )
    return values


@pytest.fixture
async def tkeys(nc: NATS, settings: GatewaySettings) -> AsyncIterator[FakeTenantKeys]:
    fake = FakeTenantKeys(nc, Subjects(settings.subject_prefix))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def http(
    tkeys: FakeTenantKeys, sessions: FakeSessionService, gateway: RunningGateway
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client:
        yield client


@pytest.fixture
async def sid(http: httpx.AsyncClient) -> str:
    created = await http.post("/v1/sessions", headers=ALICE, json={})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert (body["status"], body["code"]) == (status, code)
    return body


async def test_round_trip_overwrite_list_delete(
    http: httpx.AsyncClient, sid: str, gateway: RunningGateway, store: str
) -> None:
    files = f"/v1/sessions/{sid}/files"
    doc = b"# todo\n- ship files\n"
    put = await http.put(
        f"{files}/notes/todo.md", headers={**ALICE, "Content-Type": "text/markdown"}, content=doc
    )
    assert put.status_code == 201, put.text
    assert put.json() == {
        "path": "notes/todo.md",
        "size": len(doc),
        "etag": md5(doc),
        "content_type": "text/markdown",
    }

    got = await http.get(f"{files}/notes/todo.md", headers=ALICE)
    assert got.status_code == 200
    assert got.content == doc
    assert got.headers["content-type"] == "text/markdown"  # as stored, no charset added
    assert got.headers["etag"] == f'"{md5(doc)}"'
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]
    cached = await http.get(
        f"{files}/notes/todo.md", headers={**ALICE, "If-None-Match": got.headers["etag"]}
    )
    assert (cached.status_code, cached.content) == (304, b"")

    # Overwrite: new bytes, new type, new ETag; no Content-Type means octet-stream.
    blob = bytes(range(256)) * 40  # 10 KiB: above max_body_bytes, below max_file_bytes
    again = await http.put(f"{files}/notes/todo.md", headers=ALICE, content=blob)
    assert again.status_code == 201, again.text
    assert again.json()["content_type"] == "application/octet-stream"
    got = await http.get(f"{files}/notes/todo.md", headers=ALICE)
    assert (got.content, got.headers["etag"]) == (blob, f'"{md5(blob)}"')
    assert got.headers["content-type"] == "application/octet-stream"

    for path in ("notes/b.txt", "src/main.py", "notes/deep/c.txt", "empty"):
        data = path.encode() if path != "empty" else b""
        assert (await http.put(f"{files}/{path}", headers=ALICE, content=data)).status_code == 201
    listed = (await http.get(files, headers=ALICE)).json()
    assert [f["path"] for f in listed["files"]] == [
        "empty",
        "notes/b.txt",
        "notes/deep/c.txt",
        "notes/todo.md",
        "src/main.py",
    ]
    assert listed["truncated"] is False
    entry = next(f for f in listed["files"] if f["path"] == "notes/b.txt")
    assert (entry["size"], entry["etag"]) == (len(b"notes/b.txt"), md5(b"notes/b.txt"))
    assert entry["modified"].endswith(("Z", "+00:00"))
    notes = (await http.get(files, headers=ALICE, params={"prefix": "notes/"})).json()
    assert [f["path"] for f in notes["files"]] == [
        "notes/b.txt",
        "notes/deep/c.txt",
        "notes/todo.md",
    ]
    partial = (await http.get(files, headers=ALICE, params={"prefix": "notes/d"})).json()
    assert [f["path"] for f in partial["files"]] == ["notes/deep/c.txt"]
    page = (await http.get(files, headers=ALICE, params={"limit": 2})).json()
    assert ([f["path"] for f in page["files"]], page["truncated"]) == (
        ["empty", "notes/b.txt"],
        True,
    )
    assert (await http.get(f"{files}/empty", headers=ALICE)).content == b""

    assert (await http.delete(f"{files}/notes/b.txt", headers=ALICE)).status_code == 204
    gone = await http.get(f"{files}/notes/b.txt", headers=ALICE)
    assert assert_problem(gone, 404, "not_found")["detail"] == "file not found"
    assert_problem(await http.delete(f"{files}/notes/b.txt", headers=ALICE), 404, "not_found")
    assert_problem(await http.get(f"{files}/never", headers=ALICE), 404, "not_found")
    # A file's prefix is not a file.
    assert_problem(await http.get(f"{files}/notes", headers=ALICE), 404, "not_found")

    # Another session's files are its own.
    other = (await http.post("/v1/sessions", headers=ALICE, json={})).json()["id"]
    assert (await http.get(f"/v1/sessions/{other}/files", headers=ALICE)).json()["files"] == []

    objects = session_files(gateway.app).objects
    assert isinstance(objects, FilesystemObjectStorage if store == "fs" else S3ObjectStorage)
    stored = await objects.get(f"sessions/{sid}/files/src/main.py")
    assert stored is not None
    assert stored.data == b"src/main.py"


async def test_unknown_and_foreign_sessions_are_404_admin_reaches_all(
    http: httpx.AsyncClient, sid: str
) -> None:
    put = await http.put(f"/v1/sessions/{sid}/files/a.txt", headers=ALICE, content=b"alice's")
    assert put.status_code == 201
    for session_id, headers in (
        (sid, BOB),
        ("ses_00000000000000000000000000", ALICE),
        ("not a token", ALICE),
    ):
        base = f"/v1/sessions/{session_id}/files"
        for method, url in (
            ("PUT", f"{base}/a.txt"),
            ("PUT", f"{base}/new.txt"),
            ("GET", f"{base}/a.txt"),
            ("DELETE", f"{base}/a.txt"),
            ("GET", base),
            ("PUT", f"{base}/%2E%2E/x"),  # the session is checked before the path
        ):
            response = await http.request(method, url, headers=headers, content=b"bob's")
            body = assert_problem(response, 404, "not_found")
            assert body["detail"] == "session not found"
            assert "alice" not in response.text
    # Nothing of bob's landed; alice's file is intact.
    got = await http.get(f"/v1/sessions/{sid}/files/a.txt", headers=ALICE)
    assert got.content == b"alice's"
    listed = (await http.get(f"/v1/sessions/{sid}/files", headers=ALICE)).json()
    assert [f["path"] for f in listed["files"]] == ["a.txt"]

    base = f"/v1/sessions/{sid}/files"
    assert (await http.put(f"{base}/admin.txt", headers=ADMIN, content=b"a")).status_code == 201
    assert (await http.get(f"{base}/a.txt", headers=ADMIN)).content == b"alice's"
    listed = (await http.get(base, headers=ADMIN)).json()
    assert [f["path"] for f in listed["files"]] == ["a.txt", "admin.txt"]
    assert (await http.delete(f"{base}/admin.txt", headers=ADMIN)).status_code == 204


async def test_scopes(http: httpx.AsyncClient, sid: str) -> None:
    base = f"/v1/sessions/{sid}/files"
    assert (await http.put(f"{base}/f", headers=ALICE, content=b"x")).status_code == 201
    read = {"Authorization": "Bearer key-alice-read"}
    assert (await http.get(f"{base}/f", headers=read)).content == b"x"
    assert (await http.get(base, headers=read)).status_code == 200
    for method in ("PUT", "DELETE"):
        body = assert_problem(
            await http.request(method, f"{base}/f", headers=read, content=b"y"), 403, "forbidden"
        )
        assert (body["required_scope"], body["write"]) == ("sessions", True)
    for key in ("key-alice-secrets", "key-alice-jobs"):
        other = {"Authorization": f"Bearer {key}"}
        for method, url in (("GET", f"{base}/f"), ("GET", base), ("PUT", f"{base}/f")):
            response = await http.request(method, url, headers=other, content=b"z")
            assert_problem(response, 403, "forbidden")
    assert_problem(await http.get(f"{base}/f"), 401, "unauthorized")
    assert (await http.get(f"{base}/f", headers=ALICE)).content == b"x"


@pytest.mark.parametrize(
    "raw_path",
    [
        "%2E%2E/escape",
        "a/%2E%2E/%2E%2E/%2E%2E/escape",
        "%2E",
        "a/%2E/b",
        "/etc/passwd",  # "files//etc/passwd": an absolute path
        "a//b",
        "a/",
        "",
        "a%00b",
        "a%01b",
        "line%0Abreak",
        "back%5Cslash",
        "x" * 1100,
    ],
)
async def test_odd_paths_are_400(
    http: httpx.AsyncClient, sid: str, raw_path: str, tmp_path: Path
) -> None:
    url = f"/v1/sessions/{sid}/files/{raw_path}"
    for method in ("PUT", "GET", "DELETE"):
        response = await http.request(method, url, headers=ALICE, content=b"payload")
        body = assert_problem(response, 400, "bad_request")
        assert body["detail"].startswith("file path"), body
        for raw in ("\x00", "\x01", "\n"):
            assert raw not in body.get("path", ""), "a control character was echoed"
            assert raw not in body["instance"]
        assert "\\u0000" not in response.text
        assert "\\u0001" not in response.text
    if raw_path == "a%00b":
        assert body["instance"].endswith("/a%00b")
        assert "path" not in body
    if raw_path == "%2E%2E/escape":
        assert body["path"] == "../escape"
    # Nothing was written anywhere.
    listed = (await http.get(f"/v1/sessions/{sid}/files", headers=ALICE)).json()
    assert listed["files"] == []
    assert not [p for p in tmp_path.glob("**/escape")]  # noqa: ASYNC240 - a test's temp dir


async def test_odd_prefixes_and_content_types_are_400(http: httpx.AsyncClient, sid: str) -> None:
    base = f"/v1/sessions/{sid}/files"
    for prefix in ("../", "a/../", "..", "/abs", "a//", "a\x00", "a\x07"):
        response = await http.get(base, headers=ALICE, params={"prefix": prefix})
        body = assert_problem(response, 400, "bad_request")
        assert body["detail"].startswith("file prefix"), body
        assert "\\u0000" not in response.text
        assert "\\u0007" not in response.text
    assert_problem(await http.get(base, headers=ALICE, params={"limit": 0}), 400, "bad_request")
    assert_problem(await http.get(base, headers=ALICE, params={"limit": 1001}), 400, "bad_request")
    for content_type in ("not a type", "text/", "text/plain; charset", "a/b" + "c" * 300):
        response = await http.put(
            f"{base}/f", headers={**ALICE, "Content-Type": content_type}, content=b"x"
        )
        assert_problem(response, 400, "bad_request")
    ok = await http.put(
        f"{base}/f", headers={**ALICE, "Content-Type": 'text/plain; charset="utf-8"'}, content=b"x"
    )
    assert ok.status_code == 201
    assert ok.json()["content_type"] == 'text/plain; charset="utf-8"'


async def test_too_large_is_413(http: httpx.AsyncClient, sid: str) -> None:
    base = f"/v1/sessions/{sid}/files"
    at_limit = b"a" * MAX_FILE
    assert (await http.put(f"{base}/max", headers=ALICE, content=at_limit)).status_code == 201
    declared = await http.put(f"{base}/big", headers=ALICE, content=at_limit + b"!")
    assert assert_problem(declared, 413, "payload_too_large")["max_bytes"] == MAX_FILE

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(MAX_FILE // 4096 + 2):
            yield b"b" * 4096

    streamed = await http.put(f"{base}/big", headers=ALICE, content=chunks())
    assert assert_problem(streamed, 413, "payload_too_large")["max_bytes"] == MAX_FILE
    assert_problem(await http.get(f"{base}/big", headers=ALICE), 404, "not_found")
    # Other routes keep max_body_bytes.
    big_json = await http.post(
        "/v1/sessions", headers=ALICE, json={"metadata": {"x": "y" * MAX_BODY}}
    )
    assert assert_problem(big_json, 413, "payload_too_large")["max_bytes"] == MAX_BODY
    # So does a PUT elsewhere under /files-like paths.
    proxied = await http.put(f"/v1/sessions/{sid}/proxy/files/x", headers=ALICE, content=at_limit)
    assert assert_problem(proxied, 413, "payload_too_large")["max_bytes"] == MAX_BODY


async def test_terminated_session_is_read_only(
    http: httpx.AsyncClient, sid: str, sessions: FakeSessionService
) -> None:
    base = f"/v1/sessions/{sid}/files"
    assert (await http.put(f"{base}/keep", headers=ALICE, content=b"k")).status_code == 201
    snapshot = await sessions.snapshot(sid)
    assert snapshot is not None
    await sessions._save(msgspec.structs.replace(snapshot, status="terminated"))
    assert_problem(await http.put(f"{base}/new", headers=ALICE, content=b"n"), 409, "conflict")
    assert (await http.get(f"{base}/keep", headers=ALICE)).content == b"k"
    assert (await http.delete(f"{base}/keep", headers=ALICE)).status_code == 204


async def test_client_library(http: httpx.AsyncClient, sid: str, gateway: RunningGateway) -> None:
    async with ShoalClient(gateway.base_url, "key-alice") as alice:
        info = await alice.put_file(sid, "dir/ü n.txt", b"hello", "text/plain")
        assert (info.path, info.size, info.etag) == ("dir/ü n.txt", 5, md5(b"hello"))
        got = await alice.get_file(sid, "dir/ü n.txt")
        assert (got.data, got.content_type, got.etag) == (b"hello", "text/plain", md5(b"hello"))
        assert [f.path for f in await alice.list_files(sid, "dir/")] == ["dir/ü n.txt"]
        with pytest.raises(ShoalAPIError) as refused:
            await alice.put_file(sid, "../x", b"")  # sent as %2E%2E, not folded away
        assert refused.value.status == 400
        await alice.delete_file(sid, "dir/ü n.txt")
        with pytest.raises(ShoalAPIError) as missing:
            await alice.get_file(sid, "dir/ü n.txt")
        assert missing.value.status == 404


async def test_file_under_a_file_path(http: httpx.AsyncClient, sid: str, store: str) -> None:
    base = f"/v1/sessions/{sid}/files"
    assert (await http.put(f"{base}/a", headers=ALICE, content=b"1")).status_code == 201
    nested = await http.put(f"{base}/a/b", headers=ALICE, content=b"2")
    if store == "s3":  # S3 holds "a" and "a/b" side by side
        assert nested.status_code == 201
        listed = (await http.get(base, headers=ALICE)).json()
        assert [f["path"] for f in listed["files"]] == ["a", "a/b"]
        return
    # A directory cannot be a file too: 409, naming the path but not the store's key.
    body = assert_problem(nested, 409, "conflict")
    assert body["path"] == "a/b"
    assert "key" not in body
    assert (await http.get(f"{base}/a", headers=ALICE)).content == b"1"


async def test_lifespan_owns_and_closes_the_store(
    tkeys: FakeTenantKeys,
    sessions: FakeSessionService,
    gateway_factory: Any,
    store: str,
) -> None:
    running = await gateway_factory()
    try:
        async with httpx.AsyncClient(base_url=running.base_url) as http:
            sid = (await http.post("/v1/sessions", headers=ALICE, json={})).json()["id"]
            put = await http.put(f"/v1/sessions/{sid}/files/x", headers=ALICE, content=b"x")
            assert put.status_code == 201
        objects = session_files(running.app).objects
    finally:
        await running.stop()
    if isinstance(objects, S3ObjectStorage):
        assert objects._client is None  # closed by the lifespan
