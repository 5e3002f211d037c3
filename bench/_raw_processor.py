"""The "session" half of the raw command path, run as its own OS process (as Shoal's is).

Pulls ``RAW_CMD`` (a work queue), and for each command, serially per key but concurrently
across keys: compare-and-set the key's KV value on its revision, publish one event with
``Nats-Msg-Id = <key>:<stream seq>:0`` and wait for its PubAck, then ack the command.
No envelopes, no validation, no projection: the floor under Shoal's session service.

Started by bench.raw_jetstream: ``python -m bench._raw_processor --nats-url URL``; prints
``ready`` once pulling and stops when its stdin closes (so it never outlives the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.kv import KeyValue

from bench._report import run_loop

CMD_STREAM = "RAW_CMD"
EVT_STREAM = "RAW_EVT"
STATE_BUCKET = "raw-state"
CONSUMER = "raw-processor"
MAX_IN_FLIGHT = 1024  # commands held at once (also the consumer's max_ack_pending)
FETCH_BATCH = 256


class Processor:
    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv
        self._revisions: dict[str, int] = {}  # key -> the KV revision this owner last wrote
        self._counts: dict[str, int] = {}
        self._tails: dict[str, asyncio.Task[None]] = {}  # key -> its lane's last command
        self.in_flight = 0  # commands dispatched and not finished
        self.applied = 0
        self.conflicts = 0
        self.failures = 0

    async def _apply(self, key: str, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        count = self._counts.get(key, 0) + 1
        state = orjson.dumps({"applied_seq": seq, "count": count})
        last = self._revisions.get(key)
        if last is None:
            last = (await self._kv.get(key)).revision or 0
        try:
            self._revisions[key] = await self._kv.update(key, state, last=last)
        except Exception:
            # Stale revision (someone else wrote): re-read and leave the command for redelivery.
            self.conflicts += 1
            self._revisions.pop(key, None)
            await msg.nak()
            return
        self._counts[key] = count
        event = orjson.dumps({"key": key, "seq": seq, "count": count, "command": msg.data.decode()})
        await self._js.publish(f"raw.evt.{key}", event, headers={"Nats-Msg-Id": f"{key}:{seq}:0"})
        await msg.ack()
        self.applied += 1

    async def _lane(self, previous: asyncio.Task[None] | None, key: str, msg: Msg) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])  # this key's earlier command first (order)
            await self._apply(key, msg)
        except Exception as exc:  # count it; the command is redelivered after ack_wait
            self.failures += 1
            if self.failures <= 3:
                print(f"command on {key} failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            self.in_flight -= 1
            if self._tails.get(key) is asyncio.current_task():
                del self._tails[key]

    def _dispatch(self, msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[-1]
        previous = self._tails.get(key)
        self.in_flight += 1
        self._tails[key] = asyncio.create_task(self._lane(previous, key, msg))

    async def run(self, nc: NatsClient, stop: asyncio.Event) -> None:
        """Pull continuously: keep pull requests outstanding for the free room, handle each
        message as it arrives. (nats-py's ``fetch`` waits for a whole batch or its timeout,
        which puts the timeout into every latency when the load is below the batch size.)
        """
        pull = PullRequests(nc, f"$JS.API.CONSUMER.MSG.NEXT.{CMD_STREAM}.{CONSUMER}")
        await pull.start(self._dispatch)
        print("ready", flush=True)
        while not stop.is_set():
            room = MAX_IN_FLIGHT - self.in_flight - pull.requested
            await pull.request(room)
            await pull.wait(0.05)
        await pull.close()
        if self._tails:
            await asyncio.wait(list(self._tails.values()), timeout=5)


class PullRequests:
    """Outstanding pull requests on one consumer, delivered to one inbox.

    ``requested`` counts messages asked for and not yet delivered or expired; the server's
    408/409 status messages carry ``Nats-Pending-Messages``, the part of a request it dropped.
    """

    EXPIRES = 2.0  # s a pull request lives on the server

    def __init__(self, nc: NatsClient, api_subject: str) -> None:
        self._nc = nc
        self._api = api_subject
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._arrived = asyncio.Event()
        self._on_msg: Callable[[Msg], None] | None = None
        self.requested = 0

    async def start(self, on_msg: Callable[[Msg], None]) -> None:
        self._on_msg = on_msg
        self._sub = await self._nc.subscribe(self._inbox, cb=self._receive)

    async def _receive(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            if status in ("408", "409"):
                pending = int(msg.headers.get("Nats-Pending-Messages", "0") if msg.headers else 0)
                self.requested = max(0, self.requested - pending)
            self._arrived.set()
            return
        self.requested = max(0, self.requested - 1)
        assert self._on_msg is not None
        self._on_msg(msg)
        self._arrived.set()

    async def request(self, room: int) -> None:
        """Ask for up to ``room`` more messages when at least half a batch is free."""
        if room < FETCH_BATCH // 2 and self.requested > 0:
            return
        batch = min(room, FETCH_BATCH)
        if batch <= 0:
            return
        body = orjson.dumps({"batch": batch, "expires": int(self.EXPIRES * 1e9)})
        self.requested += batch
        await self._nc.publish(self._api, body, reply=self._inbox)

    async def wait(self, within: float) -> None:
        """Until a message or status arrives, or ``within`` seconds pass."""
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), within)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def stop_on_stdin_close(stop: asyncio.Event) -> asyncio.Task[None]:
    """Set ``stop`` when stdin closes: how a bench tells the child process it started to stop
    (the bench exited or is done). Returns the watching task."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch() -> None:
        await reader.read()
        stop.set()

    return asyncio.create_task(watch())


async def _main(nats_url: str) -> None:
    nc = await nats.connect(nats_url, name="bench-raw-processor")
    try:
        js = nc.jetstream()
        await js.add_consumer(
            CMD_STREAM,
            ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=MAX_IN_FLIGHT,
                ack_wait=30,
            ),
        )
        kv = await js.key_value(STATE_BUCKET)
        processor = Processor(js, kv)
        stop = asyncio.Event()
        watcher = await stop_on_stdin_close(stop)
        await processor.run(nc, stop)
        watcher.cancel()
        print(
            f"applied {processor.applied} conflicts {processor.conflicts} "
            f"failures {processor.failures}",
            flush=True,
        )
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nats-url", required=True)
    args = parser.parse_args()
    run_loop(_main(args.nats_url))


if __name__ == "__main__":
    main()
