"""The `diffgentor` command: DeepGen t2i/edit on the job system, plus job and operator commands.

`main(argv)` returns the exit code (docs/cli.md lists them). Errors print one `error: ...` line that
says what to fix; `DG_DEBUG=1` adds the traceback. Torch is imported only by the commands that run
the model in this process (embedded t2i/edit, demo, tiny-model, worker).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from api_client.errors import (
    DiffgentorError,
    ExitCode,
    InputFileError,
    MissingExtra,
    UsageError,
    missing_extra_message,
    path_problem,
)
from api_client.generation import GenerationOptions, run_edit, run_t2i
from schemas.specs import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_MODEL_NAME,
    DEFAULT_STEPS,
    DEFAULT_T2I_SIDE,
    MAX_IMAGES_PER_PROMPT,
    MAX_PRIORITY,
    MIN_IMAGES_PER_PROMPT,
    MIN_PRIORITY,
)

SUPPORTED_BACKENDS = ("deepgen",)
_FOREIGN_ERRORS = {  # errors raised by worker modules, by class name (importing them could pull torch)
    "DeepGenEnvError": ExitCode.CONFIGURATION,
    "ConfigError": ExitCode.CONFIGURATION,
    "SettingsError": ExitCode.CONFIGURATION,
    "ValidationError": ExitCode.CONFIGURATION,
    "StorageError": ExitCode.UNREACHABLE,
    "JobNotFound": ExitCode.NOT_FOUND,
    "InvalidTransition": ExitCode.STATE,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at interpreter exit
        return code
    except BrokenPipeError:
        # `diffgentor list | head -1`: the reader went away. Leave quietly, as Unix tools do
        # (the Python docs' recipe: point stdout at devnull so the final flush cannot fail again).
        _stdout_to_devnull()
        return int(ExitCode.BROKEN_PIPE)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(
        reference_spellings(parser, sys.argv[1:] if argv is None else argv)
    )
    if unknown:  # reported by the subcommand's parser, so its usage line is the one shown
        command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        command_parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (see `{command_parser.prog} --help`)"
        )
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    try:
        code = int(handler(args))
        if code == ExitCode.INTERRUPTED:
            _exit_now_if_model_running(code)
        return code
    except DiffgentorError as exc:
        return _report(exc, exc.exit_code)
    except KeyboardInterrupt:
        print(
            "interrupted; jobs already submitted stay queued (`diffgentor list` shows them)", file=sys.stderr
        )
        _exit_now_if_model_running(ExitCode.INTERRUPTED)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        raise
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc.name, _command_name(args))
        if message is None:
            return _report(exc, ExitCode.INTERNAL, prefix=f"internal error ({type(exc).__name__}): ")
        return _report(MissingExtra(exc.name, _command_name(args)), ExitCode.CONFIGURATION)
    except OSError as exc:
        if exc.filename is not None:  # a user path: the output folder, DG_HOME, a file to write
            return _report(InputFileError(path_problem(exc)), ExitCode.INPUT_FILE)
        return _unexpected(exc)
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls.__name__ in _FOREIGN_ERRORS:
            return _report(exc, _FOREIGN_ERRORS[cls.__name__])
    return _report(exc, ExitCode.INTERNAL, prefix=f"internal error ({type(exc).__name__}): ")


def _command_name(args: argparse.Namespace) -> str | None:
    command_parser = getattr(args, "command_parser", None)
    return command_parser.prog.split()[-1] if command_parser is not None else None


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass


def _exit_now_if_model_running(code: int) -> None:
    """After Ctrl-C in embedded mode a job may still be inside torch on the runner thread; a normal
    interpreter shutdown would then abort. Its row stays for a rerun, so leave at once."""
    from api_client.embedded import runner_thread_alive

    if runner_thread_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _OneLineFormatter(logging.Formatter):
    """`warning: message`, without the traceback (DG_DEBUG=1 keeps the full record)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _quiet_job_logs() -> None:
    """Commands that may run embedded jobs in this process: the in-process worker's log records
    become one-line messages on stderr, and per-job failures are left to the CLI's own summary
    (`index N job ID failed: ...`) instead of being printed twice, with tracebacks."""
    root = logging.getLogger()
    if root.handlers:  # the embedding program configured logging itself
        return
    handler = logging.StreamHandler(sys.stderr)
    if not _debug():
        handler.setFormatter(_OneLineFormatter())
        logging.getLogger("worker.runner").setLevel(logging.ERROR)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _report(exc: BaseException, code: ExitCode, prefix: str = "") -> int:
    if _debug():
        traceback.print_exception(exc)
    message = str(exc).strip() or type(exc).__name__
    hint = "" if code != ExitCode.INTERNAL else " (set DG_DEBUG=1 for the traceback)"
    print(f"error: {prefix}{message}{hint}", file=sys.stderr)
    return int(code)


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffgentor",
        description="DeepGen 1.0 image generation on a job queue (embedded in-process without DG_BROKER_URL).",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    t2i = commands.add_parser(
        "t2i",
        help="text-to-image: one job per prompt, PNGs into --output_dir",
        description="Text-to-image: one job per prompt; writes OUTPUT_DIR/{index:06d}.png as each job succeeds.",
        epilog=_T2I_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prompt_source = t2i.add_mutually_exclusive_group(required=True)
    prompt_source.add_argument("--prompt", help="one prompt (index 0)")
    prompt_source.add_argument("--prompts_file", type=Path, help="prompts in .jsonl, .json, .txt or .csv")
    _add_generation_options(t2i, edit=False)
    t2i.set_defaults(handler=_cmd_t2i)

    edit = commands.add_parser(
        "edit",
        help="image editing: one job per CSV row, PNGs and results.csv",
        description="Image editing: one job per CSV row; writes OUTPUT_DIR/{index:06d}.png and results.csv.",
        epilog=_EDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument(
        "--input", required=True, type=Path, help="CSV with input_images and instruction columns"
    )
    edit.add_argument(
        "--instruction_key", default="instruction", help="instruction column (default: instruction)"
    )
    edit.add_argument("--output_csv", type=Path, help="results CSV (default: OUTPUT_DIR/results.csv)")
    _add_generation_options(edit, edit=True)
    edit.set_defaults(handler=_cmd_edit)

    status = commands.add_parser("status", help="show jobs")
    status.add_argument("job_ids", nargs="+", metavar="JOB", help=_JOB_HELP)
    status.add_argument("--json", action="store_true", help="one JSON object per job")
    status.set_defaults(handler=_cmd_status)

    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", action="append", choices=_status_names(), help="repeatable")
    listing.add_argument("--model_name", help="only jobs for this model")
    listing.add_argument("--since", type=_time_arg, help="created at/after: ISO time or age like 30m, 2h, 7d")
    listing.add_argument("--until", type=_time_arg, help="created before: ISO time or age")
    listing.add_argument("--limit", type=int, default=50, help="page size, 1-1000 (default 50)")
    listing.add_argument("--offset", type=int, default=0, help="skip this many jobs (next page)")
    listing.add_argument("--json", action="store_true", help="one JSON object per job")
    listing.set_defaults(handler=_cmd_list)

    wait = commands.add_parser("wait", help="wait until jobs finish (reattach after Ctrl-C)")
    wait.add_argument("job_ids", nargs="+", metavar="JOB", help=_JOB_HELP)
    wait.add_argument("--timeout", type=_seconds, help="give up after this many seconds (exit 7)")
    wait.add_argument("--no-progress", action="store_true", help="no progress bar")
    wait.add_argument("-o", "--output_dir", type=Path, help="also download the PNGs here")
    wait.set_defaults(handler=_cmd_wait)

    fetch = commands.add_parser("fetch", help="download a job's PNGs (or print presigned URLs)")
    fetch.add_argument("job_ids", nargs="+", metavar="JOB", help=_JOB_HELP)
    fetch.add_argument("-o", "--output_dir", type=Path, help="folder for <job_id>-<index>.png files")
    fetch.add_argument("--urls", action="store_true", help="print presigned GET URLs instead of downloading")
    fetch.add_argument("--expires", type=int, default=3600, help="presigned URL lifetime in seconds")
    fetch.set_defaults(handler=_cmd_fetch)

    cancel = commands.add_parser(
        "cancel", help="cancel jobs (queued: never start; running: stop at next step)"
    )
    cancel.add_argument("job_ids", nargs="+", metavar="JOB", help=_JOB_HELP)
    cancel.set_defaults(handler=_cmd_cancel)

    retry = commands.add_parser("retry", help="resubmit failed or cancelled jobs as new linked jobs")
    retry.add_argument("job_ids", nargs="+", metavar="JOB", help=_JOB_HELP)
    retry.set_defaults(handler=_cmd_retry)

    worker = commands.add_parser("worker", help="run a GPU worker for one model queue (needs DG_DEEPGEN_*)")
    worker.add_argument(
        "--model_name",
        default=DEFAULT_MODEL_NAME,
        help=f"queue / model to serve (default {DEFAULT_MODEL_NAME})",
    )
    worker.add_argument(
        "--pool",
        choices=("prefork", "solo", "threads"),
        default="prefork",
        help="Celery pool (default prefork: the parent never touches CUDA)",
    )
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--sweeper", action="store_true", help="also consume the sweep queue")
    worker.add_argument("--beat", action="store_true", help="also run the beat that schedules sweeps")
    worker.add_argument("--hostname", help="Celery node name (default MODEL-xxxxxx@host)")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: passed to celery worker")
    worker.set_defaults(handler=_cmd_worker)

    db = commands.add_parser("db", help="job database maintenance")
    db_commands = db.add_subparsers(title="db commands", metavar="DB_COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply the Alembic migrations to DG_DATABASE_URL")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    sweep = commands.add_parser("sweep", help="re-publish unpublished and lease-expired jobs")
    sweep.add_argument("--loop", action="store_true", help="keep sweeping every --interval seconds")
    sweep.add_argument(
        "--interval", type=float, help="seconds between sweeps (default DG_SWEEP_INTERVAL_SECONDS)"
    )
    sweep.set_defaults(handler=_cmd_sweep)

    from worker import health as worker_health  # torch-free: registry rows and the job table

    workers = commands.add_parser("workers", help="list registered workers and their state")
    health = commands.add_parser("health", help="exit 1 when a worker is gone or not consuming (monitoring)")
    worker_health.add_arguments(workers, health)
    workers.set_defaults(handler=worker_health.cmd_workers)
    health.set_defaults(handler=worker_health.cmd_health)

    from api_client.webhook_cli import add_webhook_commands  # [issue 11]

    add_webhook_commands(commands)  # `webhooks deliver|show` (api_client/webhook_cli.py)

    from api_client.batch_cli import add_batch_commands

    add_batch_commands(commands)  # `batches` and `batch show|wait|...` (api_client/batch_cli.py)

    from api_client.prune_cli import add_prune_command  # [issue 11 retention]

    add_prune_command(commands)  # `prune --older-than DAYS ...` (api_client/prune_cli.py)

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight DeepGen (for tests and demos)")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(handler=_cmd_tiny_model)

    demo = commands.add_parser("demo", help="run one t2i and one edit job on the embedded default")
    demo.add_argument("--output_dir", type=Path, help="default: DG_HOME/demo")
    demo.add_argument("--num_inference_steps", type=int, default=None)
    demo.set_defaults(handler=_cmd_demo)

    _add_dashboard_parser(commands)  # [issue 12] `dashboard` (api_client/dashboard/command.py)
    for command_parser in _all_subparsers(parser):
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffgentor")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed; run `pip install -e .`)"


def reference_spellings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Every long flag in either spelling: `--output-dir` and `--output_dir`, `--no_wait` and `--no-wait`.

    A flag the parsers do not know is rewritten to the other spelling when that one is known (or is
    the start of a known flag, so abbreviations work too). Only the reference spelling is registered
    with argparse, so help shows it alone and abbreviations stay unambiguous. Arguments after a bare
    `--` (passed on to Celery by `worker`) are left alone.
    """
    known = {
        option
        for each in (parser, *_all_subparsers(parser))
        for option in each._option_string_actions
        if option.startswith("--")
    }
    result: list[str] = []
    for position, arg in enumerate(argv):
        if arg == "--":
            return result + list(argv[position:])
        name, equals, value = arg.partition("=")
        if name.startswith("--") and len(name) > 2 and name not in known:
            for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                if other in known or any(option.startswith(other) for option in known):
                    name = other
                    break
        result.append(name + equals + value)
    return result


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.append(child)
                found.extend(_all_subparsers(child))
    return found


def _add_generation_options(parser: argparse.ArgumentParser, *, edit: bool) -> None:
    # Defaults and ranges are the job spec's (schemas/specs.py), the one place that states them.
    default_side = None if edit else DEFAULT_T2I_SIDE
    side_help = "default: the first input image's size" if edit else f"default {DEFAULT_T2I_SIDE}"
    parser.add_argument("--backend", default="deepgen", help="model backend (supported: deepgen)")
    parser.add_argument(
        "--model_name",
        default=DEFAULT_MODEL_NAME,
        help=f"model / worker queue (default {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="where {index:06d}.png files go")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=DEFAULT_GUIDANCE_SCALE,
        help=f"CFG scale (default {DEFAULT_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"denoising steps (default {DEFAULT_STEPS})",
    )
    parser.add_argument("--height", type=int, default=default_side, help=f"output height, {side_help}")
    parser.add_argument("--width", type=int, default=default_side, help=f"output width, {side_help}")
    parser.add_argument("--negative_prompt", default="", help='negative prompt (default "")')
    parser.add_argument("--seed", type=int, help="seed for every job (default: a random seed per job)")
    parser.add_argument(
        "--priority",
        type=int,
        default=MIN_PRIORITY,
        help=f"{MIN_PRIORITY} (normal, the default) to {MAX_PRIORITY} (most urgent)",
    )
    parser.add_argument("--no-wait", dest="no_wait", action="store_true", help="submit, print job ids, exit")
    parser.add_argument("--timeout", type=_seconds, help="stop waiting after this many seconds (exit 7)")
    parser.add_argument(
        "--no_resume", action="store_true", help="regenerate every index, also those whose PNGs match"
    )
    parser.add_argument(
        "--no_overwrite",
        action="store_true",
        help="refuse (exit 3, naming the indexes) instead of replacing PNGs made by another request",
    )
    parser.add_argument(
        "--num_images_per_prompt",
        type=int,
        default=MIN_IMAGES_PER_PROMPT,
        help=f"{MIN_IMAGES_PER_PROMPT}-{MAX_IMAGES_PER_PROMPT} images per row in one job; "
        "several are named {index:06d}_{j:02d}.png",
    )
    parser.add_argument(
        "--batch_name", help="name of this run's batch (default: the prompts file, CSV or output folder name)"
    )
    from api_client.webhook_cli import add_webhook_flags  # [issue 11]

    add_webhook_flags(parser)  # --webhook_url, --webhook_events
    ignored = [flag for flag in IGNORED_FLAGS if edit or flag not in _EDIT_ONLY_IGNORED]
    compat = parser.add_argument_group(
        "DeepGen CLI flags accepted with no effect here",
        textwrap.fill("each prints a one-line note naming the equivalent setting: " + ", ".join(ignored), 76),
    )
    for flag in ignored:
        takes_value, _ = IGNORED_FLAGS[flag]
        if takes_value:
            compat.add_argument(flag, metavar="X", help=argparse.SUPPRESS)
        else:
            compat.add_argument(flag, action="store_true", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--prompt_enhance_type", help=argparse.SUPPRESS
    )  # refused: it would change the output


_JOB_HELP = "job id, or a unique prefix of one (at least 4 characters)"
_MODEL_HOST = "where the model runs (each `diffgentor worker`; this process in embedded mode)"
# Reference-CLI flags users pass out of habit: flag -> (takes a value, where the equivalent lives).
IGNORED_FLAGS: dict[str, tuple[bool, str]] = {
    "--device": (True, f"set DG_DEEPGEN_DEVICE {_MODEL_HOST}"),
    "--torch_dtype": (True, f"set DG_DEEPGEN_DTYPE {_MODEL_HOST}"),
    "--num_gpus": (
        True,
        "run one `diffgentor worker` per GPU (CUDA_VISIBLE_DEVICES=N); they share the queue",
    ),
    "--batch_size": (True, "each worker runs one job at a time; add workers for throughput"),
    "--max_retries": (
        True,
        "a job is attempted up to DG_MAX_ATTEMPTS times; `diffgentor retry JOB` resubmits",
    ),
    "--resume": (False, "resuming is already the default (--no_resume turns it off)"),
    "--model_type": (True, "the deepgen backend handles both t2i and edit"),
    "--enable_cpu_offload": (False, f"set DG_DEEPGEN_OFFLOAD {_MODEL_HOST}"),
    "--attention_backend": (True, f"set DG_DEEPGEN_ATTENTION {_MODEL_HOST}"),
    "--optimize": (True, "the DeepGen backend has no such optimisations"),
    "--cache_type": (True, "the DeepGen backend has no step cache"),
    "--enable_compile": (False, "the DeepGen backend does not compile"),
    "--enable_vae_slicing": (False, "the DeepGen backend decodes one image per job"),
    "--enable_vae_tiling": (False, "the DeepGen backend decodes one image per job"),
    "--num_nodes": (True, "workers on any number of hosts share the queue (set DG_BROKER_URL)"),
    "--node_rank": (True, "workers on any number of hosts share the queue (set DG_BROKER_URL)"),
    "--log_dir": (True, "workers log where they run; job errors show in `diffgentor status JOB`"),
    "--true_cfg_scale": (True, "DeepGen uses --guidance_scale"),
    "--image_cache_dir": (True, "URL inputs are fetched by the worker, within DG_INPUT_* limits"),
    "--filter_rows": (True, "filter the CSV before passing it (the reference CLI ignored it too)"),
}
_EDIT_ONLY_IGNORED = ("--true_cfg_scale", "--image_cache_dir", "--filter_rows")

_MAIN_EPILOG = """\
first run:  diffgentor demo      (builds a tiny random-weight model when no DG_DEEPGEN_* paths are set)

Without DG_BROKER_URL, jobs run inside this process on SQLite and a local artifact folder under
DG_HOME (default ~/.diffgentor). Set DG_BROKER_URL, DG_DATABASE_URL and DG_STORAGE_URL to use
Redis, PostgreSQL, S3 and `diffgentor worker` processes instead; the commands stay the same.
The model is named by DG_DEEPGEN_CONFIG, DG_DEEPGEN_DIFFUSION_MODEL_PATH, DG_DEEPGEN_AR_MODEL_PATH
and DG_DEEPGEN_CHECKPOINT. `diffgentor COMMAND --help` for each command; docs/cli.md for every
variable and exit code (DG_DEBUG=1 adds tracebacks to errors).

Every flag takes either spelling (--output_dir or --output-dir, --no-wait or --no_wait); help shows
the reference one. JOB arguments take a full job id or a unique prefix of at least 4 characters.
"""

_T2I_EPILOG = """\
example:
  diffgentor t2i --backend deepgen --model_name deepgen \\
      --prompt "A beautiful sunset over the ocean" --output_dir ./output

Prompts files: .jsonl ({"prompt": ..., "index": 7} or a JSON string per line), .json (array),
.txt (one prompt per line), .csv (prompt column, optional index). Rerunning skips existing PNGs
and reattaches to the jobs of an interrupted run; Ctrl-C leaves the jobs queued.
"""

_EDIT_EPILOG = """\
example:
  diffgentor edit --backend deepgen --model_name deepgen --input data.csv --output_dir ./output

CSV columns: input_images (a JSON list, a comma list or one path/URL; relative paths are read
against the CSV's folder), instruction (or --instruction_key), optional integer index.
results.csv gets the row's fields plus output_image, job_id, seed, status and error.
"""


def _status_names() -> list[str]:
    from schemas.enums import JobStatus

    return [status.value for status in JobStatus]


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _time_arg(text: str) -> datetime:
    match = _AGE.match(text.strip())
    if match:
        return datetime.now(timezone.utc) - timedelta(seconds=float(match[1]) * _AGE_UNITS[match[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-01-31T12:00) nor an age (30m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------ commands


def _client() -> Any:
    from api_client.client import DiffgentorClient

    return DiffgentorClient.from_env()


def _generation_options(args: argparse.Namespace, kind: str) -> GenerationOptions:
    if args.backend not in SUPPORTED_BACKENDS:
        raise UsageError(
            f"unsupported backend {args.backend!r}; supported backends: {', '.join(SUPPORTED_BACKENDS)}"
        )
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither (edit then uses the first image's size)")
    if not MIN_IMAGES_PER_PROMPT <= args.num_images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise UsageError(
            f"--num_images_per_prompt must be between {MIN_IMAGES_PER_PROMPT} and {MAX_IMAGES_PER_PROMPT}, "
            f"got {args.num_images_per_prompt}"
        )
    if args.prompt_enhance_type is not None:
        raise UsageError(
            "--prompt_enhance_type is not supported: write the enhanced instructions into the CSV"
        )
    if "/" in args.model_name or "\\" in args.model_name or args.model_name.endswith(_CHECKPOINT_SUFFIXES):
        raise UsageError(
            f"--model_name {args.model_name!r} looks like a checkpoint path or repo id; here --model_name names the model "
            f"queue (default {DEFAULT_MODEL_NAME}) and the checkpoint is DG_DEEPGEN_CHECKPOINT where the model runs"
        )
    _note_ignored_flags(args)
    options = GenerationOptions(
        model_name=args.model_name,
        output_dir=args.output_dir,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        priority=args.priority,
        num_images_per_prompt=args.num_images_per_prompt,
        wait=not args.no_wait,
        timeout=args.timeout,
        resume=not args.no_resume,
        overwrite=not args.no_overwrite,
        batch_name=args.batch_name or _input_name(args),
    )
    options.check(kind)  # NaN guidance, priority 10, ...: exit 4 before any file is read or written
    return options


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _input_name(args: argparse.Namespace) -> str | None:
    """The batch's default name: the prompts file or edit CSV (None: the output folder's name)."""
    source = getattr(args, "prompts_file", None) or getattr(args, "input", None)
    return Path(source).name if source else None


def _note_ignored_flags(args: argparse.Namespace) -> None:
    for flag, (_, equivalent) in IGNORED_FLAGS.items():
        if getattr(args, flag.lstrip("-"), None) is not None:
            print(f"note: {flag} is ignored here; {equivalent}", file=sys.stderr)


def _cmd_t2i(args: argparse.Namespace) -> int:
    _quiet_job_logs()
    from api_client.inputs import PromptRow, load_prompts
    from api_client.webhook_cli import apply_webhook_flags  # [issue 11]

    options = _generation_options(args, "t2i")
    rows = load_prompts(args.prompts_file) if args.prompts_file else [PromptRow(0, args.prompt)]
    with _client() as client:
        apply_webhook_flags(client, args)  # [issue 11] refused (exit 4) before anything is submitted
        return run_t2i(client, rows, options)


def _cmd_edit(args: argparse.Namespace) -> int:
    _quiet_job_logs()
    from api_client.inputs import load_edit_rows
    from api_client.webhook_cli import apply_webhook_flags  # [issue 11]

    options = _generation_options(args, "edit")
    results_csv = args.output_csv or args.output_dir / "results.csv"
    with _client() as client:  # its settings give DG_INPUT_MAX_PIXELS for the local images
        apply_webhook_flags(client, args)  # [issue 11] refused (exit 4) before anything is submitted
        rows = load_edit_rows(
            args.input, instruction_key=args.instruction_key, max_pixels=client.settings.input_max_pixels
        )
        return run_edit(client, rows, options, results_csv)


def _cmd_status(args: argparse.Namespace) -> int:
    with _client() as client:
        _print_jobs(client.get_many(args.job_ids), as_json=args.json)
    return int(ExitCode.OK)


def _cmd_list(args: argparse.Namespace) -> int:
    with _client() as client:
        jobs = client.list(
            status=args.status,
            model_name=args.model_name,
            created_after=args.since,
            created_before=args.until,
            limit=args.limit,
            offset=args.offset,
        )
        _print_jobs(jobs, as_json=args.json)
        if not args.json and len(jobs) == args.limit:
            print(f"(more may exist: --offset {args.offset + args.limit})", file=sys.stderr)
    return int(ExitCode.OK)


def _cmd_wait(args: argparse.Namespace) -> int:
    _quiet_job_logs()
    with _client() as client:
        try:
            jobs = client.wait(args.job_ids, timeout=args.timeout, progress=not args.no_progress)
        except KeyboardInterrupt:
            client.detach()
            print(_reattach_hint(args.job_ids), file=sys.stderr)
            return int(ExitCode.INTERRUPTED)
        _print_jobs(jobs, as_json=False)
        if args.output_dir:
            for job in jobs:
                if job.status.value == "succeeded":
                    for path in client.download(job, args.output_dir):
                        print(path)
    return _outcome_code(jobs)


def _cmd_fetch(args: argparse.Namespace) -> int:
    if not args.urls and args.output_dir is None:
        raise UsageError("fetch needs -o/--output_dir DIR (or --urls to print presigned URLs)")
    with _client() as client:
        for job_id in args.job_ids:
            if args.urls:
                for url in client.presigned_urls(job_id, args.expires):
                    print(url)
            else:
                for path in client.download(job_id, args.output_dir):
                    print(path)
    return int(ExitCode.OK)


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        _print_jobs([client.cancel(job_id) for job_id in args.job_ids], as_json=False)
    return int(ExitCode.OK)


def _cmd_retry(args: argparse.Namespace) -> int:
    with _client() as client:
        for job_id in args.job_ids:
            old_id = client.resolve_job_id(job_id)  # a unique prefix is shown as the full id
            new_job = client.retry(old_id)
            print(f"{old_id} -> {new_job.id} {new_job.status.value}")
    return int(ExitCode.OK)


def _wait_for_services(client: Any) -> None:
    """Check the database, Redis and S3 (bucket present) before the model loads. A service that is
    down (not misconfigured) is waited for, one line per try, so a worker started during an outage
    or before its services heals by itself instead of exiting."""
    from api_client.errors import ServiceUnreachable

    pause = 1.0
    while True:
        try:
            client.check_database()
            client.check_broker()
            _ = client.artifacts
            return
        except ServiceUnreachable as exc:
            if not exc.transient:
                raise
            print(f"waiting for a service: {exc} (next try in {pause:.0f} s)", file=sys.stderr, flush=True)
            time.sleep(pause)
            pause = min(30.0, pause * 2)


def _cmd_worker(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient

    client = DiffgentorClient.from_env()  # settings errors first: they need no model libraries
    from worker.deepgen.env import read_deepgen_env
    from worker.main import start_worker

    read_deepgen_env(os.environ)  # a missing DG_DEEPGEN_* variable or unknown config fails here, naming it
    client.settings = replace(client.settings, broker_url=client.settings.worker_broker_url)
    _wait_for_services(client)
    extra = [arg for arg in args.celery_args if arg != "--"]
    start_worker(
        args.model_name,
        client.settings,
        pool=args.pool,
        loglevel=args.loglevel,
        sweeper=args.sweeper,
        beat=args.beat,
        node_name=args.hostname,
        extra_args=extra,
    )
    return int(ExitCode.OK)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient
    from worker.db import current_revision, upgrade
    from worker.redact import redact_url

    client = DiffgentorClient.from_env()
    url = client.settings.database_url
    client.check_database_reachable()
    upgrade(url, args.revision)
    print(f"job database at {redact_url(url)} is at revision {current_revision(url)}")
    return int(ExitCode.OK)


def _debug() -> bool:
    """DG_DEBUG=1 (or true/yes/on) adds tracebacks; 0, false or unset does not."""
    from worker.settings import TRUE_WORDS

    return os.environ.get("DG_DEBUG", "").strip().lower() in TRUE_WORDS


def _cmd_sweep(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient
    from worker.sweeper import Sweeper, SweepReport, run_loop
    from worker.webhooks import start_delivery_thread  # [issue 11]

    client = DiffgentorClient.from_env()
    if not args.loop:  # one sweep: fail fast on a service that is down
        client.check_services()
    sweeper = Sweeper(client.settings, interval_seconds=args.interval)  # one engine and publisher for --loop

    def show(report: SweepReport) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        lost = " (the broker had lost its data: queued jobs published again)" if report.broker_lost else ""
        print(
            f"{stamp} re-published {report.republished} job(s): {len(report.unpublished)} unpublished, "
            f"{len(report.stale)} stale, {len(report.expired)} lease-expired{lost}",
            flush=True,
        )
        if report.pruned:  # [issue 11 retention] DG_RETENTION_DAYS
            print(f"{stamp} retention pruned {report.pruned} job(s) (DG_RETENTION_DAYS)", flush=True)
        if report.error:
            print(
                f"warning: publishing failed, the jobs stay for the next sweep: {report.error}",
                file=sys.stderr,
            )

    try:
        if args.loop:
            # Survives every fault: one log line per failed sweep, a growing pause, then on again.
            # SIGTERM (docker stop) ends it cleanly: the sweeper's health row is removed.
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            # [issue 11] webhooks from the outbox, beside the sweeps (not without DG_WEBHOOK_SECRET)
            deliveries = start_delivery_thread(client.settings, sweeper.store, stop)
            run_loop(sweeper, stop=stop, on_report=show)
            if deliveries is not None:
                deliveries.join(timeout=client.settings.webhook_timeout_seconds + 5)
        else:
            show(sweeper.sweep())
    finally:
        sweeper.close()
    return int(ExitCode.OK)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    args.directory.mkdir(parents=True, exist_ok=True)  # a bad path fails now, before torch is imported
    from api_client.embedded import quiet_library_progress_bars
    from worker.deepgen.tiny import tiny_env, write_tiny_model

    quiet_library_progress_bars()
    paths = write_tiny_model(args.directory)
    print(f"# tiny random-weight DeepGen written to {paths.root} (its images are noise); use it with:")
    for name, value in tiny_env(paths).items():
        print(f"export {name}={value}")
    return int(ExitCode.OK)


def _add_dashboard_parser(commands: Any) -> None:
    """[issue 12] `diffgentor dashboard`: options and command in api_client/dashboard/command.py
    (Starlette, Jinja2 and uvicorn, the `dashboard` extra, are imported only when it runs)."""
    from api_client.dashboard.command import add_arguments, cmd_dashboard

    dashboard = commands.add_parser(
        "dashboard", help="serve the web dashboard: batches, galleries, jobs, workers (the dashboard extra)"
    )
    add_arguments(dashboard)
    dashboard.set_defaults(handler=cmd_dashboard)


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_job_logs()
    from api_client.demo import run_demo

    return run_demo(output_dir=args.output_dir, num_inference_steps=args.num_inference_steps)


# ------------------------------------------------------------------------------------------ printing


def _print_jobs(jobs: Sequence[Any], *, as_json: bool) -> None:
    if as_json:
        for job in jobs:
            print(job.model_dump_json())
        return
    for job in jobs:
        progress = f"{job.progress_step}/{job.progress_total}"
        error = f"  {job.error_type}: {job.error_message}" if job.error_type else ""
        created = job.created_at.isoformat(timespec="seconds")
        print(
            f"{job.id}  {job.kind.value:<4}  {job.model_name}  {job.status.value:<9}  {progress:>7}  "
            f"seed={job.seed}  {created}{error}"
        )


def _outcome_code(jobs: Sequence[Any]) -> int:
    ok = all(job.status.value == "succeeded" for job in jobs)
    return int(ExitCode.OK if ok else ExitCode.JOBS_FAILED)


def _reattach_hint(job_ids: Sequence[str]) -> str:
    return f"interrupted; the jobs stay queued. Reattach with: diffgentor wait {' '.join(job_ids)}"


if __name__ == "__main__":
    sys.exit(main())
