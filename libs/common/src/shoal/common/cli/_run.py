"""``shoal run <service>``: one service process, configured from ``SHOAL_*`` variables."""

from __future__ import annotations

import os
import signal
import sys
from importlib.metadata import EntryPoint, entry_points
from types import FrameType

ENTRY_POINT_GROUP = "shoal.services"

EXIT_USAGE = 2
EXIT_FAILED = 1


def service_entry_points() -> dict[str, EntryPoint]:
    """Installed services by name. When two distributions declare one name, the first on
    ``sys.path`` wins (so a ``PYTHONPATH`` entry can stand in for an installed service)."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def run_service(name: str) -> int:
    """Serve ``name``'s ``create_app()`` with uvicorn until SIGTERM/SIGINT; the exit code."""
    services = service_entry_points()
    entry = services.get(name)
    if entry is None:
        known = ", ".join(sorted(services)) or "none are installed"
        print(f"shoal run: unknown service {name!r} (known: {known})", file=sys.stderr)
        return EXIT_USAGE

    from pydantic import ValidationError

    from shoal.common.service import GcPacer, ServiceServer, server_config
    from shoal.common.settings import CommonSettings

    os.environ.setdefault("SHOAL_SERVICE_NAME", name)
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        print(f"shoal run: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    app = entry.load()()
    pacer = GcPacer(
        young=settings.gc_young_interval.total_seconds(),
        full=settings.gc_full_interval.total_seconds(),
    )
    server = ServiceServer(server_config(app, settings), gc_pacer=pacer)

    def after_uvicorn(sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal that stopped it once it has shut down gracefully:
        # that stop is done, so exit 0. Before uvicorn listens, exit as the signal asks.
        if not server.should_exit:
            raise SystemExit(128 + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, after_uvicorn)
    server.run()
    # uvicorn returns without having started when the lifespan's startup failed.
    return 0 if server.started else EXIT_FAILED
