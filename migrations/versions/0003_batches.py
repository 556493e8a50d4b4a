"""Batches: a record per group of jobs submitted together, and each job's row in it

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00

- batches: id, name, owner, model_name, created_at, job_count (newest-first listing indexes,
  overall and per owner).
- jobs.batch_id (FK to batches, ON DELETE SET NULL: deleting a batch record leaves its jobs),
  jobs.batch_index (the row in the batch), jobs.superseded (a newer retry of the same row
  exists; set in the retry's transaction). Existing jobs get no batch and superseded = false.
- Partial indexes on batch jobs only. The latest job of each row (superseded = false):
  (batch_id, status) for counts per status (index-only, deduplicated: about 20 bytes a row) and
  (batch_id, batch_index, status) for the rows in index order. Every batch job:
  (batch_id, finished_at, status) for throughput (and the foreign key's SET NULL).

Upgrades an existing database in place. PostgreSQL: ALTER TABLE (no rewrite: the new columns
are nullable or have a constant default). SQLite cannot add a constraint to a table, so batch
mode rebuilds `jobs`; the rows that point at jobs (artifacts, retry_of, workers.current_job_id)
are kept across the rebuild (`_save_links_to_jobs`), all in the migration's one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IN_A_BATCH = sa.text("batch_id IS NOT NULL")
LATEST_IN_A_BATCH = sa.text("batch_id IS NOT NULL AND NOT superseded")
LATEST_IN_A_BATCH_SQLITE = sa.text("batch_id IS NOT NULL AND superseded = 0")  # as SQLAlchemy writes it there
FK_NAME = "fk_jobs_batch_id_batches"


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index("ix_batches_created_at", "batches", ["created_at", "id"], unique=False)
    op.create_index("ix_batches_owner_created_at", "batches", ["owner", "created_at", "id"], unique=False)

    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _save_links_to_jobs()
    # SQLite cannot add a constraint to a table: batch mode rebuilds `jobs` (copy, drop, rename;
    # its partial indexes are re-created from the reflected DDL). PostgreSQL: ALTER TABLE in place,
    # no rewrite (the new columns are nullable or have a constant default).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("batch_index", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_foreign_key(FK_NAME, "batches", ["batch_id"], ["id"], ondelete="SET NULL")
    if sqlite:
        _restore_links_to_jobs()
    op.create_index(
        "ix_jobs_batch_status",
        "jobs",
        ["batch_id", "status"],
        unique=False,
        postgresql_where=LATEST_IN_A_BATCH,
        sqlite_where=LATEST_IN_A_BATCH_SQLITE,
    )
    op.create_index(
        "ix_jobs_batch_rows",
        "jobs",
        ["batch_id", "batch_index", "status"],
        unique=False,
        postgresql_where=LATEST_IN_A_BATCH,
        sqlite_where=LATEST_IN_A_BATCH_SQLITE,
    )
    op.create_index(
        "ix_jobs_batch_finished_at",
        "jobs",
        ["batch_id", "finished_at", "status"],
        unique=False,
        postgresql_where=IN_A_BATCH,
        sqlite_where=IN_A_BATCH,
    )


# Every foreign key that points at jobs.id at this revision: (table, key column, referencing column).
_LINKS_TO_JOBS = (
    ("artifacts", "id", "job_id"),
    ("workers", "worker_id", "current_job_id"),
    ("jobs", "id", "retry_of"),
)


def _save_links_to_jobs() -> None:
    """SQLite runs with `PRAGMA foreign_keys=ON`, which cannot be switched off inside the
    migration's transaction, and the rebuild's DROP TABLE of the old `jobs` is then an implicit
    DELETE of every job: ON DELETE CASCADE would remove every artifact row and SET NULL would
    clear `retry_of` and `workers.current_job_id`. Their values are kept in temporary tables
    first and written back after the rebuild, in the same transaction."""
    op.execute("CREATE TEMP TABLE dg_saved_artifacts AS SELECT * FROM artifacts")
    for table, key, column in _LINKS_TO_JOBS[1:]:
        op.execute(
            f"CREATE TEMP TABLE dg_saved_{table}_{column} AS "
            f"SELECT {key} AS key, {column} AS value FROM {table} WHERE {column} IS NOT NULL"
        )


def _restore_links_to_jobs() -> None:
    op.execute(
        "INSERT INTO artifacts SELECT * FROM dg_saved_artifacts WHERE id NOT IN (SELECT id FROM artifacts)"
    )
    op.execute("DROP TABLE dg_saved_artifacts")
    for table, key, column in _LINKS_TO_JOBS[1:]:
        saved = f"dg_saved_{table}_{column}"
        op.execute(
            f"UPDATE {table} SET {column} = (SELECT value FROM {saved} WHERE {saved}.key = {table}.{key}) "
            f"WHERE {key} IN (SELECT key FROM {saved})"
        )
        op.execute(f"DROP TABLE {saved}")


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_batch_rows", table_name="jobs")
    op.drop_index("ix_jobs_batch_status", table_name="jobs")
    if op.get_bind().dialect.name == "sqlite":
        # batch_id carries a constraint, so SQLite rebuilds the table (see _save_links_to_jobs).
        _save_links_to_jobs()
        with op.batch_alter_table("jobs") as batch:
            batch.drop_constraint(FK_NAME, type_="foreignkey")
            batch.drop_column("superseded")
            batch.drop_column("batch_index")
            batch.drop_column("batch_id")
        _restore_links_to_jobs()
    else:
        op.drop_constraint(FK_NAME, "jobs", type_="foreignkey")
        op.drop_column("jobs", "superseded")
        op.drop_column("jobs", "batch_index")
        op.drop_column("jobs", "batch_id")
    op.drop_index("ix_batches_owner_created_at", table_name="batches")
    op.drop_index("ix_batches_created_at", table_name="batches")
    op.drop_table("batches")
