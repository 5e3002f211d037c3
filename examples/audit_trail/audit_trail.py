"""An audit trail of every Shoal session event, as a FastStream app: one JSON line per event.

A durable JetStream consumer of its own (``audit-trail``) follows ``<prefix>.session.evt.>``,
the ledger of every session. Each ledger message is one command's *commit*,
``{"events": [<event>, ...]}`` on ``<prefix>.session.evt.<session>.commit`` (ledgers written by
older versions hold one event per message, the event itself: both are read). It appends each
event to a JSONL file, flushes it to disk, and only then acks the message, so a crash loses
nothing: what was not acked is redelivered. A crash between the
write and the ack redelivers an event already written, so the trail drops copies by event id
(the id is unique per event: ``<session>:<command seq>:<n>``). Exactly once in the file, at
least once on the wire.

Run it from the workspace (``make install`` has FastStream), with a fleet running::

    .venv/bin/python examples/audit_trail/audit_trail.py --out audit.jsonl \
        --nats-url nats://127.0.0.1:14222
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.nats import ConsumerConfig, DeliverPolicy, JStream, NatsBroker, NatsMessage, PullSub

CONSUMER = "audit-trail"


class AuditFile:
    """An append-only JSONL file that writes each event id once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()
        self._recover()
        self._file = path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        """Load the ids already written; drop a last line a crash cut short."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with self.path.open("r+b") as file:
                file.truncate(len(complete))
        for line in complete.splitlines():
            self.seen.add(json.loads(line)["id"])

    def write(self, events: list[dict[str, Any]]) -> None:
        """Append each of ``events`` whose id is not there yet; durable when this returns."""
        new = [e for e in events if e["id"] not in self.seen]
        if not new:
            return
        for event in new:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.seen.update(e["id"] for e in new)


def ledger_events(body: bytes) -> list[dict[str, Any]]:
    """The events of one ledger message: a commit's, or an older message's one event."""
    message = json.loads(body)
    return list(message["events"]) if "events" in message else [message]


def build_app(nats_url: str, prefix: str, out: Path) -> FastStream:
    """The FastStream app: the broker, the durable subscriber and its handler."""
    broker = NatsBroker(nats_url)
    trail = AuditFile(out)

    @broker.subscriber(
        f"{prefix}.session.evt.>",
        stream=JStream(f"{prefix.upper()}_SESSION_EVT", declare=False),
        durable=CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(ack_wait=10.0),
        pull_sub=PullSub(batch_size=1),  # one at a time: FastStream runs a batch concurrently
        ack_policy=AckPolicy.MANUAL,
    )
    async def record(message: NatsMessage) -> None:
        trail.write(ledger_events(message.body))
        await message.ack()

    return FastStream(broker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("audit.jsonl"))
    parser.add_argument(
        "--nats-url", default=os.environ.get("SHOAL_NATS_URL", "nats://127.0.0.1:14222")
    )
    parser.add_argument("--prefix", default=os.environ.get("SHOAL_SUBJECT_PREFIX", "shoal"))
    args = parser.parse_args()
    asyncio.run(build_app(args.nats_url, args.prefix, args.out).run())


if __name__ == "__main__":
    main()
