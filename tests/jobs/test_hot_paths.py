"""The cheaper hot paths keep their meaning: one-query polling, skipped progress writes,
relaxed (non-durable) bookkeeping commits, idle-only pings and the retried read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from schemas.tables import Job
from schemas.views import ArtifactView, JobView
from worker import claims
from worker.db import make_engine, session_factory
from worker.jobstore import JobNotFound, JobStore
from worker.lease import LeaseKeeper, ProgressReporter

T2I = {"kind": "t2i", "prompt": "a red fox", "params": {"num_inference_steps": 4}}


def _orm_view(store_engine: sa.Engine, job_id: str) -> JobView:
    """The view as the ORM path built it before (selectinload + model_validate)."""
    with session_factory(store_engine)() as session:
        job = session.get(Job, job_id, options=[selectinload(Job.artifacts)])
        assert job is not None
        return JobView.model_validate(job)


def test_single_query_polling_returns_the_orm_view(store: JobStore, db_engine: sa.Engine) -> None:
    plain, done = (s.job.id for s in store.submit([T2I, T2I]))
    store.claim(done, "w1", 30)
    artifacts = [
        ArtifactView(index=i, uri=f"file:///{i}.png", width=64, height=64, bytes=10 + i, sha256="ab" * 32)
        for i in (1, 0)
    ]
    assert store.finish_succeeded(
        done, "w1", artifacts=artifacts, seed=3, width=64, height=64, provenance={"device": "cpu"}
    )
    for job_id in (plain, done):
        assert store.get(job_id) == _orm_view(db_engine, job_id)
    assert [a.index for a in store.get(done).artifacts] == [0, 1]
    assert store.get(done).progress_step == 4  # set by the completion, not by a progress write
    assert store.get_many([done, plain, done]) == [_orm_view(db_engine, i) for i in (done, plain, done)]
    assert store.get_many([]) == []
    with pytest.raises(JobNotFound):
        store.get("missing")
    with pytest.raises(JobNotFound):
        store.get_many([plain, "missing"])


class _CountingStore:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.writes: list[int] = []

    def record_progress(self, job_id: str, worker_id: str, step: int, total: int) -> Any:
        self.writes.append(step)
        return self.store.record_progress(job_id, worker_id, step, total)


def test_progress_skips_the_last_step_and_the_first_interval(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    store.claim(job_id, "w1", 30)
    counting = _CountingStore(store)
    lease = LeaseKeeper(store, job_id, "w1", lease_seconds=30, heartbeat_seconds=10)
    slow = ProgressReporter(counting, job_id, "w1", lease, interval_seconds=60)  # type: ignore[arg-type]
    assert [slow(step, 4) for step in (1, 2, 3, 4)] == [False] * 4
    assert counting.writes == []  # a job shorter than the interval writes no progress at all
    every = ProgressReporter(counting, job_id, "w1", lease, interval_seconds=0)  # type: ignore[arg-type]
    for step in (1, 2, 3, 4):
        every(step, 4)
    assert counting.writes == [1, 2, 3]  # never the last step: the completion writes it
    assert store.get(job_id).progress_step == 3


def test_relaxed_writes_do_not_wait_for_the_wal_flush_but_the_claim_does(db_engine: sa.Engine) -> None:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    store = JobStore(session_factory(db_engine))
    job_id = store.submit([T2I])[0].job.id
    setting = sa.func.current_setting("synchronous_commit")
    with db_engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        relaxed = claims.relaxed(
            sa.update(Job).where(Job.id == job_id).values(priority=1).returning(setting), conn
        )
        assert conn.execute(relaxed).scalar_one() == "off"
        assert conn.execute(sa.select(setting)).scalar_one() == "on"  # it ended with the statement
    assert store.get(job_id).priority == 1
    # Claim and completion stay durable: none of the statements they send carries the flag.
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    sa.event.listen(db_engine, "before_cursor_execute", record)
    try:
        assert store.claim(job_id, "w1", 30) is not None
        assert store.finish_succeeded(
            job_id, "w1", artifacts=[], seed=1, width=64, height=64, provenance=None
        )
    finally:
        sa.event.remove(db_engine, "before_cursor_execute", record)
    assert any("UPDATE jobs" in statement for statement in sent)
    assert not [statement for statement in sent if "set_config" in statement]


def test_pool_pings_only_after_idle(db_url: str) -> None:
    engine = make_engine(db_url, ping_after_idle_seconds=0.05)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        pytest.skip("SQLite files need no ping")
    pings: list[str] = []
    original = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append("ping")
        return original(dbapi_connection)

    engine.dialect.do_ping = counted  # type: ignore[method-assign]
    try:
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(sa.select(1))
        assert pings == []  # in steady use: no extra round trip
        time.sleep(0.1)
        with engine.connect() as conn:
            conn.execute(sa.select(1))
        assert pings == ["ping"]
    finally:
        engine.dispose()


def _kill_pooled_connection(engine: sa.Engine, db_url: str) -> None:
    with engine.connect() as conn:  # the pooled connection the next call will use
        pid = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
    admin = make_engine(db_url)
    with admin.connect() as conn:
        conn.execute(sa.select(sa.func.pg_terminate_backend(pid)))
        conn.commit()
    admin.dispose()
    time.sleep(0.2)


@pytest.fixture
def pg_engine(db_url: str) -> Iterator[sa.Engine]:
    """`db_url`'s engine, PostgreSQL only: the tests below kill its server-side connection."""
    if not db_url.startswith("postgresql"):
        pytest.skip("needs a server-side connection to kill")
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_a_terminated_pooled_connection_is_replaced_at_checkout(
    pg_engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(session_factory(pg_engine))
    job_id = store.submit([T2I])[0].job.id
    _kill_pooled_connection(pg_engine, db_url)
    with session_factory(pg_engine).begin() as session:  # a multi-statement write path: no error
        assert session.get(Job, job_id) is not None
    _kill_pooled_connection(pg_engine, db_url)
    assert store.get(job_id).id == job_id
    assert "retrying once" not in caplog.text  # caught by the socket check, not by the retry


def test_a_dead_pooled_connection_is_retried_once_on_reads_claim_and_finish(
    pg_engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.db._socket_has_data", lambda _conn: False)  # a silent drop: no ping
    store = JobStore(session_factory(pg_engine))
    job_id = store.submit([T2I])[0].job.id
    steps: list[tuple[str, Any]] = [
        ("get", lambda: store.get(job_id).id == job_id),
        ("claim", lambda: store.claim(job_id, "w1", 30) is not None),
        ("heartbeat", lambda: store.heartbeat(job_id, "w1", 30).owned),
        (
            "finish",
            lambda: store.finish_succeeded(
                job_id,
                "w1",
                artifacts=[
                    ArtifactView(index=0, uri="file:///0.png", width=64, height=64, bytes=1, sha256="ab" * 32)
                ],
                seed=1,
                width=64,
                height=64,
                provenance=None,
            ),
        ),
    ]
    for name, call in steps:
        caplog.clear()
        _kill_pooled_connection(pg_engine, db_url)
        assert call(), name  # the first statement fails, the pool is reset, it runs again
        assert "retrying once" in caplog.text, name
    assert store.get_many([job_id])[0].status == "succeeded"
