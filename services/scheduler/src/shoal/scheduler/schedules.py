"""The rules of schedules: parse a spec, compute fire times, decide what a late pass fires.

Pure functions, time passed in. A schedule fires at ``cron`` times (5 fields, or 6 with
seconds first; in ``timezone``, default UTC), every ``every`` seconds from its creation, or once
``at`` a time. A pass that finds it late (the scheduler was down) fires according to
``catch_up``: ``all`` every missed time (at most :data:`MAX_CATCH_UP`), ``once`` only the
latest, ``skip`` none that are later than the grace (the next on-time firing goes ahead).

Example::

    spec = parse_spec({"cron": "*/5 * * * *", "timezone": "Europe/Paris"}, now=now)
    fire_at, next_fire_at = due_firings(spec, spec.first(now), now, grace=timedelta(seconds=30))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from shoal.common.errors import BadRequest
from shoal.common.messaging import is_token

CatchUp = Literal["once", "all", "skip"]
CATCH_UPS: tuple[CatchUp, ...] = ("once", "all", "skip")
MAX_CATCH_UP = 1000  # firings one late pass may fire with catch_up "all"
MAX_PROMPT_BYTES = 256 * 1024
MAX_EVERY_S = 10 * 366 * 86_400  # ten years
SPEC_FIELDS = frozenset({"cron", "every", "at", "timezone", "catch_up", "target"})


@dataclass(frozen=True, slots=True)
class Spec:
    """When a schedule fires (exactly one of ``cron``, ``every``, ``at``)."""

    cron: str | None = None
    every_s: float | None = None
    at: datetime | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = "once"
    anchor: datetime | None = None  # ``every`` counts from here (the creation time)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after``; None when there is none (``at``)."""
        if self.cron is not None:
            local = after.astimezone(ZoneInfo(self.timezone))
            return next(iter(CronSim(self.cron, local))).astimezone(UTC)
        if self.every_s is not None:
            anchor = self.anchor or after
            periods = int((after - anchor).total_seconds() // self.every_s) + 1
            return anchor + timedelta(seconds=periods * self.every_s)
        if self.at is not None and self.at > after:
            return self.at
        return None

    def to_public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timezone": self.timezone, "catch_up": self.catch_up}
        if self.cron is not None:
            out["cron"] = self.cron
        if self.every_s is not None:
            out["every"] = self.every_s
        if self.at is not None:
            out["at"] = self.at.isoformat().replace("+00:00", "Z")
        return out


def parse_spec(body: dict[str, Any], *, now: datetime) -> Spec:
    """Validate the timing half of a schedule body; :class:`BadRequest` says what is wrong."""
    given = [k for k in ("cron", "every", "at") if body.get(k) is not None]
    if len(given) != 1:
        raise BadRequest("give exactly one of cron, every, at")
    timezone = body.get("timezone") or "UTC"
    try:
        zone = ZoneInfo(timezone) if isinstance(timezone, str) else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if zone is None:
        raise BadRequest("timezone must be an IANA time zone name, e.g. Europe/Paris")
    catch_up = body.get("catch_up") or "once"
    if catch_up not in CATCH_UPS:
        raise BadRequest("catch_up must be once, all or skip")
    cron, every, at = body.get("cron"), body.get("every"), body.get("at")
    if cron is not None:
        if not isinstance(cron, str) or len(cron) > 200:
            raise BadRequest("cron must be a cron expression")
        try:
            CronSim(cron, now.astimezone(zone))
        except (CronSimError, ValueError) as exc:
            raise BadRequest(f"malformed cron expression: {exc}") from exc
        return Spec(cron=cron, timezone=timezone, catch_up=catch_up)
    if every is not None:
        if (
            not isinstance(every, int | float)
            or isinstance(every, bool)
            or not 1 <= every <= MAX_EVERY_S  # NaN fails both bounds
        ):
            raise BadRequest(f"every must be a number of seconds from 1 to {MAX_EVERY_S}")
        return Spec(every_s=float(every), timezone=timezone, catch_up=catch_up, anchor=now)
    if not isinstance(at, str):
        raise BadRequest("at must be an RFC 3339 time")
    try:
        when = datetime.fromisoformat(at)
    except ValueError as exc:
        raise BadRequest("at must be an RFC 3339 time") from exc
    if when.tzinfo is None:
        raise BadRequest("at must carry a time zone (e.g. Z)")
    when = when.astimezone(UTC)
    if when <= now:
        raise BadRequest("at is in the past")
    return Spec(at=when, timezone=timezone, catch_up=catch_up)


def parse_target(target: object) -> dict[str, Any]:
    """``{"job": {kind, input, …}}`` or ``{"prompt": {session_id, content}}`` (the job half is
    checked by the job rules when the schedule is created)."""
    if not isinstance(target, dict) or len(target) != 1:
        raise BadRequest('target must be {"job": {...}} or {"prompt": {...}}')
    ((name, body),) = target.items()
    if name == "job" and isinstance(body, dict):
        return {"job": body}
    if name == "prompt" and isinstance(body, dict):
        if set(body) - {"session_id", "content"}:
            raise BadRequest("target.prompt has session_id and content only")
        session_id, content = body.get("session_id"), body.get("content")
        if not isinstance(session_id, str) or not is_token(session_id):
            raise BadRequest("target.prompt.session_id must be a session id")
        if not isinstance(content, str) or not content:
            raise BadRequest("target.prompt.content must be a non-empty string")
        if len(content.encode()) > MAX_PROMPT_BYTES:
            raise BadRequest(f"target.prompt.content is at most {MAX_PROMPT_BYTES} bytes")
        return {"prompt": {"session_id": session_id, "content": content}}
    raise BadRequest('target must be {"job": {...}} or {"prompt": {...}}')


def due_firings(
    spec: Spec, next_fire_at: datetime, now: datetime, *, grace: timedelta
) -> tuple[list[datetime], datetime | None]:
    """What a pass at ``now`` fires of a schedule due at ``next_fire_at``, and its next time.

    Firings later than ``grace`` are "missed": ``all`` fires them, ``once`` fires only the
    latest of them, ``skip`` fires none of them.
    """
    due: list[datetime] = []
    at: datetime | None = next_fire_at
    while at is not None and at <= now and len(due) < MAX_CATCH_UP:
        due.append(at)
        at = spec.next_after(at)
    if at is not None and at <= now:  # more than MAX_CATCH_UP behind: jump to the present
        at = spec.next_after(now)
    if spec.catch_up == "all":
        fire = due
    elif spec.catch_up == "once":
        fire = due[-1:]
    else:
        fire = [t for t in due if now - t <= grace]
    return fire, at


def firing_id(schedule_id: str, fire_at: datetime) -> str:
    """The key of one firing: its job's idempotency key, its prompt's command id."""
    return f"{schedule_id}:{round(fire_at.timestamp() * 1000)}"


def derived_id(prefix: str, *parts: str) -> str:
    """A token-safe id that is a pure function of ``parts`` (a re-fired firing: the same id)."""
    return f"{prefix}_{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}"
