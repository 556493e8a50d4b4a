"""Shared fixtures: real PostgreSQL, Redis and a moto S3 endpoint on this machine, and the tiny model.

Each test session gets its own PostgreSQL database and its own Redis database number so that
several test runs (and helpers) can share the machine's servers without seeing each other.
Conftest files hold fixtures only; helpers shared by test modules live in tests/support.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from worker.testing import free_port, temporary_database

if TYPE_CHECKING:
    import sqlalchemy as sa

    from worker.jobstore import JobStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch/OpenMP thread in every test process and the CLI/worker subprocesses that inherit this
# environment (worker_environ sets the same for workers): the suite runs three pytest-xdist workers
# on two cores, and oversubscribed OpenMP threads spin-wait for each other (the embedded CLI tests
# used 2-4 times their CPU; the whole run took 8m40s against 6m13s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# moto's credentials for every test (S3 clients need some even to fail on a dead endpoint).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

PG_ADMIN_URL = os.environ.get("DG_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("DG_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("DG_TEST_REDIS_PORT", "6379"))


# Fixtures that reach a service or start a server or worker process: a test that uses one (directly
# or through another fixture) is marked `integration`, so `pytest -m "not integration"` is the
# services-free tier (README). Modules that run CLI/worker subprocesses end to end without such a
# fixture carry their own `pytestmark = pytest.mark.integration`.
SERVICE_FIXTURES = frozenset(
    {
        "pg_url",
        "migrated_pg_url",
        "db_url",
        "empty_db_url",  # tests/jobs/test_migrations.py: a database of its own, PostgreSQL among them
        "redis_db",
        "redis_url",
        "s3_endpoint",
        "s3_bucket",
        # sub-conftests and test modules: an own redis-server, Celery/`diffgentor worker` subprocesses
        "redis_server",
        "shared_pg_without_sweepers",
        "worker_env",
        "start_worker",
        "server_env",
        "worker_factory",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


_OUR_PACKAGES = frozenset({"worker", "api_client", "schemas", "bench", "tests"})


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo what a test did to logger levels: an in-process Celery worker hijacks the root logger,
    uvicorn configures its own, `diffgentor t2i` quiets `worker.runner`. Left in place, such a change
    silences the log records later tests in the same process assert on (with pytest-xdist the order of
    tests in a process varies from run to run). Root handlers are pytest's to manage and stay as they are."""
    root = logging.getLogger()
    saved_root = (root.level, root.disabled)
    saved = {
        name: (logger.level, logger.disabled, logger.propagate, list(logger.handlers))
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.setLevel(saved_root[0])
    root.disabled = saved_root[1]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if name in saved:
            level, logger.disabled, logger.propagate, logger.handlers[:] = saved[name]
            logger.setLevel(level)
        else:  # created during the test: others keep what their modules set, ours start clean
            logger.disabled = False
            if name.split(".")[0] in _OUR_PACKAGES:
                logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    with temporary_database(PG_ADMIN_URL, prefix="dg_test_") as url:
        yield url


@pytest.fixture(scope="session")
def migrated_pg_url(pg_url: str) -> str:
    """The session's PostgreSQL database with the schema at head."""
    from worker.db import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A migrated, empty job database on each supported dialect."""
    import sqlalchemy as sa

    from worker.db import make_engine, upgrade

    if request.param == "sqlite":
        upgrade(sqlite_url)
        return sqlite_url
    url = request.getfixturevalue("migrated_pg_url")  # lazily: SQLite-only runs need no server
    engine = make_engine(url)
    with engine.begin() as conn:  # one database for the session, emptied per test
        conn.execute(sa.text("TRUNCATE artifacts, workers, jobs, batches, pending_publishes CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on `db_url` (both dialects), disposed after the test."""
    from worker.db import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_engine: sa.Engine) -> Iterator[JobStore]:
    """A `JobStore` on `db_engine` (three attempts); closed after the test (its publish
    confirmations are written while the database is still there)."""
    from worker.db import session_factory
    from worker.jobstore import JobStore

    job_store = JobStore(session_factory(db_engine), max_attempts=3)
    yield job_store
    job_store.close()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database number reserved for this session (claimed with SETNX in db 0)."""
    import redis

    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    token = uuid.uuid4().hex
    for number in range(1, 16):
        if admin.set(f"dg-test-db-lock:{number}", token, nx=True, ex=3600):
            r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            r.flushdb()
            try:
                yield number
            finally:
                r.flushdb()
                if admin.get(f"dg-test-db-lock:{number}") == token.encode():
                    admin.delete(f"dg-test-db-lock:{number}")
            return
    raise RuntimeError("no free Redis database number 1..15 for tests")


@pytest.fixture(scope="session")
def redis_url(redis_db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 endpoint (moto server mode) on loopback."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new empty bucket on the moto endpoint; returns its name."""
    import boto3
    from botocore.config import Config

    name = f"dg-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):  # -> worker.deepgen.tiny.TinyModelPaths
    """The tiny random DeepGen model (Qwen2.5-VL + SD3 folders, both checkpoint files), written once
    per test run for every test that needs it: never write another in a test. Read-only for tests.

    The pytest-xdist workers of one run share it (it costs each ~3 s of CPU on a 2-core machine):
    the first writes it under the run's common temporary folder while holding a file lock, then
    records its paths; the others wait on the lock and reuse it (a dead writer's lock goes with it).
    """
    import dataclasses
    import json
    import shutil
    from pathlib import Path

    from filelock import FileLock

    from worker.deepgen.tiny import TinyModelPaths, write_tiny_model

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return write_tiny_model(tmp_path_factory.mktemp("tiny_deepgen"))
    run_root = tmp_path_factory.getbasetemp().parent  # pytest-N/, above this worker's popen-gwK/
    folder, record = run_root / "tiny_deepgen_shared", run_root / "tiny_deepgen_shared.json"
    with FileLock(str(run_root / "tiny_deepgen_shared.lock")):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)  # half-written by a worker that died writing it
            paths = write_tiny_model(folder)
            record.write_text(json.dumps({k: str(v) for k, v in dataclasses.asdict(paths).items()}))
            return paths
    return TinyModelPaths(**{k: Path(v) for k, v in json.loads(record.read_text()).items()})


@pytest.fixture(scope="session")
def tiny_model_paths(tiny_model):  # -> worker.deepgen.tiny.TinyModelPaths
    """Alias of `tiny_model` (the job tests' name)."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_paths(tiny_model):  # -> worker.deepgen.tiny.TinyModelPaths
    """Alias of `tiny_model` (the client tests' name)."""
    return tiny_model
