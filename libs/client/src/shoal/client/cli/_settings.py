"""Where the CLI finds the gateway and its key: flags, then the environment, then ``shoal up``.

``--url`` / ``SHOAL_URL`` and ``--api-key`` / ``SHOAL_API_KEY`` win; what they leave unset is
read from the ``up.json`` a running ``shoal up`` writes (``--up``, default ``.shoal/up.json``:
``gateway_url`` and ``admin_key``). Without a URL the gateway is ``http://127.0.0.1:8470``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from shoal.client._http import ShoalClient

DEFAULT_URL = "http://127.0.0.1:8470"
DEFAULT_UP_JSON = Path(".shoal/up.json")

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="SHOAL_URL", help="gateway URL (default: up.json, else :8470)"),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="SHOAL_API_KEY", help="API key (default: up.json's)"),
]
UpOption = Annotated[
    Path,
    typer.Option("--up", help="the up.json of a running `shoal up`, read for what is not set"),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="print JSON (stable shapes, see the README) instead")
]


class SettingsError(Exception):
    """The CLI cannot tell which gateway or key to use (exit code 2)."""


@dataclass(frozen=True)
class Target:
    """The gateway to talk to and the key to use."""

    url: str
    api_key: str


def resolve(url: str | None, api_key: str | None, up_json: Path) -> Target:
    """Flags and environment first (typer reads both), then ``up_json`` if it exists."""
    if url is None or api_key is None:
        up = _read_up(up_json)
        url = url or up.get("gateway_url")
        api_key = api_key or up.get("admin_key")
    if not api_key:
        raise SettingsError(
            f"no API key: pass --api-key, set SHOAL_API_KEY, or run `shoal up` ({up_json} "
            "holds its admin key)"
        )
    return Target(url=(url or DEFAULT_URL).rstrip("/"), api_key=api_key)


def client_for(url: str | None, api_key: str | None, up_json: Path) -> ShoalClient:
    """A client for the resolved gateway and key (use it as ``async with``)."""
    target = resolve(url, api_key, up_json)
    return ShoalClient(target.url, target.api_key)


def _read_up(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{path} is not a shoal up state file")
    return {k: v for k, v in raw.items() if isinstance(v, str)}


def gateway_url(url: str | None, up_json: Path) -> str:
    """The gateway URL alone (a runner needs no API key)."""
    if url is None:
        url = _read_up(up_json).get("gateway_url")
    return (url or DEFAULT_URL).rstrip("/")
