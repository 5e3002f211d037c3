"""Storage for every service: PostgreSQL (:class:`Database`) and objects (:class:`ObjectStorage`).

Example::

    db = Database(settings.database_url.get_secret_value(), pool_size=settings.database_pool_size)
    await db.migrate(Path(__file__).parent / "migrations", "alembic_version_session")
    objects = object_storage_from_settings(settings)
    await objects.put("sessions/s1/transcript.json", b"{}", "application/json")
    await objects.close(); await db.close()
"""

from shoal.common.storage.objects import (
    FilesystemObjectStorage,
    ObjectInfo,
    ObjectStorage,
    S3ObjectStorage,
    StoredObject,
    object_storage_from_settings,
    validate_key,
)
from shoal.common.storage.sql import (
    Database,
    DatabaseClient,
    Schema,
    SchemaOutOfDate,
    SchemaVersion,
    ensure_database,
    migrate_database,
    schema_versions,
)

__all__ = [
    "Database",
    "DatabaseClient",
    "FilesystemObjectStorage",
    "ObjectInfo",
    "ObjectStorage",
    "S3ObjectStorage",
    "StoredObject",
    "ensure_database",
    "migrate_database",
    "Schema",
    "SchemaOutOfDate",
    "SchemaVersion",
    "schema_versions",
    "object_storage_from_settings",
    "validate_key",
]
