"""Session index: tags, and keyset pages newest first (GET /v1/sessions).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "sessions",
        sa.Column("tags", postgresql.ARRAY(sa.Text()), nullable=False, server_default="{}"),
    )
    op.add_column(
        "sessions", sa.Column("tags_seq", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.drop_index("ix_sessions_owner_created", table_name="sessions")
    op.create_index("ix_sessions_owner_created_id", "sessions", ["owner", "created_at", "id"])
    op.create_index(
        "ix_sessions_owner_status_created_id", "sessions", ["owner", "status", "created_at", "id"]
    )
    op.create_index("ix_sessions_created_id", "sessions", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_sessions_created_id", table_name="sessions")
    op.drop_index("ix_sessions_owner_status_created_id", table_name="sessions")
    op.drop_index("ix_sessions_owner_created_id", table_name="sessions")
    op.create_index("ix_sessions_owner_created", "sessions", ["owner", "created_at"])
    op.drop_column("sessions", "tags_seq")
    op.drop_column("sessions", "tags")
