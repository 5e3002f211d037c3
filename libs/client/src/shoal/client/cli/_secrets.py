"""``shoal secrets set|list|rm``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from shoal.client._http import ShoalClient
from shoal.client.cli._command import Call, gateway_command

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


@gateway_command(app, "set")
def set_(
    call: Call,
    name: SecretName,
    owner: OwnerOption = None,
) -> None:
    """Store (a new version of) a secret; the value is read from stdin or a hidden prompt."""
    out = call.out
    value = _read_value()

    async def work(client: ShoalClient) -> None:
        await client.put_secret(name, value, owner=owner)
        if out.as_json:
            out.json({"name": name, "stored": True})
        else:
            out.console.print(f"stored [bold]{name}[/bold]")

    call.run(work)


@gateway_command(app, "list")
def list_(
    call: Call,
    owner: OwnerOption = None,
) -> None:
    """Names and dates of the secrets (never values)."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        stored = await client.list_secrets(owner=owner)
        if out.as_json:
            out.json({"secrets": stored})
            return
        out.table(
            ["NAME", "VERSION", "CREATED", "UPDATED"],
            ([s.name, s.version, s.created_at, s.updated_at] for s in stored),
        )

    call.run(work)


@gateway_command(app)
def rm(
    call: Call,
    name: SecretName,
    owner: OwnerOption = None,
) -> None:
    """Delete a secret."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        await client.delete_secret(name, owner=owner)
        if out.as_json:
            out.json({"name": name, "deleted": True})
        else:
            out.console.print(f"deleted [bold]{name}[/bold]")

    call.run(work)
