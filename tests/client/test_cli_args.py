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


def test_reference_flags_are_accepted_with_one_note_each(
    capsys: pytest.CaptureFixture[str], clean_env
) -> None:
    # Out-of-habit DeepGen CLI flags parse, and each says once where its equivalent lives; the command
    # then goes on (here it stops at the missing DG_DEEPGEN_CONFIG, exit 4, after the notes).
    code = main(
        [
            "edit",
            "--input",
            str(clean_env),
            "--output_dir",
            "o",
            "--device",
            "cuda",
            "--torch_dtype",
            "bfloat16",
            "--num_gpus",
            "2",
            "--batch_size",
            "4",
            "--resume",
            "--enable_cpu_offload",
            "--true_cfg_scale",
            "4",
        ]
    )
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert [note.split()[1] for note in notes] == [
        "--device",
        "--torch_dtype",
        "--num_gpus",
        "--batch_size",
        "--resume",
        "--enable_cpu_offload",
        "--true_cfg_scale",
    ]
    assert (
        "DG_DEEPGEN_DEVICE" in notes[0] and "DG_DEEPGEN_DTYPE" in notes[1] and "diffgentor worker" in notes[2]
    )
    assert "DG_DEEPGEN_OFFLOAD" in notes[5] and "--guidance_scale" in notes[6]
    assert code == 3  # the notes did not stop it: it went on to read --input (no such CSV)


def test_no_notes_without_reference_flags(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    assert main(["t2i", "--prompt", "x", "--output_dir", str(clean_env / "o")]) == 4
    assert "note:" not in capsys.readouterr().err


def test_edit_only_reference_flags_are_unknown_to_t2i(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    with pytest.raises(SystemExit) as info:
        main(["t2i", "--prompt", "x", "--output_dir", "o", "--true_cfg_scale", "4"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffgentor t2i" in err  # the subcommand's usage, not the top-level one
    assert "unrecognized arguments: --true_cfg_scale 4 (see `diffgentor t2i --help`)" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt_enhance_type", "glm_image"], "--prompt_enhance_type is not supported"),
        (["--model_name", "/ckpt/deepgen.safetensors"], "the checkpoint is DG_DEEPGEN_CHECKPOINT"),
        (["--model_name", "org/DeepGen-1.0"], "looks like a checkpoint path or repo id"),
    ],
)
def test_reference_habits_that_would_change_the_result_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], clean_env
) -> None:
    assert main(["t2i", "--prompt", "x", "--output_dir", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_texts_show_examples_and_the_ignored_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for command, example in (("t2i", '--prompt "A beautiful sunset'), ("edit", "--input data.csv")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert example in out and "accepted with no effect here" in out and "--torch_dtype" in out
        assert ("--true_cfg_scale" in out) == (command == "edit")
        assert max(len(line) for line in out.splitlines()) <= 100
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "diffgentor demo" in out and "DG_BROKER_URL" in out and "DG_DEEPGEN_CONFIG" in out


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


@pytest.mark.parametrize("count", ["0", "9", "-1"])
def test_num_images_per_prompt_out_of_range_is_refused(
    count: str, capsys: pytest.CaptureFixture[str], clean_env
) -> None:
    code = main(["t2i", "--prompt", "x", "--output_dir", "o", "--num_images_per_prompt", count])
    err = capsys.readouterr().err
    assert code == 2 and f"--num_images_per_prompt must be between 1 and 8, got {count}" in err
    assert err.count("\n") == 1  # one line


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

    from tests.support import base_env

    code = (
        "import sys\n"
        "from api_client.cli import main\n"
        "assert main(['list', '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported by a producer command'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=base_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
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


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffgentor {version('diffgentor')}"


def test_every_flag_takes_both_spellings() -> None:
    from api_client.cli import reference_spellings

    parser = build_parser()

    def parse(argv: list[str]):
        args, unknown = parser.parse_known_args(reference_spellings(parser, argv))
        assert unknown == []
        return args

    underscore = parse(
        [
            "t2i",
            "--prompt",
            "x",
            "--output_dir",
            "o",
            "--no_wait",
            "--no_resume",
            "--num_inference_steps",
            "3",
            "--guidance_scale=5",
        ]
    )
    dashes = parse(
        [
            "t2i",
            "--prompt",
            "x",
            "--output-dir",
            "o",
            "--no-wait",
            "--no-resume",
            "--num-inference-steps",
            "3",
            "--guidance-scale=5",
        ]
    )
    assert vars(underscore) == vars(dashes)
    assert (
        dashes.output_dir.name,
        dashes.no_wait,
        dashes.no_resume,
        dashes.num_inference_steps,
        dashes.guidance_scale,
    ) == ("o", True, True, 3, 5.0)
    assert (
        parse(["t2i", "--prompt", "x", "--output-d", "o", "--num-inf", "2"]).num_inference_steps == 2
    )  # abbreviated
    assert parse(["wait", "j1", "--no_progress", "--output-dir", "d"]).no_progress
    assert parse(["list", "--model-name", "m"]).model_name == "m"
    assert parse(["health", "--stale-seconds", "20", "--model-name", "m"]).stale_seconds == 20.0
    assert (
        parse(["edit", "--input", "d.csv", "--output-dir", "o", "--torch-dtype", "bf16"]).torch_dtype
        == "bf16"
    )
    # After a bare `--` the arguments belong to Celery and are passed on untouched.
    assert parse(["worker", "--model-name", "m", "--", "--max-tasks-per-child=1"]).celery_args == [
        "--",
        "--max-tasks-per-child=1",
    ]


def test_help_shows_the_reference_spelling_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["t2i", "--help"])
    out = capsys.readouterr().out
    assert "--output_dir" in out and "--num_inference_steps" in out and "--no_resume" in out
    assert "--output-dir" not in out and "--num-inference-steps" not in out and "--no-resume" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--output-dir" in capsys.readouterr().out  # the epilog says both spellings work


def test_a_dashed_flag_runs_the_command(capsys: pytest.CaptureFixture[str], clean_env) -> None:
    assert (
        main(["t2i", "--prompt", "x", "--output-dir", str(clean_env / "o"), "--no-resume"]) == 4
    )  # (no model)
    assert "unrecognized" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("true", True), ("0", False), ("false", False), ("", False)]
)
def test_dg_debug_reads_like_every_boolean(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    from api_client import cli

    monkeypatch.setenv("DG_DEBUG", value)
    assert cli._debug() is on
