"""Migrations as a step: ``shoal migrate`` (a real process) migrates with the owner's role, and
the services then run with a role that has no DDL rights (``SHOAL_MIGRATE_ON_START=false``);
before it, they refuse to start, naming the command to run."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import create_async_engine

from shoal.common.messaging import Subjects, request
from shoal.common.storage import Database, SchemaOutOfDate
from shoal.keys.app import create_app
from shoal.keys.config import KeysSettings
from shoal.scheduler.app import SCHEMA as SCHEDULER_SCHEMA
from shoal.session.app import SCHEMA as SESSION_SCHEMA

SERVICES_WITH_A_SCHEMA = {"keys", "scheduler", "session"}


def shoal_migrate(database_url: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``shoal migrate`` as a process; its exit code and its JSON answer."""
    env = {**os.environ, "SHOAL_DATABASE_URL": database_url, "SHOAL_LOG_JSON": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "shoal.common.cli", "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


async def execute(url: str, *statements: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def test_services_run_without_ddl_rights_after_shoal_migrate(
    database_url: str, nats_url: str, subject_prefix: str, nc: NATS
) -> None:
    database = database_url.rsplit("/", 1)[1]
    role = "app_" + secrets.token_hex(4)
    runtime_url = database_url.replace("//postgres@", f"//{role}@")
    await execute(
        database_url,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT CONNECT ON DATABASE {database} TO {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        # What the tables the migrations create will grant the runtime role: data, not schema.
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE "
        f"ON TABLES TO {role}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {role}",
    )
    with pytest.raises(ProgrammingError, match="permission denied"):
        await execute(runtime_url, "CREATE TABLE ddl_probe (id int)")

    code, status = shoal_migrate(database_url, "--status")
    assert code == 1
    assert set(status) == SERVICES_WITH_A_SCHEMA
    assert all(s["current"] == [] and not s["up_to_date"] for s in status.values())

    settings = KeysSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(runtime_url),
        subject_prefix=subject_prefix,
        migrate_on_start=False,
        log_json=False,
    )
    app = create_app(settings)
    with pytest.raises(SchemaOutOfDate, match=r"run `shoal migrate --service keys`"):
        async with app.router.lifespan_context(app):
            pass

    code, migrated = shoal_migrate(database_url)
    assert code == 0, migrated
    assert all(s["up_to_date"] and s["current"] == s["head"] for s in migrated.values())
    assert shoal_migrate(runtime_url, "--status", "--service", "keys") == (
        0,
        {"keys": migrated["keys"]},
    )

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        subjects = Subjects(subject_prefix)
        created = await request(
            nc,
            subjects.rpc("keys", "create"),
            {"name": "ci", "owner": "user_1", "scopes": ["sessions"]},
            timeout=10,
        )
        verified = await request(
            nc, subjects.rpc("keys", "verify"), {"key": created["key"]}, timeout=10
        )
        assert verified["owner"] == "user_1"

    runtime = Database(runtime_url, pool_size=1)
    try:
        for schema in (SCHEDULER_SCHEMA, SESSION_SCHEMA):
            version = await runtime.prepare_schema(schema, migrate=False)
            assert version.up_to_date
    finally:
        await runtime.close()


def test_shoal_migrate_names_an_unknown_service(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal.common.cli", "migrate", "--service", "gateway"],
        env={**os.environ, "SHOAL_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no schema for gateway (known: keys, scheduler, session)" in result.stderr
