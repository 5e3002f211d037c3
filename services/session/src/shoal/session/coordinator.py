"""Membership and partition leases: which partitions this replica holds, granted and handed off.

Every ``renew_interval`` (default 1 s) the coordinator

1. heartbeats this replica's key in the members bucket (``Nats-TTL`` = ``member_ttl``) and
   reads the live members (an expired heartbeat leaves a ``MaxAge`` marker: gone);
2. computes its target partitions by rendezvous hashing over them (``ownership.targets``; or
   the static ``p % n == i`` rule when ``SHOAL_PARTITION_ASSIGNMENT=static``);
3. renews every lease it holds — a compare-and-set on the lease's revision with a fresh
   ``Nats-TTL`` (``lease_ttl``) — in a loop of its own, also every ``renew_interval``, so a
   members bucket that does not answer (its stream leader moving) never holds renewals up.
   A renewal that loses its CAS means someone else holds it now: the partition is dropped at
   once. A renewal that fails on I/O (a timeout, no responders while the leases stream elects
   a leader) is retried every ``_RENEW_RETRY_S`` while the lease's local deadline
   (``ownership.HeldLease.valid``) holds; the deadline stops the partition if none lands. A
   renewal that timed out may have been stored all the same: when a later one then loses its
   CAS, the key is read, and if it holds this replica's own value (owner, token, epoch) its
   revision is adopted, trusted from the earliest unconfirmed attempt's send time;
4. hands off held partitions that are no longer targets — **drain, then release**: stop
   fetching, finish the lanes, delete the lease by CAS — so the new owner, whose grant needs
   the key free, starts from the ack floor after the last of our commits;
5. acquires free leases of target partitions (a CAS write expecting the key's current
   revision: a free key is absent, deleted or a TTL marker) and starts them.

SIGTERM (``stop``): leave the members bucket first, so the others retarget at once, then hand
off every partition the same way (renewing meanwhile, however long the drain), and return.

Example::

    coordinator = Coordinator(settings, worker, leases, members, consumers, SystemClock())
    await coordinator.start()        # first tick done: free target partitions are running
    await coordinator.stop(grace)    # every partition drained and released
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import msgspec

from shoal.common.clock import Clock, iso
from shoal.session import metrics
from shoal.session.config import SessionSettings
from shoal.session.ownership import HeldLease, targets
from shoal.session.store import LeaseStore, LeaseValue, MemberStore, PartitionConsumers
from shoal.session.worker import CommandWorker

log = logging.getLogger(__name__)

_RENEW_RETRY_S = 0.2  # between the attempts of a renewal that failed on I/O


class MemberValue(msgspec.Struct, kw_only=True):
    """What a replica publishes about itself in the members bucket."""

    member: str
    token: str
    started_at: str


class Coordinator:
    """Holds this replica's partition leases and tells the worker what to run."""

    def __init__(
        self,
        settings: SessionSettings,
        worker: CommandWorker,
        leases: LeaseStore,
        members: MemberStore,
        consumers: PartitionConsumers,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._worker = worker
        self._leases = leases
        self._members = members
        self._consumers = consumers
        self._clock = clock
        self.member_id = settings.member_id
        # A restarted replica with the same name is a different holder.
        self.token = secrets.token_hex(6)
        self._lease_ttl = int(settings.lease_ttl.total_seconds())
        self._member_ttl = int(settings.member_ttl.total_seconds())
        self._interval = settings.renew_interval.total_seconds()
        self._member_value = msgspec.json.encode(
            MemberValue(member=self.member_id, token=self.token, started_at=iso(clock.now()))
        )
        self._live: list[str] = [self.member_id]
        self._handoffs: dict[int, asyncio.Task[None]] = {}
        self._lease_lock = asyncio.Lock()  # renewals and releases never race on a revision
        # Partitions whose last renewal attempt failed on I/O and may have been stored anyway:
        # the monotonic send time of the earliest such attempt.
        self._unconfirmed: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._leaving = False
        self._closed = False
        worker.on_drop = self._dropped

    @property
    def live_members(self) -> list[str]:
        return list(self._live)

    def running(self) -> bool:
        return all(task is not None and not task.done() for task in (self._task, self._renewer))

    def wanted(self) -> set[int]:
        """The partitions this replica should hold now."""
        if self._leaving:
            return set()
        if self._settings.partition_assignment == "static":
            return set(self._settings.owned_partitions())
        return targets(self.member_id, self._live, self._settings.session_partitions)

    async def start(self) -> None:
        await self._safe_tick()
        self._task = asyncio.create_task(self._loop(), name="session-coordinator")
        self._renewer = asyncio.create_task(self._renew_loop(), name="session-renew")

    async def _loop(self) -> None:
        # Stopped by a flag, not cancel(): on 3.11 wait_for can swallow a cancellation that
        # races with the event being set (a handoff finishing as we stop).
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if not self._closed:
                await self._safe_tick()

    async def _renew_loop(self) -> None:
        while not self._closed:
            started = self._clock.monotonic()
            try:
                await self._renew()
            except Exception as exc:
                log.warning("renewing leases failed: %r", exc)
            # Every interval from the start of the last round (a slow round is not followed
            # by a full interval of silence); stopped by the flag, like _loop.
            pause = self._interval - (self._clock.monotonic() - started)
            await asyncio.sleep(max(pause, 0.0))

    async def _safe_tick(self) -> None:
        try:
            await self.tick()
        except Exception as exc:  # NATS reconnecting: the local lease deadlines keep us safe
            log.warning("coordinator tick failed: %r", exc)

    async def tick(self) -> None:
        """One round: heartbeat, read members, hand off, acquire (renewals run beside it)."""
        if not self._leaving:
            await self._members.heartbeat(self.member_id, self._member_value, ttl=self._member_ttl)
            self._live = sorted({*await self._members.live(), self.member_id})
        want = self.wanted()
        held = self._worker.held()
        for p in held:
            if p not in want and p not in self._handoffs:
                self._start_handoff(p)
        missing = sorted(p for p in want if p not in held and p not in self._handoffs)
        if missing:
            await self._acquire(missing)

    async def _renew(self) -> None:
        async with self._lease_lock:
            held = self._worker.held()
            await asyncio.gather(*(self._renew_one(lease) for lease in held.values()))

    async def _renew_one(self, lease: HeldLease) -> None:
        p = lease.partition
        value = LeaseValue(owner=self.member_id, token=self.token, epoch=lease.epoch)
        while True:
            sent = self._clock.monotonic()
            try:
                revision = await self._leases.write(
                    p, value, last=lease.revision, ttl=self._lease_ttl
                )
                break
            except Exception as exc:
                self._unconfirmed.setdefault(p, sent)
                if self._closed or not self._worker.lease_valid(lease):
                    log.warning("renewing the lease of partition %d failed: %r", p, exc)
                    return
                log.debug("renewing the lease of partition %d failed, retrying: %r", p, exc)
                await asyncio.sleep(_RENEW_RETRY_S)
        if revision is None and p in self._unconfirmed:
            revision = await self._stored_anyway(p, value)
            sent = self._unconfirmed[p]
        self._unconfirmed.pop(p, None)
        if revision is None:
            self._worker.drop_partition(p, reason="lease lost")
        else:
            self._worker.renewed(p, revision, sent)

    async def _stored_anyway(self, p: int, value: LeaseValue) -> int | None:
        """The lease's revision if the key holds exactly this replica's ``value`` (a renewal
        that timed out was stored); None if it holds anything else or cannot be read."""
        try:
            record = await self._leases.read(p)
        except Exception as exc:
            log.warning("reading the lease of partition %d failed: %r", p, exc)
            return None
        if record.value == value:
            log.info("a timed-out renewal of partition %d was stored", p)
            return record.revision
        return None

    async def _acquire(self, partitions: list[int]) -> None:
        records = await asyncio.gather(*(self._leases.read(p) for p in partitions))
        free = [
            (p, r.revision) for p, r in zip(partitions, records, strict=True) if r.value is None
        ]
        if not free:
            return
        existing = await self._consumers.existing()
        await asyncio.gather(*(self._grant(p, last, existing.get(p, [])) for p, last in free))

    async def _grant(self, p: int, last: int, existing: list[str]) -> None:
        sent = self._clock.monotonic()
        value = LeaseValue(owner=self.member_id, token=self.token)
        revision = await self._leases.write(p, value, last=last, ttl=self._lease_ttl)
        if revision is None:
            return  # another replica was faster
        self._unconfirmed.pop(p, None)  # a new lease: attempts under an old one say nothing
        lease = HeldLease(partition=p, revision=revision, epoch=revision, sent_at=sent)
        try:
            await self._worker.start_partition(lease, existing)
        except Exception:
            log.exception("could not start partition %d; releasing its lease", p)
            await self._release(lease)
            return
        metrics.LEASES_GRANTED.inc()
        log.info("lease granted", extra={"partition": p, "epoch": revision})

    def _start_handoff(self, p: int) -> None:
        self._handoffs[p] = asyncio.create_task(self._handoff(p), name=f"handoff:p{p}")

    async def _handoff(self, p: int) -> None:
        """Drain ``p`` (its lease renewed meanwhile), then release the lease."""
        try:
            lease = self._worker.held().get(p)
            if lease is None:
                return
            if await self._worker.drain_partition(p):
                await self._release(lease)
                metrics.LEASES_RELEASED.inc()
                log.info("partition %d handed off", p, extra={"partition": p})
        except Exception:
            log.exception("handoff of partition %d failed", p)
        finally:
            self._handoffs.pop(p, None)
            self._wake.set()

    async def _release(self, lease: HeldLease) -> None:
        async with self._lease_lock:
            try:
                released = await self._leases.release(lease.partition, last=lease.revision)
            except Exception as exc:
                log.warning("releasing partition %d failed: %r", lease.partition, exc)
                return
        if not released:
            log.info("lease of partition %d was no longer ours", lease.partition)

    def _dropped(self, lease: HeldLease) -> None:
        # Release what may still be ours (a fenced write under a valid lease), so that a
        # fresh grant — a new epoch and consumer — can follow; a lost lease's CAS just fails.
        async def release_then_retry() -> None:
            await self._release(lease)
            self._wake.set()

        task = asyncio.get_running_loop().create_task(release_then_retry())
        self._handoffs.setdefault(lease.partition, task)
        task.add_done_callback(lambda _: self._forget_handoff(lease.partition, task))

    def _forget_handoff(self, p: int, task: asyncio.Task[None]) -> None:
        if self._handoffs.get(p) is task:
            del self._handoffs[p]

    async def stop(self, grace: float) -> None:
        """Leave the members, hand off every partition (drain then release), stop ticking."""
        self._leaving = True
        with contextlib.suppress(Exception):
            await self._members.leave(self.member_id)
        for p in self._worker.held():
            if p not in self._handoffs:
                self._start_handoff(p)
        pending = list(self._handoffs.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace + 2.0)
            for task in late:
                task.cancel()
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._renewer is not None:
            await asyncio.gather(self._renewer, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._members.leave(self.member_id)
