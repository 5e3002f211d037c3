"""The raw JetStream baseline, measured in the same run as Shoal's command path.

Starts its own nats-server (free ports, a temporary store) once per fsync mode and measures,
from Python with nats-py:

- async publish: ``publish_async`` of ``messages`` 256-byte messages to a file stream;
- pull + ack: a durable pull consumer fetching those messages in batches, acking each;
- the raw command path, shaped like Shoal's: a client publishes a command to a work-queue
  stream and waits for its PubAck; a separate process (bench._raw_processor) pulls it, does
  a KV compare-and-set on the key, publishes an event with ``Nats-Msg-Id`` and acks; the
  client receives the event on an ordered consumer. ``keys`` keys at ``concurrency``
  outstanding commands, for ``duration`` seconds after a warm-up.

Example::

    results = asyncio.run(run_raw(RawOptions(duration=5)))
    print(render_raw(results))
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bench._raw_processor import CMD_STREAM, EVT_STREAM, STATE_BUCKET
from bench._report import CpuMeter, Latency, PathResult, fmt, fsync_label, latency_cell, table
from shoal.devtools.embedded import EmbeddedNats, free_port

PUB_STREAM = "RAW_PUB"
PAYLOAD = b"x" * 256
REPO_ROOT = Path(__file__).resolve().parent.parent  # so `-m bench._raw_processor` resolves
COMMAND_TIMEOUT = 10.0  # s: a command whose event has not arrived by then counts as an error


@dataclass(frozen=True)
class RawOptions:
    messages: int = 100_000  # for the publish and pull + ack figures
    keys: int = 1_000
    concurrency: int = 64
    duration: float = 10.0  # s of measured command path
    warmup: float = 2.0  # s of command path before the measurement starts
    fsync_modes: tuple[bool, ...] = (True, False)  # sync_interval always, then the default
    phase_limit: float = 60.0  # s: the publish and consume phases stop here whatever the count


@dataclass(frozen=True)
class RawResult:
    sync_always: bool
    publish_rate: float  # msg/s
    consume_rate: float  # msg/s
    command_path: PathResult
    options: RawOptions


async def _publish_throughput(js: JetStreamContext, options: RawOptions) -> tuple[int, float]:
    await js.add_stream(
        StreamConfig(name=PUB_STREAM, subjects=["raw.pub.>"], storage=StorageType.FILE)
    )
    started = time.perf_counter()
    deadline = started + options.phase_limit
    sent = 0
    for sent in range(1, options.messages + 1):  # noqa: B007 - the count is the result
        await js.publish_async("raw.pub.bench", PAYLOAD)
        if sent % 1000 == 0 and time.perf_counter() > deadline:
            break
    await asyncio.wait_for(js.publish_async_completed(), options.phase_limit)
    return sent, time.perf_counter() - started


async def _consume_throughput(js: JetStreamContext, wanted: int, limit: float) -> tuple[int, float]:
    await js.add_consumer(
        PUB_STREAM,
        ConsumerConfig(durable_name="raw-pull", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    sub = await js.pull_subscribe_bind(durable="raw-pull", stream=PUB_STREAM)
    started = time.perf_counter()
    deadline = started + limit
    received = 0
    while received < wanted and time.perf_counter() < deadline:
        try:
            msgs = await sub.fetch(min(512, wanted - received), timeout=1.0)
        except (NatsTimeout, TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()
        received += len(msgs)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return received, elapsed


class _CommandDriver:
    """The client side: publish a command, wait for its event on an ordered consumer."""

    def __init__(self, js: JetStreamContext, keys: list[str]) -> None:
        self._js = js
        self._keys = keys
        self._waiting: dict[bytes, asyncio.Future[float]] = {}
        self._ids = itertools.count()
        self.samples: list[float] = []
        self.errors = 0
        self.measuring = False
        self.stopping = False

    async def on_event(self, msg: Msg) -> None:
        command = orjson.loads(msg.data)["command"]
        future = self._waiting.pop(command.encode(), None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def worker(self, keys: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for key in itertools.cycle(keys):
            if self.stopping:
                return
            command = f"{next(self._ids)}".encode()
            future: asyncio.Future[float] = loop.create_future()
            self._waiting[command] = future
            started = time.perf_counter()
            try:
                await self._js.publish(f"raw.cmd.{key}", command)
                arrived = await asyncio.wait_for(future, COMMAND_TIMEOUT)
            except (TimeoutError, NatsTimeout, nats.errors.Error):
                self._waiting.pop(command, None)
                if self.measuring:
                    self.errors += 1
                continue
            if self.measuring:
                self.samples.append(arrived - started)


async def _command_path(
    nc: NatsClient, nats_url: str, server_pid: int, options: RawOptions, log_dir: Path
) -> PathResult:
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=CMD_STREAM,
            subjects=["raw.cmd.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=EVT_STREAM,
            subjects=["raw.evt.*"],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    kv = await js.create_key_value(
        KeyValueConfig(bucket=STATE_BUCKET, history=1, storage=StorageType.FILE)
    )
    keys = [f"k{i:05d}" for i in range(options.keys)]
    for key in keys:
        await kv.create(key, b'{"applied_seq":0,"count":0}')

    with (log_dir / "raw-processor.log").open("ab") as log:
        processor = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench._raw_processor",
            "--nats-url",
            nats_url,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops it
        )
    try:
        assert processor.stdout is not None
        line = await asyncio.wait_for(processor.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"raw processor did not start: {line!r} (see its log)")
        driver = _CommandDriver(js, keys)
        sub = await js.subscribe(
            "raw.evt.*",
            cb=driver.on_event,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )
        workers = [
            asyncio.create_task(driver.worker(keys[i :: options.concurrency]))
            for i in range(min(options.concurrency, len(keys)))
        ]
        try:
            await asyncio.sleep(options.warmup)
            meter = CpuMeter(
                {
                    "nats-server": [server_pid],
                    "raw processor": [processor.pid],
                    "load generator": [os.getpid()],
                }
            )
            meter.start()
            driver.measuring = True
            await asyncio.sleep(options.duration)
            driver.measuring = False
            cpu, wall = meter.stop()
            samples, errors = list(driver.samples), driver.errors
        finally:
            driver.stopping = True
            await asyncio.wait(workers, timeout=COMMAND_TIMEOUT + 2)
            for task in workers:
                task.cancel()
            await sub.unsubscribe()
        return PathResult(len(samples), wall, Latency.of(samples), errors, cpu)
    finally:
        await asyncio.shield(_stop_processor(processor))


async def _stop_processor(processor: asyncio.subprocess.Process) -> None:
    """Close its stdin (its signal to stop); SIGKILL it if it is still there after 10 s."""
    if processor.stdin is not None:
        processor.stdin.close()
    try:
        await asyncio.wait_for(processor.wait(), 10)
    except TimeoutError:
        processor.kill()
        await processor.wait()


async def run_mode(sync_always: bool, options: RawOptions) -> RawResult:
    """Every raw figure against a fresh nats-server with the given fsync mode."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-raw-") as tmp:
        server = EmbeddedNats(
            port=free_port(),
            store_dir=Path(tmp) / "nats",
            sync_always=sync_always,
            log_file=Path(tmp) / "nats.log",
        )
        await asyncio.to_thread(server.start)
        try:
            assert server.proc is not None
            nc = await nats.connect(server.url, name="bench-raw")
            try:
                js = nc.jetstream()
                published, pub_seconds = await _publish_throughput(js, options)
                consumed, sub_seconds = await _consume_throughput(
                    js, published, options.phase_limit
                )
                await js.delete_stream(PUB_STREAM)
                path = await _command_path(nc, server.url, server.proc.pid, options, Path(tmp))
            finally:
                await nc.close()
        finally:
            await asyncio.to_thread(server.stop)
    return RawResult(
        sync_always=sync_always,
        publish_rate=published / pub_seconds,
        consume_rate=consumed / sub_seconds,
        command_path=path,
        options=options,
    )


async def run_raw(options: RawOptions) -> list[RawResult]:
    """The raw baseline, once per fsync mode in ``options.fsync_modes``."""
    results = []
    for sync_always in options.fsync_modes:
        print(f"raw JetStream: {fsync_label(sync_always)} ...", file=sys.stderr, flush=True)
        results.append(await run_mode(sync_always, options))
    return results


def render_raw(results: list[RawResult]) -> str:
    """One table per fsync mode."""
    tables = []
    for result in results:
        path = result.command_path
        opts = result.options
        rows = [
            ("async publish (256 B)", f"{fmt(result.publish_rate, 0)} msg/s"),
            ("pull + ack", f"{fmt(result.consume_rate, 0)} msg/s"),
            (
                f"command path ({opts.keys} keys, concurrency {opts.concurrency})",
                f"{fmt(path.rate, 0)} cmd/s",
            ),
            ("  latency p50 / p95 / p99", latency_cell(path.latency)),
            ("  commands measured / errors", f"{path.commands} / {path.errors}"),
            ("  CPU per command (all processes)", f"{fmt(path.cpu_ms_per_command, 3)} ms"),
            *((f"  cores busy: {label}", fmt(path.cores(label), 2)) for label in path.cpu_seconds),
        ]
        title = f"Raw JetStream baseline — {fsync_label(result.sync_always)}"
        tables.append(table(title, ("figure", "value"), rows))
    return "\n\n".join(tables)
