"""The Alembic migrations create exactly the schema the models describe, on both dialects, and
upgrade a database that holds jobs in place."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from schemas.tables import Base
from worker.db import alembic_config, current_revision, make_engine, session_factory, upgrade
from worker.jobstore import JobStore
from worker.testing import temporary_database

HEAD = "0006"  # [issue 12] 0004: artifacts.thumbnail_uri; [issue 11] 0005: webhook_outbox; [issue 13] 0006: pending_publishes
PG_ADMIN_URL = os.environ.get("DG_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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
    assert {"jobs", "artifacts", "workers", "batches", "alembic_version"} <= tables
    assert current_revision(db_url) == HEAD


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables, of its own (the migration is run from the start)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.sqlite3'}"
        return
    with temporary_database(PG_ADMIN_URL, prefix="dg_test_mig_") as url:
        yield url


def _fill_0002(engine: sa.Engine) -> None:
    """Jobs as release 0002 wrote them: a retried job, an artifact, a worker on a job."""
    jobs = (
        "INSERT INTO jobs (id, kind, model_name, status, spec, seed, priority, attempts, max_attempts, "
        "progress_step, progress_total, cancel_requested, created_at, finished_at, retry_of, requeues) VALUES "
    )
    # SQLite stores UTC times as text without an offset (schemas.tables.UtcDateTime).
    stamp = "'2026-11-30 10:00:00.000000'" if engine.dialect.name == "sqlite" else "'2026-11-30 10:00:00+00'"
    spec = '\'{"kind": "t2i", "prompt": "a fox", "params": {"num_inference_steps": 2, "height": 32, "width": 32}}\''
    with engine.begin() as conn:
        conn.exec_driver_sql(
            jobs
            + f"('old-1', 't2i', 'deepgen', 'failed', {spec}, 5, 0, 1, 3, 0, 2, false, {stamp}, {stamp}, NULL, 0)"
        )
        conn.exec_driver_sql(
            jobs
            + f"('old-2', 't2i', 'deepgen', 'succeeded', {spec}, 5, 0, 1, 3, 2, 2, false, {stamp}, {stamp}, 'old-1', 0)"
        )
        conn.exec_driver_sql(
            'INSERT INTO artifacts (job_id, "index", uri, width, height, bytes, sha256, created_at) '
            f"VALUES ('old-2', 0, 'file:///a.png', 32, 32, 10, '{'ab' * 32}', {stamp})"
        )
        conn.exec_driver_sql(
            "INSERT INTO workers (worker_id, hostname, pid, model_name, queue, started_at, heartbeat_at, "
            f"current_job_id, jobs_done, role) VALUES ('w1', 'h', 1, 'deepgen', 'deepgen', {stamp}, {stamp}, 'old-2', 0, 'worker')"
        )


def _links(engine: sa.Engine) -> tuple[object, ...]:
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("SELECT id, retry_of, status FROM jobs ORDER BY id").all(),
            conn.exec_driver_sql("SELECT job_id, uri FROM artifacts").all(),
            conn.exec_driver_sql("SELECT worker_id, current_job_id FROM workers").all(),
        )


def test_0003_upgrades_a_0002_database_with_jobs_in_place(empty_db_url: str) -> None:
    """SQLite rebuilds `jobs` to add the batch foreign key (its FK pragma is on): the artifacts
    (ON DELETE CASCADE), `retry_of` and `workers.current_job_id` (SET NULL) must survive it."""
    upgrade(empty_db_url, "0002")
    engine = make_engine(empty_db_url)
    try:
        _fill_0002(engine)
        before = _links(engine)
        upgrade(empty_db_url)
        assert current_revision(empty_db_url) == HEAD
        assert _links(engine) == before
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            indexes = {index["name"] for index in sa.inspect(connection).get_indexes("jobs")}
        assert {
            "ix_jobs_batch_rows",
            "ix_jobs_batch_finished_at",
            "ix_jobs_unpublished_created_at",
        } <= indexes
        store = JobStore(session_factory(engine))
        old = store.get("old-2")
        assert (old.batch_id, old.batch_index, old.superseded) == (None, None, False)
        assert [a.uri for a in old.artifacts] == ["file:///a.png"] and old.retry_of == "old-1"
        assert store.retry("old-1").id == "old-2"  # an old unbatched chain reattaches as before

        # ... and back down to 0002, links kept (SQLite rebuilds the table again).
        with engine.begin() as connection:
            config = alembic_config(empty_db_url)
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
        assert current_revision(empty_db_url) == "0002" and _links(engine) == before
        with engine.connect() as connection:
            assert "batches" not in sa.inspect(connection).get_table_names()
    finally:
        engine.dispose()


def test_0004_adds_thumbnail_uri_to_existing_artifacts(empty_db_url: str) -> None:
    """[issue 12] Images stored before thumbnails keep their rows with no thumbnail (NULL), and the
    column goes away again on the way down with the rows kept."""
    upgrade(empty_db_url, "0002")
    engine = make_engine(empty_db_url)
    try:
        _fill_0002(engine)
        upgrade(empty_db_url, "0003")
        before = _links(engine)
        upgrade(empty_db_url)
        assert current_revision(empty_db_url) == HEAD and _links(engine) == before
        [artifact] = JobStore(session_factory(engine)).get("old-2").artifacts
        assert artifact.uri == "file:///a.png" and artifact.thumbnail_uri is None
        with engine.begin() as connection:
            config = alembic_config(empty_db_url)
            config.attributes["connection"] = connection
            command.downgrade(config, "0003")
        assert current_revision(empty_db_url) == "0003" and _links(engine) == before
        with engine.connect() as connection:
            columns = {column["name"] for column in sa.inspect(connection).get_columns("artifacts")}
        assert "thumbnail_uri" not in columns
    finally:
        engine.dispose()
