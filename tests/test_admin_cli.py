"""``shoal admin`` against a fleet of real processes: it reaches the services over NATS."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from shoal.client import ShoalClient
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


async def _shoal_admin(nats_url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "SHOAL_NATS_URL": nats_url, "SHOAL_SUBJECT_PREFIX": prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.common.cli",
        "admin",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rotate_kek_rewraps_online(
    fleet: FleetFactory, nats_url: str, subject_prefix: str
) -> None:
    running = await fleet()
    async with ShoalClient(running.gateway_url, running.admin_key) as admin:
        await admin.put_secret("OPENAI_API_KEY", "sk-test-value")
        code, out, err = await _shoal_admin(nats_url, subject_prefix, "rotate-kek")
        assert code == 0, err
        report = json.loads(out)
        assert report["remaining"] == 0
        assert report["failed"] == []
        assert [s.name for s in await admin.list_secrets()] == ["OPENAI_API_KEY"]


async def test_a_refused_admin_call_exits_1_with_the_error(
    fleet: FleetFactory, nats_url: str, subject_prefix: str
) -> None:
    await fleet()
    code, _, err = await _shoal_admin(nats_url, subject_prefix, "rotate-kek", "--to", "nosuch")
    assert code == 1
    assert "rotate-kek" in err
