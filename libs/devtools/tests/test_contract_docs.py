"""The committed contract documents (docs/openapi.json, api.md, asyncapi.json, events.md,
schemas/) match the code, and a changed route or event payload is caught as drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shoal.common.events import EVENT_PAYLOADS
from shoal.devtools import docs
from shoal.devtools.asyncapi import _model_name, asyncapi_document

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_committed_documents_match_the_code() -> None:
    for name, content in docs.documents().items():
        committed = (DOCS / name).read_text()
        assert committed == content, f"docs/{name} is stale: run `make docs` and commit it"


def _committed_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    return copy


def test_a_changed_route_is_drift(tmp_path: Path) -> None:
    tmp_path = _committed_copy(tmp_path)
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "openapi.json").read_text())
    document["paths"].pop(next(iter(document["paths"])))  # a route the code still has
    (tmp_path / "openapi.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 1


def test_a_changed_event_payload_is_drift(tmp_path: Path) -> None:
    tmp_path = _committed_copy(tmp_path)
    from pydantic import create_model

    from shoal.common.contracts import Event
    from shoal.common.events import Payload

    changed = create_model("PromptAborted", __base__=Payload, prompt_id=(str, ...), why=(str, ...))
    original = EVENT_PAYLOADS[Event.PROMPT_ABORTED]
    EVENT_PAYLOADS[Event.PROMPT_ABORTED] = changed
    try:
        rendered = docs.documents()
        assert docs.stale_documents(tmp_path, rendered) == [
            "asyncapi.json",
            "events.md",
            "schemas/prompt.aborted.json",
        ]
        assert docs.main(["--check", "--dir", str(tmp_path)]) == 1
    finally:
        EVENT_PAYLOADS[Event.PROMPT_ABORTED] = original
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 0


def test_every_event_type_has_a_channel_and_a_schema() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    commit = document["channels"]["session.commit"]
    assert commit["address"] == "shoal.session.evt.{session}.commit"
    schemas = document["components"]["schemas"]
    assert "LedgerCommit" in schemas
    for event_type in EVENT_PAYLOADS:
        assert schemas[_model_name(event_type)]["properties"]["type"]["const"] == event_type
    assert "deliver.user" in document["channels"]
    assert document["channels"]["deliver.tag"]["address"] == "shoal.deliver.tag.{owner}.{tag}"


def test_a_removed_event_type_leaves_a_stale_schema(tmp_path: Path) -> None:
    tmp_path = _committed_copy(tmp_path)
    (tmp_path / "schemas" / "prompt.renamed.json").write_text("{}\n")
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 1
    assert docs.main(["--dir", str(tmp_path)]) == 0  # `make docs` removes it
    assert not (tmp_path / "schemas" / "prompt.renamed.json").exists()
    assert docs.main(["--check", "--dir", str(tmp_path)]) == 0


def test_every_event_type_has_a_json_schema_and_a_catalogue_entry() -> None:
    catalogue = (DOCS / "events.md").read_text()
    for event_type in EVENT_PAYLOADS:
        schema = json.loads((DOCS / "schemas" / f"{event_type}.json").read_text())
        assert schema["properties"]["type"]["const"] == event_type
        assert {"id", "type", "source", "time", "subject", "data"} <= set(schema["required"])
        assert f"### `{event_type}`" in catalogue


def test_the_api_reference_names_every_route() -> None:
    reference = (DOCS / "api.md").read_text()
    openapi = json.loads((DOCS / "openapi.json").read_text())
    for path, item in openapi["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "patch", "delete"):
                assert f"### `{method.upper()} {path}`" in reference
