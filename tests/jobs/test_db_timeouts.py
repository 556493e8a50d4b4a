"""PostgreSQL connections carry a connect timeout and TCP keepalives; SQLite is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from worker.db import POSTGRES_CONNECT_ARGS, make_engine


class _Captured(Exception):
    """Raised from do_connect so that no connection is attempted."""


def _connect_params(engine: sa.Engine) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    @sa.event.listens_for(engine, "do_connect")
    def _capture(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise _Captured

    try:
        with pytest.raises(_Captured):
            engine.connect()
    finally:
        engine.dispose()
    return seen


def test_postgres_connections_get_timeouts_and_keepalives() -> None:
    # Port 1 on loopback is never reached: do_connect stops before the driver connects.
    params = _connect_params(make_engine("postgresql+psycopg://u:p@127.0.0.1:1/db"))
    assert {key: params[key] for key in POSTGRES_CONNECT_ARGS} == POSTGRES_CONNECT_ARGS
    assert params["keepalives"] == 1 and params["connect_timeout"] > 0
    assert "options" not in params  # no global statement_timeout


def test_url_query_and_explicit_connect_args_override_the_defaults() -> None:
    params = _connect_params(make_engine("postgresql+psycopg://u:p@127.0.0.1:1/db?connect_timeout=3"))
    assert (
        params["connect_timeout"] == "3"
        and params["keepalives_idle"] == POSTGRES_CONNECT_ARGS["keepalives_idle"]
    )
    params = _connect_params(
        make_engine("postgresql+psycopg://u:p@127.0.0.1:1/db", connect_args={"keepalives_count": 9})
    )
    assert (
        params["keepalives_count"] == 9
        and params["connect_timeout"] == POSTGRES_CONNECT_ARGS["connect_timeout"]
    )


def test_sqlite_is_unaffected(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    params = _connect_params(engine)
    assert not set(POSTGRES_CONNECT_ARGS) & set(params)
    assert params["check_same_thread"] is False
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("select 1").scalar() == 1
    finally:
        engine.dispose()
