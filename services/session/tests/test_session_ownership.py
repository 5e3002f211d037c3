"""Partition ownership rules: rendezvous hashing and lease deadlines (pure, injected clock)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from shoal.common.clock import ManualClock
from shoal.session.config import SessionSettings
from shoal.session.ownership import HeldLease, assign, moved, owner_of, targets

P = 256


def test_every_partition_has_exactly_one_owner_and_the_split_is_even() -> None:
    owners = assign(["a", "b", "c"], P)
    assert sorted(owners) == list(range(P))
    counts = {m: sum(1 for o in owners.values() if o == m) for m in "abc"}
    assert all(P / 3 * 0.7 < c < P / 3 * 1.3 for c in counts.values()), counts
    # targets() of every member partition the space with no overlap
    split = [targets(m, ["a", "b", "c"], P) for m in "abc"]
    assert sum(len(t) for t in split) == P
    assert set().union(*split) == set(range(P))


def test_scaling_two_to_three_moves_about_a_third_and_only_to_the_newcomer() -> None:
    before = assign(["session-0", "session-1"], P)
    after = assign(["session-0", "session-1", "session-2"], P)
    n = moved(before, after)
    assert 0.25 * P < n < 0.42 * P, n  # ~1/3, never all of them
    assert all(after[p] == "session-2" for p in range(P) if before[p] != after[p])


def test_losing_a_member_moves_only_its_partitions() -> None:
    before = assign(["a", "b", "c"], P)
    after = assign(["a", "c"], P)
    assert {p for p in range(P) if before[p] != after[p]} == {
        p for p in range(P) if before[p] == "b"
    }


def test_assignment_is_independent_of_member_order_and_empty_without_members() -> None:
    assert assign(["x", "y", "z"], 64) == assign(["z", "x", "y", "y"], 64)
    assert assign([], 8) == {}
    assert owner_of(3, []) is None
    assert targets("me", [], 4) == {0, 1, 2, 3}  # alone, a replica wants everything


def test_a_lease_is_trusted_until_its_ttl_minus_the_margin_from_when_it_was_sent() -> None:
    clock = ManualClock()
    lease = HeldLease(partition=1, revision=9, epoch=9, sent_at=clock.monotonic())
    clock.advance(3.4)
    assert lease.valid(clock.monotonic(), ttl=4.0, margin=0.5)
    clock.advance(0.2)  # 3.6 s: inside the margin, the server may expire it any moment now
    assert not lease.valid(clock.monotonic(), ttl=4.0, margin=0.5)
    lease.sent_at = clock.monotonic()  # renewed
    assert lease.valid(clock.monotonic(), ttl=4.0, margin=0.5)
    clock.advance(60)  # a SIGSTOP: the replica wakes with its deadline long gone
    assert not lease.valid(clock.monotonic(), ttl=4.0, margin=0.5)


def test_lease_settings_are_whole_seconds_and_well_above_the_renew_interval() -> None:
    ok = SessionSettings(lease_ttl=timedelta(seconds=3), renew_interval=timedelta(seconds=1))
    assert ok.lease_ttl.total_seconds() == 3
    with pytest.raises(ValidationError):
        SessionSettings(lease_ttl=timedelta(seconds=1.5))
    with pytest.raises(ValidationError):
        SessionSettings(lease_ttl=timedelta(seconds=2), renew_interval=timedelta(seconds=1.5))
    assert SessionSettings(instance_id="host:12").member_id == "host_12"
    from_env = SessionSettings.model_validate({"lease_ttl": "3", "renew_interval": "0.5"})
    assert from_env.lease_ttl == timedelta(seconds=3)
    assert from_env.renew_interval == timedelta(seconds=0.5)
