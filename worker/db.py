"""Database engines, sessions and schema upgrades (Alembic, configured in code)."""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection idle longer than this is pinged before reuse (see `_ping_after_idle`).
PING_AFTER_IDLE_SECONDS = 2.0
_CHECKIN_AT = "dg_checkin_at"
# Execution option read by the SQLite "begin" listener: "immediate" takes the write lock at BEGIN.
SQLITE_BEGIN_OPTION = "dg_sqlite_begin"

# libpq parameters for every PostgreSQL connection, so a network partition fails a heartbeat or a
# completion within about a minute instead of hanging it until the job's hard time limit.
# No statement_timeout: migrations and bulk maintenance may legitimately run long.
POSTGRES_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": 10,  # seconds to establish a connection (libpq waits forever by default)
    # Idle connection (a query waiting on the server, or a pooled one): probe after 15 s of silence,
    # every 5 s, declare dead after 3 misses, i.e. about 30 s; a busy but live server still answers.
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    # Keepalives are not sent while written data is unacknowledged; this bounds that case (Linux, ms).
    "tcp_user_timeout": 30_000,
}


def make_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine with the per-dialect settings the job system relies on."""
    parsed = make_url(url)
    ping_after = kwargs.pop("ping_after_idle_seconds", PING_AFTER_IDLE_SECONDS)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs,
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own BEGIN handling is off (`_sqlite_pragmas`); we emit BEGIN ourselves so every
        # transaction (including the claim UPDATE) is a real SQLite transaction.
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # Ours are defaults: the URL's query (?connect_timeout=...) and explicit connect_args win.
        defaults = {key: value for key, value in POSTGRES_CONNECT_ARGS.items() if key not in parsed.query}
        kwargs["connect_args"] = {**defaults, **kwargs.get("connect_args", {})}
    engine = sa.create_engine(parsed, **kwargs)
    _ping_after_idle(engine, ping_after)
    return engine


def _ping_after_idle(engine: sa.Engine, idle_seconds: float) -> None:
    """Stale-connection safety without `pool_pre_ping`'s round trip on every checkout.

    A connection is pinged before reuse when it sat in the pool longer than `idle_seconds`
    (a failover or an idle-timeout proxy may have dropped it silently), or when its socket
    has something to read while idle: a server restart or `pg_terminate_backend` sends an
    error and closes the socket, which a zero-timeout poll sees without a round trip. A failed
    ping makes the pool discard the connection and check out another. What still slips
    through (a silent drop within `idle_seconds`) fails its first statement; SQLAlchemy then
    invalidates the pool and the work is retried once (`Database`).
    """

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKIN_AT] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get(_CHECKIN_AT)
        if last is None:
            return  # brand new
        if time.monotonic() - last < idle_seconds and not _socket_has_data(dbapi_connection):
            return  # used moments ago and the server sent nothing since
        try:
            engine.dialect.do_ping(dbapi_connection)
            dbapi_connection.rollback()  # the ping opened a transaction; leave the connection idle
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


def _socket_has_data(dbapi_connection: Any) -> bool:
    """True if an idle connection's socket is readable (EOF or an unsolicited server message)."""
    try:
        readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 0)
    except (OSError, ValueError, AttributeError):
        return True  # closed or no socket to look at: let the ping decide
    return bool(readable)


def _sqlite_begin(conn: sa.Connection) -> None:
    immediate = conn.get_execution_options().get(SQLITE_BEGIN_OPTION) == "immediate"
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def for_writes(engine: sa.Engine) -> sa.Engine:
    """The engine to open write transactions with: on SQLite they BEGIN IMMEDIATE.

    A deferred transaction that reads and then writes fails at once with "database is locked"
    (SQLITE_BUSY_SNAPSHOT, which skips busy_timeout) when another connection committed after
    its read, e.g. the embedded runner thread writing progress. Taking the write lock at BEGIN
    makes it wait its turn (busy_timeout) instead. Reads keep a plain BEGIN and never wait for
    the write lock. Other dialects: the engine itself.
    """
    if engine.dialect.name != "sqlite":
        return engine
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "immediate"})


class Database:
    """How the job store reaches its database: the connection policy, apart from the job logic.

    - ``read(fn)``: one read in autocommit on PostgreSQL (no BEGIN/ROLLBACK round trips; one
      statement is atomic and sees one snapshot), retried once on a dead pooled connection.
    - ``write_one(fn)``: one write statement in its own transaction (autocommit on PostgreSQL,
      BEGIN IMMEDIATE on SQLite), retried once on a dead pooled connection. Only for writes that
      are idempotent when retried (progress, lease renewal, ``published_at``, the claim: a
      retried claim whose first try did commit is granted again to the same worker).
    - ``write_once(fn)``: the same without the retry (an INSERT whose lost commit reply must not
      insert twice).
    - ``transaction(fn)``: a session transaction for several statements (BEGIN IMMEDIATE on
      SQLite), retried once on a dead pooled connection; ``transaction()`` without ``fn`` is the
      plain context manager, never retried.
    - ``session()``: a read session for ORM queries.

    Pooled connections are only pinged after sitting idle (`_ping_after_idle`), so one that died
    while in steady use (database restart, failover) fails its first statement instead;
    SQLAlchemy then invalidates the pool and the work runs once more on a new connection.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        engine: sa.Engine = sessions.kw["bind"]
        self.dialect = engine.dialect.name
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql" else engine
        )
        self._autocommit_writes = for_writes(self._autocommit)
        self._write_sessions: sessionmaker[Session] = sessionmaker(
            **{**sessions.kw, "bind": for_writes(engine)}
        )

    def session(self) -> Session:
        return self.sessions()

    def read(self, work: Callable[[sa.Connection], _T]) -> _T:
        return _retrying_once(self._autocommit.connect, work)

    def write_one(self, work: Callable[[sa.Connection], _T]) -> _T:
        return _retrying_once(self._autocommit_writes.begin, work)

    def write_once(self, work: Callable[[sa.Connection], _T]) -> _T:
        with self._autocommit_writes.begin() as conn:
            return work(conn)

    @overload
    def transaction(self) -> AbstractContextManager[Session]: ...

    @overload
    def transaction(self, work: Callable[[Session], _T]) -> _T: ...

    def transaction(self, work: Callable[[Session], _T] | None = None) -> Any:
        if work is None:
            return self._write_sessions.begin()
        return _retrying_once(self._write_sessions.begin, work)


def _retrying_once(open_connection: Callable[[], Any], work: Callable[[Any], _T]) -> _T:
    try:
        with open_connection() as conn:
            return work(conn)
    except sa.exc.DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("database connection lost; retrying once on a new connection")
    with open_connection() as conn:
        return work(conn)


def sqlite_locked(exc: sa.exc.OperationalError) -> bool:
    """SQLite busy past busy_timeout (nothing was written: the transaction rolled back)."""
    return "database is locked" in str(exc.orig) or "database is busy" in str(exc.orig)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let the "begin" listener control transactions
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Any:
    """An Alembic Config built in code: works from an installed package without alembic.ini."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    # Passed as an attribute, not a main option: configparser would choke on '%' in passwords.
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (what `diffgentor db upgrade` runs)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
