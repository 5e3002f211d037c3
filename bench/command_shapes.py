"""Does a command need its own durable write? The command path in two shapes, nothing else.

``python -m bench.command_shapes [--sessions 1000] [--concurrency 64] [--commands 20000]
[--fsync always|default|both] [--ledger-streams 1] [--json FILE] [--quick]``: per fsync mode
and shape, a fresh nats-server (with a monitoring port), one owner process (``--owner``,
this module, like a session replica) and this process as the load generator, ``concurrency``
workers each sending one command at a time to its own slice of ``sessions`` sessions:

- queued: the generator publishes the command to the ``CMD`` stream and awaits its PubAck
  (today's 202); the owner pulls it, publishes the command's commit to the ledger fenced on the
  session's last sequence and awaits its PubAck, acks the command and replies to the
  generator (core NATS, the subject in a header). Latency to the PubAck and to the reply.
- direct: the generator sends a core NATS request to the owner; the owner publishes the same
  fenced commit, awaits its PubAck and replies (the 202 after the ledger write). A request
  left unanswered is retried with the same idempotency key (the commit's ``Nats-Msg-Id``).

A commit is one message of three events (~900 bytes), as a prompt's; the sessions' commits
are spread over ``--ledger-streams`` file streams (``EVT<k>``, by a hash of the session).
Prints commands/s, latency, CPU per command by process (/proc) and NATS messages per command
(/connz).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench._raw_processor import PullRequests, stop_on_stdin_close
from bench._report import CpuMeter, Latency, fmt, machine_info, run_loop, table
from shoal.devtools.embedded import EmbeddedNats, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("queued", "direct")
CMD_STREAM, CONSUMER = "CMD", "owner"
REPLY_HEADER = "Bench-Reply"  # where the owner tells the generator the command is committed
MAX_IN_FLIGHT = 1024  # commands the queued owner holds at once
REQUEST_TIMEOUT = 5.0  # s before a direct request is retried (no owner answered)
COMMAND = orjson.dumps({"type": "prompt.submit", "text": "x" * 200})
EVENT = {"type": "prompt.queued", "payload": "x" * 220}  # 3 of these: a ~900-byte commit


def _ledger_subject(session: str, streams: int) -> str:
    """``evt.<k>.<session>``: the session's commits live in ledger stream ``EVT<k>``."""
    return f"evt.{zlib.crc32(session.encode()) % streams}.{session}"


def _commit(command_id: str, seq: int) -> bytes:
    events = [dict(EVENT, id=f"{command_id}:{n}", seq=seq + n) for n in range(3)]
    return orjson.dumps({"command": command_id, "events": events})


# --- the owner (its own OS process) -------------------------------------------------------


class Owner:
    """Applies commands: one fenced commit per command, serially per session."""

    def __init__(self, nc: NatsClient, ledger_streams: int) -> None:
        self._nc = nc
        self._streams = ledger_streams
        self._js = nc.jetstream()
        self._last: dict[str, int] = {}  # session -> its last commit's stream sequence
        self._locks: dict[str, asyncio.Lock] = {}
        self.in_flight = 0
        self.failures = 0

    async def commit(self, session: str, command_id: str) -> int:
        async with self._locks.setdefault(session, asyncio.Lock()):
            last = self._last.get(session, 0)
            subject = _ledger_subject(session, self._streams)
            ack = await self._js.publish(
                f"{subject}.commit",
                _commit(command_id, last),
                headers={
                    "Nats-Msg-Id": command_id,  # a retried command commits once
                    "Nats-Expected-Last-Subject-Sequence": str(last),
                    "Nats-Expected-Last-Subject-Sequence-Subject": f"{subject}.>",
                },
            )
            self._last[session] = ack.seq
            return ack.seq

    async def _queued(self, msg: Msg) -> None:
        try:
            headers = msg.headers or {}
            seq = await self.commit(msg.subject.split(".")[1], headers["Nats-Msg-Id"])
            await msg.ack()
            await self._nc.publish(headers[REPLY_HEADER], str(seq).encode())
        except Exception as exc:  # the command is redelivered after ack_wait
            self._failed(exc)
        finally:
            self.in_flight -= 1

    async def _direct(self, msg: Msg) -> None:
        try:
            headers = msg.headers or {}
            seq = await self.commit(msg.subject.split(".")[1], headers["Nats-Msg-Id"])
            await msg.respond(str(seq).encode())
        except Exception as exc:  # no answer: the caller retries with the same key
            self._failed(exc)
        finally:
            self.in_flight -= 1

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures <= 3:
            print(f"command failed: {exc!r}", file=sys.stderr, flush=True)

    def _spawn(self, handler: str, msg: Msg) -> None:
        self.in_flight += 1
        asyncio.get_running_loop().create_task(getattr(self, handler)(msg))

    async def run(self, shape: str, stop: asyncio.Event) -> None:
        if shape == "direct":

            async def on_request(msg: Msg) -> None:
                self._spawn("_direct", msg)

            sub = await self._nc.subscribe("own.*", cb=on_request)
            await self._nc.flush()
            print("ready", flush=True)
            await stop.wait()
            await sub.unsubscribe()
            return
        await self._js.add_consumer(
            CMD_STREAM,
            ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=MAX_IN_FLIGHT,
                ack_wait=30,
            ),
        )
        pull = PullRequests(self._nc, f"$JS.API.CONSUMER.MSG.NEXT.{CMD_STREAM}.{CONSUMER}")
        await pull.start(lambda msg: self._spawn("_queued", msg))
        print("ready", flush=True)
        while not stop.is_set():
            await pull.request(MAX_IN_FLIGHT - self.in_flight - pull.requested)
            await pull.wait(0.05)
        await pull.close()


async def _owner_main(nats_url: str, shape: str, ledger_streams: int) -> None:
    nc = await nats.connect(nats_url, name="owner")
    try:
        stop = asyncio.Event()
        watcher = await stop_on_stdin_close(stop)
        gc.freeze()
        owner = Owner(nc, ledger_streams)
        await owner.run(shape, stop)
        watcher.cancel()
        print(f"failures {owner.failures}", flush=True)
    finally:
        await nc.close()


# --- the load generator ---------------------------------------------------------------------


@dataclass
class ShapeResult:
    shape: str
    fsync: str
    ledger_streams: int
    commands_per_s: float
    p50_ms: float  # to the 202: the PubAck (queued) or the reply (direct)
    p99_ms: float
    commit_p50_ms: float  # to the commit being in the ledger (the owner's reply)
    commit_p99_ms: float
    cpu_ms_per_command: dict[str, float]  # by process, and "all"
    nats_msgs_per_command: dict[str, float]  # in + out by connection, and "all"
    retries: int
    errors: int


class Generator:
    def __init__(self, nc: NatsClient, shape: str, sessions: list[str]) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._shape = shape
        self._sessions = sessions
        self._inbox = nc.new_inbox()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._next_id = 0
        self.remaining = 0
        self.accepted: list[float] = []  # s to the 202
        self.committed: list[float] = []  # s to the commit
        self.retries = 0
        self.errors = 0

    async def start(self) -> None:
        async def on_reply(msg: Msg) -> None:
            future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
            if future is not None and not future.done():
                future.set_result(None)

        await self._nc.subscribe(f"{self._inbox}.*", cb=on_reply)

    async def run(self, commands: int, concurrency: int) -> None:
        """``commands`` commands, ``concurrency`` at a time, one at a time per session."""
        self.remaining = commands
        slices = [self._sessions[i::concurrency] for i in range(concurrency)]
        await asyncio.gather(*(self._worker(mine) for mine in slices if mine))

    async def _worker(self, sessions: list[str]) -> None:
        turn = 0
        while self.remaining > 0:
            self.remaining -= 1
            session = sessions[turn % len(sessions)]
            turn += 1
            self._next_id += 1
            command_id = f"c{self._next_id}"
            try:
                if self._shape == "queued":
                    await self._queued(session, command_id)
                else:
                    await self._direct(session, command_id)
            except Exception as exc:
                self.errors += 1
                if self.errors <= 3:
                    print(f"command failed: {exc!r}", file=sys.stderr, flush=True)

    async def _queued(self, session: str, command_id: str) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = done
        started = time.perf_counter()
        await self._js.publish(
            f"cmd.{session}",
            COMMAND,
            headers={"Nats-Msg-Id": command_id, REPLY_HEADER: f"{self._inbox}.{command_id}"},
        )
        self.accepted.append(time.perf_counter() - started)
        try:
            await asyncio.wait_for(done, 30)
        finally:
            self._waiting.pop(command_id, None)
        self.committed.append(time.perf_counter() - started)

    async def _direct(self, session: str, command_id: str) -> None:
        started = time.perf_counter()
        for attempt in range(3):
            try:
                await self._nc.request(
                    f"own.{session}",
                    COMMAND,
                    timeout=REQUEST_TIMEOUT,
                    headers={"Nats-Msg-Id": command_id},
                )
                break
            except NatsTimeoutError:
                if attempt == 2:
                    raise
                self.retries += 1
        elapsed = time.perf_counter() - started
        self.accepted.append(elapsed)
        self.committed.append(elapsed)


async def _connz(monitor_url: str) -> dict[str, int]:
    """in_msgs + out_msgs per client connection name, from nats-server's /connz."""
    async with httpx.AsyncClient(timeout=10) as client:
        connz = (await client.get(f"{monitor_url}/connz", params={"limit": 4096})).json()
    counts: dict[str, int] = {}
    for conn in connz.get("connections") or ():
        name = str(conn.get("name") or "unnamed")
        counts[name] = counts.get(name, 0) + int(conn["in_msgs"]) + int(conn["out_msgs"])
    return counts


@contextlib.asynccontextmanager
async def _owner(nats_url: str, shape: str, ledger_streams: int, log: Path) -> AsyncIterator[int]:
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.command_shapes",
            "--owner",
            shape,
            "--nats-url",
            nats_url,
            "--ledger-streams",
            str(ledger_streams),
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops it
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"owner did not start: {line!r} (see {log})")
        yield proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def measure(shape: str, sync_always: bool, args: argparse.Namespace) -> ShapeResult:
    with tempfile.TemporaryDirectory(prefix="shoal-shapes-") as tmp:
        server = EmbeddedNats(
            port=free_port(),
            store_dir=Path(tmp) / "nats",
            monitor_port=free_port(),
            sync_always=sync_always,
        )
        await asyncio.to_thread(server.start)
        try:
            assert server.proc is not None
            monitor = f"http://127.0.0.1:{server.monitor_port}"
            nc = await nats.connect(server.url, name="load generator")
            try:
                js = nc.jetstream()
                for k in range(args.ledger_streams):
                    await js.add_stream(
                        StreamConfig(
                            name=f"EVT{k}", subjects=[f"evt.{k}.>"], storage=StorageType.FILE
                        )
                    )
                if shape == "queued":
                    await js.add_stream(
                        StreamConfig(
                            name=CMD_STREAM,
                            subjects=["cmd.>"],
                            storage=StorageType.FILE,
                            retention=RetentionPolicy.WORK_QUEUE,
                        )
                    )
                sessions = [f"s{i:05d}" for i in range(args.sessions)]
                log = Path(tmp) / "owner.log"
                async with _owner(server.url, shape, args.ledger_streams, log) as owner_pid:
                    gen = Generator(nc, shape, sessions)
                    await gen.start()
                    await gen.run(args.warmup, args.concurrency)
                    gen.accepted.clear()
                    gen.committed.clear()
                    gc.freeze()
                    meter = CpuMeter(
                        {
                            "nats-server": [server.proc.pid],
                            "owner": [owner_pid],
                            "load generator": [os.getpid()],
                        }
                    )
                    before = await _connz(monitor)
                    meter.start()
                    await gen.run(args.commands, args.concurrency)
                    cpu, wall = meter.stop()
                    after = await _connz(monitor)
            finally:
                await nc.close()
        finally:
            await asyncio.to_thread(server.stop)
    done = len(gen.committed)
    per = 1000.0 / done if done else float("nan")
    cpu_ms = {label: round(seconds * per, 3) for label, seconds in cpu.items()}
    cpu_ms["all"] = round(sum(cpu.values()) * per, 3)
    msgs = {name: round((n - before.get(name, 0)) / done, 2) for name, n in after.items()}
    msgs["all"] = round(sum(msgs.values()), 2)
    accepted, committed = Latency.of(gen.accepted), Latency.of(gen.committed)
    return ShapeResult(
        shape=shape,
        fsync="always" if sync_always else "default",
        ledger_streams=args.ledger_streams,
        commands_per_s=round(done / wall, 1),
        p50_ms=round(accepted.p50, 3),
        p99_ms=round(accepted.p99, 3),
        commit_p50_ms=round(committed.p50, 3),
        commit_p99_ms=round(committed.p99, 3),
        cpu_ms_per_command=cpu_ms,
        nats_msgs_per_command=msgs,
        retries=gen.retries,
        errors=gen.errors,
    )


def _print(results: list[ShapeResult]) -> None:
    rows = [
        [
            f"{r.shape}, {r.fsync}, {r.ledger_streams} EVT",
            fmt(r.commands_per_s, 0),
            f"{fmt(r.p50_ms, 2)} / {fmt(r.p99_ms, 2)}",
            f"{fmt(r.commit_p50_ms, 2)} / {fmt(r.commit_p99_ms, 2)}",
            *(
                fmt(r.cpu_ms_per_command.get(k, float("nan")), 3)
                for k in ("nats-server", "owner", "load generator", "all")
            ),
            fmt(r.nats_msgs_per_command["all"], 2),
            str(r.retries + r.errors),
        ]
        for r in results
    ]
    headers = [
        "shape, fsync, ledger",
        "cmd/s",
        "202 p50/p99 ms",
        "commit p50/p99 ms",
        "CPU ms: nats",
        "owner",
        "load gen.",
        "all",
        "NATS msgs",
        "retries+err",
    ]
    print(table("Command shapes (per command)", headers, rows))


async def _main(args: argparse.Namespace) -> list[ShapeResult]:
    modes = {"always": [True], "default": [False], "both": [True, False]}[args.fsync]
    for label, value in machine_info():
        print(f"{label}: {value}", file=sys.stderr)
    results = []
    for sync_always in modes:
        for shape in SHAPES:
            print(f"measuring {shape}, fsync always={sync_always}", file=sys.stderr, flush=True)
            results.append(await measure(shape, sync_always, args))
    _print(results)
    print(f"load average: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.command_shapes")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--commands", type=int, default=20000, help="measured, per run")
    parser.add_argument("--warmup", type=int, default=2000, help="commands before measuring")
    parser.add_argument("--fsync", choices=("always", "default", "both"), default="both")
    parser.add_argument(
        "--ledger-streams", type=int, default=1, help="ledger streams the sessions spread over"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="2,000 commands, 500 warm-up")
    parser.add_argument("--owner", choices=SHAPES, help=argparse.SUPPRESS)  # the owner process
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.owner:
        run_loop(_owner_main(args.nats_url, args.owner, args.ledger_streams))
        return
    if args.quick:
        args.commands, args.warmup = 2000, 500
    results = run_loop(_main(args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": [asdict(r) for r in results]}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
