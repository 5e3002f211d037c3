"""timers.traceparent / tracestate: the W3C trace context of the call that armed the timer, so
its firing continues the caller's trace (NULL for timers armed before, or outside a trace)."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.add_column("timers", sa.Column("traceparent", sa.Text, nullable=True))
    op.add_column("timers", sa.Column("tracestate", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("timers", "tracestate")
    op.drop_column("timers", "traceparent")
