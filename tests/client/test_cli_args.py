"""Command-line parsing: the DeepGen CLI's defaults, backends, time filters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from api_client.cli import _time_arg, build_parser, main


def test_t2i_defaults_follow_the_deepgen_docs() -> None:
    args = build_parser().parse_args(["t2i", "--prompt", "x", "--output_dir", "out"])
    assert (args.backend, args.model_name) == ("deepgen", "deepgen")
    assert (args.guidance_scale, args.num_inference_steps, args.height, args.width) == (4.0, 50, 512, 512)
    assert args.negative_prompt == "" and args.seed is None and args.priority == 0 and not args.no_wait


def test_edit_size_defaults_to_the_first_image() -> None:
    args = build_parser().parse_args(["edit", "--input", "d.csv", "--output_dir", "out"])
    assert args.height is None and args.width is None and args.instruction_key == "instruction"


def test_compatibility_flags_are_accepted() -> None:
    args = build_parser().parse_args(
        ["t2i", "--prompt", "x", "--output_dir", "o", "--device", "cuda", "--torch_dtype", "bfloat16",
         "--num_gpus", "2", "--batch_size", "4", "--resume", "--no-wait", "--seed", "5", "--priority", "9"]
    )
    assert args.no_wait and args.seed == 5 and args.priority == 9


def test_prompt_and_prompts_file_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["t2i", "--prompt", "x", "--prompts_file", "p.txt", "--output_dir", "o"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_unsupported_backend_lists_supported(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    code = main(["t2i", "--backend", "diffusers", "--prompt", "x", "--output_dir", str(clean_env / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unsupported backend 'diffusers'; supported backends: deepgen" in err
    assert "Traceback" not in err


def test_num_images_per_prompt_other_than_one_is_refused(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    code = main(["t2i", "--prompt", "x", "--output_dir", "o", "--num_images_per_prompt", "2"])
    assert code == 2 and "--num_images_per_prompt must be 1" in capsys.readouterr().err


def test_time_filters_accept_ages_and_iso_times() -> None:
    before = datetime.now(timezone.utc)
    parsed = _time_arg("2h")
    after = datetime.now(timezone.utc)
    assert before - timedelta(hours=2) <= parsed <= after - timedelta(hours=2)
    assert _time_arg("2026-01-31T12:00") == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    with pytest.raises(Exception, match="neither an ISO time"):
        _time_arg("yesterday")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "t2i" in capsys.readouterr().err


def test_producer_commands_do_not_import_torch(tmp_path) -> None:
    import subprocess
    import sys

    from tests.client.conftest import base_env

    code = (
        "import sys\n"
        "from api_client.cli import main\n"
        "assert main(['list', '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported by a producer command'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=base_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_edit_needs_both_sides_or_neither(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    code = main(["edit", "--input", "d.csv", "--output_dir", "o", "--height", "256"])
    assert code == 2 and "give both --height and --width" in capsys.readouterr().err


def test_workers_and_health_commands_are_wired(clean_env, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.db import upgrade
    from worker.settings import load_settings

    upgrade(load_settings().database_url)
    assert main(["workers"]) == 0
    assert "no registered workers" in capsys.readouterr().out
    assert main(["health", "--model_name", "deepgen"]) == 6
    assert "no registered worker for deepgen" in capsys.readouterr().err
