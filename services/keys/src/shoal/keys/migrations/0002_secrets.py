"""data_keys and secrets: users' secrets under envelope encryption (ciphertext only)."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # One data key per owner, stored only wrapped by the KEK named kek_id. version counts
    # wraps: 1 when created, +1 on every re-wrap by rotate-kek.
    op.create_table(
        "data_keys",
        sa.Column("owner", sa.Text, primary_key=True),
        sa.Column("kek_id", sa.Text, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("ix_data_keys_kek_id", "data_keys", ["kek_id"])
    # version is the secret's write counter; it is bound into the ciphertext's associated data.
    op.create_table(
        "secrets",
        sa.Column("owner", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("secrets")
    op.drop_index("ix_data_keys_kek_id", table_name="data_keys")
    op.drop_table("data_keys")
