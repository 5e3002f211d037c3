"""The options every gateway command takes, declared once.

``@gateway_command(app)`` registers ``fn(call, …its own options)``: typer sees ``fn``'s own
parameters followed by ``--url``, ``--api-key``, ``--up`` and ``--json``, and ``fn`` receives
those four as one :class:`Call`, which prints (``call.out``) and runs the command's work with a
client (``call.run``).

Example::

    @gateway_command(app)
    def show(call: Call, job_id: JobId) -> None:
        \"\"\"A job.\"\"\"

        async def work(client: ShoalClient) -> None:
            call.out.json(await client.get_job(job_id))

        call.run(work)
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import typer

from shoal.client._http import ShoalClient
from shoal.client.cli._output import Output, run
from shoal.client.cli._settings import (
    DEFAULT_UP_JSON,
    ApiKeyOption,
    JsonOption,
    UpOption,
    UrlOption,
    client_for,
)


@dataclass(frozen=True)
class Call:
    """One command's run: where it prints and which gateway, with which key, it talks to."""

    out: Output
    url: str | None
    api_key: str | None
    up: Path

    def run(self, work: Callable[[ShoalClient], Awaitable[None]]) -> None:
        """Run ``work`` with a client, turning what goes wrong into a message and an exit code."""

        async def main() -> None:
            async with client_for(self.url, self.api_key, self.up) as client:
                await work(client)

        run(self.out, main())


_SHARED = [
    inspect.Parameter("url", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=UrlOption),
    inspect.Parameter(
        "api_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ApiKeyOption
    ),
    inspect.Parameter(
        "up", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_UP_JSON, annotation=UpOption
    ),
    inspect.Parameter(
        "as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOption
    ),
]


def gateway_command(
    app: typer.Typer, name: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``fn(call, …)`` on ``app`` with the shared options appended."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        hints = get_type_hints(fn, include_extras=True)
        own = list(inspect.signature(fn).parameters.values())[1:]  # after ``call``
        params = [p.replace(annotation=hints[p.name]) for p in own] + _SHARED

        def command(**kwargs: Any) -> None:
            call = Call(
                Output(kwargs.pop("as_json")),
                kwargs.pop("url"),
                kwargs.pop("api_key"),
                kwargs.pop("up"),
            )
            fn(call, **kwargs)

        command.__name__ = fn.__name__
        command.__doc__ = fn.__doc__
        command.__module__ = fn.__module__
        # typer reads the parameters from the signature and the annotations.
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        app.command(name)(command)
        return fn

    return register
