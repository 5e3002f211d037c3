"""``shoal runner --session ID --token T [--url U] [--echo] -- CMD …``: the runner bridge."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer

from shoal.client._bridge import RunnerBridge
from shoal.client.cli._output import EXIT_INTERRUPTED
from shoal.client.cli._settings import DEFAULT_UP_JSON, UpOption, UrlOption, gateway_url


def runner(
    command: Annotated[
        list[str] | None,
        typer.Argument(help="the agent to run, after `--` (it speaks JSON lines on stdio)"),
    ] = None,
    session: Annotated[str, typer.Option("--session", help="the session id")] = "",
    token: Annotated[
        str,
        typer.Option("--token", envvar="SHOAL_RUNNER_TOKEN", help="the session's runner token"),
    ] = "",
    echo: Annotated[
        bool, typer.Option("--echo", help="no agent: answer each prompt with its content")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log reconnects")] = False,
    url: UrlOption = None,
    up: UpOption = DEFAULT_UP_JSON,
) -> None:
    """Run an agent process as the session's runner, bridging its stdin/stdout to the runner
    socket (reconnecting by itself); exits with the agent's exit code."""
    if not session or not token:
        raise typer.BadParameter("--session and --token (or SHOAL_RUNNER_TOKEN) are required")
    if echo == bool(command):
        raise typer.BadParameter("give either --echo or a command after `--`")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="shoal runner: %(levelname)s %(message)s",
    )
    bridge = RunnerBridge(gateway_url(url, up), session, token, None if echo else command)
    raise typer.Exit(asyncio.run(_until_signalled(bridge)))


async def _until_signalled(bridge: RunnerBridge) -> int:
    """Run the bridge; SIGTERM or SIGINT stop it (and its agent) cleanly, exit code 130."""
    task = asyncio.create_task(bridge.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
