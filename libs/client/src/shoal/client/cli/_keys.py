"""``shoal keys create|list|revoke``."""

from __future__ import annotations

from typing import Annotated

import typer

from shoal.client._http import ShoalClient
from shoal.client.cli._command import Call, gateway_command

app = typer.Typer(help="Issue, list and revoke API keys.", no_args_is_help=True)

OwnerOption = Annotated[
    str | None, typer.Option("--owner", help="act for this owner (admin keys only)")
]


@gateway_command(app)
def create(
    call: Call,
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
) -> None:
    """Issue a key; the key itself is shown only now."""
    out = call.out

    async def work(client: ShoalClient) -> None:
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

    call.run(work)


@gateway_command(app, "list")
def list_(
    call: Call,
    owner: OwnerOption = None,
) -> None:
    """This owner's keys (an admin key: every key, or --owner's)."""
    out = call.out

    async def work(client: ShoalClient) -> None:
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

    call.run(work)


@gateway_command(app)
def revoke(
    call: Call,
    key_id: Annotated[str, typer.Argument(help="the key's id (not the key itself)")],
) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        await client.revoke_key(key_id)
        if out.as_json:
            out.json({"id": key_id, "revoked": True})
        else:
            out.console.print(f"revoked [bold]{key_id}[/bold]")

    call.run(work)
