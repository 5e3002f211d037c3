"""Shoal's command path, end to end: HTTP prompt -> gateway -> session -> event on the socket.

Per fsync mode, starts everything it measures on 127.0.0.1 in a temporary directory:
nats-server (``sync_interval: always`` or the default), PostgreSQL, and every installed
service as its own OS process through :class:`shoal.devtools.supervisor.Fleet`. Then:

1. creates ``sessions`` sessions (``POST /v1/sessions``);
2. per session, opens a client socket (``/v1/sessions/{id}/ws``, the admin key) and a runner
   socket (``/v1/sessions/{id}/runner``, the session's runner token) whose runner answers each
   prompt at once with ``message.completed``; waits until every session saw
   ``runner.connected``;
3. runs ``concurrency`` workers, each owning a slice of the sessions and cycling through it:
   ``POST /v1/sessions/{id}/prompts`` and wait for that prompt's ``prompt.queued`` event on the
   session's client socket. A worker does not prompt a session again before the previous
   prompt's ``message.completed`` arrived (one prompt in flight per session).

With ``runners=False`` (``--no-runner``) step 2 opens only the client sockets, so a prompt is
exactly the issue's command path — one command, one event (``prompt.queued``) on the client's
socket — and a worker prompts a session again as soon as its ``prompt.queued`` arrived (the
prompts queue up in the session's state, as they would with a busy runner).

Latency is from just before the HTTP request to the event's arrival on the client socket:
to ``prompt.queued`` (the command path) and to ``message.completed`` (through the runner and
back: two session commands). Everything it starts is stopped in ``finally`` blocks, on
Ctrl-C too.

Example::

    results = asyncio.run(run_command_path(CommandOptions(sessions=100, duration=3)))
    print(render_command_path(results, raw=None))
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench._http1 import Http1Connection
from bench._report import CpuMeter, Latency, PathResult, fmt, fsync_label, latency_cell, table
from shoal.devtools.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from shoal.devtools.supervisor import SERVICES, Fleet, FleetConfig, fleet_specs

DATABASE = "shoal"
REQUEST_TIMEOUT = 15.0  # s: an HTTP call or an awaited event slower than this is an error
SETUP_CONCURRENCY = 32  # sessions created / sockets opened at once during setup


@dataclass(frozen=True)
class CommandOptions:
    sessions: int = 1_000
    concurrency: int = 64
    duration: float = 10.0  # s measured
    warmup: float = 2.0  # s of load before the measurement starts
    fsync_modes: tuple[bool, ...] = (True, False)
    session_replicas: int = 1
    ready_timeout: float = 90.0  # s for the fleet to answer /readyz
    keep_dir: bool = False  # keep the temporary directory (logs) for a look afterwards
    fleet_env: tuple[tuple[str, str], ...] = ()  # extra SHOAL_* settings for every service
    runners: bool = True  # a runner per session answering every prompt (two commands each)


@dataclass(frozen=True)
class CommandResult:
    sync_always: bool
    queued: PathResult  # HTTP -> prompt.queued on the client socket
    completed: Latency  # HTTP -> message.completed on the client socket
    setup_seconds: float
    options: CommandOptions
    services: tuple[str, ...]
    # NATS messages per prompt by client connection name: (into the server, out of it).
    traffic: dict[str, tuple[float, float]] = field(default_factory=dict)


def installed_services() -> tuple[str, ...]:
    """The services whose entry point and module are both present, in the fleet's order."""
    present = set()
    for entry in entry_points(group="shoal.services"):
        module = entry.value.split(":", 1)[0]
        with contextlib.suppress(ImportError, ValueError):
            if find_spec(module) is not None:
                present.add(entry.name)
    return tuple(name for name in SERVICES if name in present)


@dataclass
class _Fleet:
    gateway_url: str
    admin_key: str
    nats_url: str
    pids: dict[str, list[int]]
    services: tuple[str, ...]
    monitor_url: str  # nats-server's monitoring endpoint


@contextlib.asynccontextmanager
async def running_fleet(
    sync_always: bool, home: Path, options: CommandOptions
) -> AsyncIterator[_Fleet]:
    """NATS + PostgreSQL + the services, all on free ports of 127.0.0.1; stopped on exit."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    nats = EmbeddedNats(
        port=free_port(),
        store_dir=home / "nats",
        sync_always=sync_always,
        log_file=logs / "nats.log",
        monitor_port=free_port(),  # /connz: messages per prompt by connection
    )
    postgres = EmbeddedPostgres(
        data_dir=home / "postgres", port=free_port(), log_file=logs / "postgres.log"
    )

    def start_postgres() -> None:
        postgres.start()
        postgres.create_database(DATABASE)

    try:
        # Not cancelled half-way: a server whose start was cut short could not be stopped.
        started = await asyncio.shield(
            asyncio.gather(
                asyncio.to_thread(nats.start),
                asyncio.to_thread(start_postgres),
                return_exceptions=True,
            )
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        services = installed_services()
        config = FleetConfig(
            nats_url=nats.url,
            database_url=postgres.url(DATABASE),
            admin_key="shoal_dev_" + secrets.token_urlsafe(24),
            session_replicas=options.session_replicas,
            object_store_path=home / "objects",
            services=services,
            extra_env=dict(options.fleet_env),
            # The bench's own environment must not redirect the fleet elsewhere.
            base_env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        )
        fleet = Fleet(fleet_specs(config), config=config, log_dir=logs)
        async with fleet:
            await fleet.wait_ready(options.ready_timeout)
            pids: dict[str, list[int]] = {}
            for proc in fleet.processes:
                service = proc.name.split("-", 1)[0]
                if proc.pid is not None:
                    pids.setdefault(service, []).append(proc.pid)
            for label, server in (("nats-server", nats), ("postgres", postgres)):
                if server.proc is not None:
                    pids[label] = [server.proc.pid]
            monitor = f"http://127.0.0.1:{nats.monitor_port}"
            yield _Fleet(fleet.gateway_url, fleet.admin_key, nats.url, pids, services, monitor)
    finally:
        await asyncio.shield(asyncio.to_thread(postgres.stop))
        await asyncio.shield(asyncio.to_thread(nats.stop))


@dataclass(eq=False)
class _Session:
    id: str
    runner_token: str
    runner_connected: asyncio.Event = field(default_factory=asyncio.Event)
    previous: asyncio.Future[float] | None = None  # the last prompt's message.completed


@dataclass
class _Stats:
    measuring: bool = False
    stopping: bool = False
    queued: list[float] = field(default_factory=list)
    completed: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if self.measuring:
            self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what)


class _Load:
    """The load generator: sockets, runners and prompting workers, all in this process."""

    def __init__(self, gateway_url: str, admin_key: str) -> None:
        parts = urlsplit(gateway_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.ws_base = f"ws://{self.host}:{self.port}"
        self.admin_key = admin_key
        # prompt content (unique per prompt) -> (prompt.queued, message.completed) futures
        self.waiting: dict[str, tuple[asyncio.Future[float], asyncio.Future[float]]] = {}
        self.sockets: list[ClientConnection] = []
        self.readers: list[asyncio.Task[None]] = []
        self.stats = _Stats()
        self._ids = itertools.count()

    def http(self) -> Http1Connection:
        return Http1Connection(self.host, self.port, {"Authorization": f"Bearer {self.admin_key}"})

    async def create_sessions(self, count: int) -> list[_Session]:
        sessions: list[_Session] = []
        per_conn = [range(i, count, SETUP_CONCURRENCY) for i in range(SETUP_CONCURRENCY)]

        async def create(indices: range) -> None:
            conn = self.http()
            try:
                for _ in indices:
                    body = orjson.dumps({"metadata": {"bench": True}})
                    status, answer = await asyncio.wait_for(
                        conn.request("POST", "/v1/sessions", body), REQUEST_TIMEOUT
                    )
                    if status != 201:
                        raise RuntimeError(f"POST /v1/sessions answered {status}: {answer[:300]!r}")
                    created = orjson.loads(answer)
                    sessions.append(_Session(created["id"], created["runner_token"]))
            finally:
                await conn.close()

        await _all(create(indices) for indices in per_conn if indices)
        return sessions

    async def _open(self, path: str, token: str) -> ClientConnection:
        ws = await connect(
            f"{self.ws_base}{path}",
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,
            ping_interval=None,  # a run is short; keepalive frames would only add noise
            open_timeout=REQUEST_TIMEOUT,
            close_timeout=2,
        )
        self.sockets.append(ws)
        return ws

    async def _follow(self, session: _Session, ws: ClientConnection) -> None:
        """The client socket: resolve waiters on prompt.queued and message.completed."""
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") != "event":
                    continue
                event = frame["event"]
                kind = event.get("type")
                if kind == "prompt.queued":
                    waiters = self.waiting.get(event["data"].get("content"))
                    if waiters is not None and not waiters[0].done():
                        waiters[0].set_result(time.perf_counter())
                elif kind == "message.completed":
                    waiters = self.waiting.pop(event["data"].get("content"), None)
                    if waiters is not None and not waiters[1].done():
                        waiters[1].set_result(time.perf_counter())
                elif kind == "runner.connected":
                    session.runner_connected.set()
        except ConnectionClosed as closed:
            if not self.stats.stopping:
                self.stats.error(f"client socket of {session.id} closed: {closed}")

    async def _run_runner(self, session: _Session, ws: ClientConnection) -> None:
        """The runner: answer each prompt at once, echoing its content."""
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "prompt":
                    answer = {
                        "type": "message.completed",
                        "prompt_id": frame["prompt_id"],
                        "content": frame["content"],
                    }
                    await ws.send(orjson.dumps(answer).decode())
                elif frame.get("type") == "error":
                    self.stats.error(f"runner of {session.id}: {frame}")
        except ConnectionClosed as closed:
            if not self.stats.stopping:
                self.stats.error(f"runner socket of {session.id} closed: {closed}")

    async def connect_all(self, sessions: Sequence[_Session], runners: bool) -> None:
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def attach(session: _Session) -> None:
            async with gate:
                client = await self._open(f"/v1/sessions/{session.id}/ws", self.admin_key)
                self.readers.append(asyncio.create_task(self._follow(session, client)))
                if not runners:
                    return
                runner = await self._open(f"/v1/sessions/{session.id}/runner", session.runner_token)
                await runner.send('{"type":"hello"}')
                self.readers.append(asyncio.create_task(self._run_runner(session, runner)))

        await _all(attach(s) for s in sessions)
        if runners:
            waits = [asyncio.wait_for(s.runner_connected.wait(), 60) for s in sessions]
            await _all(waits)

    async def worker(self, sessions: list[_Session], runners: bool) -> None:
        loop = asyncio.get_running_loop()
        conn = self.http()
        try:
            for session in itertools.cycle(sessions):
                if self.stats.stopping:
                    return
                if session.previous is not None and not session.previous.done():
                    # One prompt in flight per session: wait for the last one's completion.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(session.previous), REQUEST_TIMEOUT)
                    if not session.previous.done():
                        self.stats.error(f"no message.completed on {session.id}")
                content = f"bench-{next(self._ids)}"
                queued: asyncio.Future[float] = loop.create_future()
                completed: asyncio.Future[float] = loop.create_future()
                self.waiting[content] = (queued, completed)
                # Without runners nothing completes: the worker below waits for prompt.queued.
                session.previous = completed if runners else None
                body = orjson.dumps({"content": content})
                path = f"/v1/sessions/{session.id}/prompts"
                started = time.perf_counter()
                try:
                    status, answer = await asyncio.wait_for(
                        conn.request("POST", path, body), REQUEST_TIMEOUT
                    )
                    if status != 202:
                        self.waiting.pop(content, None)
                        self.stats.error(f"POST prompts answered {status}: {answer[:200]!r}")
                        continue
                    arrived = await asyncio.wait_for(asyncio.shield(queued), REQUEST_TIMEOUT)
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                    self.waiting.pop(content, None)
                    self.stats.error(f"prompt on {session.id}: {exc!r}")
                    await conn.close()
                    continue
                if not runners:
                    self.waiting.pop(content, None)  # nothing completes: done with this prompt
                if self.stats.measuring:
                    self.stats.queued.append(arrived - started)
                    completed.add_done_callback(self._record_completion(started))
        finally:
            await conn.close()

    def _record_completion(self, started: float) -> Callable[[asyncio.Future[float]], None]:
        def record(future: asyncio.Future[float]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.stats.completed.append(future.result() - started)

        return record

    async def close(self) -> None:
        self.stats.stopping = True
        await _all(ws.close() for ws in self.sockets)
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        for queued, completed in self.waiting.values():
            queued.cancel()
            completed.cancel()


async def _all(aws: Any) -> None:
    """Await every awaitable; the first failure cancels the rest and is raised."""
    tasks: list[asyncio.Task[Any]] = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_mode(sync_always: bool, options: CommandOptions) -> CommandResult:
    """Start a fleet with the given fsync mode, load it, stop it; the figures."""
    home = Path(tempfile.mkdtemp(prefix="shoal-bench-fleet-"))
    setup_started = time.perf_counter()
    try:
        async with running_fleet(sync_always, home, options) as fleet:
            load = _Load(fleet.gateway_url, fleet.admin_key)
            try:
                _say(f"  creating {options.sessions} sessions")
                sessions = await load.create_sessions(options.sessions)
                _say(
                    "  connecting a client socket and a runner per session"
                    if options.runners
                    else "  connecting a client socket per session (no runners)"
                )
                await load.connect_all(sessions, options.runners)
                setup_seconds = time.perf_counter() - setup_started
                # The load generator's own full GC passes (100+ ms over its sockets) would show
                # up as the fleet's latency: what the set-up built is kept out of them.
                gc.collect()
                gc.freeze()
                _say(f"  load: concurrency {options.concurrency}, {options.duration:.0f}s")
                workers = [
                    asyncio.create_task(
                        load.worker(sessions[i :: options.concurrency], options.runners)
                    )
                    for i in range(min(options.concurrency, len(sessions)))
                ]
                try:
                    await asyncio.sleep(options.warmup)
                    groups = {**fleet.pids, "load generator": [os.getpid()]}
                    meter = CpuMeter(groups)
                    before = await _connection_counts(fleet.monitor_url)
                    meter.start()
                    load.stats.measuring = True
                    await asyncio.sleep(options.duration)
                    load.stats.measuring = False
                    cpu, wall = meter.stop()
                    after = await _connection_counts(fleet.monitor_url)
                    queued = list(load.stats.queued)
                    errors = load.stats.errors
                finally:
                    load.stats.stopping = True
                    await asyncio.wait(workers, timeout=REQUEST_TIMEOUT + 2)
                    for task in workers:
                        task.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                completed = list(load.stats.completed)
                for line in load.stats.first_errors:
                    _say(f"  error: {line}")
            finally:
                await load.close()
    except BaseException:
        for data in ("nats", "postgres", "objects"):
            _remove(home / data)
        _say(f"  logs kept in {home / 'logs'}")
        raise
    else:
        if options.keep_dir:
            _say(f"  kept {home}")
        else:
            _remove(home)
    return CommandResult(
        sync_always=sync_always,
        queued=PathResult(len(queued), wall, Latency.of(queued), errors, cpu),
        completed=Latency.of(completed),
        setup_seconds=setup_seconds,
        options=options,
        services=fleet.services,
        traffic=_per_prompt(before, after, len(queued)),
    )


async def _connection_counts(monitor_url: str) -> dict[str, tuple[int, int]]:
    """(in_msgs, out_msgs) summed per client connection name, from nats-server's /connz."""
    async with httpx.AsyncClient(timeout=10) as client:
        connz = (await client.get(f"{monitor_url}/connz", params={"limit": 4096})).json()
    counts: dict[str, tuple[int, int]] = {}
    for conn in connz.get("connections") or ():
        name = str(conn.get("name") or "unnamed")
        seen_in, seen_out = counts.get(name, (0, 0))
        counts[name] = (seen_in + int(conn["in_msgs"]), seen_out + int(conn["out_msgs"]))
    return counts


def _per_prompt(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], prompts: int
) -> dict[str, tuple[float, float]]:
    """Messages per prompt over the window; connections that came or went count from 0."""
    if not prompts:
        return {}
    traffic = {}
    for name, (now_in, now_out) in sorted(after.items()):
        was_in, was_out = before.get(name, (0, 0))
        if now_in - was_in or now_out - was_out:
            traffic[name] = ((now_in - was_in) / prompts, (now_out - was_out) / prompts)
    return traffic


def _remove(home: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_command_path(options: CommandOptions) -> list[CommandResult]:
    """The command path, once per fsync mode in ``options.fsync_modes``."""
    results = []
    for sync_always in options.fsync_modes:
        _say(f"Shoal command path: {fsync_label(sync_always)} ...")
        results.append(await run_mode(sync_always, options))
    return results


def render_command_path(results: list[CommandResult], raw_rates: dict[bool, float]) -> str:
    """One table per fsync mode; ``raw_rates`` (fsync mode -> raw cmd/s) adds the ratio."""
    tables = []
    for result in results:
        path = result.queued
        opts = result.options
        raw = raw_rates.get(result.sync_always)
        ratio = f"{path.rate / raw:.2f}x ({fmt(raw, 0)} cmd/s raw)" if raw else "-"
        rows = [
            (
                f"prompts ({opts.sessions} sessions, concurrency {opts.concurrency})",
                f"{fmt(path.rate, 0)} cmd/s",
            ),
            ("  HTTP -> prompt.queued p50 / p95 / p99", latency_cell(path.latency)),
            ("  HTTP -> message.completed p50 / p95 / p99", latency_cell(result.completed)),
            ("  prompts measured / errors", f"{path.commands} / {path.errors}"),
            ("  ratio to the raw command path", ratio),
            ("  CPU per prompt (all processes)", f"{fmt(path.cpu_ms_per_command, 3)} ms"),
            *((f"  cores busy: {label}", fmt(path.cores(label), 2)) for label in path.cpu_seconds),
            *(
                (f"  NATS msgs per prompt: {name} (in / out)", f"{sent:.2f} / {got:.2f}")
                for name, (sent, got) in result.traffic.items()
            ),
            ("  setup (fleet, sessions, sockets)", f"{result.setup_seconds:.1f} s"),
        ]
        runners = "" if opts.runners else ", no runners: one command and one event per prompt"
        title = f"Shoal command path — {fsync_label(result.sync_always)}{runners}"
        tables.append(table(title, ("figure", "value"), rows))
    return "\n\n".join(tables)


__all__ = [
    "CommandOptions",
    "CommandResult",
    "render_command_path",
    "run_command_path",
]
