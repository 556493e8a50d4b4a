"""Self-healing: error class, requeues after infrastructure faults, flat sweep indexes, worker nodes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00

- jobs.error_class: "permanent" (the user's input or configuration) or "transient" (an
  infrastructure fault that outlasted every retry) on failed rows.
- jobs.requeues / jobs.available_at: a job handed back to the queue after an infrastructure
  fault, and the earliest time the sweeper publishes it again.
- Partial indexes for the sweeper's three scans, so one sweep is flat with table size.
- The listing indexes end with `id`, list()'s full sort key (created_at DESC, id DESC), so a
  page by status is an index scan even when the newest rows are of another status.
- workers.node / role / sweep_interval_seconds: the Celery node a process belongs to (health
  judges nodes, not child pids), and sweeper rows with their interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPUBLISHED = sa.text("status = 'queued' AND published_at IS NULL")
QUEUED = sa.text("status = 'queued'")


LIST_INDEXES = {
    "ix_jobs_status_created_at": (["status", "created_at"], ["status", "created_at", "id"]),
    "ix_jobs_model_name_status_created_at": (
        ["model_name", "status", "created_at"],
        ["model_name", "status", "created_at", "id"],
    ),
    "ix_jobs_created_at": (["created_at"], ["created_at", "id"]),
}


def upgrade() -> None:
    for name, (_before, after) in LIST_INDEXES.items():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", after, unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("error_class", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("requeues", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("available_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_unpublished_created_at",
        "jobs",
        ["created_at"],
        unique=False,
        postgresql_where=UNPUBLISHED,
        sqlite_where=UNPUBLISHED,
    )
    op.create_index(
        "ix_jobs_queued_published_at",
        "jobs",
        ["published_at"],
        unique=False,
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("node", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default="worker"))
        batch.add_column(sa.Column("sweep_interval_seconds", sa.Float(), nullable=True))
    op.create_index("ix_workers_node", "workers", ["node"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_workers_node", table_name="workers")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("sweep_interval_seconds")
        batch.drop_column("role")
        batch.drop_column("node")
    op.drop_index("ix_jobs_queued_published_at", table_name="jobs")
    op.drop_index("ix_jobs_unpublished_created_at", table_name="jobs")
    for name, (before, _after) in LIST_INDEXES.items():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", before, unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("available_at")
        batch.drop_column("requeues")
        batch.drop_column("error_class")
