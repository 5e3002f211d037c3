"""The NATS connection every service holds: reconnects forever, logs state changes.

Example::

    nc = await connect_nats(settings, name="gateway")
    js = nc.jetstream()
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from nats.aio.client import Client as NATS

from shoal.common.errors import Unavailable
from shoal.common.settings import CommonSettings

log = logging.getLogger(__name__)


async def connect_nats(settings: CommonSettings, *, name: str) -> NATS:
    """Connect with unlimited reconnects; the first connect fails within
    ``nats_connect_timeout`` with :class:`Unavailable`, naming the last error the server or
    the TLS handshake gave (an authorization violation, an unknown CA)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    timeout = settings.nats_connect_timeout.total_seconds()
    # A dict: nats-py annotates the timeouts as int, and takes (and needs) float seconds.
    options: dict[str, Any] = {
        **nats_auth_options(settings),
        "name": f"{name}@{settings.replica_name}",
        "connect_timeout": timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
    }
    nc = NATS()
    try:
        # nats-py retries a failed first connect for ever when reconnects are unlimited: the
        # deadline is ours.
        async with asyncio.timeout(timeout):
            await nc.connect(nats_servers(settings.nats_url), **options)
    except Exception as exc:  # nats raises several unrelated types on a failed first connect
        await nc.close()
        cause = errors[-1] if errors else exc
        raise Unavailable(f"cannot connect to NATS at {settings.nats_url}: {cause!r}") from exc
    return nc


def nats_servers(url: str) -> list[str]:
    """The servers of ``SHOAL_NATS_URL``: one URL, or several separated by commas (a cluster's
    seeds; the client learns the rest from the servers)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def nats_tls_context(settings: CommonSettings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for (a CA to trust, a client certificate), or None."""
    ca, cert, key = (
        settings.nats_tls_ca_file,
        settings.nats_tls_cert_file,
        settings.nats_tls_key_file,
    )
    if ca is None and cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def nats_auth_options(settings: CommonSettings) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for the settings' credentials and TLS.

    Files are checked here so a missing mount fails with its setting's name, not deep in nats-py.
    """
    files = {
        "SHOAL_NATS_CREDS_FILE": settings.nats_creds_file,
        "SHOAL_NATS_NKEY_SEED_FILE": settings.nats_nkey_seed_file,
        "SHOAL_NATS_TLS_CA_FILE": settings.nats_tls_ca_file,
        "SHOAL_NATS_TLS_CERT_FILE": settings.nats_tls_cert_file,
        "SHOAL_NATS_TLS_KEY_FILE": settings.nats_tls_key_file,
    }
    for variable, path in files.items():
        if path is not None and not path.is_file():
            raise Unavailable(f"{variable}={path}: no such file")
    options: dict[str, Any] = {}
    if settings.nats_creds_file is not None:
        options["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    tls = nats_tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options
