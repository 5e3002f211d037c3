"""The committed contract documents under ``docs/``, all generated from the code.

``openapi.json`` (the gateway) and ``api.md`` (its readable reference); ``asyncapi.json``,
``events.md`` (the event catalogue) and ``schemas/<type>.json`` (one JSON Schema per event type,
for consumers without ``shoal-common``). ``make docs`` (``python -m shoal.devtools.docs``) writes
them; ``--check`` exits 1 and names what is stale when the code and a committed document differ
(the drift test runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.common.events import EVENT_PAYLOADS, EventMessage
from shoal.devtools._markdown import api_markdown, events_markdown
from shoal.devtools.asyncapi import event_message_model
from shoal.devtools.asyncapi import render as render_asyncapi

SCHEMA_DIR = "schemas"


def _json(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def openapi_document() -> dict[str, Any]:
    """The gateway's OpenAPI document (built offline: nothing connects)."""
    from shoal.gateway.app import create_app
    from shoal.gateway.config import GatewaySettings

    document: dict[str, Any] = create_app(GatewaySettings()).openapi()
    return document


def render_openapi() -> str:
    """The gateway's OpenAPI document as committed."""
    return _json(openapi_document())


def event_schemas() -> dict[str, str]:
    """``schemas/<type>.json`` for every event type, and ``schemas/event.json`` (any type)."""
    schemas = {f"{SCHEMA_DIR}/event.json": _json(_schema(EventMessage, "event"))}
    for event_type in sorted(EVENT_PAYLOADS):
        model = event_message_model(event_type)
        schemas[f"{SCHEMA_DIR}/{event_type}.json"] = _json(_schema(model, event_type))
    return schemas


def _schema(model: type[EventMessage], name: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://shoal.dev/schemas/v1/{name}.json",
        **schema,
    }


def documents() -> dict[str, str]:
    """Path under docs/ -> its content rendered from the code."""
    openapi = openapi_document()
    return {
        "openapi.json": _json(openapi),
        "api.md": api_markdown(openapi),
        "asyncapi.json": render_asyncapi(),
        "events.md": events_markdown(),
        **event_schemas(),
    }


def stale_documents(docs_dir: Path, rendered: dict[str, str]) -> list[str]:
    """What differs from ``rendered``: changed or missing files, and schemas nothing renders."""
    stale = [
        name
        for name, content in rendered.items()
        if not (docs_dir / name).exists() or (docs_dir / name).read_text() != content
    ]
    schema_dir = docs_dir / SCHEMA_DIR
    if schema_dir.is_dir():
        stale += sorted(
            f"{SCHEMA_DIR}/{path.name}"
            for path in schema_dir.glob("*.json")
            if f"{SCHEMA_DIR}/{path.name}" not in rendered
        )
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.devtools.docs", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("docs"))
    parser.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    args = parser.parse_args(argv)
    rendered = documents()
    stale = stale_documents(args.dir, rendered)
    if args.check:
        if stale:
            print(f"stale: {', '.join(stale)} — run `make docs` and commit", file=sys.stderr)
            return 1
        return 0
    for name in stale:
        path = args.dir / name
        if name in rendered:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rendered[name])
            print(f"wrote {path}")
        else:
            path.unlink()
            print(f"removed {path} (no such event type)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
