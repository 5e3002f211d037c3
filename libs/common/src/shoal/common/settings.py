"""Typed settings shared by every Shoal process, read from ``SHOAL_*`` environment variables.

Example::

    settings = CommonSettings()              # reads SHOAL_NATS_URL, SHOAL_DATABASE_URL, ...
    settings.subject_prefix                  # "shoal"

Each service subclasses :class:`CommonSettings` with its own fields (see ``<service>/config.py``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["development", "test", "production"]

# Values that must never reach production: they are the README's and the chart's examples.
_PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "dev", "admin"})


class CommonSettings(BaseSettings):
    """Settings every service shares: where NATS, PostgreSQL and objects live, and how to log."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="ignore", frozen=True)

    environment: Environment = "development"
    service_name: str = "shoal"
    instance_id: str = Field(default="", description="Replica name; defaults to host:pid")

    nats_url: str = "nats://127.0.0.1:14222"
    nats_connect_timeout: timedelta = timedelta(seconds=5)
    # NATS authentication and TLS, each a file (a mounted Secret): a ``.creds`` file (user JWT +
    # NKey seed) or a bare NKey seed; a CA bundle to trust the server by; a client certificate
    # and key for mutual TLS. Any TLS file turns TLS on (``tls://`` in the URL does too).
    nats_creds_file: Path | None = None
    nats_nkey_seed_file: Path | None = None
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    subject_prefix: str = Field(default="shoal", pattern=r"^[A-Za-z0-9_-]+$")
    # Number of session partitions. Fixed when SESSION_CMD is first created: changing it later
    # would move sessions between partitions, so provisioning refuses a different value.
    session_partitions: int = Field(default=64, ge=1, le=1024)
    # JetStream replication for streams and buckets (1 on one machine, 3 on a cluster).
    stream_replicas: int = Field(default=1, ge=1, le=5)
    event_retention: timedelta = timedelta(days=30)

    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:15432/shoal")
    database_pool_size: int = 5
    # Migrate the service's schema at start-up (``shoal up``). Off, the service only checks the
    # schema is at head and refuses to start if not: ``shoal migrate`` (the chart's Job) migrates,
    # and the runtime role needs no DDL rights.
    migrate_on_start: bool = True

    object_store: Literal["fs", "s3"] = "fs"
    object_store_path: Path = Path(".shoal/objects")
    s3_bucket: str = "shoal"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=0, ge=0, le=65535)
    # Serve /metrics on this port (on http_host) instead of the HTTP port: keeps it off the
    # gateway's public port. Unset: /metrics on the HTTP port (``shoal up``).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # One log line per HTTP request (logger ``shoal.access``: method, route, status, duration).
    access_log: bool = False
    shutdown_grace: timedelta = timedelta(seconds=10)
    # The garbage collector's clock (shoal.common.service.GcPacer): young passes every
    # gc_young_interval (a gen1 pass every 10th), a full pass every gc_full_interval (0: when
    # CPython decides).
    gc_young_interval: timedelta = Field(
        default=timedelta(milliseconds=250), gt=timedelta(0), le=timedelta(seconds=60)
    )
    gc_full_interval: timedelta = Field(default=timedelta(minutes=10), ge=timedelta(0))

    log_level: str = "INFO"
    log_json: bool = True
    otel_exporter: Literal["none", "console", "otlp"] = "none"

    dev_admin_key: SecretStr | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _plain_seconds(cls, value: object, info: ValidationInfo) -> object:
        """A duration given as ``"20"`` or ``"0.5"`` means seconds (ISO 8601 ``PT20S`` works
        too); without this pydantic refuses the plain numbers operators and Helm charts write."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and field.annotation is timedelta and isinstance(value, str):
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @model_validator(mode="after")
    def _nats_auth_is_coherent(self) -> CommonSettings:
        if self.nats_creds_file is not None and self.nats_nkey_seed_file is not None:
            raise ValueError(
                "set SHOAL_NATS_CREDS_FILE or SHOAL_NATS_NKEY_SEED_FILE, not both: "
                "a .creds file already holds the NKey seed"
            )
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError(
                "SHOAL_NATS_TLS_CERT_FILE and SHOAL_NATS_TLS_KEY_FILE go together (mutual TLS)"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> CommonSettings:
        if self.environment == "production":
            if self.dev_admin_key is not None:
                raise ValueError(
                    "SHOAL_DEV_ADMIN_KEY is for development only; create keys with the API"
                )
            for name in ("s3_secret_access_key",):
                value: SecretStr | None = getattr(self, name)
                if value is not None and value.get_secret_value().lower() in _PLACEHOLDER_SECRETS:
                    raise ValueError(f"SHOAL_{name.upper()} is a placeholder; set a real secret")
        return self

    @property
    def replica_name(self) -> str:
        """A name for this process that is unique in the fleet."""
        if self.instance_id:
            return self.instance_id
        import os
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"
