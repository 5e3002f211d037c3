"""The gateway's Prometheus metrics (served on ``/metrics`` with the process's others).

The live path counts once per event, never per socket; the slow paths (a socket sent back to
the ledger, a repair, a close) count per socket. Their rates tell an operator whether sockets
are keeping up: a steady stream of overflows or repairs means a gateway, or its peers, are
falling behind.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SOCKETS = Gauge(
    "shoal_gateway_sockets", "WebSockets open in this gateway (clients, users, runners)"
)
LIVE_SUBSCRIPTIONS = Gauge(
    "shoal_gateway_live_subscriptions",
    "Sessions and users this gateway follows live (one core NATS subscription each)",
)
LIVE_EVENTS = Counter(
    "shoal_gateway_live_events_total",
    "Stored events received on the live subscriptions (once per event, whatever the sockets)",
)
CATCH_UPS = Counter(
    "shoal_gateway_catch_ups_total",
    "Sockets sent back to the ledger: their live buffer overflowed, or NATS reconnected",
    ["reason"],
)
REPAIRS = Counter(
    "shoal_gateway_repairs_total",
    "Sockets that saw a jump in their live events and re-read the ledger before going on",
)
LEDGER_READS = Counter(
    "shoal_gateway_ledger_reads_total",
    "Batched direct gets from a ledger (replays after since, catch-ups, repairs)",
)
SOCKET_CLOSES = Counter(
    "shoal_gateway_socket_closes_total",
    "Sockets closed by the gateway, by close code (4408: lagging, 1012: restart, ...)",
    ["code"],
)
