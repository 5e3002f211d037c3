"""Session replicas as real OS processes, a command load, and the ledger audit of the fault tests.

Replicas run ``python -m shoal.common.cli run session`` (what ``shoal run session`` runs).
Commands are published straight to JetStream (the gateway's contract, docs/CONTRACTS.md);
the audit reads back the SESSION_EVT ledger and the session-state bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal.common.clock import iso
from shoal.common.contracts import Event, decode_snapshot
from shoal.common.messaging import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    Envelope,
    Subjects,
    encode,
    ledger_events,
    loads,
)
from shoal.devtools.embedded import free_port
from shoal.devtools.supervisor import ServiceProcess, ServiceSpec
from shoal.session.service import replay
from shoal.session.store import EventLedger, LeaseRecord, LeaseStore, PartitionConsumers

_ids = itertools.count(1)


def _quiet(line: bytes) -> None:
    return None


class Cluster:
    """Session replicas sharing one NATS, one database and one subject prefix."""

    def __init__(
        self,
        *,
        nats_url: str,
        database_url: str,
        prefix: str,
        partitions: int,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.database_url = database_url
        self.prefix = prefix
        self.partitions = partitions
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.replicas: dict[str, ServiceProcess] = {}

    def _spec(self, name: str, service: str = "session") -> ServiceSpec:
        port = free_port()
        env = {
            "PATH": str(Path(sys.executable).parent),
            "SHOAL_NATS_URL": self.nats_url,
            "SHOAL_DATABASE_URL": self.database_url,
            "SHOAL_SUBJECT_PREFIX": self.prefix,
            "SHOAL_HTTP_PORT": str(port),
            "SHOAL_INSTANCE_ID": name,
            "SHOAL_SERVICE_NAME": service,
            "SHOAL_SCHEDULER_POLL_INTERVAL": "PT0.1S",
            "SHOAL_ENVIRONMENT": "test",
            "SHOAL_SESSION_PARTITIONS": str(self.partitions),
            "SHOAL_PROJECTION_ENABLED": "false",
            "SHOAL_LEASE_TTL": "PT3S",
            "SHOAL_MEMBER_TTL": "PT3S",
            "SHOAL_RENEW_INTERVAL": "PT0.5S",
            "SHOAL_FETCH_TIMEOUT": "PT0.5S",
            "SHOAL_SHUTDOWN_GRACE": "PT10S",
            "SHOAL_LOG_LEVEL": "INFO",
            "SHOAL_SESSION_TIMERS": "false",  # on where the test runs a scheduler (env=...)
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        argv = (sys.executable, "-m", "shoal.common.cli", "run", service)
        return ServiceSpec(name=name, argv=argv, env=env, http_port=port)

    async def start(self, *names: str, ready_within: float = 60.0) -> None:
        """Start replicas ``names`` (new processes) and wait until each is ready."""
        for name in names:
            proc = ServiceProcess(self._spec(name), log_dir=self.log_dir, echo=_quiet)
            self.replicas[name] = proc
            await proc.start()
        await asyncio.gather(*(self.wait_ready(n, ready_within) for n in names))

    async def start_scheduler(self, name: str = "scheduler", ready_within: float = 60.0) -> None:
        """Start (or start again) the scheduler process that fires the sessions' timers."""
        proc = self.replicas.get(name)
        if proc is None:
            spec = self._spec(name, service="scheduler")
            proc = ServiceProcess(spec, log_dir=self.log_dir, echo=_quiet)
            self.replicas[name] = proc
        await proc.start()
        await self.wait_ready(name, ready_within)

    async def wait_ready(self, name: str, within: float) -> None:
        proc = self.replicas[name]
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not await proc.probe(client):
                if not proc.running or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{name} not ready ({proc.last_probe}):\n{proc.log_tail(30)}"
                    )
                await asyncio.sleep(0.1)

    async def metric(self, name: str, metric: str) -> float:
        """A metric's value (summed over its labels) from the replica's /metrics."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            text = (await client.get(f"{self.replicas[name].url}/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric) and not line.startswith("#"):
                head, _, value = line.rpartition(" ")
                if head == metric or head.startswith(metric + "{"):
                    total += float(value)
        return total

    async def wait_metric(self, name: str, metric: str, *, at_least: float, within: float) -> float:
        """Poll the replica's metric until it reaches ``at_least``; its value."""
        deadline = time.monotonic() + within
        while True:
            value = await self.metric(name, metric)
            if value >= at_least:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: {metric} stayed at {value} < {at_least}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop every replica this cluster started (SIGCONT first, SIGTERM, then SIGKILL)."""
        await asyncio.gather(
            *(p.stop(grace=15.0) for p in self.replicas.values()), return_exceptions=True
        )


async def leases(js: JetStreamContext, subjects: Subjects, partitions: int) -> dict[int, str]:
    """Partition -> owner of the live leases right now."""
    records: dict[int, LeaseRecord] = await LeaseStore(js, subjects).read_all(partitions)
    return {p: r.value.owner for p, r in records.items() if r.value is not None}


async def wait_owners(
    js: JetStreamContext,
    subjects: Subjects,
    partitions: int,
    *,
    condition: Any,
    within: float = 30.0,
) -> tuple[dict[int, str], float]:
    """Poll the leases until ``condition(owners)`` holds; (owners, seconds waited)."""
    started = time.monotonic()
    while True:
        owners = await leases(js, subjects, partitions)
        if condition(owners):
            return owners, time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"leases did not settle within {within}s: {owners}")
        await asyncio.sleep(0.05)


async def held_unacked(
    js: JetStreamContext, subjects: Subjects, owner: str, partitions: int
) -> int:
    """Commands the server has handed to ``owner``'s consumers and not seen acked: what that
    replica holds right now, by the server's count (readable while the replica is stopped)."""
    records: dict[int, LeaseRecord] = await LeaseStore(js, subjects).read_all(partitions)
    consumers = PartitionConsumers(js, subjects)
    held = 0
    for p, record in records.items():
        if record.value is not None and record.value.owner == owner:
            lag = await consumers.lag(p, record.epoch)
            held += lag[1] if lag else 0
    return held


def all_owned_by(members: set[str], partitions: int) -> Any:
    return lambda owners: len(owners) == partitions and set(owners.values()) <= members


@dataclass
class Load:
    """``sessions`` x ``commands`` (a create, then prompts), concurrent across sessions, each
    session's commands in order. A command counts as sent once JetStream acknowledged it; a
    failed publish is retried with the same ``Nats-Msg-Id`` (the stream drops a copy).
    Every command carries a reply inbox: replies are collected per command id."""

    nc: NATS
    js: JetStreamContext
    subjects: Subjects
    sessions: list[str]
    commands: int
    concurrency: int = 64
    pace: float = 0.0  # seconds between a session's commands (spreads the load in time)
    sent: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    acked: int = 0
    publish_errors: int = 0
    replies_ok: set[str] = field(default_factory=set)
    replies_err: dict[str, Any] = field(default_factory=dict)
    all_replied: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return len(self.sessions) * self.commands

    async def run(self) -> None:
        inbox_prefix = self.nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            command_id = msg.subject.rsplit(".", 1)[-1]
            body = loads(msg.data)
            if body.get("ok"):
                self.replies_ok.add(command_id)
                if len(self.replies_ok) >= self.total:
                    self.all_replied.set()
            else:
                self.replies_err[command_id] = body.get("error")

        sub = await self.nc.subscribe(f"{inbox_prefix}.*", cb=on_reply)
        gate = asyncio.Semaphore(self.concurrency)

        async def one_session(sid: str) -> None:
            for i in range(self.commands):
                async with gate:
                    await self._send(sid, i, inbox_prefix)
                if self.pace:
                    await asyncio.sleep(self.pace)

        try:
            await asyncio.gather(*(one_session(sid) for sid in self.sessions))
        finally:
            self._reply_sub = sub

    async def _send(self, sid: str, i: int, inbox_prefix: str) -> None:
        command_id = f"c{next(_ids)}x{time.monotonic_ns()}"
        if i == 0:
            type_, data = "session.create", {"metadata": {}, "runner_token_hash": "ab"}
        else:
            type_, data = "prompt.submit", {"prompt_id": f"p{i}", "content": "x"}
        envelope = Envelope(
            id=command_id,
            type=type_,
            source="fault-test",
            time=iso(time.time()),
            subject=sid,
            owner="u1",
            data=data,
        )
        body = encode(envelope)
        headers = {MSG_ID_HEADER: command_id, REPLY_TO_HEADER: f"{inbox_prefix}.{command_id}"}
        while True:
            try:
                await self.js.publish(
                    self.subjects.session_command(sid), body, headers=headers, timeout=5.0
                )
                break
            except Exception:  # NATS restarting: retry the same message id
                self.publish_errors += 1
                await asyncio.sleep(0.2)
        if i > 0:
            self.sent[sid].append(f"p{i}")
        self.acked += 1

    async def wait_sent(self, fraction: float, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while self.acked < fraction * self.total:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.acked}/{self.total} commands sent")
            await asyncio.sleep(0.01)


async def wait_drained(js: JetStreamContext, subjects: Subjects, within: float = 120.0) -> float:
    """Until SESSION_CMD (a work queue) holds nothing: every command applied and acked."""
    started = time.monotonic()
    while True:
        info = await js.stream_info(subjects.session_cmd_stream)
        if info.state.messages == 0:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{info.state.messages} commands still unacknowledged")
        await asyncio.sleep(0.1)


@dataclass
class Audit:
    sent: int
    applied: int
    lost: int
    duplicated: int
    reordered: int
    bad_seq: int  # sessions whose event seqs are not 1..n, or whose state disagrees

    def line(self, name: str, **extra: float | int) -> str:
        more = " ".join(
            f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
        )
        return (
            f"[{name}] sent={self.sent} applied={self.applied} lost={self.lost} "
            f"duplicated={self.duplicated} reordered={self.reordered} bad_seq={self.bad_seq} "
            f"{more}"
        )


async def read_ledger(js: JetStreamContext, subjects: Subjects) -> dict[str, list[Envelope]]:
    """Every event of SESSION_EVT, by session, in stream order (commits split)."""
    info = await js.stream_info(subjects.session_evt_stream)
    expected = info.state.messages
    consumer = f"audit{next(_ids)}"
    await js.add_consumer(
        subjects.session_evt_stream,
        ConsumerConfig(
            name=consumer,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60.0,
        ),
    )
    sub = await js.pull_subscribe_bind(consumer, stream=subjects.session_evt_stream)
    by_session: dict[str, list[Envelope]] = defaultdict(list)
    got = 0
    try:
        while got < expected:
            try:
                msgs = await sub.fetch(min(1000, expected - got), timeout=5.0)
            except NatsTimeout:
                break
            for m in msgs:
                for event in ledger_events(m.data):
                    by_session[event.subject or ""].append(event)
            got += len(msgs)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return by_session


async def audit(js: JetStreamContext, subjects: Subjects, sent: dict[str, list[str]]) -> Audit:
    """Compare what was sent with the ledger and the state bucket, per session."""
    ledger = await read_ledger(js, subjects)
    ledger_commands = EventLedger(js, subjects)
    kv = await js.key_value(subjects.session_state_bucket)
    total = applied = lost = duplicated = reordered = bad = 0
    for sid, prompts in sent.items():
        events = ledger.get(sid, [])
        queued = [str(e.data.get("prompt_id")) for e in events if e.type == Event.PROMPT_QUEUED]
        total += len(prompts)
        applied += len(set(queued) & set(prompts))
        lost += len(set(prompts) - set(queued))
        duplicated += len(queued) - len(set(queued))
        first_seen = list(dict.fromkeys(queued))
        if [p for p in first_seen if p in set(prompts)] != [p for p in prompts if p in queued]:
            reordered += 1
        created = [e for e in events if e.type == Event.SESSION_CREATED]
        entry = await kv.get(sid)
        snapshot = decode_snapshot(entry.value or b"{}")
        # What a replica recovers: the snapshot plus the ledger's commands after it (with lazy
        # snapshots the bucket may trail the ledger when its writer was killed).
        tail = await ledger_commands.commands_after(sid, snapshot.ledger_seq)
        state = replay(snapshot, tail) or snapshot
        if (
            [e.seq for e in events] != list(range(1, len(events) + 1))
            or len(created) != 1
            or [q.prompt_id for q in state.queue] != prompts
            or state.event_seq != len(events)
        ):
            bad += 1
    return Audit(total, applied, lost, duplicated, reordered, bad)
