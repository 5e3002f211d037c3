"""The worker SDK: register ``async def handle(job) -> output`` by kind and run.

The SDK holds one socket to ``/v1/workers/ws`` (reconnecting with backoff), runs each job it is
given in its own task, heartbeats while the handler runs (every third of the job's timeout),
and reports the handler's return value as ``job.completed`` or its exception as ``job.failed``.
A ``cancel`` frame cancels the handler's task (the handler sees ``CancelledError``).

Example::

    worker = Worker("http://127.0.0.1:8470", api_key, max_in_flight=4)

    @worker.handler("resize")
    async def resize(job: WorkerJob) -> dict[str, str]:
        return {"url": await make_thumbnail(job.input["url"])}

    await worker.run()          # until worker.stop() or a fatal refusal (bad key, scope)

Raise :class:`JobFailed` with ``retryable=False`` for a failure that no retry can fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from shoal.client._errors import ShoalConnectionClosed
from shoal.client._ws import _Backoff, _close_of, _open, websocket_url

log = logging.getLogger(__name__)

# Close codes after which reconnecting cannot help (bad query, key or scope).
_FATAL_CLOSES = frozenset({4400, 4401, 4403})


@dataclass(frozen=True, slots=True)
class WorkerJob:
    """One attempt of a job, as a handler sees it. ``traceparent``/``tracestate`` (W3C trace
    context) place the attempt in the trace of the call that submitted the job: a handler that
    makes spans of its own continues them, e.g. ``propagate.extract(job.trace_headers)``."""

    job_id: str
    kind: str
    input: Any
    attempt: int
    lease_expires_at: str
    timeout: float
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def trace_headers(self) -> dict[str, str]:
        """The trace context as a carrier for an OpenTelemetry propagator (empty: none)."""
        headers = {"traceparent": self.traceparent, "tracestate": self.tracestate}
        return {k: v for k, v in headers.items() if v}


class JobFailed(Exception):
    """Raise from a handler to fail the attempt with ``error``; ``retryable=False``: dead now."""

    def __init__(self, error: Any, *, retryable: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable


Handler = Callable[[WorkerJob], Awaitable[Any]]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class Worker:
    """A job worker for the kinds it has handlers for (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_in_flight: int = 1,
        name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._max_in_flight = max_in_flight
        self._name = name
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ws: ClientConnection | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()  # set while a socket is open (tests wait on it)

    def handler(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator: ``fn`` handles jobs of ``kind``."""

        def register(fn: Handler) -> Handler:
            self._handlers[kind] = fn
            return fn

        return register

    async def stop(self) -> None:
        """Stop taking jobs and close the socket; running handlers are cancelled (their
        leases run out and the jobs are redriven)."""
        self._stopping.set()
        if self._ws is not None:
            await self._ws.close()

    async def run(self) -> None:
        """Serve until :meth:`stop`; raises :class:`ShoalConnectionClosed` on a fatal refusal."""
        if not self._handlers:
            raise ValueError("register a handler first")
        query: dict[str, Any] = {
            "kinds": ",".join(self._handlers),
            "max_in_flight": self._max_in_flight,
        }
        if self._name:
            query["name"] = self._name
        url = websocket_url(self.base_url, "/v1/workers/ws", query)
        backoff = _Backoff()
        while not self._stopping.is_set():
            try:
                self._ws = await _open(url, {"Authorization": f"Bearer {self._api_key}"})
            except (OSError, InvalidHandshake, TimeoutError):
                await backoff.sleep()
                continue
            backoff.reset()
            try:
                await self._serve(self._ws)
            except ConnectionClosed as exc:
                code, reason = _close_of(exc)
                if code in _FATAL_CLOSES:
                    raise ShoalConnectionClosed(code, reason) from exc
            finally:
                self.connected.clear()
                for task in self._running.values():
                    task.cancel()
                self._running.clear()
            if not self._stopping.is_set():
                await backoff.sleep()

    async def _serve(self, ws: ClientConnection) -> None:
        self.connected.set()
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "job":
                job = WorkerJob(
                    job_id=frame["job_id"],
                    kind=frame["kind"],
                    input=frame.get("input"),
                    attempt=int(frame["attempt"]),
                    lease_expires_at=str(frame.get("lease_expires_at")),
                    timeout=float(frame.get("timeout") or 30),
                    traceparent=_text(frame.get("traceparent")),
                    tracestate=_text(frame.get("tracestate")),
                )
                self._running[job.job_id] = asyncio.create_task(self._run_job(ws, job))
            elif kind == "cancel":
                task = self._running.get(frame.get("job_id", ""))
                if task is not None:
                    task.cancel()
            elif kind == "error":
                log.warning("gateway: %s", frame.get("message"))
        code, reason = (ws.close_code or 1006), (ws.close_reason or "")
        if code in _FATAL_CLOSES:
            raise ShoalConnectionClosed(code, reason)

    async def _run_job(self, ws: ClientConnection, job: WorkerJob) -> None:
        handler = self._handlers[job.kind]
        beat = asyncio.create_task(self._heartbeat(ws, job))
        report: dict[str, Any]
        try:
            output = await handler(job)
            report = {"type": "job.completed", "job_id": job.job_id, "output": output}
        except asyncio.CancelledError:
            report = {"type": "job.failed", "job_id": job.job_id, "error": "cancelled"}
            report["retryable"] = False
        except JobFailed as exc:
            report = {"type": "job.failed", "job_id": job.job_id, "error": exc.error}
            report["retryable"] = exc.retryable
        except Exception as exc:
            error = "".join(traceback.format_exception_only(exc)).strip()
            report = {"type": "job.failed", "job_id": job.job_id, "error": error}
        finally:
            beat.cancel()
            self._running.pop(job.job_id, None)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(report))

    async def _heartbeat(self, ws: ClientConnection, job: WorkerJob) -> None:
        interval = max(job.timeout / 3, 0.2)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await ws.send(json.dumps({"type": "heartbeat", "job_id": job.job_id}))
