"""Settings of the keys service (``SHOAL_*`` environment variables).

Example::

    settings = KeysSettings()      # SHOAL_KEYS_PEPPER, SHOAL_DEV_ADMIN_KEY, SHOAL_DATABASE_URL ...
    settings.pepper()              # bytes for the key HMAC
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import SecretStr, model_validator

from shoal.common.settings import CommonSettings

# Only for development and tests: a key hashed with it is as good as unhashed to anyone who
# reads this file, which is why production refuses it.
DEV_PEPPER = "shoal-development-pepper-do-not-use-in-production"
MIN_PEPPER_LENGTH = 32
_PLACEHOLDERS = frozenset({"", "changeme", "change-me", "secret", "dev", "pepper", DEV_PEPPER})


class KeysSettings(CommonSettings):
    service_name: str = "keys"
    # Server-side secret mixed into every key hash (SHOAL_KEYS_PEPPER). Rotating it
    # invalidates every key, so treat it like a KEK.
    keys_pepper: SecretStr | None = None
    # last_used_at is written at most once per this interval per key (SHOAL_KEYS_TOUCH_INTERVAL),
    # so verifying a key on every request does not turn into a write per request.
    keys_touch_interval: timedelta = timedelta(minutes=1)

    @model_validator(mode="after")
    def _refuse_weak_pepper_in_production(self) -> KeysSettings:
        if self.environment == "production":
            pepper = self.keys_pepper.get_secret_value() if self.keys_pepper else ""
            if pepper.lower() in _PLACEHOLDERS or len(pepper) < MIN_PEPPER_LENGTH:
                raise ValueError(
                    f"SHOAL_KEYS_PEPPER must be set to a random secret of at least "
                    f"{MIN_PEPPER_LENGTH} characters in production"
                )
        return self

    def pepper(self) -> bytes:
        """The HMAC pepper: the configured one, or the fixed dev pepper outside production."""
        if self.keys_pepper is not None and self.keys_pepper.get_secret_value():
            return self.keys_pepper.get_secret_value().encode()
        return DEV_PEPPER.encode()
