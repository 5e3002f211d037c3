"""Alembic revisions of the scheduler service (version table ``alembic_version_scheduler``)."""
