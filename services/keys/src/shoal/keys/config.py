"""Settings of the keys service (``SHOAL_*`` environment variables).

Example::

    settings = KeysSettings()      # SHOAL_KEYS_PEPPER, SHOAL_DEV_ADMIN_KEY, SHOAL_DATABASE_URL ...
    settings.pepper()              # bytes for the key HMAC
    settings.kek_ring()            # SHOAL_KEYS_KEKS / SHOAL_KEYS_KEK_FILE / SHOAL_KEYS_ACTIVE_KEK
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shoal.common.settings import CommonSettings
from shoal.keys.crypto import (
    DEV_KEK_ID,
    KekConfigError,
    KekRing,
    dev_kek,
    is_weak_kek,
    kek_fingerprint_id,
    parse_keks,
)

# Only for development and tests: a key hashed with it is as good as unhashed to anyone who
# reads this file, which is why production refuses it.
DEV_PEPPER = "shoal-development-pepper-do-not-use-in-production"
MIN_PEPPER_LENGTH = 32
_PLACEHOLDERS = frozenset({"", "changeme", "change-me", "secret", "dev", "pepper", DEV_PEPPER})


class KeysSettings(CommonSettings):
    # pydantic would otherwise quote the raw input (the pepper, the KEKs) in a validation error,
    # which start-up failures print to the log.
    model_config = SettingsConfigDict(**CommonSettings.model_config, hide_input_in_errors=True)

    service_name: str = "keys"
    # Server-side secret mixed into every key hash (SHOAL_KEYS_PEPPER). Rotating it
    # invalidates every key, so treat it like a KEK.
    keys_pepper: SecretStr | None = None
    # last_used_at is written at most once per this interval per key (SHOAL_KEYS_TOUCH_INTERVAL),
    # so verifying a key on every request does not turn into a write per request.
    keys_touch_interval: timedelta = timedelta(minutes=1)
    # Key-encryption keys, "id1:base64key,id2:base64key" (SHOAL_KEYS_KEKS), and/or a mounted
    # file of the same entries, one per line or comma-separated (SHOAL_KEYS_KEK_FILE). Every
    # KEK that wrapped a data key must stay configured until `rotate-kek` has moved them all.
    keys_keks: SecretStr | None = None
    # One KEK, as the Helm chart mounts it (SHOAL_KEYS_KEK): "id:base64key", or a bare base64
    # key whose id is derived from its fingerprint (so replicas agree on it without config).
    keys_kek: SecretStr | None = None
    keys_kek_file: Path | None = None
    # The KEK new data keys are wrapped with (SHOAL_KEYS_ACTIVE_KEK); optional with one KEK.
    keys_active_kek: str | None = None
    # How long audit events stay in the AUDIT stream (SHOAL_KEYS_AUDIT_RETENTION).
    keys_audit_retention: timedelta = timedelta(days=365)
    # An admin-scoped key's use is audited at most once per this interval per key and replica.
    keys_admin_audit_interval: timedelta = Field(default=timedelta(minutes=1), ge=timedelta(0))

    @model_validator(mode="after")
    def _refuse_weak_pepper_in_production(self) -> KeysSettings:
        if self.environment == "production":
            pepper = self.keys_pepper.get_secret_value() if self.keys_pepper else ""
            if pepper.lower() in _PLACEHOLDERS or len(pepper) < MIN_PEPPER_LENGTH:
                raise ValueError(
                    f"SHOAL_KEYS_PEPPER must be set to a random secret of at least "
                    f"{MIN_PEPPER_LENGTH} characters in production"
                )
        ring = self.kek_ring()  # malformed KEK settings fail at start-up, in every environment
        if self.environment == "production":
            weak = [kek_id for kek_id, key in ring.keks.items() if is_weak_kek(key)]
            if DEV_KEK_ID in ring.keks or weak:
                raise ValueError(
                    "SHOAL_KEYS_KEKS holds a placeholder or development KEK; "
                    "use random 32-byte keys in production"
                )
        return self

    def kek_ring(self) -> KekRing:
        """The configured KEKs; outside production the dev KEK is added (active if alone)."""
        texts: list[tuple[str, str]] = []  # (setting, "id:base64key" entries)
        if self.keys_kek is not None and self.keys_kek.get_secret_value().strip():
            text = self.keys_kek.get_secret_value().strip()
            if ":" not in text:
                text = f"{kek_fingerprint_id(text)}:{text}"
            texts.append(("SHOAL_KEYS_KEK", text))
        if self.keys_keks is not None:
            texts.append(("SHOAL_KEYS_KEKS", self.keys_keks.get_secret_value()))
        if self.keys_kek_file is not None:
            try:
                texts.append(("SHOAL_KEYS_KEK_FILE", self.keys_kek_file.read_text()))
            except OSError as exc:
                raise ValueError(f"SHOAL_KEYS_KEK_FILE cannot be read: {exc.strerror}") from None
        keks: dict[str, bytes] = {}
        for source, text in texts:
            for kek_id, key in parse_keks(text, source=source).items():
                if kek_id in keks and keks[kek_id] != key:
                    raise KekConfigError(f"KEK {kek_id} is configured twice, differently")
                keks[kek_id] = key
        if self.environment == "production":
            if not keks:
                raise ValueError(
                    "a KEK is required in production: set SHOAL_KEYS_KEK, SHOAL_KEYS_KEKS or "
                    "SHOAL_KEYS_KEK_FILE"
                )
        else:
            # Keeps data keys wrapped in development readable after real KEKs are configured.
            keks.setdefault(DEV_KEK_ID, dev_kek())
        active = self.keys_active_kek
        if active is None:
            configured = sorted(k for k in keks if k != DEV_KEK_ID) or [DEV_KEK_ID]
            if len(configured) > 1:
                raise ValueError("several KEKs are configured: set SHOAL_KEYS_ACTIVE_KEK")
            active = configured[0]
        return KekRing(keks, active=active)

    def pepper(self) -> bytes:
        """The HMAC pepper: the configured one, or the fixed dev pepper outside production."""
        if self.keys_pepper is not None and self.keys_pepper.get_secret_value():
            return self.keys_pepper.get_secret_value().encode()
        return DEV_PEPPER.encode()
