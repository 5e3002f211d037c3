"""Event fan-out through one gateway process, next to a bare uvicorn broadcast server.

Both runs have the same shape: ``sessions`` topics, ``open`` client sockets spread evenly over
them, ``idle`` sockets that receive nothing, and ``rate`` events per second spread round-robin
over the topics, so each event is delivered to ``open / sessions`` sockets.

**Baseline** (``bench/_uvicorn_baseline.py``, its own process): a plain ASGI app on uvicorn,
the same WebSocket implementation and settings as Shoal's services (no permessage-deflate),
that generates the events itself and sends each to every socket of its topic.

**Shoal**: nats-server, PostgreSQL and every installed service as OS processes (one gateway),
through :func:`bench.command_path.running_fleet`. It creates the sessions (``POST
/v1/sessions``), opens the client sockets (``/v1/sessions/{id}/ws``, the admin key) and the idle
ones (client sockets on sessions that get no events, 10 per session, or the user stream
``/v1/events/ws`` of an owner without sessions), then a publisher process appends events to the
``SESSION_EVT`` ledger directly — one commit per event on ``<prefix>.session.evt.<session>.commit``
(``shoal.common.messaging.ledger``), a ``message.completed`` ``Envelope`` (docs/CONTRACTS.md)
with ``seq`` contiguous per session after the session's own events — so the session service
is not in the path being measured.

Every event carries the ``time.monotonic_ns()`` of its production (``data.sent_ns``; the clock
is system-wide on Linux), read by the receiving client: publish -> receive latency. The load
generator is ``clients`` processes, each holding a share of the sockets with a small asyncio
protocol (the upgrade, RFC 6455 framing parsed in place, automatic pongs: :class:`_Socket`), so
it costs little per frame; it checks that every socket's seqs arrive contiguous.

Figures per run: delivered events/s in the measured window (and what was offered), CPU of the
server process (gateway / baseline server) per delivered frame and deliveries per core-second,
latency p50/p95/p99, the server's RSS growth per idle socket, its CPU with every socket open and
no events, and the cores busy of every process group. Everything runs on 127.0.0.1, is bounded
in count and time, and is stopped in ``finally`` blocks (Ctrl-C too).

File descriptors: every process raises its RLIMIT_NOFILE soft limit (to the hard limit, or
above it when allowed). The gateway needs one per socket; it inherits the limit from this
process (the supervisor execs it), which is why this process raises its own first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from websockets.utils import accept_key

from bench._http1 import Http1Connection
from bench._report import CpuMeter, Latency, fmt, latency_cell, run_loop, table
from bench._uvicorn_baseline import raise_fd_limit
from bench.command_path import CommandOptions, running_fleet
from shoal.common.messaging import Subjects
from shoal.common.service import WS_IMPLEMENTATION
from shoal.devtools.embedded import free_port, wait_for_port

SETUP_CONCURRENCY = 32  # HTTP connections creating sessions
HANDSHAKES_PER_CLIENT = 32  # socket handshakes in flight per client process
REQUEST_TIMEOUT = 30.0
SENT_NS = b'"sent_ns":'
EVENT_PREFIX = b'{"type":"event","seq":'
IDLE_PER_SESSION = 10  # idle client sockets per idle session
EVENT_TYPE = "message.completed"
PING = b'{"type":"ping"}'
KEEPALIVE = 60  # s between a socket's application pings (the gateway's idle timeout is 120 s)
SATURATED = 0.9  # share of the machine's cores busy past which the latencies are the machine's
_ID_RE = re.compile(r"\b(ses|usr|key)_[0-9a-z]{8,}")  # ids out of close reasons, so they add up


@dataclass(frozen=True)
class FanoutOptions:
    open: int = 5_000  # client sockets receiving events
    idle: int = 10_000  # sockets receiving nothing
    sessions: int = 500  # topics / sessions the open sockets are spread over
    rate: float = 2_000.0  # events/s produced (each delivered to open / sessions sockets)
    duration: float = 10.0  # s measured
    warmup: float = 2.0  # s of load before measuring
    # s of CPU measured with every socket open and no events: one protocol ping interval (20 s),
    # so each socket pings once in it whenever its pings began
    idle_window: float = 20.0
    clients: int = 4  # load-generator processes
    content_bytes: int = 200  # size of the event's content (frames are ~450 bytes)
    idle_on: str = "session"  # "session": client sockets on idle sessions; "user": user stream
    baseline: bool = True
    shoal: bool = True
    keep_dir: bool = False
    fleet_env: tuple[tuple[str, str], ...] = ()
    ready_timeout: float = 90.0
    # > 0: raise max_consumers of the SESSION_EVT and DELIVER streams after the fleet started
    # (nats-server 2.15 gives every stream a default limit of 1,000 consumers; today the
    # gateway holds one ordered consumer per socket)
    stream_max_consumers: int = 0
    # Give the server (the gateway / the baseline server) a core of its own and run every other
    # process of the run on the rest, as a Kubernetes CPU request would (needs >= 2 cores).
    server_core: bool = False

    @property
    def fanout(self) -> float:
        return self.open / self.sessions if self.sessions else 0.0


@dataclass
class FanoutResult:
    name: str  # "baseline" / "shoal"
    options: FanoutOptions
    delivered: int = 0  # frames received in the measured window
    seconds: float = float("nan")
    produced: int = 0  # events produced during the whole load (warmup included)
    produce_seconds: float = float("nan")
    latency: Latency = field(default_factory=lambda: Latency.of([]))
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group
    server_label: str = ""
    rss_start: int = 0  # bytes, the server's tree before any socket
    rss_open: int = 0  # after the open sockets
    rss_idle: int = 0  # after the idle sockets too
    rss_end: int = 0  # after the load
    idle_cores: float = float("nan")  # server CPU with every socket open, no events
    connect_seconds: float = float("nan")
    sockets_ready: int = 0
    order_errors: int = 0
    closes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    fd_limit: str = ""
    notes: list[str] = field(default_factory=list)
    machine_cores: float = float("nan")  # cores busy in the window, every process (/proc/stat)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else float("nan")

    @property
    def server_cpu(self) -> float:
        return self.cpu.get(self.server_label, float("nan"))

    @property
    def per_core(self) -> float:
        cpu = self.server_cpu
        return self.delivered / cpu if cpu > 0 else float("nan")

    @property
    def us_per_frame(self) -> float:
        return self.server_cpu * 1e6 / self.delivered if self.delivered else float("nan")

    @property
    def idle_bytes_per_socket(self) -> float:
        idle = self.options.idle
        return (self.rss_idle - self.rss_open) / idle if idle and self.rss_idle else float("nan")


# ----------------------------------------------------------------------------- load clients


class _Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.frames = 0  # bench events in the window
        self.latencies: array[float] = array("d")
        self.order_errors = 0
        self.open = 0
        self.closes: Counter[str] = Counter()


class _Socket(asyncio.Protocol):
    """One client socket: an HTTP/1.1 upgrade, then RFC 6455 framing written out by hand.

    A measuring client should cost as little per frame as it can, because it shares the cores
    with the server it measures. Server frames are unmasked and (from both servers here) never
    fragmented, so a frame is a 2-, 4- or 10-byte header and its payload: parsed in place, a
    fraction of the CPU of a general parser (websockets' sans-I/O protocol cost ~40 us a frame
    here). Client frames (pongs, application pings, the close reply) are masked (RFC 6455 §5.3).
    """

    def __init__(self, stats: _Stats, host: str, port: int, spec: _SocketSpec) -> None:
        loop = asyncio.get_running_loop()
        self.stats = stats
        key = base64.b64encode(os.urandom(16)).decode()
        self.accept = accept_key(key).encode()
        lines = [
            f"GET {spec.path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in spec.headers),
        ]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.handshake: asyncio.Future[None] = loop.create_future()
        # Ready: the first frame came (a replayed event or the baseline's hello), or at once
        # after the handshake for a socket that gets nothing (an idle user stream).
        self.ready: asyncio.Future[None] = loop.create_future()
        self.expect_frame = spec.expect_frame
        self.last_seq = -1
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            if not self._on_response(buf[:end]):
                return
            buf = buf[end + 4 :]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                length, head = int.from_bytes(buf[pos + 2 : pos + 4]), 4
            elif length == 127:
                length, head = int.from_bytes(buf[pos + 2 : pos + 10]), 10
            end = pos + head + length
            if end > size:
                break
            if second & 0x80 or not first & 0x80:
                self._fail_protocol("a masked or fragmented server frame")
                return
            opcode = first & 0x0F
            if opcode == 0x1:
                self._on_text(buf[pos + head : end])
            elif opcode == 0x9:
                self._send(0xA, buf[pos + head : end])  # pong with the ping's payload
            elif opcode == 0x8:
                self._on_close(buf[pos + head : end])
                return
            pos = end
        self.buffer = buf[pos:] if pos < size else b""

    def _on_response(self, head: bytes) -> bool:
        status = head[9:12]
        if status == b"101" and self.accept in head:
            self.upgraded = True
            self.stats.open += 1
            _resolve(self.handshake)
            if not self.expect_frame:
                _resolve(self.ready)
            return True
        error = RuntimeError(f"handshake answered {status.decode(errors='replace')}")
        _fail(self.handshake, error)
        _fail(self.ready, error)
        self.close()
        return False

    def _on_text(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.ready.done():
            _resolve(self.ready)
        if not data.startswith(EVENT_PREFIX):
            return
        stats = self.stats
        try:
            seq = int(data[22 : data.index(b",", 22)])
        except ValueError:
            return
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            stats.order_errors += 1
        self.last_seq = seq
        at = data.rfind(SENT_NS)
        if at < 0 or not stats.measuring:
            return
        start = at + len(SENT_NS)
        try:
            sent = int(data[start : data.index(b"}", start)])
        except ValueError:
            return
        stats.frames += 1
        stats.latencies.append((now - sent) / 1e9)

    def _on_close(self, payload: bytes) -> None:
        if len(payload) >= 2:
            what = f"{int.from_bytes(payload[:2])} {payload[2:].decode(errors='replace')}"
        else:
            what = "close (no code)"
        self._send(0x8, payload[:2])  # the closing handshake's reply
        self._closed(what)
        if self.transport is not None:
            self.transport.close()

    def _fail_protocol(self, what: str) -> None:
        self._closed(f"protocol error: {what}")
        self.close()

    def _closed(self, what: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.upgraded:
            self.stats.open -= 1
        self.stats.closes[_ID_RE.sub(r"\1_…", what)[:200]] += 1
        error = ConnectionError(what)
        _fail(self.handshake, error)
        _fail(self.ready, error)

    def _send(self, opcode: int, payload: bytes) -> None:
        """One masked client frame (payloads here are under 126 bytes)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed:
            return
        size = len(payload)
        mask = os.urandom(4)
        key = int.from_bytes((mask * (size // 4 + 1))[:size])
        masked = (int.from_bytes(payload) ^ key).to_bytes(size)
        transport.write(bytes((0x80 | opcode, 0x80 | size)) + mask + masked)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed(f"connection lost{': ' + str(exc) if exc else ''}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def ping(self) -> None:
        """An application ping (the gateway closes a socket that sent nothing for 120 s)."""
        if self.upgraded:
            self._send(0x1, PING)


async def _keepalive(sockets: list[_Socket]) -> None:
    """Ping each socket once per ``KEEPALIVE`` seconds, spread evenly over that time."""
    tick = 0
    while True:
        await asyncio.sleep(1.0)
        tick = (tick + 1) % KEEPALIVE
        for sock in sockets[tick::KEEPALIVE]:
            sock.ping()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: no "never retrieved" warning for unawaited ones


@dataclass(frozen=True)
class _SocketSpec:
    path: str
    headers: tuple[tuple[str, str], ...]
    expect_frame: bool


async def _recv(conn: Connection, within: float) -> Any:
    """The next object on a pipe, without a thread (so Ctrl-C is never stuck behind one).

    Polled, not watched with ``loop.add_reader``: watched that way on uvloop, a client holding
    thousands of sockets once lost its pipe mid-run (the bench read ECONNRESET while the
    process was alive; the cause was not found). Polled, it has not."""
    deadline = time.monotonic() + within
    while not conn.poll():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)
    return conn.recv()


async def _client_async(conn: Connection, host: str, port: int) -> None:
    stats = _Stats()
    sockets: list[_Socket] = []
    loop = asyncio.get_running_loop()
    pinger = loop.create_task(_keepalive(sockets))

    async def open_one(spec: _SocketSpec, gate: asyncio.Semaphore, within: float) -> bool:
        async with gate:
            sock = _Socket(stats, host, port, spec)
            sockets.append(sock)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: sock, host, port), REQUEST_TIMEOUT
                )
                await asyncio.wait_for(asyncio.shield(sock.handshake), within)
            except (OSError, TimeoutError, ConnectionError, RuntimeError) as exc:
                stats.closes[f"connect: {type(exc).__name__}: {exc}"[:200]] += 1
                sock.close()
                return False
        try:
            await asyncio.wait_for(asyncio.shield(sock.ready), within)
        except (TimeoutError, ConnectionError, RuntimeError):
            return False
        return True

    while True:
        try:
            command = await _recv(conn, 3600)
        except (EOFError, OSError, TimeoutError):
            return  # the bench is gone
        op = command[0]
        if op == "connect":
            specs: list[_SocketSpec] = command[1]
            timeout: float = command[2]
            gate = asyncio.Semaphore(HANDSHAKES_PER_CLIENT)
            started = time.perf_counter()
            ready = await asyncio.gather(*(open_one(s, gate, timeout) for s in specs))
            conn.send(
                {"ready": sum(ready), "open": stats.open, "seconds": time.perf_counter() - started}
            )
        elif op == "start":
            stats.frames = 0
            stats.latencies = array("d")
            stats.measuring = True
            conn.send("ok")
        elif op == "stop":
            stats.measuring = False
            conn.send(
                {
                    "frames": stats.frames,
                    "latencies": stats.latencies.tobytes(),
                    "order_errors": stats.order_errors,
                    "open": stats.open,
                    "closes": dict(stats.closes),
                }
            )
        elif op == "close":
            pinger.cancel()
            for sock in sockets:
                sock.close()
            await asyncio.sleep(0.1)
            conn.send({"open": stats.open, "closes": dict(stats.closes)})
            return


def _client_main(conn: Connection, host: str, port: int, sockets: int) -> None:
    """A load-generator process: holds its share of the sockets until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us (Ctrl-C reaches it too)
    raise_fd_limit(sockets + 1024)
    _no_collector_pauses()
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        run_loop(_client_async(conn, host, port))


def _no_collector_pauses() -> None:
    """The measuring processes (load clients, publisher) must not add pauses of their own to
    the latency they measure: with the collector on, a client holding 3,750 sockets made full
    passes of 45-166 ms (a gc.callbacks probe), every frame it held meanwhile counted late.
    They make next to no reference cycles, and live for one run."""
    gc.disable()


# ----------------------------------------------------------------------------- publisher


async def _publish_async(
    conn: Connection,
    nats_url: str,
    prefix: str,
    sessions: list[tuple[str, str, int]],
    rate: float,
    content_bytes: int,
) -> None:
    import nats

    from shoal.common.messaging import Envelope, encode_commit

    nc = await nats.connect(nats_url, name="bench-publisher")
    js = nc.jetstream()
    content = "x" * content_bytes
    published = errors = 0
    first_error: list[str] = []

    def on_ack(future: asyncio.Future[Any]) -> None:
        nonlocal errors
        if future.cancelled() or future.exception() is not None:
            errors += 1
            if not first_error:
                first_error.append(repr(future.exception()) if not future.cancelled() else "")

    try:
        conn.send("ready")
        seconds: float = await _recv(conn, 600)
        seqs = [next_seq for _, _, next_seq in sessions]
        started = time.monotonic()
        index = 0
        count = len(sessions)
        while (now := time.monotonic()) - started < seconds:
            due = (now - started) * rate
            while published < due:
                session_id, owner, _ = sessions[index]
                seq = seqs[index]
                seqs[index] = seq + 1
                envelope = Envelope(
                    id=f"{session_id}:bench:{seq}",
                    type=EVENT_TYPE,
                    source="session",
                    time="2026-01-01T00:00:00.000000Z",
                    subject=session_id,
                    owner=owner,
                    seq=seq,
                    data={
                        "message_id": f"msg_{session_id}_{seq}",
                        "prompt_id": "prm_bench",
                        "role": "assistant",
                        "content": content,
                        "sent_ns": time.monotonic_ns(),
                    },
                )
                try:
                    # Not publish_async's wait_stall: on Python 3.11 it yields to the loop on
                    # every publish, and each would go out in a write of its own
                    # (shoal.eventbus.store).
                    async with asyncio.timeout(5.0):
                        future = await js.publish_async(
                            f"{prefix}.session.evt.{session_id}.commit",
                            encode_commit([envelope]),
                            headers={"Nats-Msg-Id": envelope.id, "Shoal-Seq": str(seq)},
                        )
                except Exception as exc:  # stalled: JetStream acks nothing for 5 s
                    errors += 1
                    if not first_error:
                        first_error.append(repr(exc))
                    seqs[index] = seq  # not published: the session's seqs stay contiguous
                    if time.monotonic() - started > seconds:
                        break
                    continue
                future.add_done_callback(on_ack)
                published += 1
                index = (index + 1) % count
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - started
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(js.publish_async_completed(), 10)
        conn.send(
            {"published": published, "seconds": elapsed, "errors": errors, "first": first_error}
        )
    finally:
        await nc.close()


def _publisher_main(
    conn: Connection,
    nats_url: str,
    prefix: str,
    sessions: list[tuple[str, str, int]],
    rate: float,
    content_bytes: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _no_collector_pauses()
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        run_loop(_publish_async(conn, nats_url, prefix, sessions, rate, content_bytes))


# ----------------------------------------------------------------------------- the bench side


class _Child:
    """A process of ours (load client or publisher) and the pipe to it."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=target, args=(child_conn, *args), name=name, daemon=True
        )
        self.proc.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    async def call(self, message: Any, within: float) -> Any:
        self.conn.send(message)
        return await self.reply(within)

    async def reply(self, within: float) -> Any:
        try:
            return await _recv(self.conn, within)
        except (EOFError, OSError):
            raise RuntimeError(f"{self.proc.name} exited (code {self.proc.exitcode})") from None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)


class _Clients:
    """The load-generator processes and their sockets."""

    def __init__(self, count: int, url: str, sockets: int) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        share = math.ceil(sockets / count)
        self.children: list[_Child] = []
        for i in range(count):
            self.children.append(_Child(_client_main, (host, port, share), f"bench-client-{i}"))

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    async def connect(self, specs: Sequence[_SocketSpec], within: float) -> tuple[int, float]:
        """Open ``specs`` spread over the processes; (sockets ready, seconds)."""
        shares: list[list[_SocketSpec]] = [[] for _ in self.children]
        for i, spec in enumerate(specs):
            shares[i % len(shares)].append(spec)
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(
                child.call(("connect", share, within), within + REQUEST_TIMEOUT + 60)
                for child, share in zip(self.children, shares, strict=True)
            )
        )
        return sum(a["ready"] for a in answers), time.perf_counter() - started

    async def each(self, message: Any, within: float = REQUEST_TIMEOUT) -> list[Any]:
        return list(await asyncio.gather(*(c.call(message, within) for c in self.children)))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.each(("close",)), 15)
        for child in self.children:
            await asyncio.to_thread(child.stop)


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[-1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for row in Path(f"/proc/{current}/status").read_text().splitlines():
                if row.startswith("VmRSS:"):
                    total += int(row.split()[1]) * 1024
        except OSError:
            pass
    return total


def _fd_limit(pid: int) -> str:
    try:
        for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if row.startswith("Max open files"):
                soft, hard = row.split()[3:5]
                return f"{soft} (hard {hard})"
    except OSError:
        pass
    return "unknown"


async def _settle(seconds: float = 1.0) -> None:
    await asyncio.sleep(seconds)


async def _measure(
    result: FanoutResult,
    clients: _Clients,
    groups: dict[str, list[int]],
    options: FanoutOptions,
) -> None:
    """The measured window: clients count and time what arrives; CPU of every group."""
    await asyncio.sleep(options.warmup)
    meter = CpuMeter(groups)
    await clients.each(("start",))
    meter.start()
    machine_from = _machine_busy()
    await asyncio.sleep(options.duration)
    answers = await clients.each(("stop",), 60)
    cpu, wall = meter.stop()
    result.machine_cores = (_machine_busy() - machine_from) / wall if wall > 0 else math.nan
    latencies: list[float] = []
    for answer in answers:
        result.delivered += answer["frames"]
        samples: array[float] = array("d")
        samples.frombytes(answer["latencies"])
        latencies.extend(samples)
    result.seconds = wall
    result.cpu = cpu
    result.latency = Latency.of(latencies)


def _machine_busy() -> float:
    """CPU seconds every process of the machine has spent so far (/proc/stat: all but idle and
    iowait): what bounds the latencies when the bench and the fleet share too few cores."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def _idle_cpu(pids: list[int], seconds: float) -> float:
    meter = CpuMeter({"server": pids})
    meter.start()
    await asyncio.sleep(seconds)
    used, wall = meter.stop()
    return used["server"] / wall if wall > 0 else float("nan")


async def _collect_closes(result: FanoutResult, clients: _Clients) -> None:
    """What the sockets saw over the whole run: closes (code and reason) and seq disorder."""
    for answer in await clients.each(("stop",), 60):
        result.closes.update(answer["closes"])
        result.order_errors += answer["order_errors"]


def _open_specs(
    options: FanoutOptions, paths: Sequence[str], headers: tuple[tuple[str, str], ...]
) -> list[_SocketSpec]:
    return [_SocketSpec(paths[i % len(paths)], headers, True) for i in range(options.open)]


# ----------------------------------------------------------------------------- baseline


async def run_baseline(options: FanoutOptions) -> FanoutResult:
    """The bare uvicorn broadcast server under the same load."""
    result = FanoutResult("baseline", options, server_label="baseline server")
    split = _split_cores(options)
    port = free_port()
    sockets = options.open + options.idle
    argv = [
        sys.executable, "-m", "bench._uvicorn_baseline", "--port", str(port),
        "--topics", str(options.sessions), "--content-bytes", str(options.content_bytes),
        "--sockets", str(sockets), "--ws", WS_IMPLEMENTATION,
    ]  # fmt: skip
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, not awaited)
        argv, stdin=subprocess.PIPE, start_new_session=True
    )
    clients: _Clients | None = None
    try:
        await asyncio.to_thread(wait_for_port, port, 30, server)
        url = f"http://127.0.0.1:{port}"
        http = Http1Connection("127.0.0.1", port, {})
        clients = _Clients(options.clients, url, sockets)
        result.fd_limit = _fd_limit(server.pid)
        _give_server_its_core(result, server.pid, split)
        result.rss_start = _rss(server.pid)
        _say(f"  {options.open} open sockets on {options.sessions} topics")
        paths = [f"/ws/{i}" for i in range(options.sessions)]
        ready_open, secs_open = await clients.connect(
            _open_specs(options, paths, ()), _connect_timeout(options.open)
        )
        await _settle()
        result.rss_open = _rss(server.pid)
        _say(f"  {options.idle} idle sockets")
        idle = [_SocketSpec("/idle", (), True) for _ in range(options.idle)]
        ready_idle, secs_idle = await clients.connect(idle, _connect_timeout(options.idle))
        await _settle()
        result.rss_idle = _rss(server.pid)
        result.sockets_ready = ready_idle + ready_open
        result.connect_seconds = secs_idle + secs_open
        result.idle_cores = await _idle_cpu([server.pid], options.idle_window)
        _say(f"  load: {options.rate:g} events/s, {options.duration:g}s measured")
        status, body = await http.request("GET", f"/rate?events={options.rate}")
        started = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"baseline /rate answered {status}: {body!r}")
        groups = {"baseline server": [server.pid], "load clients": clients.pids}
        await _measure(result, clients, groups, options)
        status, body = await http.request("GET", "/rate?events=0")
        result.produce_seconds = time.perf_counter() - started
        result.produced = int(body) if status == 200 and body.isdigit() else 0
        await http.close()
        await _settle(0.5)
        result.rss_end = _rss(server.pid)
        await _collect_closes(result, clients)
    finally:
        if clients is not None:
            await clients.close()
        if server.stdin is not None:
            server.stdin.close()
        server.terminate()
        try:
            await asyncio.to_thread(server.wait, 10)
        except subprocess.TimeoutExpired:
            server.kill()
            await asyncio.to_thread(server.wait, 5)
    return result


def _split_cores(options: FanoutOptions) -> tuple[set[int], set[int]] | None:
    """(the server's core, everyone else's) when ``server_core``: the highest core this process
    may use is the server's. Called before anything is started, so every process the run
    starts inherits "everyone else's" and only the server is moved."""
    if not options.server_core:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError("--server-core needs at least 2 cores")
    server, rest = {cores[-1]}, set(cores[:-1])
    _pin(os.getpid(), rest)
    return server, rest


def _pin(pid: int, cores: set[int]) -> None:
    """Move every thread of ``pid`` to ``cores``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cores)


def _give_server_its_core(
    result: FanoutResult, pid: int, split: tuple[set[int], set[int]] | None
) -> None:
    """With ``--server-core``: move the server to its core, and say so in the notes."""
    if split is None:
        return
    server, rest = split
    _pin(pid, server)
    result.notes.append(
        f"{result.server_label} on core {','.join(map(str, sorted(server)))} alone; every other "
        f"process of the run on core(s) {','.join(map(str, sorted(rest)))} (--server-core)"
    )


def _connect_timeout(sockets: int) -> float:
    """Seconds a share of sockets may take to open: generous, but bounded."""
    return min(600.0, 60.0 + sockets * 0.02)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- Shoal


async def _create_sessions(http: list[Http1Connection], count: int) -> list[tuple[str, str, int]]:
    """``count`` sessions: (id, owner, last seq) each."""
    created: list[tuple[str, str, int]] = []
    shares = [range(i, count, len(http)) for i in range(len(http))]

    async def create(conn: Http1Connection, indices: range) -> None:
        for _ in indices:
            body = orjson.dumps({"metadata": {"bench": "fanout"}})
            status, answer = await asyncio.wait_for(
                conn.request("POST", "/v1/sessions", body), REQUEST_TIMEOUT
            )
            if status != 201:
                raise RuntimeError(f"POST /v1/sessions answered {status}: {answer[:300]!r}")
            session = orjson.loads(answer)
            created.append((session["id"], session["owner"], int(session.get("last_seq") or 0)))

    await asyncio.gather(*(create(c, r) for c, r in zip(http, shares, strict=True) if r))
    return created


def _log_lines(path: Path, needles: Sequence[str], keep: int = 3) -> tuple[int, list[str]]:
    """How many lines of ``path`` hold one of ``needles``, and the first ``keep`` of them."""
    count, first = 0, list[str]()
    with contextlib.suppress(OSError), path.open(errors="replace") as file:
        for line in file:
            if any(n in line for n in needles):
                count += 1
                if len(first) < keep:
                    first.append(line.strip()[:400])
    return count, first


CONSUMER_LIMIT = ("maximum consumers", "10026")


async def _raise_consumer_limit(nats_url: str, options: FanoutOptions) -> str:
    """Set ``max_consumers`` of the streams the gateway's sockets consume (a bench-only knob:
    it lasts until the services provision the streams again)."""
    import nats

    subjects = Subjects()
    nc = await nats.connect(nats_url, name="bench-setup")
    try:
        js = nc.jetstream()
        for stream in (subjects.session_evt_stream, subjects.deliver_stream):
            config = (await js.stream_info(stream)).config
            config.max_consumers = options.stream_max_consumers
            await js.update_stream(config)
    finally:
        await nc.close()
    return (
        f"max_consumers of the SESSION_EVT and DELIVER streams raised to "
        f"{options.stream_max_consumers:,} for this run (--stream-max-consumers)"
    )


async def run_shoal(options: FanoutOptions) -> FanoutResult:
    """One gateway (and the rest of the fleet) under the same load."""
    result = FanoutResult("shoal", options, server_label="gateway")
    home = Path(tempfile.mkdtemp(prefix="shoal-bench-fanout-"))
    fleet_options = CommandOptions(
        session_replicas=1,
        ready_timeout=options.ready_timeout,
        keep_dir=options.keep_dir,
        fleet_env=options.fleet_env,
    )
    split = _split_cores(options)
    try:
        async with running_fleet(False, home, fleet_options) as fleet:
            try:
                await _load_shoal(result, fleet, options, split)
            except Exception as exc:  # what was measured so far is still printed
                _say(f"  failed: {type(exc).__name__}: {exc}")
                result.errors.append(f"run failed: {type(exc).__name__}: {exc}"[:600])
    finally:
        logs = home / "logs"
        for name in ("gateway", "nats"):
            count, first = _log_lines(logs / f"{name}.log", CONSUMER_LIMIT)
            if count:
                result.notes.append(f"{name}.log: {count} lines about the consumer limit")
                result.errors.extend(first)
        if options.keep_dir:
            _say(f"  kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return result


async def _load_shoal(
    result: FanoutResult,
    fleet: Any,
    options: FanoutOptions,
    split: tuple[set[int], set[int]] | None,
) -> None:
    parts = urlsplit(fleet.gateway_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    auth = {"Authorization": f"Bearer {fleet.admin_key}"}
    gateway = fleet.pids["gateway"]
    result.fd_limit = _fd_limit(gateway[0])
    _give_server_its_core(result, gateway[0], split)
    if options.stream_max_consumers > 0:
        result.notes.append(await _raise_consumer_limit(fleet.nats_url, options))
    http = [Http1Connection(host, port, auth) for _ in range(SETUP_CONCURRENCY)]
    clients: _Clients | None = None
    publisher: _Child | None = None
    try:
        idle_sessions = (
            math.ceil(options.idle / IDLE_PER_SESSION) if options.idle_on == "session" else 0
        )
        _say(f"  creating {options.sessions} + {idle_sessions} idle sessions")
        active = await _create_sessions(http, options.sessions)
        idle_ids = [s[0] for s in await _create_sessions(http, idle_sessions)]
        idle_headers = (("Authorization", auth["Authorization"]),)
        if options.idle_on == "user":
            body = orjson.dumps(
                {"name": "bench-idle", "scopes": ["sessions"], "owner": "usr_benchidle"}
            )
            status, answer = await http[0].request("POST", "/v1/keys", body)
            if status != 201:
                raise RuntimeError(f"POST /v1/keys answered {status}: {answer[:300]!r}")
            idle_headers = (("Authorization", f"Bearer {orjson.loads(answer)['key']}"),)
            idle = [_SocketSpec("/v1/events/ws", idle_headers, False)] * options.idle
        else:
            idle = [
                _SocketSpec(f"/v1/sessions/{idle_ids[i % len(idle_ids)]}/ws", idle_headers, True)
                for i in range(options.idle)
            ]
        sockets = options.open + options.idle
        clients = _Clients(options.clients, fleet.gateway_url, sockets)
        await _settle()
        result.rss_start = _rss(gateway[0])
        nats_rss = _rss(fleet.pids["nats-server"][0])
        _say(f"  {options.open} open sockets on {options.sessions} sessions")
        paths = [f"/v1/sessions/{sid}/ws" for sid, _, _ in active]
        ready_open, secs_open = await clients.connect(
            _open_specs(options, paths, (("Authorization", auth["Authorization"]),)),
            _connect_timeout(options.open),
        )
        await _settle()
        result.rss_open = _rss(gateway[0])
        nats_rss = _rss(fleet.pids["nats-server"][0])
        _say(f"  {options.idle} idle sockets ({options.idle_on})")
        ready_idle, secs_idle = await clients.connect(idle, _connect_timeout(options.idle))
        await _settle()
        result.rss_idle = _rss(gateway[0])
        grown = (_rss(fleet.pids["nats-server"][0]) - nats_rss) / max(1, options.idle)
        result.notes.append(f"nats-server RSS growth per idle socket: {grown / 1000:.1f} KB")
        result.sockets_ready = ready_idle + ready_open
        result.connect_seconds = secs_idle + secs_open
        if result.sockets_ready < sockets:
            _say(f"  only {result.sockets_ready} of {sockets} sockets ready")
        result.idle_cores = await _idle_cpu(gateway, options.idle_window)
        _say(f"  load: {options.rate:g} events/s, {options.duration:g}s measured")
        publisher = _Child(
            _publisher_main,
            (
                fleet.nats_url,
                Subjects().prefix,  # the fleet runs with the default prefix (no SHOAL_* passed)
                [(sid, owner, last + 1) for sid, owner, last in active],
                options.rate,
                options.content_bytes,
            ),
            "bench-publisher",
        )
        if await publisher.reply(60) != "ready":
            raise RuntimeError("the publisher did not start")
        seconds = options.warmup + options.duration + 1.0
        publisher.conn.send(seconds)
        groups = {**fleet.pids, "load clients": clients.pids, "publisher": [publisher.pid]}
        await _measure(result, clients, groups, options)
        published = await publisher.reply(seconds + 30)
        result.produced = published["published"]
        result.produce_seconds = published["seconds"]
        if published["errors"]:
            result.errors.append(
                f"publisher: {published['errors']} failed publishes, first {published['first']}"
            )
        await _settle(0.5)
        result.rss_end = _rss(gateway[0])
    finally:
        if clients is not None:
            with contextlib.suppress(Exception):
                await _collect_closes(result, clients)
        for conn in http:
            await conn.close()
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
        if clients is not None:
            await clients.close()


# ----------------------------------------------------------------------------- run and render


async def run_fanout(options: FanoutOptions) -> list[FanoutResult]:
    """The baseline, then Shoal (each optional); their figures. A failed run is reported in
    its result's ``errors`` and the other still runs."""
    # The gateway inherits this process's limit: raise it before the fleet starts.
    raise_fd_limit(options.open + options.idle + 4096)
    results = []
    for name, wanted, run in (
        ("baseline: bare uvicorn broadcast", options.baseline, run_baseline),
        ("Shoal: one gateway", options.shoal, run_shoal),
    ):
        if not wanted:
            continue
        _say(f"fan-out {name} ...")
        cores = os.sched_getaffinity(0)
        try:
            results.append(await run(options))
        except Exception as exc:
            _say(f"  failed: {type(exc).__name__}: {exc}")
            failed = FanoutResult("baseline" if run is run_baseline else "shoal", options)
            failed.errors.append(f"run failed: {type(exc).__name__}: {exc}"[:600])
            results.append(failed)
        finally:
            os.sched_setaffinity(0, cores)  # --server-core narrowed this process's
    return results


TARGET_PER_CORE = 30_000.0
TARGET_P99_MS = 50.0
TARGET_IDLE_BYTES = 30_000.0


def _ratio(shoal: float, base: float) -> str:
    if not (shoal == shoal and base == base) or base == 0:
        return "-"
    return f"{shoal / base:.2f}x"


def _mib(value: int) -> str:
    return fmt(value / 2**20, 1) if value else "-"


def _check(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def render_fanout(results: list[FanoutResult]) -> str:
    """Shoal next to the baseline, the targets of issue 4, then cores busy per process."""
    base = next((r for r in results if r.name == "baseline"), None)
    shoal = next((r for r in results if r.name == "shoal"), None)
    options = (shoal or base or FanoutResult("-", FanoutOptions())).options
    empty = FanoutResult("-", options)
    b, s = base or empty, shoal or empty

    def row(
        what: str, get: Any, digits: int = 0, ratio: bool = True, target: str = "", ok: Any = None
    ) -> tuple[str, str, str, str, str, str]:
        bv, sv = get(b), get(s)
        cells = (fmt(bv, digits), fmt(sv, digits))
        met = _check(ok(s) if ok is not None and shoal is not None else None)
        return (what, *cells, _ratio(sv, bv) if ratio else "", target, met)

    def text(what: str, bv: str, sv: str, target: str = "") -> tuple[str, ...]:
        return (what, bv, sv, "", target, "")

    offered = options.rate * options.fanout
    rows: list[tuple[str, ...]] = [
        text(
            "sockets: open / idle (asked)",
            f"{options.open:,} / {options.idle:,}",
            f"{options.open:,} / {options.idle:,}",
            "5,000 / 10,000",
        ),
        text("sockets ready", f"{b.sockets_ready:,}", f"{s.sockets_ready:,}"),
        text(
            "events/s produced (asked)",
            f"{fmt(_rate(b), 0)} ({options.rate:,.0f})",
            f"{fmt(_rate(s), 0)} ({options.rate:,.0f})",
        ),
        text(
            f"deliveries/s offered (x{options.fanout:g} sockets per event)",
            fmt(offered, 0),
            fmt(offered, 0),
        ),
        row("deliveries/s received (measured window)", lambda r: r.rate),
        row(
            "deliveries per core-second of the server process",
            lambda r: r.per_core,
            target="≥ 30,000",
            ok=lambda r: r.per_core >= TARGET_PER_CORE,
        ),
        row("server CPU per delivered frame (µs)", lambda r: r.us_per_frame, 1),
        row("server cores busy under load", lambda r: r.server_cpu / r.seconds, 2),
        row(
            f"machine cores busy, every process (of {os.cpu_count()})",
            lambda r: r.machine_cores,
            2,
        ),
        text(
            "publish -> receive p50 / p95 / p99",
            latency_cell(b.latency),
            latency_cell(s.latency),
            "p99 ≤ 50 ms",
        )[:5]
        + (_check(s.latency.p99 <= TARGET_P99_MS if shoal and s.latency.count else None),),
        row("  p99 (ms)", lambda r: r.latency.p99, 2),
        row("  max (ms)", lambda r: r.latency.max, 2),
        row(
            "server RSS growth per idle socket (KB)",
            lambda r: r.idle_bytes_per_socket / 1000,
            1,
            target="≤ 30 KB",
            ok=lambda r: r.idle_bytes_per_socket <= TARGET_IDLE_BYTES,
        ),
        text(
            "server RSS MiB: start / +open / +idle / end",
            " / ".join(_mib(v) for v in (b.rss_start, b.rss_open, b.rss_idle, b.rss_end)),
            " / ".join(_mib(v) for v in (s.rss_start, s.rss_open, s.rss_idle, s.rss_end)),
        ),
        row("server cores busy, sockets open, no events", lambda r: r.idle_cores, 3),
        row("socket setup (s)", lambda r: r.connect_seconds, 1),
        text("seq gaps or duplicates seen", str(b.order_errors), str(s.order_errors)),
        text("server RLIMIT_NOFILE", b.fd_limit or "-", s.fd_limit or "-"),
    ]
    headers = ("figure", "baseline", "Shoal", "Shoal / baseline", "target", "met")
    title = (
        f"Fan-out: one gateway vs a bare uvicorn broadcast server — {options.sessions:,} "
        f"sessions, {options.duration:g} s measured, {options.clients} client processes"
    )
    parts = [table(title, headers, rows)]
    cpu_rows = []
    for result in results:
        for label, used in sorted(result.cpu.items(), key=lambda kv: -kv[1]):
            cpu_rows.append((f"{result.name}: {label}", fmt(used / result.seconds, 2)))
    if cpu_rows:
        parts.append(table("Fan-out: cores busy per process group (measured window)",
                           ("process group", "cores"), cpu_rows))  # fmt: skip
    notes = []
    for result in results:
        for label, count in result.closes.most_common(5):
            notes.append(f"{result.name}: socket closed {count}x: {label}")
        notes.extend(f"{result.name}: {note}" for note in result.notes)
        cores = os.cpu_count() or 1
        if result.machine_cores >= SATURATED * cores:
            notes.append(
                f"{result.name}: the machine was saturated ({result.machine_cores:.2f} of {cores}"
                " cores busy in the window, every process): the latencies include waiting for a"
                " CPU; a lower --rate (or fewer --open) shows them at a load the machine carries"
            )
        notes.extend(f"{result.name}: error: {error}" for error in result.errors)
    if notes:
        parts.append("Fan-out notes\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def _rate(result: FanoutResult) -> float:
    if result.produce_seconds > 0:
        return result.produced / result.produce_seconds
    return float("nan")


def resource_note() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"{soft} (hard {hard})"


__all__ = ["FanoutOptions", "FanoutResult", "render_fanout", "run_fanout"]
