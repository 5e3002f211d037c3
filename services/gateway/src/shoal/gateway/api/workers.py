"""``/v1/workers/ws?kinds=a,b&max_in_flight=N``: a job worker's socket.

The gateway holds the socket and claims jobs *for* the worker through the scheduler's
``jobs.claim`` RPC whenever the worker has room (``max_in_flight`` minus the jobs it holds).
Claims are ``SKIP LOCKED`` row locks in PostgreSQL, so any number of sockets on any number of
gateways take disjoint jobs, and nothing has to be pushed to a gateway that may be gone. A
claim is tried when the socket opens, when a job of one of its kinds is announced
(``bcast.jobs.ready.<kind>``), when the worker finishes one, and every ``POLL_INTERVAL_S``
(jobs whose ``run_at`` or backoff came due). The sockets of a kind share a queue group on the
announcement, so one job wakes one socket, not all of them; a socket without room passes the
announcement on (at most ``MAX_READY_HOPS`` times).

Frames, server -> worker: ``{"type": "job", "job_id", "kind", "input", "attempt",
"lease_expires_at", "timeout", "traceparent", "tracestate"?}``, ``{"type": "cancel", "job_id"}``
(stop: the job was cancelled, or the attempt is no longer yours), ``{"type": "error",
"message"}``. Worker -> server: ``{"type": "heartbeat", "job_id"}``, ``{"type":
"job.completed", "job_id", "output"}``, ``{"type": "job.failed", "job_id", "error",
"retryable"?}``; a report may carry a ``traceparent`` of the job's trace (a worker's own span).

Tracing: sending a job is a ``gateway.job_dispatch`` span in the submitter's trace (stored
with the job), and its context is the frame's ``traceparent``; relaying a report is a
``gateway.job_report`` span in the same trace, and the scheduler's RPC continues it.

Close codes: 4400 bad query, 4401 bad key, 4403 a key without ``jobs:work`` (or ``admin``),
1013 scheduler unreachable at open, 1003 a frame that is not a JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shoal.common.errors import Forbidden, ShoalError, Unauthorized
from shoal.common.messaging import is_token, loads, new_id
from shoal.common.observability import inject_trace, start_span, trace_id_of
from shoal.gateway.api.deps import gateway_state
from shoal.gateway.jobs import Jobs, reader
from shoal.gateway.service import Principal
from shoal.gateway.tenancy import ADMIN, JOBS_WORK
from shoal.gateway.ws.upgrade import streaming_state, upgrade_principal

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

MAX_KINDS = 32
MAX_IN_FLIGHT = 1000
POLL_INTERVAL_S = 1.0
# After a wake-up, wait this long before claiming: a burst of submits (each announced to every
# socket of its kind) or of completions becomes one claim query instead of one per signal.
CLAIM_COALESCE_S = 0.005
MAX_READY_HOPS = 3
READY_GROUP = "workers"
CLOSE_UNSUPPORTED = 1003
CLOSE_TRY_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
TRACE_FIELDS = ("traceparent", "tracestate")


class WorkerRefused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_worker_query(params: Any) -> tuple[list[str], int, str]:
    """``(kinds, max_in_flight, worker name)`` from the query, or :class:`WorkerRefused`."""
    kinds = [k for k in (params.get("kinds") or "").split(",") if k]
    if not kinds or len(kinds) > MAX_KINDS or not all(is_token(k) for k in kinds):
        raise WorkerRefused(
            CLOSE_BAD_REQUEST, f"kinds: 1 to {MAX_KINDS} job kinds, comma-separated"
        )
    raw = params.get("max_in_flight") or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_IN_FLIGHT:
        raise WorkerRefused(CLOSE_BAD_REQUEST, f"max_in_flight: 1 to {MAX_IN_FLIGHT}")
    name = params.get("name")
    if name is not None and not is_token(name):
        raise WorkerRefused(CLOSE_BAD_REQUEST, "name: 1..128 characters of A-Z a-z 0-9 _ -")
    return list(dict.fromkeys(kinds)), int(raw), name or new_id("wrk")


def may_work(principal: Principal) -> bool:
    return JOBS_WORK in principal.scopes or ADMIN in principal.scopes


class WorkerSocket:
    """One worker's socket: claims while it has room, relays its reports to the scheduler."""

    def __init__(
        self,
        websocket: WebSocket,
        jobs: Jobs,
        principal: Principal,
        kinds: list[str],
        max_in_flight: int,
        worker: str,
    ) -> None:
        self._ws = websocket
        self._jobs = jobs
        self._owner = reader(principal)  # an admin's worker takes every owner's jobs
        self._kinds = kinds
        self._max = max_in_flight
        self._worker = worker
        self._held: dict[str, int] = {}  # job id -> attempt this socket was given
        self._traces: dict[str, dict[str, str]] = {}  # job id -> its dispatch span's context
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._subs: list[Subscription] = []
        self._relays: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        bus = self._jobs.bus
        for kind in self._kinds:
            self._subs.append(
                await bus.subscribe_broadcast(
                    f"jobs.ready.{kind}", self._on_ready, queue=READY_GROUP
                )
            )
        self._subs.append(await bus.subscribe_broadcast("jobs.cancel", self._on_cancel))
        claimer = asyncio.create_task(self._claim_loop(), name="worker-claims")
        try:
            await self._read_loop()
        finally:
            claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claimer
            # Reports already read are still relayed (a completion must not be lost).
            await asyncio.gather(*self._relays, return_exceptions=True)
            for sub in self._subs:
                with contextlib.suppress(NatsError):
                    await sub.unsubscribe()
            # Jobs still held are not failed here: their leases run out and they are redriven.

    async def _send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._ws.send_text(json.dumps(frame))

    async def _on_ready(self, msg: Msg) -> None:
        if len(self._held) < self._max:
            self._wake.set()
            return
        try:
            body = loads(msg.data)
            hops = int(body.get("hops", 0))
        except (ShoalError, AttributeError, TypeError, ValueError):
            return
        if hops < MAX_READY_HOPS:  # full: let another socket of this kind have it
            topic = "jobs.ready." + msg.subject.rsplit(".", 1)[-1]
            await self._jobs.bus.publish_broadcast(topic, {**body, "hops": hops + 1})

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            job_id = loads(msg.data).get("job_id")
        except (ShoalError, AttributeError):
            return
        if job_id in self._held:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await self._send({"type": "cancel", "job_id": job_id})

    async def _claim_loop(self) -> None:
        rpc = self._jobs.bus.scheduler_rpc
        while True:
            self._wake.clear()
            room = self._max - len(self._held)
            claimed: list[dict[str, Any]] = []
            if room > 0:
                try:
                    body = {
                        "kinds": self._kinds,
                        "owner": self._owner,
                        "worker": self._worker,
                        "limit": room,
                    }
                    claimed = list((await rpc("jobs.claim", body)).get("jobs") or [])
                except ShoalError as exc:
                    log.warning("job claim failed: %s", exc.message)
            for offer in claimed:
                self._held[offer["job_id"]] = int(offer["attempt"])
                try:
                    await self._dispatch(offer)
                except (RuntimeError, OSError, WebSocketDisconnect):
                    return  # the socket is gone: the leases of these jobs run out
            if claimed and len(claimed) == room:
                continue  # full: look again once the worker reports
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
                await asyncio.sleep(CLAIM_COALESCE_S)

    async def _dispatch(self, offer: dict[str, Any]) -> None:
        """Send one claimed attempt, in a span of the submitter's trace that the worker (and the
        report's relay) continue."""
        submitted = {k: offer.pop(k) for k in TRACE_FIELDS if isinstance(offer.get(k), str)}
        job_id = offer["job_id"]
        with start_span(
            "gateway.job_dispatch",
            submitted,
            **{"shoal.job_id": job_id, "shoal.job_attempt": offer["attempt"]},
        ):
            trace = {k: v for k, v in inject_trace({}).items() if k in TRACE_FIELDS}
            self._traces[job_id] = trace
            await self._send({"type": "job", **offer, **trace})

    async def _read_loop(self) -> None:
        while True:
            try:
                text = await self._ws.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                frame = json.loads(text)
                if not isinstance(frame, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self._ws.close(CLOSE_UNSUPPORTED, "frames are JSON objects")
                return
            # Reports are relayed concurrently: one slow RPC does not hold up the next frame.
            task = asyncio.create_task(self._relay(frame))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _relay(self, frame: dict[str, Any]) -> None:
        try:
            await self._handle(frame)
        except ShoalError as exc:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await self._send({"type": "error", "message": exc.message})
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass  # the socket went away while relaying

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind, job_id = frame.get("type"), frame.get("job_id")
        if kind not in ("heartbeat", "job.completed", "job.failed"):
            await self._send({"type": "error", "message": f"unknown frame type {kind!r}"})
            return
        attempt = self._held.get(job_id) if isinstance(job_id, str) else None
        if attempt is None or not isinstance(job_id, str):
            await self._send({"type": "error", "message": "no such job on this socket"})
            return
        rpc = self._jobs.bus.scheduler_rpc
        if kind == "heartbeat":
            beat = await rpc("jobs.heartbeat", {"job_id": job_id, "attempt": attempt})
            if not beat.get("ok"):
                self._release(job_id)  # redriven or ended elsewhere: stop working on it
            if not beat.get("ok") or beat.get("cancel"):
                await self._send({"type": "cancel", "job_id": job_id})
            return
        with start_span(
            "gateway.job_report",
            self._report_trace(job_id, frame),
            **{"shoal.job_id": job_id, "shoal.job_attempt": attempt, "shoal.report": kind},
        ):
            if kind == "job.completed":
                body = {"job_id": job_id, "attempt": attempt, "output": frame.get("output")}
                await rpc("jobs.complete", body)
            else:
                retryable = frame.get("retryable", True)
                body = {
                    "job_id": job_id,
                    "attempt": attempt,
                    "error": frame.get("error"),
                    "retryable": retryable if isinstance(retryable, bool) else True,
                }
                await rpc("jobs.fail", body)
        self._release(job_id)

    def _report_trace(self, job_id: str, frame: dict[str, Any]) -> dict[str, str]:
        """The report's parent: the worker's span when it names one of the job's trace (a
        worker's own trace or a malformed value is ignored), else the dispatch span."""
        dispatched = self._traces.get(job_id, {})
        reported = {k: v for k in TRACE_FIELDS if isinstance(v := frame.get(k), str)}
        if trace_id_of(dispatched) is not None and trace_id_of(reported) == trace_id_of(dispatched):
            return reported
        return dispatched

    def _release(self, job_id: str) -> None:
        self._held.pop(job_id, None)
        self._traces.pop(job_id, None)
        self._wake.set()


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.accept()
        await websocket.close(code, reason[:120])


@router.websocket("/workers/ws")
async def worker_socket(websocket: WebSocket) -> None:
    """A job worker (see the module docstring for frames and close codes)."""
    jobs = getattr(websocket.app.state, "jobs", None)
    if not isinstance(jobs, Jobs):
        await _refuse(websocket, CLOSE_TRY_LATER, "gateway is starting")
        return
    try:
        kinds, max_in_flight, worker = parse_worker_query(websocket.query_params)
        streaming = streaming_state(websocket.app)
        principal = await upgrade_principal(
            websocket,
            gateway_state(websocket.app).service,
            streaming.tickets if streaming else None,
        )
        if not may_work(principal):
            raise WorkerRefused(CLOSE_FORBIDDEN, "a worker needs the jobs:work (or admin) scope")
    except WorkerRefused as refused:
        await _refuse(websocket, refused.code, refused.reason)
        return
    except (Unauthorized, Forbidden) as exc:
        code = CLOSE_UNAUTHORIZED if isinstance(exc, Unauthorized) else CLOSE_FORBIDDEN
        await _refuse(websocket, code, exc.message)
        return
    except ShoalError as exc:
        await _refuse(websocket, CLOSE_TRY_LATER, exc.message)
        return
    await websocket.accept()
    socket = WorkerSocket(websocket, jobs, principal, kinds, max_in_flight, worker)
    try:
        await socket.serve()
    finally:
        if websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await websocket.close()
