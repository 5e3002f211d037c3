"""Settings: durations in plain seconds, production refusals."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import SecretStr, ValidationError

from shoal.common.settings import CommonSettings


def test_durations_accept_plain_seconds_and_iso8601(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_SHUTDOWN_GRACE", "20")
    monkeypatch.setenv("SHOAL_EVENT_RETENTION", "P7D")
    settings = CommonSettings()
    assert settings.shutdown_grace == timedelta(seconds=20)
    assert settings.event_retention == timedelta(days=7)
    assert CommonSettings(shutdown_grace="0.5").shutdown_grace == timedelta(seconds=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        CommonSettings(shutdown_grace="soon")  # type: ignore[arg-type]


def test_production_refuses_the_development_admin_key() -> None:
    with pytest.raises(ValidationError, match="development only"):
        CommonSettings(environment="production", dev_admin_key=SecretStr("k"))
