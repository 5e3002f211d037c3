"""Memory a hibernated session costs the session service process.

Starts, on free ports of 127.0.0.1 in a temporary directory: nats-server, PostgreSQL, the
scheduler and one session replica (``shoal.devtools.supervisor.Fleet``, durable timers on).
Then, in two rounds (``warmup`` sessions, then ``sessions``), publishes ``session.create``
with ``idle_timeout`` 1 s straight to SESSION_CMD (the gateway's contract) and waits until
every session of the round announced ``session.status`` ``hibernated`` (on the ledger's live
re-publish) and the replica reports no session lane left (``shoal_session_lanes`` = 0).

The figure is the session process's resident memory (VmRSS) after round 2 minus after round 1,
per round-2 session: round 1 lets the allocator and every cache reach their working size (the
peak of commands in flight, not the session count, sets it), so what round 2 adds is what a
hibernated session keeps. Round 1's growth over the idle process is
printed too (an upper bound that includes that warm-up).

Example::

    uv run python -m bench.hibernation_memory --sessions 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shoal.common.clock import iso
from shoal.common.messaging import MSG_ID_HEADER, Envelope, Subjects, encode, ledger_events
from shoal.devtools.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from shoal.devtools.supervisor import Fleet, FleetConfig, fleet_specs

DATABASE = "shoal"
WINDOW = 500  # sessions created together; the next window starts once they all hibernated


@dataclass(frozen=True)
class Round:
    sessions: int
    seconds: float  # from the first create to the last lane gone
    rss_kib: int  # the session process's VmRSS afterwards


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc status")


async def _metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _round(
    nc: NATS, subjects: Subjects, prefix: str, count: int, session_url: str, pid: int
) -> Round:
    """Create ``count`` sessions a window at a time, each window after the previous one's
    sessions all hibernated: the peak of sessions awake (lanes, commands in flight) is one
    window in every round, so a later round's growth is what hibernated sessions keep."""
    js = nc.jetstream()
    hibernated: set[str] = set()
    window_done = asyncio.Event()
    waiting_for = 0

    async def on_status(msg: Msg) -> None:
        for event in ledger_events(msg.data):  # one commit per command
            sid = event.subject
            if (
                event.type == "session.status"
                and event.data.get("status") == "hibernated"
                and sid.startswith(prefix)
            ):
                hibernated.add(sid)
        if len(hibernated) >= waiting_for:
            window_done.set()

    sub = await nc.subscribe(f"{subjects.prefix}.live.session.evt.>", cb=on_status)
    started = time.monotonic()
    try:
        for first in range(0, count, WINDOW):
            last = min(first + WINDOW, count)
            waiting_for = last
            window_done.clear()
            acks = []
            for n in range(first, last):
                sid = f"{prefix}{n:06d}"
                command = Envelope(
                    id=f"cmd_{sid}",
                    type="session.create",
                    source="bench",
                    time=iso(time.time()),
                    subject=sid,
                    owner="bench",
                    data={"idle_timeout": 1},
                )
                acks.append(
                    await js.publish_async(
                        subjects.session_command(sid),
                        encode(command),
                        headers={MSG_ID_HEADER: command.id},
                    )
                )
            await asyncio.gather(*acks)
            if len(hibernated) < waiting_for:
                await asyncio.wait_for(window_done.wait(), timeout=120)
        async with httpx.AsyncClient(timeout=5.0) as client:
            # Another process's gauge: polled over HTTP, there is no event to await.
            while await _metric(client, session_url, "shoal_session_lanes") > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        await sub.unsubscribe()
    seconds = time.monotonic() - started
    await asyncio.sleep(1.0)  # let the allocator settle after the last commands
    return Round(count, seconds, _rss_kib(pid))


async def run(sessions: int, warmup: int, keep: bool) -> None:
    home = Path(tempfile.mkdtemp(prefix="shoal-hibernation-"))
    logs = home / "logs"
    logs.mkdir()
    nats_server = EmbeddedNats(port=free_port(), store_dir=home / "nats", log_file=logs / "n.log")
    postgres = EmbeddedPostgres(data_dir=home / "pg", port=free_port(), log_file=logs / "pg.log")
    try:
        await asyncio.to_thread(nats_server.start)
        await asyncio.to_thread(postgres.start)
        postgres.create_database(DATABASE)
        config = FleetConfig(
            nats_url=nats_server.url,
            database_url=postgres.url(DATABASE),
            admin_key="shoal_dev_" + secrets.token_urlsafe(24),
            services=("scheduler", "session"),
            extra_env={"SHOAL_PROJECTION_ENABLED": "false", "SHOAL_LOG_LEVEL": "WARNING"},
            base_env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        )
        fleet = Fleet(fleet_specs(config), config=config, log_dir=logs)
        async with fleet:
            await fleet.wait_ready(90)
            [session] = [p for p in fleet.processes if p.name.startswith("session")]
            assert session.pid is not None
            nc = await nats.connect(nats_server.url)
            try:
                subjects = Subjects()
                idle = _rss_kib(session.pid)
                print(f"session process idle: {idle} KiB", file=sys.stderr)
                first = await _round(nc, subjects, "ses_a", warmup, session.url, session.pid)
                print(f"round 1: {first}", file=sys.stderr)
                second = await _round(nc, subjects, "ses_b", sessions, session.url, session.pid)
                print(f"round 2: {second}", file=sys.stderr)
            finally:
                await nc.close()
        per_session = (second.rss_kib - first.rss_kib) * 1024 / sessions
        warm = (first.rss_kib - idle) * 1024 / warmup
        print(f"| sessions: round 1 (warm-up) / round 2 | {warmup:,} / {sessions:,} |")
        print(f"| round 1: create -> hibernated, lanes gone | {first.seconds:.1f} s |")
        print(f"| round 2: create -> hibernated, lanes gone | {second.seconds:.1f} s |")
        print(
            f"| RSS idle / after round 1 / after round 2 | {idle} / {first.rss_kib} / "
            f"{second.rss_kib} KiB |"
        )
        print(f"| per hibernated session (round 2 growth) | {per_session:,.0f} B |")
        print(f"| round 1 growth per session (with warm-up) | {warm:,.0f} B |")
    finally:
        await asyncio.to_thread(postgres.stop)
        await asyncio.to_thread(nats_server.stop)
        if not keep:
            import shutil

            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hibernation_memory")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions measured")
    parser.add_argument("--warmup", type=int, default=2_000, help="sessions of round 1")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    asyncio.run(run(args.sessions, args.warmup, args.keep_logs))


if __name__ == "__main__":
    main()
