"""The ``shoal`` command: ``shoal run <service>`` serves one service, ``shoal migrate`` migrates
the services' schemas, ``shoal admin …`` asks a running fleet; any other subcommand comes from
the ``shoal.cli`` entry points of the installed distributions (``shoal up`` from shoal-devtools),
each a ``main(argv: list[str]) -> int`` given the arguments after its name.

Example::

    shoal run gateway                   # SHOAL_HTTP_PORT=8470 SHOAL_NATS_URL=... in the env
    shoal migrate --service keys        # SHOAL_DATABASE_URL in the env; --status only reads
    shoal admin partitions --up .shoal/up.json
    shoal up --home .shoal              # with shoal-devtools installed
    python -m shoal.common.cli run keys # the same without the console script

Exit codes: 0 done (including a stop by SIGINT/SIGTERM), 1 failed, 2 bad usage, an unknown
service or a command that is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

__all__ = ["COMMAND_ENTRY_POINT_GROUP", "build_parser", "command_entry_points", "main"]

COMMAND_ENTRY_POINT_GROUP = "shoal.cli"
BUILTIN_COMMANDS = ("run", "migrate", "admin")
# Commands users know from the README, and the distribution that provides each.
KNOWN_PROVIDERS = {"up": "shoal-devtools"}
EXIT_FAILED = 1
EXIT_USAGE = 2

Command = Callable[[list[str]], int]


def command_entry_points() -> dict[str, EntryPoint]:
    """Installed subcommands by name (the first on ``sys.path`` wins)."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=COMMAND_ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def _summary(entry: EntryPoint) -> str:
    """The first line of the command's docstring, for ``shoal --help``."""
    try:
        doc = entry.load().__doc__ or ""
    except Exception as exc:  # a broken plugin must not break `shoal --help`
        return f"(cannot be loaded: {exc})"
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else f"(from {entry.value})"


def build_parser(
    commands: Mapping[str, EntryPoint] | None = None, *, describe: bool = True
) -> argparse.ArgumentParser:
    """The parser of the built-in commands; ``commands`` are listed in its help, with their
    docstrings' first lines when ``describe`` (which imports each command's module)."""
    parser = argparse.ArgumentParser(
        prog="shoal", description="Shoal: run one service or the fleet."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser(
        "run",
        help="serve one service (configured by SHOAL_* environment variables)",
        description="Serve one service's create_app() with uvicorn on "
        "SHOAL_HTTP_HOST:SHOAL_HTTP_PORT until SIGTERM/SIGINT.",
    )
    run.add_argument("service", help="a name from the shoal.services entry points, e.g. gateway")

    migrate = subparsers.add_parser(
        "migrate",
        help="migrate the services' PostgreSQL schemas to this version's head",
        description="Migrate the installed services' schemas in SHOAL_DATABASE_URL (each under "
        "an advisory lock, so concurrent runs are safe) and print each one's revision as JSON. "
        "Exit 1 when one is not at head afterwards (with --status: when one is behind).",
    )
    migrate.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="only this service's schema (repeatable; default: every installed service)",
    )
    migrate.add_argument(
        "--status",
        action="store_true",
        help="only read each schema's revision and the head this version needs",
    )

    admin = subparsers.add_parser(
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

    for name, entry in sorted((commands or {}).items()):
        subparsers.add_parser(name, help=_summary(entry) if describe else None, add_help=False)
    return parser


def main(
    argv: Sequence[str] | None = None, commands: Mapping[str, EntryPoint] | None = None
) -> int:
    """Entry point of the ``shoal`` console script; returns the exit code.

    ``commands`` (default: the installed ``shoal.cli`` entry points) serve every subcommand
    that is not built in; they cannot replace a built-in one.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    discovered = command_entry_points() if commands is None else commands
    installed = {name: e for name, e in discovered.items() if name not in BUILTIN_COMMANDS}
    name = args[0] if args else ""
    if name and name not in BUILTIN_COMMANDS and not name.startswith("-"):
        entry = installed.get(name)
        if entry is not None:
            try:
                command: Command = entry.load()
            except Exception as exc:  # a broken plugin: name it instead of a traceback
                print(f"shoal {name}: cannot load {entry.value}: {exc}", file=sys.stderr)
                return EXIT_FAILED
            return command(args[1:])
        if name in KNOWN_PROVIDERS:
            print(
                f"shoal {name}: not installed here; install {KNOWN_PROVIDERS[name]} "
                f"(e.g. `make install` in a Shoal checkout) to get it",
                file=sys.stderr,
            )
            return EXIT_USAGE

    # `shoal run` starts every service process: it does not import the plugins for their help.
    parsed = build_parser(installed, describe=name not in BUILTIN_COMMANDS).parse_args(args)
    if parsed.command == "migrate":
        from shoal.common.cli._migrate import run_migrate

        return run_migrate(parsed.service, status_only=parsed.status)
    if parsed.command == "admin":
        from shoal.common.cli._admin import run_admin

        body: dict[str, object] = {}
        if parsed.action == "session":
            body = {"session_id": parsed.session_id}
        elif parsed.action == "rotate-kek":
            body = {"to_kek_id": parsed.to_kek_id}
        return run_admin(parsed.action, body, parsed.up)

    from shoal.common.cli._run import run_service

    return run_service(parsed.service)
