"""The README's quick start, run command for command as a new user would, against a fleet.

The block after the ``<!-- quickstart`` marker is the test's script: only ``git clone`` and
``make up`` are left out (the test starts the fleet itself and writes the ``.shoal/up.json`` that
``make up`` writes); every other line runs as written, in bash, with ``set -e``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
LEFT_TO_THE_TEST = ("git clone ", "make up")


def quickstart_commands() -> list[str]:
    """The quick-start block's lines, in order."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- quickstart.*?-->\n```sh\n(.*?)\n```", readme, re.DOTALL)
    assert found, "README.md has no quick-start block after a `<!-- quickstart` marker"
    return found.group(1).splitlines()


def test_the_block_is_what_a_new_user_runs() -> None:
    commands = quickstart_commands()
    assert commands[0].startswith("git clone ")
    assert commands[1].startswith("make up")
    for step in ("shoal sessions create", "shoal runner", "sessions prompt", "sessions watch"):
        assert any(step in line for line in commands), step


async def test_the_quick_start_works(fleet: FleetFactory, tmp_path: Path) -> None:
    running = await fleet()
    clone = tmp_path / "shoal"
    (clone / ".shoal").mkdir(parents=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (clone / ".shoal" / "up.json").write_text(
        json.dumps({"gateway_url": running.gateway_url, "admin_key": running.admin_key})
    )
    script = "\n".join(
        ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
        + [line for line in quickstart_commands() if not line.startswith(LEFT_TO_THE_TEST)]
    )
    script = script.replace("&& cd shoal", "")  # the clone line is gone; the test is in it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "VIRTUAL_ENV"))}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=clone, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    output = stdout.decode().splitlines()
    assert proc.returncode == 0, f"{stdout.decode()}\n{stderr.decode()}"
    assert output[0] == "hello"  # the echo runner's answer, printed by `prompt --wait`
    events = [json.loads(line) for line in output[1:]]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    types = {e["type"] for e in events}
    assert {"session.created", "runner.connected", "prompt.queued"} <= types
