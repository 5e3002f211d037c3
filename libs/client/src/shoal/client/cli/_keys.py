"""``shoal keys create|list|revoke``."""

from __future__ import annotations

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

app = typer.Typer(help="Issue, list and revoke API keys.", no_args_is_help=True)

OwnerOption = Annotated[
    str | None, typer.Option("--owner", help="act for this owner (admin keys only)")
]


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="a name to recognise the key by")],
    scopes: Annotated[
        list[str],
        typer.Option(
            "--scope", "-s", help="a scope (repeat): sessions, secrets, jobs, read, admin"
        ),
    ],
    owner: OwnerOption = None,
    expires_in: Annotated[
        int | None, typer.Option("--expires-in", help="seconds until it expires")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """Issue a key; the key itself is shown only now."""
    out = Output(as_json)

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            key = await client.create_key(name, scopes, owner=owner, expires_in_seconds=expires_in)
        if out.as_json:
            out.json(key)
            return
        out.fields(
            [
                ("id", key.id),
                ("name", key.name),
                ("owner", key.owner),
                ("scopes", ", ".join(key.scopes)),
                ("expires", key.expires_at or "never"),
                ("key", key.key),
            ]
        )
        out.console.print("[dim]keep the key: it is shown only once[/dim]")

    run(out, work())


@app.command("list")
def list_(
    owner: OwnerOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """This owner's keys (an admin key: every key, or --owner's)."""
    out = Output(as_json)

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            keys = await client.list_keys(owner=owner)
        if out.as_json:
            out.json({"keys": keys})
            return
        out.table(
            ["ID", "NAME", "OWNER", "SCOPES", "CREATED", "LAST USED", "REVOKED"],
            (
                [
                    k.id,
                    k.name,
                    k.owner,
                    ",".join(k.scopes),
                    k.created_at,
                    k.last_used_at or "-",
                    f"[red]{k.revoked_at}[/red]" if k.revoked_at else "-",
                ]
                for k in keys
            ),
        )

    run(out, work())


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (not the key itself)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    up: UpOption = DEFAULT_UP_JSON,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    out = Output(as_json)

    async def work() -> None:
        async with client_for(url, api_key, up) as client:
            await client.revoke_key(key_id)
        if out.as_json:
            out.json({"id": key_id, "revoked": True})
        else:
            out.console.print(f"revoked [bold]{key_id}[/bold]")

    run(out, work())
