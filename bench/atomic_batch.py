"""What one command's ledger write costs: N fenced publishes vs one JetStream atomic batch.

``python -m bench.atomic_batch [--events 3] [--rounds 2000]``: a fresh nats-server with
``sync_interval: always`` (bench/README.md, "Ledger write"), a stream with ``allow_atomic``,
one publisher writing ``rounds`` commands of ``events`` events each, one at a time, under both
shapes, each fenced on the subject filter's last sequence like the session service's ledger:
- fenced: one request per event, each expecting the previous one's sequence;
- batch: ``Nats-Batch-Id`` / ``Nats-Batch-Sequence`` on every message, the fence on the first,
  ``Nats-Batch-Commit: 1`` on the last, which alone gets the PubAck (nats-py has no API).
Prints latency per command (p50 / p99) and nats-server's CPU per command (/proc). Fsyncs per
command are not counted here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import nats

from bench._report import Latency
from shoal.devtools.embedded import EmbeddedNats, free_port

STREAM = "LEDGER"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(events: int, rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    last_by_session: dict[str, int] = {}  # the fence: each subject filter's last sequence
    with tempfile.TemporaryDirectory(prefix="shoal-batch-") as tmp:
        server = EmbeddedNats(port=free_port(), store_dir=Path(tmp) / "nats", sync_always=True)
        await asyncio.to_thread(server.start)
        try:
            nc = await nats.connect(server.url)
            config = {
                "name": STREAM,
                "subjects": ["evt.>"],
                "storage": "file",
                "allow_atomic": True,
                "allow_msg_ttl": False,
            }
            reply = await nc.request(
                f"$JS.API.STREAM.CREATE.{STREAM}", json.dumps(config).encode(), timeout=5
            )
            assert b"error" not in reply.data, reply.data
            assert server.proc is not None
            pid = server.proc.pid
            for shape in ("fenced", "batch"):
                samples: list[float] = []
                cpu0 = _cpu_seconds(pid)
                for n in range(rounds):
                    session = f"s{n % 100}"
                    subject_filter = f"evt.{shape}.{session}.>"
                    started = time.perf_counter()
                    if shape == "fenced":
                        # the expected sequence: this session's previous event
                        expected = last_by_session.get(subject_filter, 0)
                        for i in range(events):
                            ack = await nc.request(
                                f"evt.{shape}.{session}.e{i}",
                                b"x" * 300,
                                headers={
                                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                                    "Nats-Expected-Last-Subject-Sequence-Subject": subject_filter,
                                    "Nats-Msg-Id": f"{shape}:{n}:{i}",
                                },
                                timeout=5,
                            )
                            expected = json.loads(ack.data)["seq"]
                    else:
                        batch = uuid.uuid4().hex
                        expected = last_by_session.get(subject_filter, 0)
                        for i in range(events):
                            headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i + 1)}
                            if i == 0:
                                headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
                                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = (
                                    subject_filter
                                )
                            if i == events - 1:
                                headers["Nats-Batch-Commit"] = "1"
                                ack = await nc.request(
                                    f"evt.{shape}.{session}.e{i}",
                                    b"x" * 300,
                                    headers=headers,
                                    timeout=5,
                                )
                            else:
                                await nc.publish(
                                    f"evt.{shape}.{session}.e{i}", b"x" * 300, headers=headers
                                )
                        body = json.loads(ack.data)
                        assert "error" not in body, body
                        expected = body["seq"]
                    last_by_session[subject_filter] = expected
                    samples.append(time.perf_counter() - started)
                cpu = _cpu_seconds(pid) - cpu0
                lat = Latency.of(samples)
                out[shape] = {
                    "p50_ms": round(lat.p50, 3),
                    "p99_ms": round(lat.p99, 3),
                    "server_cpu_ms_per_command": round(cpu * 1000 / rounds, 3),
                }
            await nc.close()
        finally:
            await asyncio.to_thread(server.stop)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.atomic_batch")
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.events, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
