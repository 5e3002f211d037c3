"""``shoal up``: the ``shoal`` command (shoal-common) finds it in the ``shoal.cli`` entry points.

Example::

    shoal up --home .shoal --session-replicas 2
    shoal up --gateway-port 0 --nats-url nats://127.0.0.1:4222   # an external NATS

Exit codes: 0 after a clean stop (SIGINT/SIGTERM), 1 when the fleet cannot start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["build_parser", "main"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: `shoal --help` loads this module for its summary line.
    from shoal.devtools import up as _up

    parser = argparse.ArgumentParser(
        prog="shoal up",
        description="Start nats-server, PostgreSQL and every service as supervised processes; "
        "print the gateway URL and an admin key; Ctrl-C stops everything. Port 0 means any "
        "free port.",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=_up.DEFAULT_HOME,
        metavar="DIR",
        help="data directory: nats/, postgres/, objects/, logs/, up.json (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("SHOAL_NATS_URL") or None,
        metavar="URL",
        help="use this NATS instead of starting one (default: $SHOAL_NATS_URL)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("SHOAL_DATABASE_URL") or None,
        metavar="URL",
        help="use this PostgreSQL instead of starting one (default: $SHOAL_DATABASE_URL)",
    )
    parser.add_argument(
        "--nats-port",
        type=_port,
        default=_up.DEFAULT_NATS_PORT,
        metavar="PORT",
        help="embedded nats-server's client port (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-monitor-port",
        type=_port,
        default=_up.DEFAULT_NATS_MONITOR_PORT,
        metavar="PORT",
        help="its HTTP monitoring port (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-cluster",
        type=_positive,
        default=1,
        metavar="N",
        help="start N nats-servers with routes between them (free ports; streams and KV at "
        "R3, or R1 for N < 3) instead of one (default: 1)",
    )
    parser.add_argument(
        "--postgres-port",
        type=_port,
        default=_up.DEFAULT_POSTGRES_PORT,
        metavar="PORT",
        help="embedded PostgreSQL's port (default: %(default)s)",
    )
    parser.add_argument(
        "--gateway-port",
        type=_port,
        default=_up.DEFAULT_GATEWAY_PORT,
        metavar="PORT",
        help="the gateway's HTTP port (default: %(default)s)",
    )
    parser.add_argument(
        "--session-replicas",
        type=_positive,
        default=1,
        metavar="N",
        help="session processes; named session-0.. when N > 1 (default: 1)",
    )
    parser.add_argument(
        "--scheduler-replicas",
        type=_positive,
        default=1,
        metavar="N",
        help="scheduler processes sharing the timers (each fires once); named scheduler-0.. "
        "when N > 1 (default: 1)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when the services are not all ready by then (default: 60)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Run the whole fleet on this machine (embedded NATS and PostgreSQL)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nats_cluster > 1 and args.nats_url:
        parser.error("--nats-cluster starts its own servers: drop --nats-url (or SHOAL_NATS_URL)")
    from shoal.devtools.up import UpOptions, up

    return up(
        UpOptions(
            home=args.home,
            nats_url=args.nats_url,
            database_url=args.database_url,
            nats_port=args.nats_port,
            nats_monitor_port=args.nats_monitor_port,
            nats_cluster=args.nats_cluster,
            postgres_port=args.postgres_port,
            gateway_port=args.gateway_port,
            session_replicas=args.session_replicas,
            scheduler_replicas=args.scheduler_replicas,
            ready_timeout=args.ready_timeout,
        )
    )
