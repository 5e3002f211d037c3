"""``shoal migrate``: migrate the installed services' schemas, or report where they are.

Services list their :class:`~shoal.common.storage.Schema` under the ``shoal.migrations`` entry
points. The database is ``SHOAL_DATABASE_URL``; all services share one database, each with its
own version table.
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import entry_points

from shoal.common.storage import Schema

SCHEMA_ENTRY_POINT_GROUP = "shoal.migrations"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def installed_schemas() -> dict[str, Schema]:
    """The schemas of the installed services, by service name."""
    found: dict[str, Schema] = {}
    for entry in entry_points(group=SCHEMA_ENTRY_POINT_GROUP):
        schema = entry.load()
        if not isinstance(schema, Schema):
            raise TypeError(f"entry point {entry.value} is not a shoal.common.storage.Schema")
        found.setdefault(entry.name, schema)
    return found


def run_migrate(services: list[str], *, status_only: bool) -> int:
    """Migrate (or with ``status_only`` only read) the named services' schemas, all by default;
    print one JSON object by service. With ``status_only`` exit 1 when one is behind."""
    from pydantic import ValidationError

    from shoal.common.settings import CommonSettings
    from shoal.common.storage import schema_versions

    schemas = installed_schemas()
    unknown = sorted(set(services) - set(schemas))
    if unknown:
        known = ", ".join(sorted(schemas)) or "none are installed"
        print(
            f"shoal migrate: no schema for {', '.join(unknown)} (known: {known})", file=sys.stderr
        )
        return EXIT_USAGE
    chosen = [schemas[name] for name in (services or sorted(schemas))]
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        print(f"shoal migrate: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    url = settings.database_url.get_secret_value()
    try:
        versions = asyncio.run(schema_versions(url, chosen, migrate=not status_only))
    except Exception as exc:  # any database or migration failure ends the command, named
        print(f"shoal migrate: failed: {exc!r}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({v.service: v.as_dict() for v in versions}, indent=2))
    return EXIT_OK if all(v.up_to_date for v in versions) else EXIT_FAILED
