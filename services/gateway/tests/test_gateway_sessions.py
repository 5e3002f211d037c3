"""Session verbs over HTTP against real NATS and the session rules (``gateway_fakes``): list,
terminate, abort, answer, update, events, admin, runner files; each with its refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeKeys, FakeSessionService

from shoal.client import connect_runner
from shoal.common.contracts import (
    Command,
    PendingQuestion,
    QuestionAnswer,
    QuestionAsk,
    RunnerDisconnect,
    RunnerError,
    SessionCreate,
    SessionSnapshot,
    SessionUpdate,
)
from shoal.common.errors import Conflict, NotFound, ShoalError
from shoal.common.messaging import Envelope
from shoal.gateway.api.deps import gateway_state
from shoal.gateway.service import GatewayService

if TYPE_CHECKING:
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
ADMIN = {"Authorization": "Bearer key-admin"}


@pytest.fixture
async def http(
    gateway: RunningGateway, keys: FakeKeys, sessions: FakeSessionService
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == (status, code)
    return body


async def create(http: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await http.post("/v1/sessions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def prompt(http: httpx.AsyncClient, sid: str, content: str) -> httpx.Response:
    return await http.post(f"/v1/sessions/{sid}/prompts", json={"content": content}, headers=ALICE)


def service_of(gateway: RunningGateway) -> GatewayService:
    return gateway_state(gateway.app).service


# -- create --
async def test_create_sends_tags_and_timeouts(
    http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    """What the gateway puts in ``session.create`` (the session's answer echoes what its rules
    kept: tests/test_sessions_api_e2e.py checks that on the real fleet)."""
    plain = await create(http, ALICE)
    sent = SessionCreate(**sessions.commands[-1].data)
    assert (sent.tags, sent.idle_timeout, sent.prompt_timeout) == ([], 900, 600)
    assert sent.runner_token_hash
    assert plain["runner_token"] not in sent.runner_token_hash
    await create(
        http, ALICE, tags=["team-api", "nightly", "team-api"], idle_timeout=1, prompt_timeout=30
    )
    sent = SessionCreate(**sessions.commands[-1].data)
    assert (sent.tags, sent.idle_timeout, sent.prompt_timeout) == (["team-api", "nightly"], 1, 30)


@pytest.mark.parametrize(
    "body",
    [
        {"idle_timeout": 0},
        {"idle_timeout": 2_592_001},
        {"prompt_timeout": 0},
        {"prompt_timeout": 86_401},
        {"tags": ["has space"]},
        {"tags": ["x" * 65]},
        {"tags": [f"t{i}" for i in range(33)]},
        {"tags": "not-a-list"},
    ],
)
async def test_create_refuses_bad_tags_and_timeouts(
    http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    assert_problem(await http.post("/v1/sessions", json=body, headers=ALICE), 400, "bad_request")


# -- list --
async def test_list_pages_newest_first_and_only_the_callers(http: httpx.AsyncClient) -> None:
    mine = [(await create(http, ALICE))["id"] for _ in range(5)]
    theirs = (await create(http, BOB))["id"]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/v1/sessions", params=params, headers=ALICE)).json()
        assert len(page["sessions"]) <= 2
        seen += [s["id"] for s in page["sessions"]]
        if page["sessions"]:
            assert page["sessions"][0]["owner"] == "alice"
            assert "runner_token" not in page["sessions"][0]
        cursor = page["next"]
        if cursor is None:
            break
        await create(http, ALICE)  # a create between pages shifts nothing still to come
    assert seen == mine[::-1]

    everyone = (await http.get("/v1/sessions", params={"limit": 100}, headers=ADMIN)).json()
    assert {theirs, *mine} <= {s["id"] for s in everyone["sessions"]}
    bobs = (await http.get("/v1/sessions", params={"owner": "bob"}, headers=ADMIN)).json()
    assert [s["id"] for s in bobs["sessions"]] == [theirs]


async def test_list_filters_by_status(http: httpx.AsyncClient) -> None:
    kept = (await create(http, ALICE))["id"]
    ended = (await create(http, ALICE))["id"]
    assert (await http.delete(f"/v1/sessions/{ended}", headers=ALICE)).status_code == 200
    page = (await http.get("/v1/sessions?status=terminated", headers=ALICE)).json()
    assert [s["id"] for s in page["sessions"]] == [ended]
    page = (await http.get("/v1/sessions?status=idle", headers=ALICE)).json()
    assert [s["id"] for s in page["sessions"]] == [kept]


@pytest.mark.parametrize(
    "query",
    ["status=sleepy", "limit=0", "limit=101", "cursor=not-a-cursor", "cursor=", "limit=x"],
)
async def test_list_refuses_bad_queries(http: httpx.AsyncClient, query: str) -> None:
    assert_problem(await http.get(f"/v1/sessions?{query}", headers=ALICE), 400, "bad_request")


async def test_list_for_another_owner_needs_admin(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/v1/sessions?owner=bob", headers=ALICE), 403, "forbidden")
    own = await http.get("/v1/sessions?owner=alice", headers=ALICE)
    assert own.status_code == 200


# -- terminate --
async def test_delete_terminates_once_then_prompts_get_409(http: httpx.AsyncClient) -> None:
    sid = (await create(http, ALICE))["id"]
    assert (
        await http.post(f"/v1/sessions/{sid}/prompts", json={"content": "a"}, headers=ALICE)
    ).status_code == 202
    first = await http.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "terminated"
    assert first.json()["queued_prompts"] == 0
    again = await http.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert again.status_code == 200
    assert again.json()["last_seq"] == first.json()["last_seq"]  # nothing happened twice
    assert_problem(await prompt(http, sid, "b"), 409, "conflict")
    events = (await http.get(f"/v1/sessions/{sid}/events", headers=ALICE)).json()["events"]
    assert [e["type"] for e in events][-1] == "session.terminated"
    assert [e["type"] for e in events].count("session.terminated") == 1


async def test_delete_of_a_foreign_or_unknown_session_is_404(http: httpx.AsyncClient) -> None:
    sid = (await create(http, ALICE))["id"]
    assert_problem(await http.delete(f"/v1/sessions/{sid}", headers=BOB), 404, "not_found")
    assert_problem(await http.delete("/v1/sessions/ses_nope", headers=ALICE), 404, "not_found")
    assert (await http.get(f"/v1/sessions/{sid}", headers=ALICE)).json()["status"] == "idle"


# -- abort --
async def test_abort_stops_the_running_prompt_and_starts_the_next(
    gateway: RunningGateway, http: httpx.AsyncClient
) -> None:
    created = await create(http, ALICE)
    sid = created["id"]
    nothing = await http.post(f"/v1/sessions/{sid}/abort", headers=ALICE)
    assert nothing.status_code == 202, nothing.text
    assert nothing.json() == {"session_id": sid, "seq": 1}  # nothing ran: no event
    first = (
        await http.post(f"/v1/sessions/{sid}/prompts", json={"content": "1"}, headers=ALICE)
    ).json()
    second = (
        await http.post(f"/v1/sessions/{sid}/prompts", json={"content": "2"}, headers=ALICE)
    ).json()
    async with connect_runner(gateway.base_url, sid, created["runner_token"]) as runner:
        async for prompt in runner.prompts():
            assert prompt.prompt_id == first["prompt_id"]
            break
        aborted = await http.post(f"/v1/sessions/{sid}/abort", json={}, headers=ALICE)
        assert aborted.status_code == 202
        async for prompt in runner.prompts():
            assert prompt.prompt_id == second["prompt_id"]
            break
    session = (await http.get(f"/v1/sessions/{sid}", headers=ALICE)).json()
    events = (await http.get(f"/v1/sessions/{sid}/events", headers=ALICE)).json()["events"]
    kinds = [(e["type"], e["data"].get("prompt_id")) for e in events]
    assert ("prompt.aborted", first["prompt_id"]) in kinds
    assert kinds.index(("prompt.aborted", first["prompt_id"])) < kinds.index(
        ("prompt.dispatched", second["prompt_id"])
    )
    assert aborted.json()["seq"] <= session["last_seq"]


async def test_abort_refusals(http: httpx.AsyncClient) -> None:
    sid = (await create(http, ALICE))["id"]
    assert_problem(await http.post(f"/v1/sessions/{sid}/abort", headers=BOB), 404, "not_found")
    bad = await http.post(f"/v1/sessions/{sid}/abort", json={"prompt_id": "a b"}, headers=ALICE)
    assert_problem(bad, 400, "bad_request")
    await http.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert_problem(await http.post(f"/v1/sessions/{sid}/abort", headers=ALICE), 409, "conflict")


# -- questions (the rules are scripted here: the session service answers 404 / 409) --
def question_rules(sessions: FakeSessionService) -> None:
    def ask(snap: SessionSnapshot | None, env: Envelope) -> ShoalError | None:
        assert snap is not None
        asked = QuestionAsk(**env.data)
        snap.questions.append(
            PendingQuestion(question_id=asked.question_id, content=asked.content, asked_at=env.time)
        )
        return None

    def answer(snap: SessionSnapshot | None, env: Envelope) -> ShoalError | None:
        assert snap is not None
        answered = QuestionAnswer(**env.data)
        if answered.question_id in snap.metadata.get("answered", []):
            return Conflict("question already answered")
        if not any(q.question_id == answered.question_id for q in snap.questions):
            return NotFound("question not found")
        snap.questions = [q for q in snap.questions if q.question_id != answered.question_id]
        snap.metadata = {"answered": [answered.question_id]}
        return None

    sessions.scripts[Command.QUESTION_ASK] = ask
    sessions.scripts[Command.QUESTION_ANSWER] = answer


async def test_answer_is_202_then_409_and_unknown_is_404(
    gateway: RunningGateway, http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    question_rules(sessions)
    sid = (await create(http, ALICE))["id"]
    service = service_of(gateway)
    snapshot = await sessions.snapshot(sid)
    assert snapshot is not None
    asked = await service.runner_question(
        snapshot, "conn-1", {"type": "question", "content": "Deploy?", "expires_in": 60}
    )
    assert asked.question_id.startswith("q_")
    assert asked.expires_at is not None
    command = sessions.commands[-1]
    assert command.type == Command.QUESTION_ASK
    assert QuestionAsk(**command.data) == asked

    url = f"/v1/sessions/{sid}/questions/{asked.question_id}/answer"
    ok = await http.post(url, json={"answer": "yes"}, headers=ALICE)
    assert ok.status_code == 202, ok.text
    assert ok.json()["question_id"] == asked.question_id
    assert QuestionAnswer(**sessions.commands[-1].data) == QuestionAnswer(
        question_id=asked.question_id, answer="yes"
    )
    assert_problem(await http.post(url, json={"answer": "no"}, headers=ALICE), 409, "conflict")
    unknown = f"/v1/sessions/{sid}/questions/q_unknown/answer"
    assert_problem(await http.post(unknown, json={"answer": "x"}, headers=ALICE), 404, "not_found")
    assert_problem(await http.post(url, json={"answer": "x"}, headers=BOB), 404, "not_found")
    assert_problem(await http.post(url, json={}, headers=ALICE), 400, "bad_request")
    assert_problem(
        await http.post(url, json={"answer": "x" * 70_000}, headers=ALICE), 413, "payload_too_large"
    )
    await http.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert_problem(await http.post(url, json={"answer": "x"}, headers=ALICE), 409, "conflict")


async def test_runner_question_keeps_the_runners_id_and_refuses_bad_frames(
    gateway: RunningGateway, http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    question_rules(sessions)
    sid = (await create(http, ALICE))["id"]
    service = service_of(gateway)
    snapshot = await sessions.snapshot(sid)
    assert snapshot is not None
    asked = await service.runner_question(
        snapshot,
        "c",
        {"type": "question", "question_id": "q-1", "content": "Which?", "options": ["a", "b"]},
    )
    assert (asked.question_id, asked.options, asked.expires_at) == ("q-1", ["a", "b"], None)
    for frame in (
        {"content": ""},
        {"content": "x", "question_id": "a b"},
        {"content": "x", "expires_in": 0},
        {"content": "x", "options": [str(i) for i in range(33)]},
        {"nothing": True},
    ):
        with pytest.raises(ShoalError) as refused:
            await service.runner_question(snapshot, "c", frame)
        assert refused.value.code == "bad_request"


async def test_runner_error_and_disconnect_carry_the_connection(
    gateway: RunningGateway, http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    sessions.scripts[Command.RUNNER_ERROR] = lambda snap, env: None
    sid = (await create(http, ALICE))["id"]
    service = service_of(gateway)
    snapshot = await sessions.snapshot(sid)
    assert snapshot is not None
    await service.runner_error(snapshot, "conn-9", "prm_1", "tool crashed")
    assert RunnerError(**sessions.commands[-1].data) == RunnerError(
        connection_id="conn-9", prompt_id="prm_1", message="tool crashed"
    )
    with pytest.raises(ShoalError):
        await service.runner_error(snapshot, "conn-9", "prm_1", "")
    await service.runner_disconnect(snapshot, "conn-9", "replaced")
    disconnect = await sessions.took(Command.RUNNER_DISCONNECT)
    assert RunnerDisconnect(**disconnect.data) == RunnerDisconnect(
        connection_id="conn-9", reason="replaced"
    )


# -- update (scripted until the session service applies session.update) --
async def test_patch_changes_tags_and_refuses_bad_input(
    http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    def update(snap: SessionSnapshot | None, env: Envelope) -> ShoalError | None:
        assert snap is not None
        change = SessionUpdate(**env.data)
        if change.tags is not None:
            snap.tags = change.tags
        if change.metadata is not None:
            snap.metadata = change.metadata
        return None

    sessions.scripts[Command.SESSION_UPDATE] = update
    sid = (await create(http, ALICE, tags=["a"]))["id"]
    patched = await http.patch(f"/v1/sessions/{sid}", json={"tags": ["b", "c"]}, headers=ALICE)
    assert patched.status_code == 200, patched.text
    assert patched.json()["tags"] == ["b", "c"]
    assert SessionUpdate(**sessions.commands[-1].data) == SessionUpdate(tags=["b", "c"])
    assert_problem(
        await http.patch(f"/v1/sessions/{sid}", json={}, headers=ALICE), 400, "bad_request"
    )
    assert_problem(
        await http.patch(f"/v1/sessions/{sid}", json={"tags": ["no way"]}, headers=ALICE),
        400,
        "bad_request",
    )
    assert_problem(
        await http.patch(f"/v1/sessions/{sid}", json={"tags": []}, headers=BOB), 404, "not_found"
    )
    big = {"metadata": {"x": "y" * 20_000}}
    assert_problem(
        await http.patch(f"/v1/sessions/{sid}", json=big, headers=ALICE), 413, "payload_too_large"
    )
    await http.delete(f"/v1/sessions/{sid}", headers=ALICE)
    ended = await http.patch(f"/v1/sessions/{sid}", json={"tags": []}, headers=ALICE)
    assert_problem(ended, 409, "conflict")


# -- events --
async def test_events_page_through_the_ledger(http: httpx.AsyncClient) -> None:
    sid = (await create(http, ALICE))["id"]
    for n in range(6):
        await prompt(http, sid, str(n))
    seqs: list[int] = []
    after: int | None = None
    while True:
        params = {"limit": 3, **({"after": after} if after is not None else {})}
        page = (await http.get(f"/v1/sessions/{sid}/events", params=params, headers=ALICE)).json()
        seqs += [e["seq"] for e in page["events"]]
        after = page["next"]
        if after is None:
            break
    assert seqs == list(range(1, 8))  # session.created + 6 x prompt.queued
    tail = (await http.get(f"/v1/sessions/{sid}/events?after=5", headers=ALICE)).json()
    assert [(e["seq"], e["type"]) for e in tail["events"]] == [
        (6, "prompt.queued"),
        (7, "prompt.queued"),
    ]
    assert tail["next"] is None
    assert (await http.get(f"/v1/sessions/{sid}/events?after=7", headers=ALICE)).json() == {
        "events": [],
        "next": None,
    }
    assert_problem(await http.get(f"/v1/sessions/{sid}/events", headers=BOB), 404, "not_found")
    assert_problem(
        await http.get(f"/v1/sessions/{sid}/events?limit=501", headers=ALICE), 400, "bad_request"
    )
    assert_problem(
        await http.get(f"/v1/sessions/{sid}/events?after=-1", headers=ALICE), 400, "bad_request"
    )


# -- admin --
async def test_admin_routes_answer_admin_keys_only(
    http: httpx.AsyncClient, sessions: FakeSessionService
) -> None:
    sid = (await create(http, ALICE))["id"]
    partitions = await http.get("/v1/admin/partitions", headers=ADMIN)
    assert partitions.status_code == 200, partitions.text
    assert [p["partition"] for p in partitions.json()] == list(range(8))
    placed = await http.get(f"/v1/admin/sessions/{sid}", headers=ADMIN)
    assert placed.status_code == 200, placed.text
    assert (placed.json()["session_id"], placed.json()["session_owner"]) == (sid, "alice")
    assert_problem(await http.get("/v1/admin/partitions", headers=ALICE), 403, "forbidden")
    assert_problem(await http.get(f"/v1/admin/sessions/{sid}", headers=ALICE), 403, "forbidden")
    assert_problem(await http.get("/v1/admin/sessions/ses_nope", headers=ADMIN), 404, "not_found")
    assert_problem(await http.get("/v1/admin/partitions"), 401, "unauthorized")


# -- runner files --
async def test_runner_token_reaches_its_own_sessions_files_only(http: httpx.AsyncClient) -> None:
    mine = await create(http, ALICE)
    other = await create(http, ALICE)
    runner = {"Authorization": f"Bearer {mine['runner_token']}"}
    url = f"/v1/sessions/{mine['id']}/files/out/report.txt"
    put = await http.put(url, content=b"done", headers={**runner, "Content-Type": "text/plain"})
    assert put.status_code == 201, put.text
    assert (await http.get(url, headers=runner)).content == b"done"
    assert (await http.get(url, headers=ALICE)).content == b"done"  # the owner sees it too
    listed = (await http.get(f"/v1/sessions/{mine['id']}/files", headers=runner)).json()
    assert [f["path"] for f in listed["files"]] == ["out/report.txt"]
    foreign = f"/v1/sessions/{other['id']}/files/out/report.txt"
    assert_problem(await http.put(foreign, content=b"x", headers=runner), 401, "unauthorized")
    assert_problem(await http.get(foreign, headers=runner), 401, "unauthorized")
    forged = {"Authorization": "Bearer srt_forged"}
    assert_problem(await http.get(url, headers=forged), 401, "unauthorized")
    assert (await http.delete(url, headers=runner)).status_code == 204
