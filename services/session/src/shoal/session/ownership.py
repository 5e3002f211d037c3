"""Who should own which partition, and how long a held lease may be trusted (pure rules).

Rendezvous (highest-random-weight) hashing: every live member scores every partition with a
stable hash of ``(member, partition)`` and the highest score wins. All replicas that see the
same members compute the same owners with no coordination, and when a member joins or leaves
only the partitions it wins or held move (about 1/N of them), never the rest.

A lease is trusted only until ``sent + ttl - margin`` on this process's monotonic clock, where
``sent`` is when the grant or renewal that the server acknowledged was *sent*: the server
starts the TTL later than that, so the local deadline always passes first. A replica that was
paused (GC, SIGSTOP) wakes with its deadlines behind it and stops those partitions before any
fetch or commit — the KV fences (state CAS, ledger expected-sequence) catch what slips through.

Example::

    owners = assign(["a", "b", "c"], partitions=64)        # {0: "b", 1: "a", ...}
    targets("a", ["a", "b", "c"], 64)                       # the partitions "a" should hold
    lease = HeldLease(partition=3, revision=17, epoch=17, sent_at=clock.monotonic())
    lease.valid(clock.monotonic(), ttl=4.0, margin=0.5)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass


def score(member: str, partition: int) -> int:
    """The member's weight for a partition: 64 bits of BLAKE2b, the same in every process."""
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(partition: int, members: Iterable[str]) -> str | None:
    """The member that should own ``partition`` (None when there are no members)."""
    best: tuple[int, str] | None = None
    for member in members:
        candidate = (score(member, partition), member)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]


def assign(members: Iterable[str], partitions: int) -> dict[int, str]:
    """Every partition's owner among ``members`` (empty when there are none)."""
    live = sorted(set(members))
    if not live:
        return {}
    return {p: owner for p in range(partitions) if (owner := owner_of(p, live)) is not None}


def targets(me: str, members: Iterable[str], partitions: int) -> set[int]:
    """The partitions ``me`` should hold; ``me`` counts as live whatever ``members`` says."""
    live = {*members, me}
    return {p for p, owner in assign(live, partitions).items() if owner == me}


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    """How many partitions change owner between two assignments."""
    return sum(1 for p, owner in after.items() if before.get(p) != owner)


@dataclass(slots=True)
class HeldLease:
    """A lease this replica holds: the KV revision to compare-and-set on, and its epoch.

    ``epoch`` is the bucket revision of the grant: it increases with every new owner of the
    partition (a re-grant after expiry included, which a counter in the value could not do,
    since an expired value is gone) and stays fixed across renewals.
    """

    partition: int
    revision: int
    epoch: int
    sent_at: float  # monotonic time the acknowledged grant/renewal was sent

    def valid(self, now: float, *, ttl: float, margin: float) -> bool:
        """Whether the lease can still be trusted at monotonic time ``now``."""
        return now < self.sent_at + ttl - margin
