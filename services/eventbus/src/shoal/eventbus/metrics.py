"""Prometheus metrics of the eventbus (registered once per process)."""

from prometheus_client import Counter

EVENTS = Counter(
    "shoal_eventbus_events_total",
    "Ledger events handled, by outcome: fanned_out, malformed (terminated), retried (nak)",
    ["outcome"],
)
DELIVERIES = Counter(
    "shoal_eventbus_deliveries_total",
    "Publishes to delivery subjects, by target (user, tag); duplicates counted separately",
    ["target"],
)
DUPLICATES = Counter(
    "shoal_eventbus_duplicate_deliveries_total",
    "Deliveries DELIVER dropped as duplicates (a redelivered event it had already stored)",
)
