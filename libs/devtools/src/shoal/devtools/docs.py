"""The committed contract documents: ``docs/openapi.json`` and ``docs/asyncapi.json``.

``make docs`` (``python -m shoal.devtools.docs``) writes both from the code; ``--check`` exits 1
and names the stale file when the code and a committed document differ (CI's drift test runs the
same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoal.devtools.asyncapi import render as render_asyncapi


def render_openapi() -> str:
    """The gateway's OpenAPI document as committed (built offline: nothing connects)."""
    from shoal.gateway.app import create_app
    from shoal.gateway.config import GatewaySettings

    document = create_app(GatewaySettings()).openapi()
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def documents() -> dict[str, str]:
    """File name under docs/ -> its content rendered from the code."""
    return {"openapi.json": render_openapi(), "asyncapi.json": render_asyncapi()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.devtools.docs", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("docs"))
    parser.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, content in documents().items():
        path = args.dir / name
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(content)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)} — run `make docs` and commit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
