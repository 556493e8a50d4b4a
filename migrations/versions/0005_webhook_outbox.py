"""Webhook outbox: one row per webhook event, inserted by a trigger in the job's own transaction

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00

- webhook_outbox: id (the event id every delivery attempt carries), job_id (FK to jobs, ON DELETE
  CASCADE: pruning a job drops its events), event_type (succeeded | failed | cancelled), url, status
  (pending | delivered | dead), attempts, next_attempt_at, lease_owner / lease_expires_at (the
  deliverer's claim), created_at, last_attempt_at, delivered_at, last_status_code, last_error.
  Indexes: the due pending rows (partial, on next_attempt_at) and job_id (the foreign key's cascade).
- A trigger on jobs, AFTER UPDATE OF status, for each row whose status became succeeded, failed or
  cancelled while its spec has a webhook_url (and its webhook_events, when a list, names that status):
  it inserts the row in the same transaction as the change (worker/webhooks.py, docs/events.md).
  PostgreSQL: a plpgsql function, the WHEN clause on the trigger. SQLite: a trigger with its
  own WHEN; the event id is a random UUID (version 4) made from randomblob().

Nothing is rewritten; jobs finished before this revision get no events. A later migration that
rebuilds `jobs` on SQLite (batch mode: copy, drop, rename) drops this trigger with the old table
and must create it again (`create_trigger()` below).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")
TRIGGER = "jobs_webhook_outbox"
FUNCTION = "diffgentor_webhook_outbox"

_POSTGRESQL_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (id, job_id, event_type, url, status, attempts, next_attempt_at, created_at)
    VALUES (gen_random_uuid()::text, NEW.id, NEW.status, NEW.spec->>'webhook_url', 'pending', 0,
            statement_timestamp(), statement_timestamp());
    RETURN NULL;
END
$$
"""
_POSTGRESQL_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER UPDATE OF status ON jobs FOR EACH ROW
WHEN (
    NEW.status IN ('succeeded', 'failed', 'cancelled')
    AND OLD.status IS DISTINCT FROM NEW.status
    AND NEW.spec->>'webhook_url' IS NOT NULL
    AND (json_typeof(NEW.spec->'webhook_events') IS DISTINCT FROM 'array'
         OR (NEW.spec->'webhook_events')::jsonb ? NEW.status)
)
EXECUTE FUNCTION {FUNCTION}()
"""
# SQLite stores UtcDateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC, no offset): the same text here.
_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
_SQLITE_UUID4 = (
    "(lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6))))"
)
_SQLITE_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER UPDATE OF status ON jobs FOR EACH ROW
WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
    AND OLD.status IS NOT NEW.status
    AND json_extract(NEW.spec, '$.webhook_url') IS NOT NULL
    AND (json_type(NEW.spec, '$.webhook_events') IS NOT 'array'
         OR EXISTS (SELECT 1 FROM json_each(NEW.spec, '$.webhook_events') WHERE value = NEW.status))
BEGIN
    INSERT INTO webhook_outbox (id, job_id, event_type, url, status, attempts, next_attempt_at, created_at)
    VALUES ({_SQLITE_UUID4}, NEW.id, NEW.status, json_extract(NEW.spec, '$.webhook_url'), 'pending', 0,
            {_SQLITE_NOW}, {_SQLITE_NOW});
END
"""


def create_trigger() -> None:
    """The trigger that fills the outbox (also for a later migration that rebuilds `jobs` on SQLite)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRESQL_FUNCTION)
        op.execute(_POSTGRESQL_TRIGGER)
    else:
        op.execute(_SQLITE_TRIGGER)


def drop_trigger() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}" + (" ON jobs" if _postgresql() else ""))
    if _postgresql():
        op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}()")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_webhook_outbox_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
    )
    op.create_index(
        "ix_webhook_outbox_due",
        "webhook_outbox",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index("ix_webhook_outbox_job_id", "webhook_outbox", ["job_id"], unique=False)
    create_trigger()


def downgrade() -> None:
    drop_trigger()
    op.drop_index("ix_webhook_outbox_job_id", table_name="webhook_outbox")
    op.drop_index(
        "ix_webhook_outbox_due", table_name="webhook_outbox", postgresql_where=PENDING, sqlite_where=PENDING
    )
    op.drop_table("webhook_outbox")
