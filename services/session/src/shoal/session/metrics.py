"""Prometheus metrics of the session service (process-wide, registered once at import)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from shoal.common.contracts import Command

COMMANDS = Counter(
    "shoal_session_commands_total",
    "Commands handled, by type and outcome (applied, redelivered, rejected, malformed, failed)",
    ["type", "outcome"],
)
FENCED_WRITES = Counter(
    "shoal_session_fenced_writes_total",
    "Writes refused because this replica no longer owns the session, by the fence that "
    "refused them: state (KV compare-and-set lost), ledger (the session's event ledger moved: "
    "expected-sequence check), lease (commands in hand abandoned unapplied when the "
    "partition's lease expired or was lost, e.g. on waking from a pause)",
    ["fence"],
)
for _fence in ("state", "ledger", "lease"):
    FENCED_WRITES.labels(_fence)
IO_RETRIES = Counter(
    "shoal_session_io_retries_total",
    "Command attempts retried after a NATS error (publish, KV, a scheduler timer RPC)",
)
TIMER_CALLS = Counter(
    "shoal_session_timer_calls_total",
    "Durable timers set or cancelled through the scheduler after a committed command",
    ["op"],
)
for _op in ("set", "cancel"):
    TIMER_CALLS.labels(_op)
APPLY_SECONDS = Histogram(
    "shoal_session_apply_seconds",
    "From taking a command off its lane to its ack: load, apply, publish, CAS, reply",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PARTITIONS = Gauge("shoal_session_partitions_held", "Partitions this replica holds and runs")
PARTITIONS_DROPPED = Counter(
    "shoal_session_partitions_dropped_total",
    "Partitions left at once, by reason (lease lost, lease expired, fenced write)",
    ["reason"],
)
LEASES_GRANTED = Counter(
    "shoal_session_leases_granted_total", "Partition leases this replica acquired"
)
LEASES_RELEASED = Counter(
    "shoal_session_leases_released_total", "Partition leases handed off after a drain"
)
SNAPSHOT_WRITES = Counter(
    "shoal_session_snapshot_writes_total",
    "Lazy snapshot writes after the reply, by outcome (written, lost: CAS lost, failed: I/O)",
    ["outcome"],
)
LANES = Gauge("shoal_session_lanes", "Session lanes alive in this replica")
IN_FLIGHT = Gauge("shoal_session_commands_in_flight", "Commands fetched and not yet finished")
PROJECTED = Counter(
    "shoal_session_projected_events_total",
    "Events the PostgreSQL projection consumed, by outcome (written, malformed, failed)",
    ["outcome"],
)

CONSUMER_PENDING = Gauge(
    "shoal_session_consumer_pending",
    "Commands not yet delivered to a held partition's consumer (its lag), sampled periodically",
    ["partition"],
)
CONSUMER_ACK_PENDING = Gauge(
    "shoal_session_consumer_ack_pending",
    "Commands delivered to a held partition's consumer and not yet acknowledged, sampled "
    "periodically",
    ["partition"],
)

log = logging.getLogger(__name__)

_KNOWN = frozenset(str(c) for c in Command)


def command_label(command_type: str | None) -> str:
    """A bounded label value: clients choose the type string, so unknown ones collapse."""
    return command_type if command_type in _KNOWN else "other"


Lag = Callable[[int, int], Awaitable[tuple[int, int] | None]]


async def sample_partition_lag(
    held: Callable[[], Mapping[int, int]], lag: Lag, interval: float
) -> None:
    """Every ``interval`` s, copy each held partition's consumer (pending, ack_pending) into
    the gauges; ``held()`` maps partition -> lease epoch, ``lag(partition, epoch)`` reads the
    consumer's info (``None``: no such consumer). Partitions no longer held lose their series,
    so a replica reports only what it runs. Runs until cancelled."""
    reported: set[int] = set()
    while True:
        partitions = dict(held())
        results = await asyncio.gather(
            *(lag(p, epoch) for p, epoch in partitions.items()), return_exceptions=True
        )
        now: set[int] = set()
        for p, result in zip(partitions, results, strict=True):
            if isinstance(result, BaseException):
                # NATS reconnecting or the stream's leader moving: the next sample tries again.
                log.debug("consumer info failed", extra={"partition": p, "error": repr(result)})
                if p in reported:
                    now.add(p)  # keep the last value rather than a gap
                continue
            if result is None:
                continue
            pending, ack_pending = result
            CONSUMER_PENDING.labels(str(p)).set(pending)
            CONSUMER_ACK_PENDING.labels(str(p)).set(ack_pending)
            now.add(p)
        for p in reported - now:
            for gauge in (CONSUMER_PENDING, CONSUMER_ACK_PENDING):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(p))
        reported = now
        await asyncio.sleep(interval)
