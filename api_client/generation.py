"""The `t2i` / `edit` batch: one job per row, wait with a progress bar, write `{index:06d}.png`.

Each row's job carries an idempotency key derived from the output folder, the index and the request,
so rerunning the same command reattaches to the jobs of an interrupted run instead of submitting them
again; rows whose PNG already exists are skipped before that (resume). A row whose earlier job failed
or was cancelled is retried as a new linked job.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api_client.errors import ExitCode, InputFileError, path_problem
from api_client.inputs import EditRow, PromptRow
from api_client.outputs import (
    ResultRecord,
    output_name,
    output_path,
    pending_rows,
    write_results_csv,
)
from schemas.enums import JobStatus
from schemas.views import JobView

Row = PromptRow | EditRow


@dataclass(frozen=True)
class GenerationOptions:
    model_name: str
    output_dir: Path
    guidance_scale: float
    num_inference_steps: int
    height: int | None
    width: int | None
    negative_prompt: str
    seed: int | None
    priority: int
    wait: bool = True
    timeout: float | None = None
    resume: bool = True
    progress: bool = True

    def params(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
        }

    def check(self, kind: str) -> None:
        """Validate the job parameters as every spec will (ConfigurationError naming the field), so a
        bad value (NaN guidance, priority 10) is reported before any file is read, uploaded or written."""
        from api_client.client import _validated  # the client's own message format
        from schemas.specs import EditParams, GenerationParams, T2ISpec

        params_type = EditParams if kind == "edit" else GenerationParams
        params = {key: value for key, value in self.params().items() if value is not None}
        _validated(lambda: params_type(**params))
        _validated(lambda: T2ISpec(prompt="check", model_name=self.model_name, priority=self.priority))


def run_t2i(client: Any, rows: Sequence[PromptRow], options: GenerationOptions) -> int:
    return _run(client, "t2i", rows, options, results_csv=None)


def run_edit(client: Any, rows: Sequence[EditRow], options: GenerationOptions, results_csv: Path) -> int:
    return _run(client, "edit", rows, options, results_csv=results_csv)


def _run(
    client: Any, kind: str, rows: Sequence[Row], options: GenerationOptions, results_csv: Path | None
) -> int:
    output_dir = options.output_dir
    _check_writable(output_dir, results_csv)  # before anything is submitted
    todo = pending_rows(rows, output_dir) if options.resume else list(rows)
    skipped = len(rows) - len(todo)
    if skipped:
        print(f"skipping {skipped} row(s) whose PNG is already in {output_dir}", file=sys.stderr)
    if not todo:
        print(f"nothing to do: all {len(rows)} output(s) already in {output_dir}")
        return int(ExitCode.OK)

    specs = [_spec(client, kind, row, options) for row in todo]
    submitted = client.submit_many(specs)
    jobs = [_fresh_job(client, item.job, item.created) for item in submitted]
    reattached = sum(1 for item in submitted if not item.created)
    note = f" ({reattached} reattached from an earlier run)" if reattached else ""
    print(f"submitted {len(jobs)} {kind} job(s) to model {options.model_name!r}{note}", file=sys.stderr)
    job_ids = [job.id for job in jobs]
    if not options.wait:
        for job_id in job_ids:
            print(job_id)
        if client.embedded:
            print("embedded mode runs the jobs in this process: exiting once they are done", file=sys.stderr)
        print(
            f"collect the images by rerunning this command, or follow with: diffgentor wait {' '.join(job_ids)}",
            file=sys.stderr,
        )
        return int(ExitCode.OK)

    collector = _Collector(client, todo, output_dir)
    try:
        final = client.wait(
            job_ids, timeout=options.timeout, progress=options.progress, on_update=collector.collect
        )
    except KeyboardInterrupt:
        client.detach()
        unfinished = [job_id for job_id in job_ids if job_id not in collector.finished]
        _write_results(results_csv, collector.records)  # keep what finished before Ctrl-C
        print(
            f"\ninterrupted; {len(unfinished)} job(s) stay queued. Reattach with: diffgentor wait "
            f"{' '.join(unfinished)}\n(or rerun this command: it picks up the same jobs and writes the PNGs)",
            file=sys.stderr,
        )
        return int(ExitCode.INTERRUPTED)
    collector.collect(final)
    _write_results(results_csv, collector.records)
    return _summarise(final, todo, output_dir, results_csv)


def _check_writable(output_dir: Path, results_csv: Path | None) -> None:
    """The output folder (created here) and results.csv must be usable: exit 3 naming the path."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(path_problem(exc, "--output_dir")) from None
    if results_csv is None:
        return
    if results_csv.is_dir():
        raise InputFileError(f"cannot use --output_csv {results_csv}: it is a folder, not a file")
    try:
        results_csv.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(path_problem(exc, "the folder of --output_csv")) from None


def _spec(client: Any, kind: str, row: Row, options: GenerationOptions) -> Any:
    params = options.params()
    common = {"model_name": options.model_name, "priority": options.priority}
    if isinstance(row, PromptRow):
        key = _idempotency_key(kind, options, row.index, {"prompt": row.prompt}) if options.resume else None
        return client.t2i_spec(row.prompt, idempotency_key=key, **common, **params)
    request = {"instruction": row.instruction, "images": list(row.images)}
    key = _idempotency_key(kind, options, row.index, request) if options.resume else None
    return client.edit_spec(row.instruction, list(row.images), idempotency_key=key, **common, **params)


def _idempotency_key(kind: str, options: GenerationOptions, index: int, request: dict[str, Any]) -> str:
    # Same folder + index + request => same key, so a rerun finds the job it submitted before.
    material = {
        "kind": kind,
        "output_dir": str(options.output_dir.resolve()),
        "index": index,
        "model_name": options.model_name,
        "params": options.params(),
        **request,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return f"cli-{kind}-{digest[:48]}"


def _fresh_job(client: Any, job: JobView, created: bool) -> JobView:
    """A reattached job that ended failed/cancelled is retried once per run as a new linked job.

    `retry` reattaches to the end of the job's retry chain when that is still live (an earlier
    run retried it and was interrupted), so rerunning the command never piles up retries.
    """
    if not created and job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return client.retry(job)
    return job


class _Collector:
    """Writes each row's PNG as soon as its job succeeds, so Ctrl-C keeps finished images."""

    def __init__(self, client: Any, rows: Sequence[Row], output_dir: Path) -> None:
        self._client = client
        self._rows = list(rows)
        self._output_dir = output_dir
        self.finished: set[str] = set()
        self.records: list[ResultRecord] = []

    def collect(self, jobs: Sequence[JobView]) -> None:
        for row, job in zip(self._rows, jobs, strict=True):
            if job.id in self.finished or not job.is_terminal:
                continue
            image = ""
            if job.status == JobStatus.SUCCEEDED and job.artifacts:
                target = output_path(self._output_dir, row.index)
                uri = min(job.artifacts, key=lambda artifact: artifact.index).uri
                self._client.artifacts.download(uri, target)  # whole, with the umask's mode
                image = output_name(row.index)
            error = f"{job.error_type}: {job.error_message}" if job.error_type else ""
            fields = row.fields if isinstance(row, EditRow) else {"prompt": row.prompt}
            self.records.append(
                ResultRecord(row.index, fields, image, job.id, job.seed, job.status.value, error)
            )
            self.finished.add(job.id)


def _write_results(results_csv: Path | None, records: list[ResultRecord]) -> None:
    if results_csv is not None and records:
        write_results_csv(results_csv, records)


def _summarise(
    jobs: Sequence[JobView], rows: Sequence[Row], output_dir: Path, results_csv: Path | None
) -> int:
    failed = [(row, job) for row, job in zip(rows, jobs, strict=True) if job.status != JobStatus.SUCCEEDED]
    for row, job in failed:
        reason = f": {job.error_type}: {job.error_message}" if job.error_type else ""
        print(f"index {row.index} job {job.id} {job.status.value}{reason}", file=sys.stderr)
    written = len(jobs) - len(failed)
    where = f"; results in {results_csv}" if results_csv else ""
    print(f"wrote {written} image(s) to {output_dir}{where}")
    if failed:
        print(f"{len(failed)} job(s) did not succeed; rerun the same command to retry them", file=sys.stderr)
        return int(ExitCode.JOBS_FAILED)
    return int(ExitCode.OK)
