"""``shoal admin …``: operator commands, sent as requests to the services' admin RPCs over NATS.

Connection settings come from the environment like every process (``SHOAL_NATS_URL``,
``SHOAL_SUBJECT_PREFIX``), or from ``--up DIR/up.json`` of a ``shoal up`` fleet. The answer is
printed as JSON; a refused or unanswered request prints the error and exits 1.

Example::

    shoal admin partitions                      # owner, epoch, lag per session partition
    shoal admin session ses_01j…                # owner, epoch, KV revision, applied_seq, status
    shoal admin rotate-kek --to k2              # re-wrap every data key with KEK k2
    shoal admin rebuild-projection              # replay SESSION_EVT into PostgreSQL
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.common.errors import ShoalError

EXIT_FAILED = 1


@dataclass(frozen=True)
class AdminCall:
    """One admin command: which service's RPC it calls, and how long it may take."""

    service: str
    method: str
    timeout: float = 10.0


COMMANDS: dict[str, AdminCall] = {
    "partitions": AdminCall("session", "admin.partitions"),
    "session": AdminCall("session", "admin.session"),
    "rebuild-projection": AdminCall("session", "admin.rebuild_projection", timeout=600.0),
    "rotate-kek": AdminCall("keys", "admin.rotate_kek", timeout=600.0),
}


def _nats_url_from(up_json: Path | None) -> str | None:
    if up_json is None:
        return None
    data: dict[str, Any] = json.loads(up_json.read_text())
    return str(data["nats_url"])


async def _call(command: str, body: dict[str, Any], up_json: Path | None) -> Any:
    from shoal.common.messaging import Subjects, connect_nats, request
    from shoal.common.settings import CommonSettings

    overrides = {"nats_url": url} if (url := _nats_url_from(up_json)) else {}
    settings = CommonSettings(**overrides)  # type: ignore[arg-type]
    call = COMMANDS[command]
    nc = await connect_nats(settings, name="shoal-admin")
    try:
        subject = Subjects(settings.subject_prefix).rpc(call.service, call.method)
        return await request(nc, subject, body, timeout=call.timeout)
    finally:
        await nc.close()


def run_admin(command: str, body: dict[str, Any], up_json: Path | None = None) -> int:
    """Send ``command`` and print its answer as JSON; the exit code."""
    try:
        answer = asyncio.run(_call(command, body, up_json))
    except ShoalError as exc:
        print(f"shoal admin {command}: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, KeyError, ValueError) as exc:
        print(f"shoal admin {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(answer, indent=2, sort_keys=True, default=str))
    return 0
