"""Helpers the keys service tests share (the fixtures are in conftest.py)."""

from __future__ import annotations

import base64
import os
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shoal.common.messaging import Envelope, Subjects, decode, request
from shoal.keys.audit import audit_stream_name

DEV_KEY = "dev-admin-key-for-tests"


def random_kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def call(nc: NATS, subjects: Subjects, method: str, body: dict[str, Any]) -> Any:
    return await request(nc, subjects.rpc("keys", method), body, timeout=10)


async def audit_events(js: JetStreamContext, subjects: Subjects) -> list[Envelope]:
    """Every event in the AUDIT stream so far, in order (read by sequence, no consumer)."""
    stream = audit_stream_name(subjects)
    info = await js.stream_info(stream)
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None
        events.append(decode(msg.data))
    return events
