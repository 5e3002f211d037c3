"""Session history and index: the PostgreSQL projection of SESSION_EVT.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "session_messages",
        sa.Column("id", sa.Text(), primary_key=True),  # the event id
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("prompt_id", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_session_messages_session_seq", "session_messages", ["session_id", "seq"], unique=True
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_sessions_owner_created", "sessions", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_sessions_owner_created", table_name="sessions")
    op.drop_table("sessions")
    op.drop_index("ix_session_messages_session_seq", table_name="session_messages")
    op.drop_table("session_messages")
