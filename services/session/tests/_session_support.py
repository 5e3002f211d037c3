"""Helpers for the session service's integration tests (real nats-server and PostgreSQL)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from shoal.common.clock import iso
from shoal.common.contracts import SessionSnapshot, decode_snapshot
from shoal.common.messaging import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    Envelope,
    Subjects,
    encode,
    ledger_events,
    loads,
)
from shoal.session.app import create_app
from shoal.session.config import SessionSettings

T = TypeVar("T")
_ids = itertools.count(1)


class running:
    """``async with running(settings) as app``: the service's lifespan, in this process."""

    def __init__(self, settings: SessionSettings) -> None:
        self.app: FastAPI = create_app(settings)
        self._ctx = self.app.router.lifespan_context(self.app)

    async def __aenter__(self) -> FastAPI:
        await self._ctx.__aenter__()
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        await self._ctx.__aexit__(None, None, None)


class Gateway:
    """Sends commands the way the gateway does (docs/CONTRACTS.md) and awaits the reply."""

    def __init__(self, nc: NATS, js: JetStreamContext, subjects: Subjects) -> None:
        self.nc, self.js, self.subjects = nc, js, subjects

    def command(
        self, session_id: str, type_: str, data: dict[str, Any] | None = None, owner: str = "u1"
    ) -> Envelope:
        return Envelope(
            id=f"cmd_{next(_ids)}_{time.monotonic_ns()}",
            type=type_,
            source="gateway",
            time=iso(time.time()),
            subject=session_id,
            owner=owner,
            data=data or {},
        )

    async def publish(self, command: Envelope, *, msg_id: str | None = None) -> Any:
        """Publish without waiting for a reply; returns the PubAck."""
        return await self.js.publish(
            self.subjects.session_command(command.subject),
            encode(command),
            headers={MSG_ID_HEADER: msg_id or command.id},
        )

    async def send(
        self,
        session_id: str,
        type_: str,
        data: dict[str, Any] | None = None,
        *,
        owner: str = "u1",
        raw: bytes | None = None,
        wait: float = 10.0,
    ) -> dict[str, Any]:
        """Publish a command with a reply inbox and return the applied reply."""
        command = self.command(session_id, type_, data, owner)
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        try:
            await self.js.publish(
                self.subjects.session_command(session_id),
                raw if raw is not None else encode(command),
                headers={MSG_ID_HEADER: command.id, REPLY_TO_HEADER: inbox},
            )
            msg = await sub.next_msg(timeout=wait)
        finally:
            await sub.unsubscribe()
        reply: dict[str, Any] = loads(msg.data)
        return reply

    async def create(self, session_id: str, owner: str = "u1") -> dict[str, Any]:
        return await self.send(
            session_id,
            "session.create",
            {"metadata": {"name": session_id}, "runner_token_hash": "ab"},
            owner=owner,
        )


async def read_events(
    js: JetStreamContext, subjects: Subjects, session_id: str, *, settle: float = 0.3
) -> list[Envelope]:
    """Every event of one session in the ledger, in stream order (commits split)."""
    info = await js.stream_info(
        subjects.session_evt_stream, subjects_filter=subjects.session_events(session_id)
    )
    expected = sum((info.state.subjects or {}).values())
    if expected == 0:
        return []
    sub = await js.pull_subscribe(
        subjects.session_events(session_id), stream=subjects.session_evt_stream
    )
    events: list[Envelope] = []
    got = 0
    try:
        while got < expected:
            try:
                msgs = await sub.fetch(expected - got, timeout=settle)
            except NatsTimeout:
                break
            got += len(msgs)
            for m in msgs:
                events.extend(ledger_events(m.data))
    finally:
        await sub.unsubscribe()
    return events


async def load_state(js: JetStreamContext, subjects: Subjects, session_id: str) -> SessionSnapshot:
    kv = await js.key_value(subjects.session_state_bucket)
    entry = await kv.get(session_id)
    assert entry.value is not None
    return decode_snapshot(entry.value)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    within: float = 10.0,
) -> T:
    """Poll ``probe`` until ``until`` holds (for the asynchronous projection)."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(0.05)


async def partition_consumers(js: JetStreamContext, subjects: Subjects) -> list[Any]:
    """The session partition consumers on SESSION_CMD (one per partition ever granted)."""
    infos = await js.consumers_info(subjects.session_cmd_stream)
    return [i for i in infos if (i.name or "").startswith("session-p")]
