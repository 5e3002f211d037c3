"""Live delivery without a consumer per socket: one subscription per session (and per user),
shared by every socket of this gateway, with replay and gap repair from the ledger.

Why not the ledger subject itself: a publish the stream *rejects* (a fenced stale writer, a
duplicate) still reaches core subscribers of the subject, and a core message on
``deliver.user.<owner>`` carries no DELIVER stream sequence. So the streams re-publish what
they stored (``RePublish``, declared in the catalog) to ``<prefix>.live.session.evt.<id>.>`` and
``<prefix>.live.deliver.user.<owner>``, with ``Nats-Sequence`` (stream sequence) and
``Nats-Last-Sequence`` (the previous one on the same subject) in the headers. Only stored
events, in stream order.

- :class:`LiveHub` — one core subscription per subject, reference-counted (subscribe with the
  first socket, unsubscribe with the last). Each message is decoded once (a session commit into
  its events, ``shoal.common.messaging.ledger``) and each event's frame encoded once, from its
  bytes as written, by the hub's encoder (:class:`LiveEvent`: the format is the sockets'
  business, not this module's); every socket's :class:`Tap` gets the same object. A tap is
  bounded (``buffer`` events, ``buffer_bytes``): past either, it is cleared and flagged, and
  its feed catches up from the ledger instead. A NATS reconnect flags every tap the same way.
- :class:`LedgerReader` — batched direct gets (``next_by_subj`` + ``batch``, ~1 MiB per round
  trip): replay, repair, and the ledger's tip for "new only" feeds. No consumer anywhere.
- :class:`LiveFeed` — the ``EventFeed`` of one socket: replay from the ledger up to its end
  while the tap buffers, then live; dedup by position; a jump (session seq > last + 1, or a
  ``Nats-Last-Sequence`` past the last position on a user stream) is repaired from the ledger
  before anything after it is returned. A position the ledger no longer holds comes back as a
  :class:`Gap` ahead of the next event — never skipped silently. The feed's position is the
  one ordering cursor of a socket.

Example::

    hub = LiveHub(nc, encode=encode_event, buffer=1024); await hub.start()
    reader = LedgerReader(nc, "SHOAL_SESSION_EVT", timeout=5)
    feed = await LiveFeed.open(hub, reader, live="shoal.live.session.evt.ses_1.>",
                               ledger="shoal.session.evt.ses_1.>", last=0, pos=1)
    event = await feed.next(); await feed.close(); await hub.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from shoal.common.errors import BadRequest, Unavailable
from shoal.common.messaging import Envelope, ledger_raw_events
from shoal.common.observability import start_span
from shoal.gateway import metrics
from shoal.gateway.service import Gap, SessionEventMsg

log = logging.getLogger(__name__)

SEQUENCE_HEADER = "Nats-Sequence"
LAST_SEQUENCE_HEADER = "Nats-Last-Sequence"
NUM_PENDING_HEADER = "Nats-Num-Pending"

_decoder = msgspec.json.Decoder(Envelope)

FrameEncoder = Callable[[int, bytes, bool], tuple[str, bytes | None]]
"""(position, the event's JSON, shared) -> its frame as text, and as bytes on the wire when
``shared`` (a live event, the same bytes for every socket; a ledger read is one socket's)."""


@dataclass(frozen=True, slots=True)
class LiveEvent(SessionEventMsg):
    """An event with its stream position and its frame, encoded once for every socket.

    ``seq`` is the socket's position: the session seq, or the DELIVER stream sequence on a
    user stream. ``prev`` is the stream sequence of the previous message on the same subject
    (0: unknown). ``frame`` and ``wire``: what the hub's encoder made of it (``wire`` only on
    live events: ledger reads are each socket's own, and many sockets write text).
    """

    stream_seq: int
    prev: int
    frame: str
    wire: bytes | None = None
    partial: bool = False  # more events of the same stored message (a commit) follow

    @property
    def next_pos(self) -> int:
        """Where a ledger read resumes once this event was taken: the next message, or this
        one again while the rest of its commit is still to come (the seqs dedup the re-read)."""
        return self.stream_seq if self.partial else self.stream_seq + 1


def _decode(
    data: bytes,
    stream_seq: int,
    prev: int,
    by_stream_seq: bool,
    encode: FrameEncoder,
    *,
    live: bool = False,
) -> list[LiveEvent]:
    """The events of one stored message, in order: one on a DELIVER stream (positioned by
    stream sequence), one or more on the session ledger (a commit of one command's events, or
    an older single event). Malformed events are left out (they have no place in the order)."""
    try:
        raws = [data] if by_stream_seq else ledger_raw_events(data)
    except BadRequest:
        return []
    events: list[LiveEvent] = []
    for n, raw in enumerate(raws):
        try:
            envelope = _decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        seq = stream_seq if by_stream_seq else envelope.seq
        if seq is None:
            continue
        frame, wire = encode(seq, raw, live)
        events.append(
            LiveEvent(
                seq=seq,
                envelope=envelope,
                raw=raw,
                stream_seq=stream_seq,
                prev=prev,
                frame=frame,
                wire=wire,
                partial=n < len(raws) - 1,
            )
        )
    return events


def _header_int(msg: Msg, name: str) -> int | None:
    value = (msg.headers or {}).get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class Tap:
    """One socket's view of a shared subscription: a bounded buffer of live events.

    While the socket's feed waits (caught up), ``sink`` takes events straight from the
    subscription's callback (no task wakes up per event); what it refuses is buffered and wakes
    the feed. The buffer and the waiter exist only when needed: an idle socket holds neither.
    """

    __slots__ = ("buffer", "limit", "max_bytes", "sink", "size", "stale", "subject", "waiter")

    def __init__(self, subject: str, limit: int, max_bytes: int) -> None:
        self.subject = subject
        self.limit = limit
        self.max_bytes = max_bytes
        self.size = 0  # bytes of the buffered frames (shared objects, but a slow socket pins them)
        self.buffer: deque[LiveEvent] | None = None
        self.stale = False  # events were dropped (overflow, reconnect): catch up from the ledger
        self.sink: Callable[[LiveEvent], bool] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: LiveEvent) -> None:
        buffer = self.buffer
        if not buffer:
            sink = self.sink
            if sink is not None and not self.stale and sink(event):
                return
            if buffer is None:
                buffer = self.buffer = deque()
        elif len(buffer) >= self.limit or self.size + len(event.frame) > self.max_bytes:
            buffer.clear()
            self.size = 0
            if not self.stale:
                metrics.CATCH_UPS.labels("overflow").inc()
            self.stale = True
        buffer.append(event)
        self.size += len(event.frame)
        self.wake()

    def peek(self) -> LiveEvent | None:
        return self.buffer[0] if self.buffer else None

    def pop(self) -> None:
        assert self.buffer is not None
        self.size -= len(self.buffer.popleft().frame)

    def mark_stale(self) -> None:
        self.stale = True
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, sink: Callable[[LiveEvent], bool] | None) -> None:
        """Until an event is buffered or the tap is woken; ``sink`` takes events meanwhile."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.sink = sink
        try:
            await self.waiter
        finally:
            self.sink = None
            self.waiter = None


class LiveHub:
    """The gateway's live subscriptions: one per followed subject, shared by its sockets."""

    def __init__(
        self,
        nc: NATS,
        *,
        encode: FrameEncoder,
        buffer: int = 1024,
        buffer_bytes: int = 1 << 20,
        by_stream_seq: Iterable[str] = (),
    ) -> None:
        self._nc = nc
        self.encode = encode
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._by_stream_seq = tuple(by_stream_seq)  # subject prefixes positioned by stream seq
        self._taps: dict[str, set[Tap]] = {}
        self._subs: dict[str, Subscription] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        metrics.LIVE_SUBSCRIPTIONS.set_function(self.subscriptions)

    async def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_reconnects())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for sub in list(self._subs.values()):
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        self._subs.clear()
        for taps in self._taps.values():
            for tap in taps:
                tap.mark_stale()
        self._taps.clear()

    def subscriptions(self) -> int:
        """Subjects this gateway follows (one core subscription each)."""
        return len(self._subs)

    async def _watch_reconnects(self) -> None:
        # Core NATS may lose messages across a reconnect: every tap catches up from the ledger.
        seen = self._nc.stats.get("reconnects", 0)
        while True:
            await asyncio.sleep(0.25)
            now = self._nc.stats.get("reconnects", 0)
            if now != seen:
                seen = now
                for taps in self._taps.values():
                    metrics.CATCH_UPS.labels("reconnect").inc(len(taps))
                    for tap in taps:
                        tap.mark_stale()

    async def attach(self, subject: str) -> Tap:
        """A tap on ``subject``; the subscription exists (server-side) when this returns."""
        tap = Tap(subject, self._buffer, self._buffer_bytes)
        self._taps.setdefault(subject, set()).add(tap)
        try:
            while subject not in self._subs:
                pending = self._subscribing.get(subject)
                if pending is not None:
                    await asyncio.shield(pending)
                    continue
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._subscribing[subject] = future
                try:
                    self._subs[subject] = await self._subscribe(subject)
                    future.set_result(None)
                except BaseException as exc:
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters re-raise it themselves
                    raise
                finally:
                    self._subscribing.pop(subject, None)
            # The ledger is read after this: make sure the server knows the interest by then.
            await self._nc.flush(timeout=5)
        except BaseException as exc:
            await self.detach(tap)
            if isinstance(exc, NatsError | TimeoutError | NatsTimeout):
                raise Unavailable(f"cannot follow {subject}: {exc}") from exc
            raise
        return tap

    async def detach(self, tap: Tap) -> None:
        taps = self._taps.get(tap.subject)
        if taps is None:
            return
        taps.discard(tap)
        if taps:
            return
        del self._taps[tap.subject]
        sub = self._subs.pop(tap.subject, None)
        if sub is not None:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _subscribe(self, subject: str) -> Subscription:
        by_stream_seq = subject.startswith(self._by_stream_seq) if self._by_stream_seq else False

        async def on_msg(msg: Msg) -> None:
            taps = self._taps.get(subject)
            if not taps:
                return
            stream_seq = _header_int(msg, SEQUENCE_HEADER)
            if stream_seq is None:
                return  # not a re-published stored message
            events = _decode(
                msg.data,
                stream_seq,
                _header_int(msg, LAST_SEQUENCE_HEADER) or 0,
                by_stream_seq,
                self.encode,
                live=True,
            )
            if not events:
                # Malformed: it has no place in the order; the feeds skip it in the ledger too.
                log.warning("skipping malformed live event on %s", msg.subject)
                return
            metrics.LIVE_EVENTS.inc(len(events))
            # The event's trace (prompt -> session -> here) ends with its delivery to sockets.
            with start_span("gateway.deliver", msg.headers, **{"shoal.sockets": len(taps)}):
                for event in events:
                    for tap in taps:
                        try:
                            tap.push(event)  # may write to the socket (Tap.sink)
                        except Exception:  # one socket's failure must not cost the others it
                            log.exception("live delivery to a socket failed")

        # The callback only hands references to the taps: it cannot fall behind for long.
        return await self._nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000)


class LedgerReader:
    """Batched direct gets from one stream (``allow_direct``): no consumer, no state."""

    def __init__(
        self, nc: NATS, stream: str, *, timeout: float, batch: int = 256, max_bytes: int = 1 << 20
    ) -> None:
        self._nc = nc
        self._api = f"$JS.API.DIRECT.GET.{stream}"
        self._timeout = timeout
        self._batch = batch
        self._max_bytes = max_bytes

    async def read(self, subject: str, start: int) -> tuple[list[Msg], bool]:
        """Messages on ``subject`` from stream sequence ``start`` on (one batch), and whether
        that reached the ledger's end."""
        request = {
            "seq": max(start, 1),
            "next_by_subj": subject,
            "batch": self._batch,
            "max_bytes": self._max_bytes,
        }
        msgs, status = await self._direct_get(request, batch=True)
        if status == "404":
            return msgs, True
        if status not in (None, "204"):
            raise Unavailable(f"ledger read failed: status {status}")
        pending = _header_int(msgs[-1], NUM_PENDING_HEADER) if msgs else 0
        at_end = pending == 0 if pending is not None else len(msgs) < self._batch
        return msgs, at_end

    async def last(self, subject: str) -> Msg | None:
        """The last message on ``subject`` (wildcards allowed), or None."""
        msgs, status = await self._direct_get({"last_by_subj": subject}, batch=False)
        if status == "404":
            return None
        if status is not None or not msgs:
            raise Unavailable(f"ledger read failed: status {status}")
        return msgs[0]

    async def _direct_get(
        self, request: dict[str, object], *, batch: bool
    ) -> tuple[list[Msg], str | None]:
        """The messages of one direct get and the status that ended it (None: a single answer).

        Cancellation-safe: each wait is bounded by ``asyncio.timeout`` around an unbounded
        ``next_msg``. (``next_msg(timeout=…)`` and ``request(timeout=…)`` use ``wait_for``,
        which on Python 3.11 returns the result instead of raising when the cancellation
        arrives as a message does: the caller's cancel is lost, and a socket's pump canceled
        mid-replay would live on and hold back the socket's close.)
        """
        inbox = self._nc.new_inbox()
        msgs: list[Msg] = []
        try:
            sub = await self._nc.subscribe(inbox)
            try:
                await self._nc.publish(self._api, msgspec.json.encode(request), reply=inbox)
                while True:
                    async with asyncio.timeout(self._timeout):
                        msg = await sub.next_msg(timeout=None)
                    status = (msg.headers or {}).get("Status")
                    if status is not None:
                        return msgs, status
                    msgs.append(msg)
                    if not batch:
                        return msgs, None
            finally:
                with contextlib.suppress(NatsError):
                    await sub.unsubscribe()
        except (NatsError, NatsTimeout, TimeoutError) as exc:
            raise Unavailable(f"cannot read the ledger: {exc}") from exc


class LiveFeed:
    """One socket's events: ledger replay, then the shared live tap, repaired from the ledger.

    ``last``: the position already delivered (``since``); ``pos``: the stream sequence the
    ledger is read from next. ``contiguous``: positions are session seqs (a jump means
    something is missing); else DELIVER positions, checked by ``Nats-Last-Sequence``.
    ``event_type``: return only events of that type (positions still advance over the rest).
    """

    def __init__(
        self,
        hub: LiveHub,
        reader: LedgerReader,
        tap: Tap,
        ledger: str,
        *,
        last: int,
        pos: int,
        replay: bool,
        contiguous: bool,
        event_type: str | None = None,
    ) -> None:
        self._hub = hub
        self._reader = reader
        self._tap: Tap | None = tap
        self._ledger = ledger
        self._last = last
        self._pos = pos
        self._replaying = replay
        self._contiguous = contiguous
        self._type = event_type
        self._pending: deque[LiveEvent] | None = None  # ledger reads not returned yet
        self._repaired_at = -1  # the stream seq of the live event a repair was last made for
        self._held: LiveEvent | None = None  # returned after the Gap that came out before it
        self._sink: Callable[[LiveEvent], bool] | None = None
        self._offer_live: Callable[[LiveEvent], bool] | None = None

    @classmethod
    async def open(
        cls,
        hub: LiveHub,
        reader: LedgerReader,
        *,
        live: str,
        ledger: str,
        last: int,
        pos: int | None,
        contiguous: bool = True,
        event_type: str | None = None,
    ) -> LiveFeed:
        """Attach to ``live`` first, then (``pos`` None: "new only") read the ledger's tip."""
        tap = await hub.attach(live)
        try:
            replay = pos is not None
            if pos is None:
                tip = await reader.last(ledger)
                if tip is not None:
                    stream_seq = _header_int(tip, SEQUENCE_HEADER) or 0
                    events = _decode(tip.data, stream_seq, 0, not contiguous, hub.encode)
                    last = events[-1].seq if events else last
                    pos = stream_seq + 1
                else:
                    pos = 1
        except BaseException:
            await hub.detach(tap)
            raise
        return cls(
            hub,
            reader,
            tap,
            ledger,
            last=last,
            pos=pos,
            replay=replay,
            contiguous=contiguous,
            event_type=event_type,
        )

    def deliver_to(self, sink: Callable[[LiveEvent], bool]) -> None:
        """While :meth:`next` waits with nothing pending (caught up), hand each live event that
        is next in order to ``sink`` from the subscription's callback instead of waking the
        caller. ``sink`` returns whether it took the event; what it refuses (or anything out of
        order: a jump to repair, a stale tap) comes out of :meth:`next` as usual. The feed's
        position has advanced past what ``sink`` took."""
        self._sink = sink
        self._offer_live = self._offer

    def _offer(self, event: LiveEvent) -> bool:
        if event.seq <= self._last:
            return True  # replayed already, or a copy: nothing to deliver
        if self._pending or self._replaying or self._missing_before(event):
            return False
        wanted = self._type is None or event.envelope.type == self._type
        if wanted and self._sink is not None and not self._sink(event):
            return False
        self._last = event.seq
        self._pos = max(self._pos, event.next_pos)
        return True

    def _missing_before(self, event: LiveEvent) -> bool:
        if self._contiguous:
            return event.seq > self._last + 1
        return event.prev >= self._pos

    async def _read_ledger(self) -> None:
        metrics.LEDGER_READS.inc()
        msgs, at_end = await self._reader.read(self._ledger, self._pos)
        if self._pending is None:
            self._pending = deque()
        for msg in msgs:
            stream_seq = _header_int(msg, SEQUENCE_HEADER)
            if stream_seq is None:
                continue
            self._pos = max(self._pos, stream_seq + 1)
            events = _decode(msg.data, stream_seq, 0, not self._contiguous, self._hub.encode)
            if not events:
                log.warning("skipping malformed event on %s", msg.subject)
                continue
            self._pending.extend(events)
        if at_end or not msgs:
            self._replaying = False

    def _take(self, event: LiveEvent) -> SessionEventMsg | Gap | None:
        """Advance past ``event``; what the socket gets now. Positions skipped on a contiguous
        feed come first, as a :class:`Gap`, and the event is held for the next call."""
        last = self._last
        if event.seq <= last:
            return None
        self._last = event.seq
        self._pos = max(self._pos, event.next_pos)
        wanted = self._type is None or event.envelope.type == self._type
        if self._contiguous and event.seq > last + 1:
            self._held = event if wanted else None
            return Gap(last + 1, event.seq - 1)
        return event if wanted else None

    async def next(self) -> SessionEventMsg | Gap:
        """The next event in order, or the positions the ledger lost before it."""
        held = self._held
        if held is not None:
            self._held = None
            return held
        while True:
            if self._pending:
                taken = self._take(self._pending.popleft())
                if taken is not None:
                    return taken
                continue
            tap = self._tap
            if tap is None:
                raise Unavailable("the feed is closed")
            if tap.stale:
                tap.stale = False
                self._replaying = True
            if self._replaying:
                await self._read_ledger()
                continue
            live = tap.peek()
            if live is None:
                self._pending = None  # drained: an idle socket keeps no buffer
                await tap.wait(self._offer_live)
                continue
            event = live
            if event.seq <= self._last:
                tap.pop()  # replayed already, or a copy
                continue
            if self._missing_before(event) and self._repaired_at != event.stream_seq:
                # Core NATS lost something (or the replay ended early): read the ledger up to
                # here first. If it still is not there, retention took it: the socket says gap.
                self._repaired_at = event.stream_seq
                self._replaying = True
                metrics.REPAIRS.inc()
                continue
            tap.pop()
            taken = self._take(event)
            if taken is not None:
                return taken

    async def close(self) -> None:
        tap, self._tap = self._tap, None
        if tap is not None:
            await self._hub.detach(tap)
            tap.wake()
