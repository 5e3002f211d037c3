"""The HTTP half of the client."""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from shoal.client._errors import ShoalAPIError
from shoal.client._models import MessagePage, PromptReceipt, Session
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
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
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
        return await self._call("GET", f"/v1/sessions/{_seg(session_id)}", Session)

    async def submit_prompt(
        self, session_id: str, content: str, *, idempotency_key: str | None = None
    ) -> PromptReceipt:
        """Queue a prompt. Retrying with the same ``idempotency_key`` queues it once."""
        body: dict[str, Any] = {"content": content}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return await self._call(
            "POST", f"/v1/sessions/{_seg(session_id)}/prompts", PromptReceipt, json=body
        )

    async def list_messages(
        self, session_id: str, *, after: int | None = None, limit: int | None = None
    ) -> MessagePage:
        """A page of completed messages; pass ``page.next`` as ``after`` for the next one."""
        params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
        return await self._call(
            "GET", f"/v1/sessions/{_seg(session_id)}/messages", MessagePage, params=params
        )

    def connect_session(
        self, session_id: str, since: int = 0, *, reconnect: bool = True
    ) -> EventStream:
        """The session's events after ``since``, replay then live, resuming after disconnects.

        Use it as ``async with client.connect_session(sid) as events: async for e in events``.
        """
        url = websocket_url(self.base_url, f"/v1/sessions/{_seg(session_id)}/ws")
        return EventStream(url, {"Authorization": f"Bearer {self._api_key}"}, since, reconnect)

    async def _call(self, method: str, path: str, into: type[T], **kwargs: Any) -> T:
        response = await self._http.request(method, path, **kwargs)
        if response.is_error:
            raise _api_error(response)
        return msgspec.json.decode(response.content, type=into)


def _seg(value: str) -> str:
    return quote(value, safe="")


def _api_error(response: httpx.Response) -> ShoalAPIError:
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
        )
    return ShoalAPIError(response.status_code, "http_error", response.text[:200])
