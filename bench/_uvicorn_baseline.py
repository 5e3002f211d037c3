"""The fan-out baseline: a bare uvicorn WebSocket broadcast server, nothing of Shoal's in it.

Run by ``bench.gateway_fanout`` as its own process (so its CPU and memory can be read from
/proc); stops when its stdin closes (the bench went away) or on SIGTERM/SIGINT::

    python -m bench._uvicorn_baseline --port 18000 --topics 500

- ``/ws/<topic>``: a socket that receives every event of topic ``<topic>`` (0 .. topics-1);
- ``/idle``: a socket that receives nothing after its ``hello`` frame;
- ``GET /rate?events=<n>``: generate ``n`` events per second from now on (0 stops), spread
  round-robin over the topics. Each event is one JSON text frame shaped like Shoal's
  (``{"type":"event","seq":N,"event":<envelope>}``, ``seq`` contiguous per topic) carrying
  the ``time.monotonic_ns()`` of its generation (``sent_ns``), encoded once and sent to every
  socket of the topic through that socket's bounded queue and sender task.

Same uvicorn and WebSocket implementation as Shoal's services (``--ws``, which the bench sets to
``shoal.common.service.WS_IMPLEMENTATION``; no permessage-deflate, the same 20 s protocol
pings), plain ASGI, no framework. Every socket
gets a ``{"type":"hello"}`` frame on accept, so a client knows it is being served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TICK = 0.005  # s between generation rounds
QUEUE = 1024  # frames waiting per socket; past it a frame is dropped and counted
HELLO = '{"type":"hello"}'


def event_frame(topic: str, seq: int, sent_ns: int, content: str, owner: str = "usr_bench") -> str:
    """A frame shaped like the gateway's: ``{"type":"event","seq":N,"event":<envelope>}``.

    The envelope is what ``shoal.common.messaging.encode`` makes of the bench's event (a
    ``message.completed``, docs/CONTRACTS.md); ``data.sent_ns`` (last, so a reader finds it
    cheaply) is when the event was produced.
    """
    envelope = (
        f'{{"id":"{topic}:bench:{seq}","type":"message.completed","source":"session",'
        f'"time":"2026-01-01T00:00:00.000000Z","subject":"{topic}","owner":"{owner}",'
        f'"seq":{seq},"data":{{"message_id":"msg_{topic}_{seq}","prompt_id":"prm_bench",'
        f'"role":"assistant","content":"{content}","sent_ns":{sent_ns}}}}}'
    )
    return f'{{"type":"event","seq":{seq},"event":{envelope}}}'


class _Socket:
    __slots__ = ("dropped", "queue", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE)
        self.dropped = 0

    async def sender(self) -> None:
        while True:
            text = await self.queue.get()
            await self.send({"type": "websocket.send", "text": text})


class Broadcast:
    """The ASGI app: sockets by topic, and the loop that generates events."""

    def __init__(self, topics: int, content_bytes: int) -> None:
        self.topics: list[set[_Socket]] = [set() for _ in range(max(1, topics))]
        self.names = [f"ses_bench{i:08d}" for i in range(len(self.topics))]
        self.seqs = [0] * len(self.topics)
        self.content = "x" * content_bytes
        self.rate = 0.0
        self.generated = 0
        self._producer: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, send)

    async def _http(self, scope: Scope, send: Send) -> None:
        status, body = 404, b"not found"
        if scope["path"] == "/rate":
            query = parse_qs(scope.get("query_string", b"").decode())
            try:
                self.set_rate(float(query.get("events", ["0"])[0]))
                status, body = 200, f"{self.generated}".encode()
            except ValueError:
                status, body = 400, b"events must be a number"
        elif scope["path"] == "/healthz":
            status, body = 200, b"ok"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def set_rate(self, events_per_second: float) -> None:
        self.rate = max(0.0, events_per_second)
        if self.rate > 0 and (self._producer is None or self._producer.done()):
            self._producer = asyncio.get_running_loop().create_task(self._produce())

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path: str = scope["path"]
        members: set[_Socket] | None = None
        if path.startswith("/ws/"):
            try:
                members = self.topics[int(path[4:])]
            except (ValueError, IndexError):
                await send({"type": "websocket.close", "code": 4404})
                return
        elif path != "/idle":
            await send({"type": "websocket.close", "code": 4404})
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": HELLO})
        socket = _Socket(send)
        sender = None
        if members is not None:
            sender = asyncio.get_running_loop().create_task(socket.sender())
            members.add(socket)
        try:
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            if members is not None:
                members.discard(socket)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender

    async def _produce(self) -> None:
        started = time.monotonic()
        due = 0.0
        made = 0
        topic = 0
        count = len(self.topics)
        while self.rate > 0:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            due = (now - started) * self.rate
            while made < due:
                self.seqs[topic] += 1
                text = event_frame(
                    self.names[topic], self.seqs[topic], time.monotonic_ns(), self.content
                )
                for socket in self.topics[topic]:
                    try:
                        socket.queue.put_nowait(text)
                    except asyncio.QueueFull:
                        socket.dropped += 1
                made += 1
                self.generated += 1
                topic = (topic + 1) % count


def raise_fd_limit(wanted: int = 1 << 20) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (and the hard one if allowed); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(open("/proc/sys/fs/nr_open").read())  # noqa: SIM115, PTH123
    except (OSError, ValueError):
        ceiling = hard
    target = min(max(wanted, soft), ceiling)
    if target > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        target = hard
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _exit_when_stdin_closes() -> None:
    """The bench holds our stdin: end of file means it is gone, so go too."""
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(1):
            pass
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topics", type=int, default=1)
    parser.add_argument("--content-bytes", type=int, default=200)
    parser.add_argument("--sockets", type=int, default=1 << 16, help="sockets to expect (fds)")
    parser.add_argument(
        "--ws", default="websockets-sansio", help="uvicorn's WebSocket implementation (--ws)"
    )
    args = parser.parse_args()
    if args.host != "127.0.0.1":
        raise SystemExit("the baseline listens on 127.0.0.1 only")
    raise_fd_limit(args.sockets + 1024)
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    app = Broadcast(args.topics, args.content_bytes)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        lifespan="off",
        log_level="warning",
        ws=args.ws,
        ws_per_message_deflate=False,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
