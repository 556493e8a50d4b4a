"""Pending publishes: the producer's outbox of jobs it is about to publish

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00

- pending_publishes: job_id (primary key), created_at. A producer that publishes right after its
  commit (worker.submission.submit_jobs) writes the job with `published_at` already set and one
  row here in the same transaction, and deletes the row once the broker took the message. Before
  this revision it wrote `published_at` with an UPDATE after the publish, which rewrote every new
  row and every index entry of it (bench/results/submit.md). The sweeper publishes rows left past
  the publish grace and drops rows whose job is gone or no longer queued (docs/jobs.md).
  No foreign key on purpose: a bulk submit would pay a lookup per row for it.

Upgrades in place on both dialects (a new table). Jobs written before this revision keep their
meaning: `published_at IS NULL` on a queued job still means "not published", and the sweeper's
scan for those stays (producers of an older release write them that way).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pending_publishes",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_pending_publishes")),
    )


def downgrade() -> None:
    op.drop_table("pending_publishes")
