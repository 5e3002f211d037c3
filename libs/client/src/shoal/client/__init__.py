"""The async Python client for Shoal's gateway: HTTP API, session event streams, runners.

Example::

    from shoal.client import ShoalClient, connect_runner

    async with ShoalClient("http://127.0.0.1:8470", api_key) as client:
        session = await client.create_session({"repo": "acme/api"})
        receipt = await client.submit_prompt(session.id, "hello", idempotency_key="hello-1")

        async with connect_runner(client.base_url, session.id, session.runner_token) as runner:
            async for prompt in runner.prompts():
                token = await runner.get_secret("GITHUB_TOKEN")  # if allowed_secrets names it
                await runner.complete(prompt.prompt_id, f"echo: {prompt.content}")
                break

        async with client.connect_session(session.id, since=0) as events:
            async for event in events:      # replay, then live; resumes by seq on its own
                print(event.seq, event.type, event.data)
"""

from shoal.client._bridge import RunnerBridge
from shoal.client._errors import ShoalAPIError, ShoalConnectionClosed
from shoal.client._http import ShoalClient
from shoal.client._models import (
    ApiKey,
    Event,
    File,
    FileInfo,
    Job,
    JobAttempt,
    JobPage,
    Message,
    MessagePage,
    Prompt,
    PromptReceipt,
    Schedule,
    SchedulePage,
    SecretInfo,
    Session,
    SessionPage,
)
from shoal.client._retry import NO_RETRY, RetryPolicy
from shoal.client._sse import SseEventStream
from shoal.client._streaming import ProxyRequest, ProxyResponse, WsTicket
from shoal.client._worker import JobFailed, Worker, WorkerJob
from shoal.client._ws import EventStream, RunnerConnection, connect_runner, websocket_url

__all__ = [
    "ApiKey",
    "Event",
    "EventStream",
    "File",
    "FileInfo",
    "Job",
    "JobFailed",
    "JobAttempt",
    "JobPage",
    "Message",
    "MessagePage",
    "Prompt",
    "ProxyRequest",
    "ProxyResponse",
    "PromptReceipt",
    "RunnerBridge",
    "RunnerConnection",
    "Schedule",
    "SchedulePage",
    "SecretInfo",
    "NO_RETRY",
    "RetryPolicy",
    "Session",
    "SessionPage",
    "SseEventStream",
    "ShoalAPIError",
    "ShoalClient",
    "ShoalConnectionClosed",
    "connect_runner",
    "websocket_url",
    "Worker",
    "WorkerJob",
    "WsTicket",
]
