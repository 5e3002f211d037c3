"""Operator actions on the keys service, called over NATS (what ``shoal admin`` runs).

Example::

    nc = await connect_nats(settings, name="cli")
    report = await rotate_kek(nc, Subjects(settings.subject_prefix), to_kek_id="k2")
    report["remaining"] == 0      # every data key is wrapped by k2; k1 may be retired
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from shoal.common.messaging import Subjects, request

# Re-wrapping is one AES-GCM operation and one UPDATE per owner; give large fleets time.
ROTATE_TIMEOUT_S = 300.0


async def rotate_kek(
    nc: NATS,
    subjects: Subjects,
    to_kek_id: str | None = None,
    *,
    timeout: float = ROTATE_TIMEOUT_S,  # noqa: ASYNC109 - passed to nc.request
) -> dict[str, Any]:
    """Ask a keys replica to re-wrap every data key under ``to_kek_id`` (default: its active KEK).

    Returns ``{"to_kek_id", "rewrapped", "remaining", "by_kek", "failed"}``. Idempotent: run it
    again until ``remaining`` is 0 (a replica with an older ``SHOAL_KEYS_ACTIVE_KEK`` may still
    have created data keys under the old KEK).
    """
    report: dict[str, Any] = await request(
        nc, subjects.rpc("keys", "admin.rotate_kek"), {"to_kek_id": to_kek_id}, timeout=timeout
    )
    return report
