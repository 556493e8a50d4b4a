"""Every user-facing error: one line, no traceback, names what to fix, documented exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_client.cli import main
from api_client.errors import ExitCode
from tests.support import write_png
from worker.testing import free_port


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(None, ["DG_DEEPGEN_CONFIG: is required but not set"], id="missing-config"),
        pytest.param(
            "deepgen_tiny", ["DG_DEEPGEN_DIFFUSION_MODEL_PATH: is required but not set"], id="missing-path"
        ),
        pytest.param(
            "deepgen_huge",
            [
                "unknown DeepGen config 'deepgen_huge'",
                "available configs: deepgen, deepgen_large, deepgen_tiny",
            ],
            id="unknown-config",
        ),
    ],
)
def test_deepgen_configuration_errors_are_named(
    config: str | None,
    expected: list[str],
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if config is not None:
        monkeypatch.setenv("DG_DEEPGEN_CONFIG", config)
    code, err = run_main(["t2i", "--prompt", "a cat", "--output_dir", str(clean_env / "out")], capsys)
    assert code == ExitCode.CONFIGURATION
    for message in expected:
        assert message in err


def test_worker_refuses_to_start_without_deepgen_variables(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(["worker", "--model_name", "deepgen"], capsys)
    assert code == ExitCode.CONFIGURATION and "DG_DEEPGEN_CONFIG" in err


def test_csv_missing_column_is_named(
    clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("input_images,prompt\na.png,make it red\n")
    code, err = run_main(["edit", "--input", str(csv_path), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == ExitCode.INPUT_FILE
    assert "has no 'instruction' column (columns: input_images, prompt)" in err


def test_row_with_missing_image_names_row_and_path(
    clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_png(tmp_path / "ok.png")
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("input_images,instruction\nok.png,red\nphotos/gone.png,blue\n")
    code, err = run_main(["edit", "--input", str(csv_path), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == ExitCode.INPUT_FILE
    assert "row 1 (line 3): input image photos/gone.png not found" in err
    assert not (tmp_path / "o").exists()  # nothing was submitted or written


def _server_env(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    from worker.db import upgrade

    upgrade(sqlite_url)
    monkeypatch.setenv("DG_DATABASE_URL", sqlite_url)


def test_unreachable_redis_names_url_without_password(
    clean_env: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _server_env(monkeypatch, sqlite_url)
    port = free_port()
    monkeypatch.setenv("DG_BROKER_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    code, err = run_main(["t2i", "--prompt", "a cat", "--output_dir", str(clean_env / "o")], capsys)
    assert code == ExitCode.UNREACHABLE
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in err
    assert "hunter2" not in err and "DG_BROKER_URL" in err
    # Fail fast means before any row is written.
    monkeypatch.delenv("DG_BROKER_URL")
    assert main(["list", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_unreachable_database_names_url_without_password(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("DG_DATABASE_URL", f"postgresql+psycopg://dg:hunter2@127.0.0.1:{port}/jobs")
    code, err = run_main(["list"], capsys)
    assert code == ExitCode.UNREACHABLE
    assert f"cannot reach the job database at postgresql+psycopg://dg:***@127.0.0.1:{port}/jobs" in err
    assert "hunter2" not in err and "DG_DATABASE_URL" in err


def test_database_without_tables_says_run_db_upgrade(
    clean_env: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlalchemy as sa

    empty = pg_url.rsplit("/", 1)[0] + "/postgres"
    engine = sa.create_engine(empty)
    with engine.connect() as connection:
        has_tables = connection.execute(sa.text("SELECT to_regclass('public.jobs') IS NOT NULL")).scalar()
    engine.dispose()
    if has_tables:
        pytest.skip("the shared 'postgres' database has job tables")
    monkeypatch.setenv("DG_DATABASE_URL", empty)
    monkeypatch.setenv("DG_BROKER_URL", "redis://127.0.0.1:6379/15")
    code, err = run_main(["status", "00000000-0000-0000-0000-000000000000"], capsys)
    assert code == ExitCode.CONFIGURATION and "run `diffgentor db upgrade`" in err


def test_unreachable_s3_endpoint_is_named(
    clean_env: Path,
    sqlite_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _server_env(monkeypatch, sqlite_url)
    port = free_port()
    monkeypatch.setenv("DG_BROKER_URL", redis_url)
    monkeypatch.setenv("DG_STORAGE_URL", "s3://dg-missing/prefix")
    monkeypatch.setenv("DG_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, err = run_main(["t2i", "--prompt", "a cat", "--output_dir", str(clean_env / "o")], capsys)
    assert code == ExitCode.UNREACHABLE
    assert f"http://127.0.0.1:{port}" in err and "DG_S3_ENDPOINT_URL" in err


def test_unknown_job_id(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(["status", "no-such-job"], capsys)
    assert code == ExitCode.NOT_FOUND and "no job with id no-such-job" in err
