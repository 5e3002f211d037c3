"""The client CLI: ``shoal sessions|keys|secrets|jobs|runner …`` (typer + rich).

Each group is also an entry point of the ``shoal.cli`` group (``main(argv) -> int``), which the
``shoal`` command dispatches to; ``python -m shoal.client <group> …`` runs the same commands
without it.
"""

from __future__ import annotations

import sys

import stamina.instrumentation
import typer

from shoal.client.cli import _jobs, _keys, _secrets, _sessions
from shoal.client.cli._output import EXIT_USAGE
from shoal.client.cli._runner import runner

app = typer.Typer(
    help="Shoal's client commands: sessions, API keys, secrets, jobs and the runner bridge.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(_sessions.app, name="sessions")
app.add_typer(_keys.app, name="keys")
app.add_typer(_secrets.app, name="secrets")
app.add_typer(_jobs.app, name="jobs")
app.command("runner")(runner)

runner_app = typer.Typer(add_completion=False)
runner_app.command()(runner)


def _invoke(typer_app: typer.Typer, argv: list[str], prog_name: str) -> int:
    """Run a typer app on ``argv`` and return its exit code instead of exiting."""
    # stamina logs each retry as a bare "stamina.retry_scheduled" warning: noise on a terminal.
    stamina.instrumentation.set_on_retry_hooks([])
    command = typer.main.get_command(typer_app)
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # bad usage: say what, as typer's own runner would
        typer.echo(f"{prog_name}: {exc.format_message()}", err=True)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """``shoal-client`` and ``python -m shoal.client``: every group."""
    return _invoke(app, sys.argv[1:] if argv is None else argv, "shoal")


def sessions_main(argv: list[str]) -> int:
    """Sessions: create, list, show, prompt, watch, abort, rm."""
    return _invoke(_sessions.app, argv, "shoal sessions")


def keys_main(argv: list[str]) -> int:
    """API keys: create, list, revoke."""
    return _invoke(_keys.app, argv, "shoal keys")


def secrets_main(argv: list[str]) -> int:
    """Secrets: set, list, rm."""
    return _invoke(_secrets.app, argv, "shoal secrets")


def jobs_main(argv: list[str]) -> int:
    """Jobs: submit, show, list, cancel, retry."""
    return _invoke(_jobs.app, argv, "shoal jobs")


def runner_main(argv: list[str]) -> int:
    """Bridge an agent process's stdin/stdout to a session's runner socket."""
    return _invoke(runner_app, argv, "shoal runner")
