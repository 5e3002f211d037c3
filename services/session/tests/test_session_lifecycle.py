"""Runner takeover, hibernation and durable timers on real processes: session replicas and the
scheduler run as OS processes against a real nats-server and PostgreSQL; commands are
published straight to JetStream (the gateway's contract) and the ledger is read back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from _cluster import Cluster
from _session_support import Gateway, eventually, load_state, read_events
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shoal.common.clock import iso
from shoal.common.contracts import Event, Status
from shoal.common.messaging import Envelope, Subjects, ledger_events

PARTITIONS = 16
ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster(
    nats_url: str, database_url: str, subject_prefix: str, tmp_path: Path
) -> AsyncIterator[ClusterFactory]:
    made: list[Cluster] = []

    async def make(*names: str, timers: bool = False) -> Cluster:
        c = Cluster(
            nats_url=nats_url,
            database_url=database_url,
            prefix=subject_prefix,
            partitions=PARTITIONS,
            log_dir=tmp_path / f"cluster{len(made)}",
            env={"SHOAL_SESSION_TIMERS": "true"} if timers else {},
        )
        made.append(c)
        if timers:
            await c.start_scheduler()
        await c.start(*names)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.close()


def _types(events: list[Envelope]) -> list[str]:
    return [e.type for e in events]


async def test_a_late_close_of_a_replaced_runner_leaves_the_new_one_in_charge(
    cluster: ClusterFactory, js: JetStreamContext, gateway: Gateway, subjects: Subjects
) -> None:
    await cluster("s-a")
    sid = "ses_race"
    await gateway.send(sid, "session.create", {})
    await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "one"})
    await gateway.send(sid, "runner.connect", {"connection_id": "c2"})  # takes over
    await gateway.send(sid, "runner.disconnect", {"connection_id": "c1"})  # c1 closes late
    reply = await gateway.send(
        sid, "message.complete", {"prompt_id": "p1", "message_id": "m1", "content": "done by c2"}
    )
    assert reply["ok"]
    reply = await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "two"})
    session = reply["data"]["session"]
    assert session["runner_connected"] is True
    assert session["current_prompt_id"] == "p2"
    assert (await load_state(js, subjects, sid)).runner_connection_id == "c2"

    events = await read_events(js, subjects, sid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    connections = [
        (e.type, e.data["connection_id"], e.data.get("reason"))
        for e in events
        if e.type in (Event.RUNNER_CONNECTED, Event.RUNNER_DISCONNECTED)
    ]
    assert connections == [
        (Event.RUNNER_CONNECTED, "c1", None),
        (Event.RUNNER_DISCONNECTED, "c1", "replaced"),
        (Event.RUNNER_CONNECTED, "c2", None),
    ]
    dispatched = [e.data["prompt_id"] for e in events if e.type == Event.PROMPT_DISPATCHED]
    assert dispatched == ["p1", "p1", "p2"]  # p1 again to c2, then p2 to c2


async def test_a_vanished_runners_prompt_is_dispatched_exactly_once_more_to_the_next(
    cluster: ClusterFactory, js: JetStreamContext, gateway: Gateway, subjects: Subjects
) -> None:
    c = await cluster("s-a", "s-b")
    sid = "ses_vanish"
    await gateway.send(sid, "session.create", {})
    await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "one"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "two"})
    # The runner died without a close: the gateway's heartbeat grace reports it gone. Both
    # session replicas are SIGKILLed and one restarted in between, so the commands after it
    # are applied by a new owner from the stored state.
    await gateway.send(sid, "runner.disconnect", {"connection_id": "c1", "reason": "heartbeat"})
    for name in ("s-a", "s-b"):
        c.replicas[name].kill()
        await c.replicas[name].wait()
    await c.start("s-c")
    await gateway.send(sid, "runner.connect", {"connection_id": "c2"}, wait=30)
    await gateway.send(
        sid, "message.complete", {"prompt_id": "p1", "message_id": "m1", "content": "ok"}
    )
    events = await read_events(js, subjects, sid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    dispatched = [e.data["prompt_id"] for e in events if e.type == Event.PROMPT_DISPATCHED]
    assert dispatched == ["p1", "p1", "p2"]  # p1 once more (to c2), then the next prompt
    gone = [e.data for e in events if e.type == Event.RUNNER_DISCONNECTED]
    assert gone == [{"connection_id": "c1", "reason": "heartbeat"}]
    assert _types(events).count(Event.PROMPT_QUEUED) == 2


async def test_a_thousand_sessions_hibernate_and_each_wakes_on_its_prompt_once(
    cluster: ClusterFactory, js: JetStreamContext, gateway: Gateway, subjects: Subjects
) -> None:
    await cluster("s-a", "s-b", timers=True)
    sids = [f"ses_h{i}" for i in range(1000)]
    live = _Statuses()
    await live.start(gateway.nc, subjects)
    try:
        await asyncio.gather(*(_create(gateway, sid) for sid in sids))
        await asyncio.wait_for(live.reached("hibernated", set(sids)), timeout=300)
        await asyncio.gather(
            *(
                gateway.publish(
                    gateway.command(sid, "prompt.submit", {"prompt_id": f"p-{sid}", "content": "x"})
                )
                for sid in sids
            )
        )
        await asyncio.wait_for(live.reached("idle", set(sids)), timeout=300)
    finally:
        await live.close()
    woken = Counter(sid for sid, status in live.seen if status == "idle")
    assert set(woken.values()) == {1}  # none woken twice by its one prompt
    for sid in sids[::50]:  # the ledger agrees, and no queued prompt was lost
        events = await read_events(js, subjects, sid)
        assert [e.data.get("status") for e in events if e.type == Event.SESSION_STATUS] == [
            "hibernated",
            "idle",
        ]
        assert [e.data["prompt_id"] for e in events if e.type == Event.PROMPT_QUEUED] == [
            f"p-{sid}"
        ]
    states = await asyncio.gather(*(load_state(js, subjects, sid) for sid in sids))
    assert all(s.status == Status.IDLE for s in states)
    assert all([p.prompt_id for p in s.queue] == [f"p-{s.id}"] for s in states)


async def _create(gateway: Gateway, sid: str) -> None:
    await gateway.publish(gateway.command(sid, "session.create", {"idle_timeout": 1}))


class _Statuses:
    """Every ``session.status`` event on the ledger's live re-publish, as it happens."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self, nc: NATS, subjects: Subjects) -> None:
        self._sub = await nc.subscribe(
            f"{subjects.prefix}.live.session.evt.*.commit", cb=self._on_msg
        )

    async def _on_msg(self, msg: Msg) -> None:
        for event in ledger_events(msg.data):
            if event.type == "session.status":
                self.seen.append((event.subject, event.data["status"]))
        self._changed.set()

    async def reached(self, status: str, sids: set[str]) -> None:
        while not sids <= {sid for sid, s in self.seen if s == status}:
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def test_a_question_expiry_and_a_watchdog_due_while_the_scheduler_is_down_fire_once(
    cluster: ClusterFactory, js: JetStreamContext, gateway: Gateway, subjects: Subjects
) -> None:
    c = await cluster("s-a", timers=True)
    asked, silent = "ses_ask", "ses_silent"
    for sid in (asked, silent):
        await gateway.send(sid, "session.create", {"prompt_timeout": 3})
        await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
        await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    due = time.time() + 3
    reply = await gateway.send(
        asked, "question.ask", {"question_id": "q1", "content": "?", "expires_at": iso(due)}
    )
    assert reply["data"]["session"]["status"] == Status.WAITING_INPUT
    # Both timers are set (the replies come after the scheduler took them): kill it.
    c.replicas["scheduler"].kill()
    await c.replicas["scheduler"].wait()
    await asyncio.sleep(max(0.0, due + 0.5 - time.time()))  # both fall due while it is down
    assert Event.QUESTION_EXPIRED not in _types(await read_events(js, subjects, asked))
    await c.start_scheduler()

    expired = await eventually(
        lambda: read_events(js, subjects, asked),
        lambda events: Event.QUESTION_EXPIRED in _types(events),
        within=30,
    )
    failed = await eventually(
        lambda: read_events(js, subjects, silent),
        lambda events: Event.PROMPT_FAILED in _types(events),
        within=30,
    )
    await asyncio.sleep(1.0)  # a second firing would land within the scheduler's next polls
    expired = await read_events(js, subjects, asked)
    failed = await read_events(js, subjects, silent)
    assert _types(expired).count(Event.QUESTION_EXPIRED) == 1
    assert _types(failed).count(Event.PROMPT_FAILED) == 1
    [timeout] = [e for e in failed if e.type == Event.PROMPT_FAILED]
    assert timeout.data["reason"] == "timeout"
    # The asked session's prompt goes on after its question expired: its watchdog is armed
    # again, so it may time out later too; nothing else was fired twice.
    assert (await load_state(js, subjects, silent)).status == Status.IDLE
