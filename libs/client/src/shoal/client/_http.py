"""The HTTP half of the client."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import stamina

from shoal.client._errors import ShoalAPIError
from shoal.client._models import (
    ApiKey,
    File,
    FileInfo,
    Job,
    JobPage,
    MessagePage,
    PromptReceipt,
    Schedule,
    SchedulePage,
    SecretInfo,
    Session,
    SessionPage,
    _FileList,
    _KeyList,
    _SecretList,
)
from shoal.client._retry import (
    DEFAULT_RETRY,
    IDEMPOTENT_METHODS,
    NO_RETRY,
    RetryPolicy,
    parse_retry_after,
    should_retry,
)
from shoal.client._sse import SseEventStream
from shoal.client._streaming import DeltaCallback, WsTicket
from shoal.client._ws import EventStream, websocket_url

T = TypeVar("T")


class ShoalClient:
    """An async client for the gateway's v1 API.

    Example::

        async with ShoalClient("http://127.0.0.1:8470", api_key) as client:
            session = await client.create_session({"repo": "acme/api"})
            await client.submit_prompt(session.id, "fix the tests", idempotency_key="run-1")
            async with client.connect_session(session.id) as events:
                async for event in events:
                    print(event.seq, event.type, event.data)

    Errors answered by the API raise :class:`ShoalAPIError`; network errors are httpx's.
    Requests that are safe to repeat (GET, PUT, DELETE, a prompt with an idempotency key) are
    retried on 429, 503 and connection errors as ``retry`` says (``NO_RETRY`` turns it off).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._retry = retry
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> ShoalClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create_session(self, metadata: dict[str, Any] | None = None) -> Session:
        """Create a session. Keep ``session.runner_token``: it is shown only here."""
        body = {"metadata": metadata} if metadata is not None else {}
        return await self._call("POST", "/v1/sessions", Session, json=body)

    async def get_session(self, session_id: str) -> Session:
        """The session (without its runner token)."""
        return await self._call("GET", f"/v1/sessions/{_seg(session_id)}", Session)

    async def list_sessions(
        self, *, limit: int | None = None, cursor: str | None = None, status: str | None = None
    ) -> SessionPage:
        """A page of this owner's sessions, newest first; pass ``page.next`` as ``cursor``."""
        query = (("limit", limit), ("cursor", cursor), ("status", status))
        params = {k: v for k, v in query if v is not None}
        return await self._call("GET", "/v1/sessions", SessionPage, params=params)

    async def terminate_session(self, session_id: str) -> Session:
        """End the session for good (its runner is told; prompts are refused afterwards)."""
        return await self._call("DELETE", f"/v1/sessions/{_seg(session_id)}", Session)

    async def abort(self, session_id: str) -> None:
        """Stop the running prompt; queued prompts keep their turn. Not retried."""
        await self._send("POST", f"/v1/sessions/{_seg(session_id)}/abort")

    async def answer(self, session_id: str, question_id: str, answer: str) -> None:
        """Answer the runner's question ``question_id`` (a second answer is 409). Not retried."""
        url = f"/v1/sessions/{_seg(session_id)}/questions/{_seg(question_id)}/answer"
        await self._send("POST", url, json={"answer": answer})

    async def submit_prompt(
        self, session_id: str, content: str, *, idempotency_key: str | None = None
    ) -> PromptReceipt:
        """Queue a prompt. Retrying with the same ``idempotency_key`` queues it once."""
        body: dict[str, Any] = {"content": content}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return await self._call(
            "POST",
            f"/v1/sessions/{_seg(session_id)}/prompts",
            PromptReceipt,
            json=body,
            idempotent=idempotency_key is not None,
        )

    async def list_messages(
        self, session_id: str, *, after: int | None = None, limit: int | None = None
    ) -> MessagePage:
        """A page of completed messages; pass ``page.next`` as ``after`` for the next one."""
        params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
        return await self._call(
            "GET", f"/v1/sessions/{_seg(session_id)}/messages", MessagePage, params=params
        )

    # -- API keys --
    async def create_key(
        self,
        name: str,
        scopes: list[str],
        *,
        owner: str | None = None,
        expires_in_seconds: int | None = None,
    ) -> ApiKey:
        """Issue a key; ``result.key`` is the key itself, shown only here.

        Without the admin scope: only for this key's owner and only with scopes it has.
        """
        body: dict[str, Any] = {"name": name, "scopes": scopes}
        if owner is not None:
            body["owner"] = owner
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        return await self._call("POST", "/v1/keys", ApiKey, json=body)

    async def list_keys(self, *, owner: str | None = None) -> list[ApiKey]:
        """This owner's keys (an admin key: every key, or ``owner``'s)."""
        params = {"owner": owner} if owner is not None else {}
        return (await self._call("GET", "/v1/keys", _KeyList, params=params)).keys

    async def revoke_key(self, key_id: str) -> None:
        """Revoke a key; every gateway refuses it within a second."""
        await self._send("DELETE", f"/v1/keys/{_seg(key_id)}")

    # -- secrets --
    async def put_secret(self, name: str, value: str, *, owner: str | None = None) -> None:
        """Store (a new version of) the secret ``name``; runners read it with ``get_secret``."""
        params = {"owner": owner} if owner is not None else {}
        await self._send("PUT", f"/v1/secrets/{_seg(name)}", json={"value": value}, params=params)

    async def list_secrets(self, *, owner: str | None = None) -> list[SecretInfo]:
        """Names and dates of the owner's secrets (never values)."""
        params = {"owner": owner} if owner is not None else {}
        return (await self._call("GET", "/v1/secrets", _SecretList, params=params)).secrets

    async def delete_secret(self, name: str, *, owner: str | None = None) -> None:
        """Delete the secret ``name`` (:class:`ShoalAPIError` 404 if there is none)."""
        params = {"owner": owner} if owner is not None else {}
        await self._send("DELETE", f"/v1/secrets/{_seg(name)}", params=params)

    # -- session files --
    async def put_file(
        self,
        session_id: str,
        path: str,
        data: bytes,
        content_type: str = "application/octet-stream",
    ) -> FileInfo:
        """Store ``data`` as the session's file ``path`` ("notes/a.md"), replacing any there."""
        return await self._call(
            "PUT",
            _file_url(session_id, path),
            FileInfo,
            content=data,
            headers={"Content-Type": content_type},
        )

    async def get_file(self, session_id: str, path: str) -> File:
        """The session's file ``path`` (:class:`ShoalAPIError` 404 if there is none)."""
        response = await self._request("GET", _file_url(session_id, path))
        return File(
            path=path,
            data=response.content,
            content_type=response.headers.get("content-type", "application/octet-stream"),
            etag=response.headers.get("etag", "").strip('"'),
        )

    async def delete_file(self, session_id: str, path: str) -> None:
        """Delete the session's file ``path`` (:class:`ShoalAPIError` 404 if there is none)."""
        await self._send("DELETE", _file_url(session_id, path))

    async def list_files(
        self, session_id: str, prefix: str = "", *, limit: int = 1000
    ) -> list[FileInfo]:
        """The session's files whose path starts with ``prefix``, in path order (at most
        ``limit``; the API says ``truncated`` when more matched)."""
        params = {"prefix": prefix, "limit": limit}
        url = f"/v1/sessions/{_seg(session_id)}/files"
        return (await self._call("GET", url, _FileList, params=params)).files

    def connect_session(
        self,
        session_id: str,
        since: int = 0,
        *,
        reconnect: bool = True,
        fallback_urls: Sequence[str] = (),
        on_delta: DeltaCallback | None = None,
    ) -> EventStream:
        """The session's events after ``since``, replay then live, resuming after disconnects.

        Use it as ``async with client.connect_session(sid) as events: async for e in events``.
        ``fallback_urls``: other gateways to resume on if this one goes away. ``on_delta``
        receives the runner's streaming ``delta`` frames (ephemeral, best-effort).
        """
        path = f"/v1/sessions/{_seg(session_id)}/ws"
        return EventStream(
            websocket_url(self.base_url, path),
            {"Authorization": f"Bearer {self._api_key}"},
            since,
            reconnect,
            fallback_urls=[websocket_url(u, path) for u in fallback_urls],
            on_delta=on_delta,
        )

    def connect_events(
        self, since: int = 0, *, reconnect: bool = True, fallback_urls: Sequence[str] = ()
    ) -> EventStream:
        """Every event of this key's owner's sessions (the user stream), resuming by position.

        ``events.last_seq`` is the DELIVER position (not a session's seq): keep it to resume.
        """
        return EventStream(
            websocket_url(self.base_url, "/v1/events/ws"),
            {"Authorization": f"Bearer {self._api_key}"},
            since,
            reconnect,
            fallback_urls=[websocket_url(u, "/v1/events/ws") for u in fallback_urls],
        )

    def stream_session(
        self, session_id: str, since: int = 0, *, reconnect: bool = True
    ) -> SseEventStream:
        """The session's events after ``since`` over server-sent events (no WebSocket needed).

        Resumes with ``Last-Event-ID`` after a drop, like :meth:`connect_session` by seq.
        """
        return SseEventStream(
            self._http, f"/v1/sessions/{_seg(session_id)}/events/stream", since, reconnect=reconnect
        )

    def stream_events(self, since: int = 0, *, reconnect: bool = True) -> SseEventStream:
        """The user stream over server-sent events; ``last_seq`` is the DELIVER position."""
        return SseEventStream(self._http, "/v1/events/stream", since, reconnect=reconnect)

    async def create_ws_ticket(self) -> WsTicket:
        """A single-use ticket for a browser socket or SSE stream (``?ticket=``)."""
        return await self._call("POST", "/v1/ws-tickets", WsTicket)

    # -- jobs --
    async def submit_job(
        self,
        kind: str,
        input: Any = None,
        *,
        run_at: str | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's lease, not this call's
        callback_url: str | None = None,
    ) -> Job:
        """Queue a job for a worker of ``kind``; the same ``idempotency_key``: the same job."""
        body = _without_none(
            kind=kind,
            input=input,
            run_at=run_at,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            timeout=timeout,
            callback_url=callback_url,
        )
        return await self._call(
            "POST", "/v1/jobs", Job, json=body, idempotent=idempotency_key is not None
        )

    async def run_job(
        self,
        kind: str,
        input: Any = None,
        *,
        wait: float = 30,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's lease, not this call's
    ) -> Job:
        """Run a job and wait up to ``wait`` s (max 60); ``job.ended`` False: poll ``get_job``."""
        body = _without_none(
            kind=kind, input=input, wait=wait, max_attempts=max_attempts, timeout=timeout
        )
        return await self._call("POST", "/v1/run", Job, json=body, timeout=wait + 30.0)

    async def get_job(self, job_id: str) -> Job:
        return await self._call("GET", f"/v1/jobs/{_seg(job_id)}", Job)

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """A page of this owner's jobs, newest first; pass ``page.next`` as ``cursor``."""
        params = _without_none(status=status, kind=kind, limit=limit, cursor=cursor)
        return await self._call("GET", "/v1/jobs", JobPage, params=params)

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel: a queued job at once, a running one when its worker stops."""
        return await self._call("POST", f"/v1/jobs/{_seg(job_id)}/cancel", Job)

    async def retry_job(self, job_id: str) -> Job:
        """Put a dead or cancelled job back in the queue."""
        return await self._call("POST", f"/v1/jobs/{_seg(job_id)}/retry", Job)

    # -- schedules --
    async def create_schedule(
        self,
        target: dict[str, Any],
        *,
        cron: str | None = None,
        every: float | None = None,
        at: str | None = None,
        timezone: str | None = None,
        catch_up: str | None = None,
    ) -> Schedule:
        """Fire ``target`` (``{"job": {...}}`` or ``{"prompt": {session_id, content}}``) on a
        ``cron``, ``every`` N seconds or once ``at`` a time."""
        body = _without_none(
            cron=cron, every=every, at=at, timezone=timezone, catch_up=catch_up, target=target
        )
        return await self._call("POST", "/v1/schedules", Schedule, json=body)

    async def get_schedule(self, schedule_id: str) -> Schedule:
        return await self._call("GET", f"/v1/schedules/{_seg(schedule_id)}", Schedule)

    async def list_schedules(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> SchedulePage:
        params = _without_none(limit=limit, cursor=cursor)
        return await self._call("GET", "/v1/schedules", SchedulePage, params=params)

    async def delete_schedule(self, schedule_id: str) -> None:
        await self._send("DELETE", f"/v1/schedules/{_seg(schedule_id)}")

    async def _send(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> None:
        """A request answered with no body (204)."""
        await self._request(method, path, idempotent=idempotent, **kwargs)

    async def _call(
        self,
        method: str,
        path: str,
        into: type[T],
        *,
        idempotent: bool | None = None,
        **kwargs: Any,
    ) -> T:
        response = await self._request(method, path, idempotent=idempotent, **kwargs)
        return msgspec.json.decode(response.content, type=into)

    async def _request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send once, or with retries when the request is safe to repeat (see _retry.py)."""
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        policy = self._retry if idempotent else NO_RETRY
        async for attempt in stamina.retry_context(
            on=should_retry,
            attempts=policy.attempts,
            timeout=policy.timeout,
            wait_initial=policy.wait_initial,
            wait_max=policy.wait_max,
            wait_jitter=policy.wait_jitter,
        ):
            with attempt:
                response = await self._http.request(method, path, **kwargs)
                if response.is_error:
                    raise _api_error(response)
                return response
        raise AssertionError("unreachable: retry_context raises its last error")


def _without_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _seg(value: str) -> str:
    return quote(value, safe="")


def _file_url(session_id: str, path: str) -> str:
    # Each segment percent-encoded, "/" kept: the gateway sees the path as given, dots included
    # (a literal "." or ".." segment would be folded away by URL normalisation).
    segments = (_seg(s) if s not in (".", "..") else s.replace(".", "%2E") for s in path.split("/"))
    return f"/v1/sessions/{_seg(session_id)}/files/" + "/".join(segments)


def _api_error(response: httpx.Response) -> ShoalAPIError:
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        return ShoalAPIError(
            response.status_code,
            str(problem.get("code") or "http_error"),
            str(problem.get("detail") or problem.get("title") or ""),
            problem,
            retry_after=retry_after,
        )
    return ShoalAPIError(
        response.status_code, "http_error", response.text[:200], retry_after=retry_after
    )
