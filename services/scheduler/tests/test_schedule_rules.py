"""Schedule rules as pure functions: parsing, fire times, catch-up after downtime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shoal.common.errors import BadRequest
from shoal.scheduler.schedules import due_firings, parse_spec, parse_target

NOW = datetime(2026, 3, 28, 23, 0, 30, tzinfo=UTC)
GRACE = timedelta(seconds=30)


def test_cron_follows_its_time_zone() -> None:
    spec = parse_spec({"cron": "0 9 * * *", "timezone": "Europe/Paris"}, now=NOW)
    first = spec.next_after(NOW)
    assert first == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 09:00 CEST (DST started)
    assert spec.next_after(first) == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)


def test_every_counts_from_creation() -> None:
    spec = parse_spec({"every": 10}, now=NOW)
    assert spec.next_after(NOW) == NOW + timedelta(seconds=10)
    assert spec.next_after(NOW + timedelta(seconds=25)) == NOW + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("catch_up", "fired"),
    [("all", [10, 20, 30, 40]), ("once", [40]), ("skip", [40])],
)
def test_a_late_pass_honours_catch_up(catch_up: str, fired: list[int]) -> None:
    spec = parse_spec({"every": 10, "catch_up": catch_up}, now=NOW)
    # Down from +10 s until +45 s: four firings are due; only +40 is within the 5 s grace.
    fire, following = due_firings(
        spec, NOW + timedelta(seconds=10), NOW + timedelta(seconds=45), grace=timedelta(seconds=5)
    )
    assert [(t - NOW).total_seconds() for t in fire] == fired
    assert following == NOW + timedelta(seconds=50)


def test_skip_fires_nothing_when_every_due_firing_is_stale() -> None:
    spec = parse_spec({"every": 10, "catch_up": "skip"}, now=NOW)
    fire, following = due_firings(
        spec, NOW + timedelta(seconds=10), NOW + timedelta(seconds=38), grace=timedelta(seconds=5)
    )
    assert fire == []
    assert following == NOW + timedelta(seconds=40)


def test_at_fires_once() -> None:
    at = NOW + timedelta(minutes=5)
    spec = parse_spec({"at": at.isoformat()}, now=NOW)
    fire, following = due_firings(spec, at, at + timedelta(seconds=1), grace=GRACE)
    assert fire == [at]
    assert following is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"cron": "* * * * *", "every": 5},
        {"cron": "not a cron"},
        {"cron": "61 * * * *"},
        {"every": 0.5},
        {"every": True},
        {"every": float("inf")},
        {"every": float("nan")},
        {"at": "2020-01-01T00:00:00Z"},
        {"at": "2030-01-01T00:00:00"},
        {"every": 5, "timezone": "Mars/Olympus"},
        {"every": 5, "catch_up": "sometimes"},
    ],
)
def test_bad_specs_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        parse_spec(body, now=NOW)


@pytest.mark.parametrize(
    "target",
    [
        None,
        {},
        {"job": {}, "prompt": {}},
        {"prompt": {"session_id": "a.b", "content": "x"}},
        {"prompt": {"session_id": "ses_1", "content": ""}},
        {"prompt": {"session_id": "ses_1", "content": "x", "extra": 1}},
        {"webhook": {}},
    ],
)
def test_bad_targets_are_refused(target: object) -> None:
    with pytest.raises(BadRequest):
        parse_target(target)
