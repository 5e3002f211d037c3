"""jobs.traceparent / tracestate: the W3C trace context of the submit call, so the attempts a
worker runs and the job's end continue the submitter's trace (NULL for jobs submitted before,
or outside a trace)."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("traceparent", sa.Text, nullable=True))
    op.add_column("jobs", sa.Column("tracestate", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "tracestate")
    op.drop_column("jobs", "traceparent")
