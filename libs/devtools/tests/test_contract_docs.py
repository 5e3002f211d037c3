"""The committed contract documents (docs/openapi.json, docs/asyncapi.json) match the code."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.common.events import EVENT_PAYLOADS
from shoal.devtools import docs
from shoal.devtools.asyncapi import asyncapi_document

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_committed_documents_match_the_code() -> None:
    for name, content in docs.documents().items():
        committed = (DOCS / name).read_text()
        assert committed == content, f"docs/{name} is stale: run `make docs` and commit it"


def test_a_changed_route_is_drift(tmp_path: Path) -> None:
    for name in ("openapi.json", "asyncapi.json"):
        (tmp_path / name).write_text((DOCS / name).read_text())
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "openapi.json").read_text())
    document["paths"].pop(next(iter(document["paths"])))  # a route the code still has
    (tmp_path / "openapi.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 1


def test_a_changed_event_payload_is_drift(tmp_path: Path) -> None:
    (tmp_path / "asyncapi.json").write_text((DOCS / "asyncapi.json").read_text())
    (tmp_path / "openapi.json").write_text((DOCS / "openapi.json").read_text())
    from pydantic import create_model

    from shoal.common.contracts import Event
    from shoal.common.events import Payload

    changed = create_model("PromptAborted", __base__=Payload, prompt_id=(str, ...), why=(str, ...))
    original = EVENT_PAYLOADS[Event.PROMPT_ABORTED]
    EVENT_PAYLOADS[Event.PROMPT_ABORTED] = changed
    try:
        assert docs.main(["--check", "--dir", str(tmp_path)]) == 1
    finally:
        EVENT_PAYLOADS[Event.PROMPT_ABORTED] = original
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 0


def test_every_event_type_has_a_channel_and_a_schema() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    for event_type in EVENT_PAYLOADS:
        channel = document["channels"][event_type]
        assert channel["address"] == f"shoal.session.evt.{{session}}.{event_type}"
    assert "deliver.user" in document["channels"]
    assert document["channels"]["deliver.tag"]["address"] == "shoal.deliver.tag.{owner}.{tag}"
