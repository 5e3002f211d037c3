"""The edge: turn one NATS message into a call of the rules, commit its effects, then ack.

Order of effects for one command, and why it is safe (DESIGN §3.3)::

    1. compute (new_state, events) = apply(old_state, command, stream_seq)    pure
    2. append the events as one commit (one message: ``shoal.common.messaging.ledger``),
       Nats-Msg-Id = its first event's id "<session>:<stream_seq>:<n>", carrying the command,
       expected right after the session's previous ledger message (the ledger fence, below)
    3. lazy snapshots (default): the reply and the ack follow; the snapshot is CAS-written
       right after, off the hot path. Eager, or a commit that could not carry its command:
       CAS-write new_state (applied_seq = stream_seq, ledger_seq = the commit's sequence) on
       the revision we read (the state fence) before going on
    4. set and cancel the session's durable timers: the difference between the timers the
       old and the new state want (service.timers_for), through the scheduler's RPCs
    5. reply on Shoal-Reply-To, then ack the command

- Crash before 2: nothing is written; the command comes back, is applied to the same old
  state, and yields the same events with the same ids.
- Crash after 2: the ledger holds the command. With lazy snapshots the session is recovered as
  its snapshot plus ``service.replay`` of the commands recorded after the snapshot's
  ``ledger_seq``, so the redelivered command is ``already_applied``; in eager mode (the bucket
  alone is read) its re-run finds its own commit at the ledger's tip and goes on from there.
- Crash between 3 and 5: the command comes back with stream_seq <= applied_seq; apply says
  ``already_applied``, its events are in the ledger since step 2, so we re-set every timer the
  state wants (setting is replace-by-id), answer and ack. A timer RPC that fails is retried
  like any other I/O of the command (the same path: the state is read again, the command is
  already applied, its timers are set again), so a timer is never lost; a cancel that never
  happened only leaves a firing that the rules ignore (the state no longer wants it).

Fencing — why a stale owner can land nothing. Publishing before the state write needs nothing
but determinism, but alone it would let a paused ex-owner append events before its CAS fails.
So step 2 is fenced too: the commit carries ``Nats-Expected-Last-Subject-Sequence`` with
``Nats-Expected-Last-Subject-Sequence-Subject = <prefix>.session.evt.<session>.>`` (server
2.11+), i.e. "the session's ledger still ends where my state says". Every committed state
change appends a commit, so a newer owner that wrote the session has moved the ledger, and the
stale writer's publish fails before anything lands. The two checks are on two resources, so
consider who wins each:

- The stale writer re-runs a command the new owner also runs, from the same state: the
  commits are identical (pure rules, ids from the command), whichever lands first the other's
  copy is recognised as the tip, and at most one CAS wins. The ledger holds the events once.
- The stale writer runs a command from an older state than the new owner's: its expected
  sequence is behind the tip and the tip is not its commit: ``Fenced``, nothing lands.
- The new owner has not touched the session yet: the stale writer's append succeeds — a
  legitimate, in-order write (it applied the next command to the latest state); the new owner
  later reads it (replay) and skips the command as applied.

Creation, hibernation and termination write the snapshot before the reply in both modes
(the gateway, runner auth and the next lane read the bucket). A command whose events and
command do not fit in one message (contents of hundreds of KiB) is split over several commits
and/or written without its command (``EventLedger.publish``); its snapshot is then written
before the reply, as in eager mode, since a replay could not rebuild it.

A fenced write (either check) is counted in ``shoal_session_fenced_writes_total`` and raised:
the worker drops the whole partition at once, unacked, because every cached snapshot of it is
suspect; its next owner (this replica again, if the lease is still ours to re-grant) starts a
fresh consumer from the ack floor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from shoal.common.clock import iso
from shoal.common.contracts import SessionSnapshot, Status, tags_header
from shoal.common.errors import BadRequest, Fenced, NotFound, ShoalError
from shoal.common.messaging import (
    REPLY_TO_HEADER,
    Envelope,
    Subjects,
    decode,
    ledger_events,
    partition,
)
from shoal.common.observability import inject_trace, start_span
from shoal.session import metrics
from shoal.session.listing import parse_sessions_query, sessions_page
from shoal.session.service import (
    Result,
    apply,
    error_reply,
    messages_page,
    parse_messages_query,
    parse_session_query,
    replay,
    session_introspection,
    timer_changes,
    timer_command,
)
from shoal.session.store import (
    EventLedger,
    HistoryStore,
    LeaseStore,
    PartitionConsumers,
    Replier,
    SchedulerTimers,
    StateStore,
    command_headers,
)

log = logging.getLogger(__name__)

# Back-off between attempts of a command whose I/O failed (NATS reconnecting, timeouts), s.
_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


Loader = Callable[[str], Awaitable[tuple[SessionSnapshot | None, int]]]


class SessionCache:
    """A lane's view of its session: its latest state and the KV revision of its snapshot.

    Valid because this replica is the session's only writer; any doubt (a lost CAS, an I/O
    error) drops it and the next attempt reads the bucket (and the ledger's tail) again.
    ``dirty``: the state is ahead of the snapshot in the bucket (lazy snapshots).
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.state: SessionSnapshot | None = None
        self.revision = 0
        self.loaded = False
        self.dirty = False

    async def get(self, load: Loader) -> tuple[SessionSnapshot | None, int]:
        if not self.loaded:
            self.state, self.revision = await load(self.session_id)
            self.loaded = True
        return self.state, self.revision

    def remember(self, state: SessionSnapshot | None, revision: int) -> None:
        self.state, self.revision, self.loaded, self.dirty = state, revision, True, False

    def advance(self, state: SessionSnapshot) -> None:
        """A state committed to the ledger but not yet to the bucket (revision unchanged)."""
        if self.loaded:
            self.state, self.dirty = state, True

    def forget(self) -> None:
        self.state, self.revision, self.loaded, self.dirty = None, 0, False, False

    @property
    def dormant(self) -> bool:
        """Hibernated or terminated: nothing will happen until a command comes, so the lane
        may go now (the next command reads the state from the bucket again)."""
        return self.state is not None and self.state.status in (
            Status.HIBERNATED,
            Status.TERMINATED,
        )


class SnapshotWriter:
    """Writes lazily kept snapshots to the bucket off the hot path.

    At most one write in flight per session; each writes the session's newest state, and
    another follows if the state moved meanwhile. A write that fails (a lost CAS: someone
    wrote the key since; or I/O) drops the cache: the next command recovers the session from
    the bucket and the ledger, which holds every committed command either way.
    """

    def __init__(self, states: StateStore) -> None:
        self._states = states
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def schedule(self, cache: SessionCache) -> None:
        if cache.session_id not in self._in_flight:
            self._in_flight[cache.session_id] = asyncio.create_task(
                self._write(cache), name=f"snapshot:{cache.session_id}"
            )

    async def settled(self, session_id: str) -> None:
        """Wait for the session's write in flight, if any (before reading or writing its key)."""
        task = self._in_flight.get(session_id)
        if task is not None:
            await asyncio.wait({task})

    async def settle_all(self) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight.values()))

    async def _write(self, cache: SessionCache) -> None:
        try:
            while cache.dirty and cache.loaded and cache.state is not None:
                state, revision = cache.state, cache.revision
                cache.dirty = False
                try:
                    written = await self._states.save(state, revision)
                except Exception as exc:
                    metrics.SNAPSHOT_WRITES.labels(
                        "lost" if isinstance(exc, Fenced) else "failed"
                    ).inc()
                    log.info(
                        "lazy snapshot not written: %r",
                        exc,
                        extra={"session_id": cache.session_id, "expected_revision": revision},
                    )
                    cache.forget()
                    return
                metrics.SNAPSHOT_WRITES.labels("written").inc()
                if cache.loaded and cache.revision == revision:
                    cache.revision = written
        finally:
            self._in_flight.pop(cache.session_id, None)


class CommandHandler:
    """Handles one command message of a session lane, from decode to ack."""

    def __init__(
        self,
        states: StateStore,
        ledger: EventLedger,
        replier: Replier,
        timers: SchedulerTimers | None,
        subjects: Subjects,
        *,
        lazy_snapshots: bool = False,
    ) -> None:
        self._states = states
        self._ledger = ledger
        self._replier = replier
        self._timers = timers  # None: no scheduler in this deployment (timers never fire)
        self._subjects = subjects
        self._stopping = False
        self._lazy = lazy_snapshots
        self.snapshots = SnapshotWriter(states)

    async def load(self, session_id: str) -> tuple[SessionSnapshot | None, int]:
        """The session's state and its snapshot's KV revision: with lazy snapshots, the
        snapshot plus the ledger's commands after it (``service.replay``)."""
        if not self._lazy:
            return await self._states.load(session_id)
        await self.snapshots.settled(session_id)
        snapshot, revision = await self._states.load(session_id)
        after = snapshot.ledger_seq if snapshot is not None else 0
        tail = await self._ledger.commands_after(session_id, after)
        return replay(snapshot, tail), revision

    def stop_retrying(self) -> None:
        """At shutdown: a command whose I/O fails is left unacked instead of retried."""
        self._stopping = True

    async def handle(self, cache: SessionCache, msg: Msg) -> None:
        """Commit one command and ack it. Raises :class:`Fenced` (counted, not acked) when
        another writer owns the session now: the caller must drop the partition."""
        started = time.perf_counter()
        headers = dict(msg.headers or {})
        inbox = headers.get(REPLY_TO_HEADER)
        stream_seq = int(msg.metadata.sequence.stream)
        try:
            command = decode(msg.data)
            if command.subject != cache.session_id:
                raise BadRequest(
                    "envelope subject does not match the command subject",
                    detail={"subject": command.subject, "session_id": cache.session_id},
                )
        except BadRequest as exc:
            # Never retried: a malformed command cannot get better. Logged, answered, acked.
            log.warning(
                "malformed command",
                extra={"session_id": cache.session_id, "stream_seq": stream_seq, "error": str(exc)},
            )
            metrics.COMMANDS.labels("other", "malformed").inc()
            await self._answer(inbox, error_reply(exc))
            await msg.ack()
            return

        label = metrics.command_label(command.type)
        with start_span(
            "session.apply", headers, session_id=cache.session_id, command_type=command.type
        ):
            trace_headers = inject_trace({})
            result = await self._commit_with_retries(cache, msg, command, stream_seq, trace_headers)
        if result is None:
            return  # shutting down mid-retry: left unacked, it comes back to the next owner
        await self._answer(inbox, result.reply)
        await msg.ack()
        metrics.COMMANDS.labels(label, _outcome(result)).inc()
        metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        if result.error is not None:
            log.info(
                "command rejected",
                extra={
                    "session_id": cache.session_id,
                    "command_type": command.type,
                    "code": result.error.code,
                },
            )

    async def _commit_with_retries(
        self,
        cache: SessionCache,
        msg: Msg,
        command: Envelope,
        stream_seq: int,
        trace_headers: dict[str, str],
    ) -> Result | None:
        failures = 0
        while True:
            try:
                return await self._commit(cache, command, stream_seq, trace_headers)
            except Fenced as exc:
                metrics.FENCED_WRITES.labels(str(exc.detail.get("fence", "state"))).inc()
                log.warning(
                    "write fenced; dropping the partition",
                    extra={
                        "session_id": cache.session_id,
                        "stream_seq": stream_seq,
                        "detail": exc.detail,
                    },
                )
                cache.forget()
                raise
            except _ApplyFailed as exc:
                # A bug in the rules, not a bad command (those are replies). Retrying gives the
                # same result, so the message is terminated rather than redelivered forever.
                log.error(
                    "command handler failed; terminating the message",
                    exc_info=exc.__cause__,
                    extra={"session_id": cache.session_id, "stream_seq": stream_seq},
                )
                metrics.COMMANDS.labels(metrics.command_label(command.type), "failed").inc()
                await self._answer(
                    msg.headers.get(REPLY_TO_HEADER) if msg.headers else None,
                    error_reply(ShoalError("the session could not apply this command")),
                )
                await msg.term()
                return None
            except Exception as exc:  # NATS I/O: publish, KV read or write
                cache.forget()  # a timed-out write may still have landed: read again
                metrics.IO_RETRIES.inc()
                if self._stopping:
                    log.warning(
                        "giving up on a command at shutdown (it will be redelivered)",
                        extra={"session_id": cache.session_id, "error": repr(exc)},
                    )
                    return None
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
                failures += 1
                log.warning(
                    "command I/O failed; retrying: %r",
                    exc,
                    extra={"session_id": cache.session_id, "error": repr(exc), "delay_s": delay},
                )
                # Keep the command ours while we retry: without this the server would
                # redeliver it after ack_wait while a later command of the session waits.
                try:
                    await msg.in_progress()
                except Exception:
                    log.debug("in_progress failed", exc_info=True)
                await asyncio.sleep(delay)

    async def _commit(
        self,
        cache: SessionCache,
        command: Envelope,
        stream_seq: int,
        trace_headers: dict[str, str],
    ) -> Result:
        state, revision = await cache.get(self.load)
        try:
            result = apply(state, command, stream_seq)
        except Exception as exc:
            raise _ApplyFailed from exc
        if result.changed:
            assert result.new_state is not None
            new_state = result.new_state
            recorded = False
            if result.events:
                appended = await self._ledger.publish(
                    result.events,
                    {**trace_headers, **tags_header(new_state.tags)},
                    after=state.ledger_seq if state is not None else 0,
                    command=command_headers(command, stream_seq),
                )
                new_state = msgspec.structs.replace(new_state, ledger_seq=appended.seq)
                recorded = appended.recorded
            if self._lazy and recorded and _lazy_snapshot_ok(state, new_state):
                cache.advance(new_state)
                self.snapshots.schedule(cache)
            else:
                revision = await self._save_now(cache, new_state, revision)
                cache.remember(new_state, revision)
            await self._sync_timers(state, new_state, command)
            return dataclasses.replace(result, new_state=new_state)
        if result.already_applied:
            await self._sync_timers(None, state)
            if self._lazy and state is not None:
                # Recovered from the ledger: the bucket may trail it (its writer was killed).
                cache.advance(state)
                self.snapshots.schedule(cache)
        return result

    async def _save_now(self, cache: SessionCache, state: SessionSnapshot, revision: int) -> int:
        if self._lazy:
            # A lazy write in flight moves the revision: wait for it, then write on top.
            await self.snapshots.settled(cache.session_id)
            if not cache.loaded:
                raise _CacheDropped("the session's snapshot write failed; recovering")
            revision = cache.revision
        return await self._states.save(state, revision)

    async def _sync_timers(
        self,
        old: SessionSnapshot | None,
        new: SessionSnapshot | None,
        command: Envelope | None = None,
    ) -> None:
        if self._timers is None or new is None:
            return
        to_set, to_cancel = timer_changes(old, new, command)
        if not to_set and not to_cancel:
            return
        subject = self._subjects.session_command(new.id)
        timers = self._timers
        await asyncio.gather(
            *(
                timers.set(
                    spec.id, spec.fire_at, subject, msgspec.to_builtins(timer_command(new, spec))
                )
                for spec in to_set
            ),
            *(timers.cancel(timer_id) for timer_id in to_cancel),
        )
        metrics.TIMER_CALLS.labels("set").inc(len(to_set))
        metrics.TIMER_CALLS.labels("cancel").inc(len(to_cancel))

    async def _answer(self, inbox: str | None, body: dict[str, Any]) -> None:
        if not inbox:
            return
        try:
            await self._replier.reply(inbox, body)
        except Exception:  # the caller may be gone; the command is committed either way
            log.warning("could not answer %s", inbox, exc_info=True)


class _ApplyFailed(Exception):
    pass


class _CacheDropped(Exception):
    """Retried like I/O: the command is run again on the recovered state."""


def _lazy_snapshot_ok(old: SessionSnapshot | None, new: SessionSnapshot) -> bool:
    """Whether the snapshot may follow the reply: not when the session is created (the
    gateway and runners read the bucket at once), nor when it goes dormant (its lane leaves)."""
    return old is not None and new.status not in (Status.HIBERNATED, Status.TERMINATED)


def _outcome(result: Result) -> str:
    if result.already_applied:
        return "redelivered"
    if result.error is not None:
        return "rejected"
    return "applied"


class ProjectionHandler:
    """Writes a batch of ledger events into PostgreSQL, then acks them."""

    def __init__(self, history: HistoryStore) -> None:
        self._history = history

    async def handle(self, msgs: list[Msg]) -> None:
        events: list[Envelope] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                events.extend(ledger_events(msg.data))  # a commit, or an older single event
                good.append(msg)
            except BadRequest:
                log.warning("malformed event on %s; skipped", msg.subject)
                metrics.PROJECTED.labels("malformed").inc()
                await msg.term()
        try:
            await self._history.project(events)
        except Exception:
            log.warning("projection write failed; events will come back", exc_info=True)
            metrics.PROJECTED.labels("failed").inc(len(events))
            for msg in good:
                await msg.nak(delay=1.0)
            return
        for msg in good:
            await msg.ack()
        metrics.PROJECTED.labels("written").inc(len(events))


class MessagesRpc:
    """``rpc("session", "messages")``: a page of a session's history from PostgreSQL.

    The projection follows the ledger asynchronously, so a message committed a few
    milliseconds ago may not be in the page yet; the event stream is the source of truth.
    """

    def __init__(self, history: HistoryStore) -> None:
        self._history = history

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        query = parse_messages_query(body)
        rows = await self._history.messages(query.session_id, query.after, query.limit + 1)
        page, next_cursor = messages_page(rows, query.limit)
        return {
            "messages": [
                {
                    "id": r.id,
                    "prompt_id": r.prompt_id,
                    "role": r.role,
                    "content": r.content,
                    "created_at": r.created_at,
                    "seq": r.seq,
                }
                for r in page
            ],
            "next": next_cursor,
        }


class SessionsRpc:
    """``rpc("session", "list")``: a page of the session index from PostgreSQL, newest first.

    Like the history, the index follows the ledger asynchronously: a session created a few
    milliseconds ago may be missing from the first page, and its status may lag its state.
    """

    def __init__(self, history: HistoryStore) -> None:
        self._history = history

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        query = parse_sessions_query(body)
        rows = await self._history.list_sessions(
            query.owner, query.status, query.before, query.limit + 1
        )
        page, next_cursor = sessions_page(rows, query.limit)
        return {
            "sessions": [
                {
                    "id": r.id,
                    "owner": r.owner,
                    "status": r.status,
                    "tags": r.tags,
                    "created_at": iso(r.created_at.timestamp()),
                    "updated_at": iso(r.updated_at.timestamp()),
                }
                for r in page
            ],
            "next": next_cursor,
        }


class AdminRpc:
    """``rpc("session", "admin.partitions")`` and ``rpc("session", "admin.session")``:
    who owns what, under which epoch, how far behind (docs/CONTRACTS.md). Any replica answers;
    everything is read from the buckets and the stream, not from this replica's memory."""

    def __init__(
        self,
        states: StateStore,
        leases: LeaseStore,
        consumers: PartitionConsumers,
        partitions: int,
    ) -> None:
        self._states = states
        self._leases = leases
        self._consumers = consumers
        self._partitions = partitions

    async def partitions(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        records = await self._leases.read_all(self._partitions)

        async def row(p: int) -> dict[str, Any]:
            record = records[p]
            lag = await self._consumers.lag(p, record.epoch) if record.value else None
            return {
                "partition": p,
                "owner": record.value.owner if record.value else None,
                "epoch": record.epoch if record.value else None,
                "lease_revision": record.revision if record.value else None,
                "lag": lag[0] if lag else None,
                "in_flight": lag[1] if lag else None,
            }

        return list(await asyncio.gather(*(row(p) for p in range(self._partitions))))

    async def session(self, body: dict[str, Any]) -> dict[str, Any]:
        query = parse_session_query(body)
        state, revision = await self._states.load(query.session_id)
        if state is None:
            raise NotFound("session not found", detail={"session_id": query.session_id})
        p = partition(query.session_id, self._partitions)
        lease = await self._leases.read(p)
        return session_introspection(state, revision, p, lease.value, lease.epoch)
