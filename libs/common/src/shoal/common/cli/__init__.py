"""The ``shoal`` command: ``shoal run <service>`` serves one service, ``shoal up`` the fleet,
``shoal admin …`` asks a running fleet.

Example::

    shoal run gateway                   # SHOAL_HTTP_PORT=8470 SHOAL_NATS_URL=... in the env
    shoal up --home .shoal --session-replicas 2
    shoal admin partitions --up .shoal/up.json
    python -m shoal.common.cli up       # the same without the console script

Exit codes: 0 done (including a stop by SIGINT/SIGTERM), 1 failed, 2 bad usage or an unknown
service.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
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
    from shoal.common.cli import _up

    parser = argparse.ArgumentParser(
        prog="shoal", description="Shoal: run one service or the fleet."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="serve one service (configured by SHOAL_* environment variables)",
        description="Serve one service's create_app() with uvicorn on "
        "SHOAL_HTTP_HOST:SHOAL_HTTP_PORT until SIGTERM/SIGINT.",
    )
    run.add_argument("service", help="a name from the shoal.services entry points, e.g. gateway")

    up = commands.add_parser(
        "up",
        help="run the whole fleet on this machine (embedded NATS and PostgreSQL)",
        description="Start nats-server, PostgreSQL and every service as supervised processes; "
        "print the gateway URL and an admin key; Ctrl-C stops everything. Port 0 means any "
        "free port.",
    )
    up.add_argument(
        "--home",
        type=Path,
        default=_up.DEFAULT_HOME,
        metavar="DIR",
        help="data directory: nats/, postgres/, objects/, logs/, up.json (default: %(default)s)",
    )
    up.add_argument(
        "--nats-url",
        default=os.environ.get("SHOAL_NATS_URL") or None,
        metavar="URL",
        help="use this NATS instead of starting one (default: $SHOAL_NATS_URL)",
    )
    up.add_argument(
        "--database-url",
        default=os.environ.get("SHOAL_DATABASE_URL") or None,
        metavar="URL",
        help="use this PostgreSQL instead of starting one (default: $SHOAL_DATABASE_URL)",
    )
    up.add_argument(
        "--nats-port",
        type=_port,
        default=_up.DEFAULT_NATS_PORT,
        metavar="PORT",
        help="embedded nats-server's client port (default: %(default)s)",
    )
    up.add_argument(
        "--nats-monitor-port",
        type=_port,
        default=_up.DEFAULT_NATS_MONITOR_PORT,
        metavar="PORT",
        help="its HTTP monitoring port (default: %(default)s)",
    )
    up.add_argument(
        "--postgres-port",
        type=_port,
        default=_up.DEFAULT_POSTGRES_PORT,
        metavar="PORT",
        help="embedded PostgreSQL's port (default: %(default)s)",
    )
    up.add_argument(
        "--gateway-port",
        type=_port,
        default=_up.DEFAULT_GATEWAY_PORT,
        metavar="PORT",
        help="the gateway's HTTP port (default: %(default)s)",
    )
    up.add_argument(
        "--session-replicas",
        type=_positive,
        default=1,
        metavar="N",
        help="session processes; named session-0.. when N > 1 (default: 1)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when the services are not all ready by then (default: 60)",
    )

    admin = commands.add_parser(
        "admin",
        help="operator commands to a running fleet (over NATS)",
        description="Ask a running fleet over NATS (SHOAL_NATS_URL, SHOAL_SUBJECT_PREFIX, or "
        "--up DIR/up.json). Prints the answer as JSON.",
    )
    admin.add_argument(
        "--up",
        type=Path,
        default=None,
        metavar="UP_JSON",
        help="take the NATS URL from a shoal up fleet's up.json",
    )
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("partitions", help="owner, epoch and lag of every session partition")
    session = actions.add_parser(
        "session", help="a session's owner replica, epoch, KV revision, applied_seq, status"
    )
    session.add_argument("session_id")
    actions.add_parser(
        "rebuild-projection", help="replay the SESSION_EVT ledger into PostgreSQL's history"
    )
    rotate = actions.add_parser(
        "rotate-kek", help="re-wrap every data key with the active (or given) KEK, online"
    )
    rotate.add_argument("--to", dest="to_kek_id", default=None, metavar="KEK_ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shoal`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        from shoal.common.cli._admin import run_admin

        body: dict[str, object] = {}
        if args.action == "session":
            body = {"session_id": args.session_id}
        elif args.action == "rotate-kek":
            body = {"to_kek_id": args.to_kek_id}
        return run_admin(args.action, body, args.up)
    if args.command == "run":
        from shoal.common.cli._run import run_service

        return run_service(args.service)

    from shoal.common.cli._up import UpOptions, up

    return up(
        UpOptions(
            home=args.home,
            nats_url=args.nats_url,
            database_url=args.database_url,
            nats_port=args.nats_port,
            nats_monitor_port=args.nats_monitor_port,
            postgres_port=args.postgres_port,
            gateway_port=args.gateway_port,
            session_replicas=args.session_replicas,
            ready_timeout=args.ready_timeout,
        )
    )
