"""A planted secret value appears nowhere but the two RPC payloads that must carry it.

The keys service runs in-process with DEBUG logging (SQL statements and their parameters
included), an in-memory trace exporter and a NATS subscriber on ``>`` that records every
subject, header and payload in the account (requests, replies, JetStream API, audit events).
The sentinel goes through put, get, list, rotate and delete, and through every error path that
receives it. Afterwards it may appear only in

- the ``secrets.put`` request payloads (the value has to reach the service), and
- the replies to ``secrets.get`` for that secret (the value has to reach the caller),

and never in a subject, a header, any other payload, an audit event, an error body, a log
line, a span, or a database column (those hold ciphertext). See docs/CONTRACTS.md, "Secrets".
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from _keys_support import audit_events, call
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from shoal.common.clock import ManualClock
from shoal.common.errors import ShoalError
from shoal.common.messaging import Subjects, dumps, loads
from shoal.common.observability import JsonFormatter
from shoal.common.storage import Database
from shoal.keys.admin import rotate_kek
from shoal.keys.app import create_app
from shoal.keys.config import KeysSettings
from shoal.keys.store import data_keys, secrets_table
from shoal.keys.vault import MAX_VALUE_BYTES

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Captured:
    subject: str
    reply: str
    headers: dict[str, str]
    data: bytes


class RecordingHandler(logging.Handler):
    """Keeps every record, formatted as JSON with extras and exception text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter("keys"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + repr(record.args) + repr(vars(record)))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


def forms(sentinel: str) -> list[bytes]:
    """The sentinel as it could leak: raw, hex, base64."""
    raw = sentinel.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")]


def leaks(blob: bytes | str, sentinel: str) -> bool:
    data = blob.encode() if isinstance(blob, str) else blob
    return any(form in data for form in forms(sentinel))


async def test_a_sentinel_secret_leaks_nowhere(
    nats_url: str,
    database_url: str,
    subject_prefix: str,
    nc: NATS,
    js: JetStreamContext,
    spans: InMemorySpanExporter,
    capfd: pytest.CaptureFixture[str],
) -> None:
    sentinel = "SENTINEL" + os.urandom(12).hex()
    subjects = Subjects(subject_prefix)
    settings = KeysSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        log_level="DEBUG",
        log_json=True,
        otel_exporter="console",
    )
    clock = ManualClock()
    app = create_app(settings, clock=clock)  # installs the service's own log handler on root
    records = RecordingHandler()
    logging.getLogger().addHandler(records)
    sql_logger = logging.getLogger("sqlalchemy.engine")
    sql_level = sql_logger.level
    sql_logger.setLevel(logging.INFO)  # statements *and bound parameters* go to the log

    captured: list[Captured] = []

    async def on_any(msg: Msg) -> None:
        captured.append(Captured(msg.subject, msg.reply, dict(msg.headers or {}), msg.data))

    wiretap = await nc.subscribe(">", cb=on_any)
    await nc.flush()
    errors: list[dict[str, Any]] = []

    async def refused(method: str, body: dict[str, Any]) -> None:
        with pytest.raises(ShoalError) as caught:
            await call(nc, subjects, method, body)
        errors.append(caught.value.to_dict())

    try:
        async with app.router.lifespan_context(app):
            owner, name = "alice", "SENT"
            await call(nc, subjects, "secrets.put", {"owner": owner, "name": name, "value": "x"})
            put = {"owner": owner, "name": name, "value": sentinel, "actor": "key:abc"}
            await call(nc, subjects, "secrets.put", put)
            got = await call(nc, subjects, "secrets.get", {"owner": owner, "name": name})
            assert got == {"name": name, "value": sentinel}
            listed = await call(nc, subjects, "secrets.list", {"owner": owner})
            assert not leaks(dumps(listed), sentinel)
            await rotate_kek(nc, subjects, timeout=10)

            # Every error path that receives the value.
            big = sentinel * (MAX_VALUE_BYTES // len(sentinel) + 1)
            await refused("secrets.put", {"owner": owner, "name": name, "value": big})
            await refused("secrets.put", {"owner": owner, "name": "bad/name", "value": sentinel})
            await refused("secrets.put", {"owner": "bad.owner", "name": name, "value": sentinel})
            await refused("secrets.put", {"owner": owner, "name": name, "value": [sentinel]})
            await refused("secrets.put", {"owner": owner, "name": sentinel + "/", "value": "v"})
            await refused("secrets.get", {"owner": "bob", "name": name})
            bad_actor = {"owner": owner, "name": name, "value": sentinel, "actor": ""}
            await refused("secrets.put", bad_actor)
            # A body that is not JSON at all, with the value inside.
            raw = b'{"owner": "alice", "name": "SENT", "value": "' + sentinel.encode() + b'"'
            reply = await nc.request(subjects.rpc("keys", "secrets.put"), raw, timeout=5)
            errors.append(loads(reply.data))
            # A ciphertext moved to another name fails to open: the error paths log, not leak.
            db = Database(database_url)
            try:
                async with db.session() as s, s.begin():
                    row = (
                        await s.execute(
                            sa.select(secrets_table).where(secrets_table.c.name == name)
                        )
                    ).one()
                    await s.execute(
                        sa.insert(secrets_table).values(**{**row._asdict(), "name": "MOVED"})
                    )
                await refused("secrets.get", {"owner": owner, "name": "MOVED"})
                async with db.session() as s:
                    stored = [
                        repr(r)
                        for table in (secrets_table, data_keys)
                        for r in (await s.execute(sa.select(table))).all()
                    ]
            finally:
                await db.close()
            assert await call(nc, subjects, "secrets.delete", {"owner": owner, "name": name})
            events = await audit_events(js, subjects)
            await nc.flush()
            await asyncio.sleep(0.2)  # let the wiretap's callbacks drain
    finally:
        await wiretap.unsubscribe()
        logging.getLogger().removeHandler(records)
        sql_logger.setLevel(sql_level)

    put_subject = subjects.rpc("keys", "secrets.put")
    get_subject = subjects.rpc("keys", "secrets.get")
    allowed_replies = {
        m.reply
        for m in captured
        if m.subject == get_subject and loads(m.data) == {"owner": owner, "name": name}
    }
    carrying = [m for m in captured if leaks(m.data, sentinel)]
    # Positive control: the wiretap did see the value where it must travel.
    assert any(m.subject == put_subject for m in carrying)
    assert any(m.subject in allowed_replies for m in carrying)
    unexpected = [
        (m.subject, m.data[:200])
        for m in carrying
        if m.subject != put_subject and m.subject not in allowed_replies
    ]
    assert unexpected == []
    assert not [m.subject for m in captured if leaks(m.subject + m.reply, sentinel)]
    assert not [m.headers for m in captured if leaks(repr(m.headers), sentinel)]
    assert len(captured) > 20  # JetStream API traffic and audit publishes were seen too

    assert {e.type for e in events} >= {"secret.put", "secret.read", "secret.deleted"}
    assert not leaks(repr(events), sentinel)
    assert len(errors) == 9
    assert not [e for e in errors if leaks(repr(e), sentinel)]
    assert records.lines, "the log capture saw nothing"
    assert any("INSERT INTO secrets" in line for line in records.lines)  # SQL params were logged
    assert not [line[:300] for line in records.lines if leaks(line, sentinel)]
    out, err = capfd.readouterr()
    assert not leaks(out + err, sentinel)
    assert not [s.name for s in spans.get_finished_spans() if leaks(s.to_json(), sentinel)]
    assert stored
    assert not [r[:200] for r in stored if leaks(r, sentinel)]
