"""Alembic revisions of the keys service (version table ``alembic_version_keys``)."""
