"""Thumbnails: artifacts.thumbnail_uri, the small WebP the worker stores beside each PNG

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:00:00

- artifacts.thumbnail_uri (nullable text): `jobs/<id>/<attempt>/<index>.thumb.webp` beside the
  PNG, written by the worker in the same fenced completion as the artifact row
  (worker/thumbnails.py). Rows of images stored before this revision keep NULL; the dashboard
  makes their thumbnails from the PNG when asked.

Upgrades in place on both dialects: a nullable column is added without rewriting the table (SQLite
`ALTER TABLE ADD COLUMN`, no rebuild).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("artifacts", sa.Column("thumbnail_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    # SQLite before 3.35 cannot drop a column in place: batch mode rebuilds `artifacts` there
    # (nothing references it); PostgreSQL drops it in place.
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("thumbnail_uri")
