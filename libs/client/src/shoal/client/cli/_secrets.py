"""``shoal secrets set|list|rm``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from shoal.client.cli._output import Output, run
from shoal.client.cli._settings import (
    DEFAULT_UP_JSON,
    ApiKeyOption,
    JsonOption,
    UpOption,
    UrlOption,
    client_for,
)

app = typer.Typer(help="Store, list and delete secrets runners may read.", no_args_is_help=True)

SecretName = Annotated[str, typer.Argument(help="the secret's name, e.g. OPENAI_API_KEY")]
OwnerOption = Annotated[
    str | None, typer.Option("--owner", help="act for this owner (admin keys only)")
]


def _read_value() -> str:
    """The value from stdin (one trailing newline dropped), or a hidden prompt on a terminal.

    Never from the command line, where other users' ``ps`` would see it.
    """
    if sys.stdin.isatty():
        value: str = typer.prompt("value", hide_input=True)
        return value
    value = sys.stdin.read()
    return value[:-1] if value.endswith("\n") else value


@app.command("set")
def set_(
    name: SecretName,
    owner: OwnerOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """Store (a new version of) a secret; the value is read from stdin or a hidden prompt."""
    out = Output(as_json)
    value = _read_value()

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            await client.put_secret(name, value, owner=owner)
        if out.as_json:
            out.json({"name": name, "stored": True})
        else:
            out.console.print(f"stored [bold]{name}[/bold]")

    run(out, work())


@app.command("list")
def list_(
    owner: OwnerOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """Names and dates of the secrets (never values)."""
    out = Output(as_json)

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            stored = await client.list_secrets(owner=owner)
        if out.as_json:
            out.json({"secrets": stored})
            return
        out.table(
            ["NAME", "VERSION", "CREATED", "UPDATED"],
            ([s.name, s.version, s.created_at, s.updated_at] for s in stored),
        )

    run(out, work())


@app.command()
def rm(
    name: SecretName,
    owner: OwnerOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """Delete a secret."""
    out = Output(as_json)

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            await client.delete_secret(name, owner=owner)
        if out.as_json:
            out.json({"name": name, "deleted": True})
        else:
            out.console.print(f"deleted [bold]{name}[/bold]")

    run(out, work())
