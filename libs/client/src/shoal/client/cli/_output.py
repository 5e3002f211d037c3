"""How every command prints: rich for people, one JSON document (or line) for scripts.

Errors go to stderr: a red line, or with ``--json`` ``{"error": {"status", "code", "detail"}}``.
Exit codes: 0 done, 1 the gateway refused or could not be reached, 2 bad usage or settings,
130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine, Iterable
from typing import Any

import httpx
import msgspec
import typer
from rich.console import Console
from rich.table import Table

from shoal.client._errors import ShoalAPIError, ShoalConnectionClosed
from shoal.client.cli._settings import SettingsError

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Output:
    """Where a command writes its result (stdout) and its errors (stderr)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)

    def json(self, value: Any) -> None:
        """One JSON document on one line (``msgspec`` structs become objects)."""
        sys.stdout.write(json.dumps(msgspec.to_builtins(value), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def table(self, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
        table = Table(*columns, header_style="bold cyan", box=None, pad_edge=False)
        for row in rows:
            table.add_row(*("" if cell is None else str(cell) for cell in row))
        self.console.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for name, value in pairs:
            table.add_row(name, "" if value is None else str(value))
        self.console.print(table)

    def fail(self, code: int, error: dict[str, Any], message: str) -> typer.Exit:
        if self.as_json:
            self.errors.file.write(json.dumps({"error": error}) + "\n")
        else:
            self.errors.print(f"[red]error:[/red] {message}")
        return typer.Exit(code)


def run(out: Output, work: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine, turning what can go wrong into a message and an exit code."""
    try:
        asyncio.run(work)
    except ShoalAPIError as exc:
        error = {"status": exc.status, "code": exc.code, "detail": exc.detail}
        raise out.fail(EXIT_API_ERROR, error, f"{exc.status} {exc.code}: {exc.detail}") from None
    except ShoalConnectionClosed as exc:
        error = {"status": exc.code, "code": "connection_closed", "detail": exc.reason}
        raise out.fail(EXIT_API_ERROR, error, str(exc)) from None
    except httpx.HTTPError as exc:
        detail = f"cannot reach the gateway: {exc!r}"
        error = {"status": 0, "code": "unreachable", "detail": detail}
        raise out.fail(EXIT_API_ERROR, error, detail) from None
    except TimeoutError:
        detail = "no answer in time (--timeout)"
        raise out.fail(
            EXIT_API_ERROR, {"status": 0, "code": "timeout", "detail": detail}, detail
        ) from None
    except SettingsError as exc:
        error = {"status": 0, "code": "bad_settings", "detail": str(exc)}
        raise out.fail(EXIT_USAGE, error, str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
