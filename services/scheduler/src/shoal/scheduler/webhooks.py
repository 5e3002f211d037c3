"""Job callbacks: the signature, the SSRF rules for callback URLs, and delivery bookkeeping.

Pure functions (no I/O). A delivery POSTs the job (JSON) to its ``callback_url`` with
``Shoal-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``; during a
rotation's overlap a second ``v1=`` carries the signature with the previous secret, so a
receiver holding either secret verifies.

Example (what a receiver does)::

    ok = verify(body, request.headers["Shoal-Signature"], secret, now=time.time())
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from shoal.common.clock import iso
from shoal.common.errors import BadRequest
from shoal.scheduler.jobs import Job, backoff

SIGNATURE_HEADER = "Shoal-Signature"
MAX_URL_CHARS = 2048
DEFAULT_TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` with ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<sig>[,v1=<sig with the previous secret>]``."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])


def verify(
    body: bytes, header: str, secret: str, *, now: float, tolerance: float = DEFAULT_TOLERANCE_S
) -> bool:
    """A receiver's check: one ``v1`` matches and ``t`` is within ``tolerance`` of ``now``."""
    fields = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in fields if k == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, v) for k, v in fields if k == "v1")


def refused_address(address: str) -> bool:
    """Private, loopback, link-local, multicast, reserved or unspecified: not the internet."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_callback_url(url: object, *, allow_private: bool) -> str:
    """A callback URL must be absolute http(s); an IP literal must be public (unless
    ``allow_private``). Host names are checked again, resolved, at each delivery."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise BadRequest(f"callback_url must be an http(s) URL of at most {MAX_URL_CHARS} chars")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback_url must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise BadRequest("callback_url must not carry credentials")
    host = parts.hostname
    if not allow_private:
        try:
            literal = refused_address(host)
        except ValueError:
            literal = host == "localhost" or host.endswith(".localhost")
        if literal:
            raise BadRequest(
                "callback_url points at a private or loopback address "
                "(SHOAL_SCHEDULER_WEBHOOKS_ALLOW_PRIVATE allows it)"
            )
    return url


def all_public(addresses: Iterable[str]) -> bool:
    found = list(addresses)
    return bool(found) and not any(refused_address(a) for a in found)


def record_delivery(
    job: Job,
    *,
    at: datetime,
    status: int | None,
    error: str | None,
    max_deliveries: int,
    base: timedelta,
    cap: timedelta,
) -> Job:
    """Add one delivery attempt to the job; 2xx ends the deliveries, a failure retries with
    backoff until ``max_deliveries`` attempts were made."""
    entry: dict[str, Any] = {"at": iso(at.timestamp()), "status": status}
    if error is not None:
        entry["error"] = error[:500]
    deliveries = (*job.deliveries, entry)
    delivered = status is not None and 200 <= status < 300
    # Deliveries since the job last ended (a retried job that ends again starts afresh).
    ended = iso(job.updated_at.timestamp())
    tries = len([d for d in deliveries if str(d.get("at", "")) >= ended])
    if delivered or tries >= max_deliveries:
        due = None
    else:
        due = at + backoff(tries, base, cap)
    return replace(job, deliveries=deliveries, callback_due_at=due)


def lease_delivery(job: Job, *, until: datetime) -> Job:
    """Hold a delivery while it is in flight: another replica retries it after ``until``."""
    return replace(job, callback_due_at=until)
