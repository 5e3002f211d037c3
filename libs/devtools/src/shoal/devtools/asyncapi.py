"""Shoal's event contract as an AsyncAPI 3 document, generated with FastStream.

The payload models live in :mod:`shoal.common.events`; this module only declares the public
subjects as FastStream publishers and renders the document. ``make docs`` writes it to
``docs/asyncapi.json``; a test fails when the committed document and the code drift.

Example::

    document = asyncapi_document()          # a JSON-ready dict
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from faststream.nats import NatsBroker
from faststream.specification.asyncapi import AsyncAPI
from pydantic import BaseModel, Field, create_model

from shoal.common.events import EVENT_PAYLOADS, EventMessage

TITLE = "Shoal events"
DESCRIPTION = (
    "Events other services consume from Shoal's NATS JetStream streams. Every message is an "
    "envelope with CloudEvents attribute names; `data` depends on `type`. Within a "
    "`schemaversion` changes are additive: ignore fields you do not know."
)


def _model_name(event_type: str) -> str:
    return "".join(part.capitalize() for part in event_type.replace(".", "_").split("_")) + "Event"


def event_message_model(event_type: str) -> type[EventMessage]:
    """The envelope of ``event_type`` with its payload model as ``data``."""
    return create_model(
        _model_name(event_type),
        __base__=EventMessage,
        type=(Literal[event_type], ...),  # type: ignore[arg-type]  # a Literal made at run time
        data=(EVENT_PAYLOADS[event_type], ...),
    )


def commit_model() -> type[BaseModel]:
    """One ledger message: ``{"events": [...]}``, each event typed by its ``type``."""
    typed = tuple(event_message_model(t) for t in sorted(EVENT_PAYLOADS))
    item = Annotated[Union[typed], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
    events = list[item]
    return create_model(
        "LedgerCommit", events=(events, Field(description="the command's events, in seq order"))
    )


def asyncapi_document(prefix: str = "shoal", version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the public subjects under ``prefix``."""
    broker = NatsBroker()
    broker.publisher(
        f"{prefix}.session.evt.{{session}}.commit",
        schema=commit_model(),
        title="session.commit",
        description=(
            f"Stream {prefix.upper()}_SESSION_EVT: the session ledger, one message per command "
            "carrying its events in `seq` order (`Nats-Msg-Id`: the first event's id; "
            "`Shoal-Seq`: the last event's seq). Ledgers written by older versions hold one event "
            f"per message on `{prefix}.session.evt.{{session}}.{{type}}` (the envelope itself)."
        ),
    )
    broker.publisher(
        f"{prefix}.deliver.user.{{owner}}",
        schema=EventMessage,
        title="deliver.user",
        description="Every event of the owner's sessions, fanned out by the eventbus.",
    )
    broker.publisher(
        f"{prefix}.deliver.tag.{{owner}}.{{tag}}",
        schema=EventMessage,
        title="deliver.tag",
        description="Every event of the owner's sessions that carry the tag (owner-scoped).",
    )
    spec = AsyncAPI(
        broker, title=TITLE, version=version, description=DESCRIPTION, schema_version="3.0.0"
    )
    document: dict[str, Any] = json.loads(spec.to_specification().to_json())
    document.pop("servers", None)  # deployments differ; the document describes subjects
    for channel in document.get("channels", {}).values():
        channel.pop("servers", None)
    return document


def render(prefix: str = "shoal") -> str:
    """The document as committed: stable key order, two-space indent, trailing newline."""
    return json.dumps(asyncapi_document(prefix), indent=2, sort_keys=True) + "\n"
