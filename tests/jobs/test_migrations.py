"""The Alembic migrations create exactly the schema the models describe, on both dialects."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from schemas.tables import Base
from worker.db import current_revision, make_engine


def test_migrations_match_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
            tables = set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"jobs", "artifacts", "workers", "alembic_version"} <= tables
    assert current_revision(db_url) == "0002"
