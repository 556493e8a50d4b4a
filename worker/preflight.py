"""Preflight: before a worker consumes (or embedded mode submits), check that the DeepGen model can run.

Cheap checks, nothing is loaded onto the device and no weights are read:

* the `DG_DEEPGEN_*` variables (`read_deepgen_env`);
* the device exists (CUDA available, the index below the device count, one tiny allocation);
* the config fits the checkpoint: DeepGen is built from the config and the folders' `config.json`
  files on the `meta` device and compared, family by family, with the checkpoint's key shapes (the
  safetensors header or a memory-mapped `.pt`), the LoRA rank included;
* the tokenizer of `DG_DEEPGEN_AR_MODEL_PATH` knows the prompt template's image tokens, with the
  LLM config's `image_token_id`.

A failure is one short line (`PreflightError`, at most `MAX_LINE` characters) naming the config, the
first family that does not fit with its shapes and the likely fix (a known config that fits the
checkpoint, when there is one); the full key report goes to the log and to `DG_HOME/preflight-report.txt`.

`diffgentor worker` runs `python -m worker.preflight` as a child process before Celery starts (the
prefork parent never touches CUDA: a fork after CUDA init breaks the children); it prints one line and
exits 0 (fits) or 4 (configuration, the CLI's exit code). Embedded mode calls `run_preflight` in-process
once per client. `DG_SKIP_PREFLIGHT=1` turns it off. This module imports torch only inside functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.settings import DEFAULT_HOME, TRUE_WORDS, SettingsError

if TYPE_CHECKING:
    from worker.deepgen.checkpoint import CheckpointReport, ShapeMismatch
    from worker.deepgen.configuration import DeepGenConfig
    from worker.deepgen.env import DeepGenEnv

logger = logging.getLogger(__name__)

SKIP_VARIABLE = "DG_SKIP_PREFLIGHT"
EXIT_OK = 0
EXIT_CONFIGURATION = 4  # api_client.errors.ExitCode.CONFIGURATION
MAX_LINE = 290  # the CLI adds "error: " and stays within 300 characters
RESULT_MARKER = "preflight-result: "  # the child's stdout line the parent reads
TIMEOUT_SECONDS = 600.0
REPORT_FILE_NAME = "preflight-report.txt"
REPORT_LOG_KEYS = 40  # problem keys logged one per line; the report file has all of them


class PreflightError(SettingsError):
    """The configured DeepGen model cannot run here; the message is one short line saying what to fix."""


@dataclass(frozen=True)
class PreflightResult:
    config: str
    device: str
    checkpoint: str  # file name, "" without a checkpoint
    matched_keys: int
    seconds: float

    def line(self) -> str:
        checked = f"{self.checkpoint} fits ({self.matched_keys} keys)" if self.checkpoint else "no checkpoint"
        return (
            f"preflight ok in {self.seconds:.1f} s: config {self.config}, {checked}, device {self.device}, "
            "image token in the tokenizer"
        )


@dataclass
class _Fit:
    report: CheckpointReport
    mismatches: list[ShapeMismatch] = field(default_factory=list)
    missing_required: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.missing_required

    def first_problem(self) -> tuple[str, str]:
        """(family, description) of the first family in FAMILIES order that does not fit."""
        from worker.deepgen.checkpoint import FAMILIES

        for family in FAMILIES:
            mismatch = next((m for m in self.mismatches if m.family == family), None)
            if mismatch is not None:
                return (
                    family,
                    f"{mismatch.key}: checkpoint {list(mismatch.checkpoint)}, config {list(mismatch.model)}",
                )
            missing = [key for key in self.missing_required if key.split(".", 1)[0] == family]
            if missing:
                return (
                    family,
                    f"{missing[0]} and {len(missing) - 1} more {family} key(s) missing from the checkpoint",
                )
        return "other", "no problem"

    def problems(self) -> list[str]:
        """Every mismatch and missing key, in FAMILIES order."""
        from worker.deepgen.checkpoint import FAMILIES

        order = {family: index for index, family in enumerate(FAMILIES)}
        found = [(m.family, str(m)) for m in self.mismatches]
        found += [
            (key.split(".", 1)[0], f"{key}: missing from the checkpoint") for key in self.missing_required
        ]
        return [text for _, text in sorted(found, key=lambda item: order.get(item[0], len(order)))]


def skip_requested(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(SKIP_VARIABLE, "").strip().lower() in TRUE_WORDS  # any other value: not skipped


def deepgen_variables(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The variables a preflight result depends on (a cache key for it)."""
    env = os.environ if environ is None else environ
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith("DG_DEEPGEN_") or k == SKIP_VARIABLE))


def one_line(text: str, limit: int = MAX_LINE) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


# ------------------------------------------------------------------------------------------ in-process


def run_preflight(environ: Mapping[str, str] | None = None) -> PreflightResult:
    """Run every check in this process; PreflightError (one short line) on the first that fails."""
    from worker.deepgen.env import DeepGenEnvError, read_deepgen_env

    started = time.perf_counter()
    env_vars = os.environ if environ is None else environ
    try:
        env = read_deepgen_env(env_vars)
    except DeepGenEnvError as error:
        raise PreflightError(one_line(str(error))) from None
    device = _check_device(env)
    lmm_config, lmm, transformer = _meta_parts(env)
    matched = 0
    if env.checkpoint is not None:
        matched = _check_checkpoint(env, lmm, transformer, _report_path(env_vars))
    _check_tokenizer(env, lmm_config)
    result = PreflightResult(
        config=env.config.name,
        device=str(device),
        checkpoint=env.checkpoint.name if env.checkpoint else "",
        matched_keys=matched,
        seconds=time.perf_counter() - started,
    )
    logger.debug("%s", result.line())  # the worker prints it; embedded mode stays quiet
    return result


def _check_device(env: DeepGenEnv) -> Any:
    import torch

    from worker.deepgen.devices import resolve_device

    asked = env.device or "auto"
    fix = "set DG_DEEPGEN_DEVICE=cpu, or run the worker where that device exists"
    try:
        device = resolve_device(env.device)
    except ValueError as error:
        raise PreflightError(one_line(f"DG_DEEPGEN_DEVICE={asked}: {error}; {fix}")) from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise PreflightError(
                one_line(
                    f"DG_DEEPGEN_DEVICE={asked}: this machine has {count} CUDA device(s){shown}; "
                    f"use cuda:0..cuda:{count - 1}"
                    if count
                    else f"DG_DEEPGEN_DEVICE={asked}: no CUDA device; {fix}"
                )
            )
    if device.type != "cpu":
        try:
            torch.zeros(1, device=device)  # the device answers (driver, visibility, exclusive mode)
        except Exception as error:  # any failure means the model cannot run there
            raise PreflightError(
                one_line(f"DG_DEEPGEN_DEVICE={asked}: {device} is not usable ({error}); {fix}")
            ) from None
    return device


def _meta_parts(env: DeepGenEnv) -> tuple[Any, Any, Any]:
    """The LLM config and the LLM and DiT built from the folders' config.json files, without weights."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from worker.deepgen.transformer import DeepGenSD3Transformer

    config = env.config
    try:
        lmm_config = AutoConfig.from_pretrained(str(env.ar_model_path))
    except (OSError, ValueError) as error:
        raise PreflightError(
            one_line(f"DG_DEEPGEN_AR_MODEL_PATH={env.ar_model_path}: unreadable config.json ({error})")
        ) from None
    loader_class = getattr(config.lmm_kwargs.get("type"), "__self__", None)
    lmm_class = loader_class if isinstance(loader_class, type) else Qwen2_5_VLForConditionalGeneration
    build_lmm = getattr(lmm_class, "from_config", None) or lmm_class  # Auto* classes build with from_config
    subfolder = config.transformer_kwargs.get("subfolder")
    try:
        dit_config = DeepGenSD3Transformer.load_config(str(env.diffusion_model_path), subfolder=subfolder)
    except (OSError, ValueError) as error:
        where = env.diffusion_model_path / subfolder if subfolder else env.diffusion_model_path
        raise PreflightError(
            one_line(f"DG_DEEPGEN_DIFFUSION_MODEL_PATH: unreadable transformer config in {where} ({error})")
        ) from None
    try:
        with torch.device("meta"):
            lmm = build_lmm(lmm_config)
            transformer = DeepGenSD3Transformer.from_config(dit_config)
    except Exception as error:  # a config.json the model classes refuse
        raise PreflightError(
            one_line(
                f"config {env.config.name}: cannot build the LLM/DiT from the model folders' config.json "
                f"({type(error).__name__}: {error})"
            )
        ) from None
    return lmm_config, lmm, transformer


def _fit(
    config: DeepGenConfig, lmm: Any, transformer: Any, shapes: Mapping[str, tuple[int, ...]], path: Path
) -> _Fit:
    """Compare the checkpoint's shapes with DeepGen built on the meta device from `config`."""
    import torch

    from worker.deepgen.checkpoint import (
        REQUIRED_FAMILIES,
        CheckpointReport,
        ShapeMismatch,
        family_of,
        match_keys,
        report_missing,
    )
    from worker.deepgen.model import DeepGenModel

    with torch.device("meta"):
        model = DeepGenModel(
            lmm=lmm, transformer=transformer, connector=config.connector, num_queries=config.num_queries
        )
    own = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    report = CheckpointReport(path=path, sha256="")
    _, mismatches = match_keys(own, shapes, report)
    report_missing(own, shapes, report)
    for key, shape in shapes.items():  # LoRA: the rank is the config's (lora.py checks the rest at load)
        if family_of(key) != "lora":
            continue
        rank_axis = 0 if (".lora_A." in key or ".lora_embedding_A" in key) else len(shape) - 1
        expected = tuple(config.lora_rank if axis == rank_axis else size for axis, size in enumerate(shape))
        if len(shape) == 2 and tuple(shape) != expected:
            mismatches.append(ShapeMismatch(key, tuple(shape), expected))
        else:
            report.families["lora"].matched.append(key)
    missing = [key for name in REQUIRED_FAMILIES for key in report.families[name].missing]
    return _Fit(report=report, mismatches=mismatches, missing_required=missing)


def _check_checkpoint(env: DeepGenEnv, lmm: Any, transformer: Any, report_path: Path) -> int:
    from worker.deepgen.checkpoint import read_checkpoint_shapes

    path = env.checkpoint
    assert path is not None
    try:
        shapes = read_checkpoint_shapes(path)
    except Exception as error:  # unreadable file: say so in one line
        raise PreflightError(
            one_line(f"DG_DEEPGEN_CHECKPOINT={path.name}: cannot read it ({type(error).__name__}: {error})")
        ) from None
    fit = _fit(env.config, lmm, transformer, shapes, path)
    logger.info(
        "preflight: config %s, checkpoint %s; %d shape mismatch(es)",
        env.config.name,
        fit.report.summary(),
        len(fit.mismatches),
    )
    if fit.ok:
        return sum(len(family.matched) for family in fit.report.families.values())

    family, problem = fit.first_problem()
    hint = _hint(env, lmm, transformer, shapes, family)
    written = _write_report(report_path, env, fit, hint)
    _log_problems(fit)
    head = f"config {env.config.name} does not fit {path.name}: {problem}"
    summary = f" ({len(fit.mismatches)} shapes differ, {len(fit.missing_required)} keys missing)"
    tail = f"; {hint}"
    where = f"; key report: {report_path}" if written else "; key report in the log"
    # The longest that fits, dropping the least useful parts first: the counts, then the path.
    candidates = (head + summary + tail + where, head + tail + where, head + tail + "; key report in the log")
    line = next((candidate for candidate in candidates if len(candidate) <= MAX_LINE), candidates[-1])
    raise PreflightError(one_line(line))


def _hint(
    env: DeepGenEnv, lmm: Any, transformer: Any, shapes: Mapping[str, tuple[int, ...]], family: str
) -> str:
    """The likely fix: a known config that fits the checkpoint, else the variable to look at."""
    from worker.deepgen.configuration import ConfigError, available_configs, load_config, resolve_config_path

    current = resolve_config_path(env.config_name).resolve()
    for name in available_configs():
        if resolve_config_path(name).resolve() == current:
            continue
        try:
            candidate = load_config(name)
            if _fit(candidate, lmm, transformer, shapes, env.checkpoint or Path("checkpoint")).ok:
                return f"this checkpoint needs DG_DEEPGEN_CONFIG={name}"
        except (ConfigError, ValueError, RuntimeError) as error:
            logger.debug("preflight: config %s not tried as a hint: %s", name, error)
    if family == "lmm":
        return (
            "its LLM weights do not match DG_DEEPGEN_AR_MODEL_PATH: point it at the LLM this checkpoint "
            "was trained on"
        )
    if family == "transformer":
        return (
            "its DiT weights do not match DG_DEEPGEN_DIFFUSION_MODEL_PATH: point it at the diffusion model "
            "this checkpoint was trained on"
        )
    if family == "lora":
        rank = next((s[0] for k, s in shapes.items() if ".lora_A." in k and len(s) == 2), None)
        return (
            f"set lora_rank={rank} in the config"
            if rank is not None
            else "set the config's lora_rank to the checkpoint's"
        )
    return (
        "no config in worker/deepgen/config fits it: write one with the checkpoint's num_queries and "
        "connector "
        "sizes (DG_DEEPGEN_CONFIG takes a .py path)"
    )


def _log_problems(fit: _Fit) -> None:
    problems = fit.problems()
    for index, problem in enumerate(problems):
        logger.log(logging.INFO if index < REPORT_LOG_KEYS else logging.DEBUG, "preflight: %s", problem)
    if len(problems) > REPORT_LOG_KEYS:
        logger.info(
            "preflight: ... and %d more (at DEBUG, and in the report file)", len(problems) - REPORT_LOG_KEYS
        )


def _report_path(environ: Mapping[str, str]) -> Path:
    home = Path(environ.get("DG_HOME", "").strip() or DEFAULT_HOME).expanduser()
    return home / REPORT_FILE_NAME


def _write_report(path: Path, env: DeepGenEnv, fit: _Fit, hint: str) -> bool:
    """The full key report as text; False when DG_HOME is not writable (the log still has it)."""
    from worker.deepgen.checkpoint import FAMILIES

    lines = [
        f"DeepGen preflight: config {env.config_name} ({env.config.name}), checkpoint {env.checkpoint}",
        f"AR folder {env.ar_model_path}, diffusion folder {env.diffusion_model_path}",
        f"hint: {hint}",
        f"summary: {fit.report.summary()}",
        "",
    ]
    for name in FAMILIES:
        family = fit.report.families[name]
        mismatched = [m for m in fit.mismatches if m.family == name]
        if not (family.matched or family.missing or family.unexpected or mismatched):
            continue
        lines.append(
            f"[{name}] {len(family.matched)} matched, {len(mismatched)} shape mismatches, "
            f"{len(family.missing)} missing, {len(family.unexpected)} unexpected"
        )
        lines += [f"  mismatch   {m}" for m in mismatched]
        lines += [f"  missing    {key}" for key in family.missing]
        lines += [f"  unexpected {key}" for key in family.unexpected]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    except OSError as error:
        logger.warning("preflight: cannot write the key report to %s: %s", path, error)
        return False
    return True


def _check_tokenizer(env: DeepGenEnv, lmm_config: Any) -> None:
    from worker.deepgen.loading import LoadError, load_tokenizer
    from worker.deepgen.prompts import PromptTemplate

    try:
        tokenizer = load_tokenizer(env.config, env.ar_model_path)
    except LoadError as error:
        raise PreflightError(one_line(f"DG_DEEPGEN_AR_MODEL_PATH: {error}")) from None
    try:
        template = PromptTemplate.from_mapping(env.config.prompt_template)
    except ValueError as error:
        raise PreflightError(one_line(f"config {env.config.name}: {error}")) from None
    vocabulary = tokenizer.get_vocab()
    for token in (template.image_context, template.image_start, template.image_end):
        if token not in vocabulary:
            raise PreflightError(
                one_line(
                    f"the tokenizer of DG_DEEPGEN_AR_MODEL_PATH has no token {token!r} (prompt_template "
                    f"of config {env.config.name}): use the Qwen2.5-VL folder the checkpoint was trained "
                    "with, or fix the template"
                )
            )
    expected = getattr(lmm_config, "image_token_id", None)
    token_id = vocabulary[template.image_context]
    if expected is not None and int(expected) != token_id:
        raise PreflightError(
            one_line(
                f"the tokenizer maps {template.image_context!r} to {token_id} but config.json's "
                f"image_token_id is "
                f"{expected}: DG_DEEPGEN_AR_MODEL_PATH={env.ar_model_path} is inconsistent"
            )
        )


# ------------------------------------------------------------------------------------------ child process


def check_in_subprocess(
    environ: Mapping[str, str] | None = None, *, loglevel: str = "INFO", timeout: float = TIMEOUT_SECONDS
) -> str:
    """Run `python -m worker.preflight` (its log on this process's stderr); the ok line, or PreflightError.

    The caller never imports torch nor touches CUDA: a prefork parent must not (its children fork from it).
    """
    argv = [sys.executable, "-m", "worker.preflight", "--loglevel", loglevel]
    skip = f"{SKIP_VARIABLE}=1 starts the worker without it"
    try:
        done = subprocess.run(
            argv,
            env=dict(os.environ if environ is None else environ),
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PreflightError(
            f"the preflight (python -m worker.preflight) took over {timeout:g} s; {skip}"
        ) from None
    results = [
        line[len(RESULT_MARKER) :] for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)
    ]
    line = results[-1] if results else ""
    if done.returncode == EXIT_OK:
        return line
    if done.returncode == EXIT_CONFIGURATION and line:
        raise PreflightError(line)
    detail = f": {line}" if line else " (its error is above)"
    raise PreflightError(
        one_line(f"the preflight (python -m worker.preflight) exited with {done.returncode}{detail}; {skip}")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.preflight",
        description="Check that the DG_DEEPGEN_* model fits (config vs checkpoint, device, tokenizer) "
        "without loading it. Exit 0: fits; 4: does not (one line on stdout says why).",
    )
    parser.add_argument(
        "--loglevel", default="INFO", help="log level of the key report on stderr (default INFO)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        stream=sys.stderr,
        format="[%(asctime)s: %(levelname)s/preflight] %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checks never download anything
    try:
        result = run_preflight()
    except PreflightError as error:
        print(RESULT_MARKER + str(error), flush=True)
        return EXIT_CONFIGURATION
    print(RESULT_MARKER + result.line(), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
