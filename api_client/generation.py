"""The `t2i` / `edit` run: one job per row, wait with a progress bar, write the row's PNGs.

Before anything is submitted every row is validated as its job spec will be, and resume
(`api_client.resume`) skips the indexes whose PNGs were made from the same request; an index whose
files came from another request (or carry no record) is regenerated, or refused with
``--no_overwrite``. Each row's job carries an idempotency key derived from the output folder, the
index and the request, so rerunning the same command reattaches to the jobs of an interrupted run
instead of submitting them again. A row whose earlier job failed or was cancelled is retried as a
new linked job. The jobs a run submits form one batch (`diffgentor batch ...`).
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
from api_client.outputs import ResultRecord, output_names, write_results_csv
from api_client.resume import OutputRecords, ResumePlan, request_fingerprint
from schemas.enums import JobStatus
from schemas.views import JobView

Row = PromptRow | EditRow
_SHOWN_INDEXES = 10


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
    num_images_per_prompt: int = 1
    wait: bool = True
    timeout: float | None = None
    resume: bool = True
    overwrite: bool = True  # False (--no_overwrite): refuse to replace outputs of another request
    progress: bool = True
    batch_name: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_images_per_prompt": self.num_images_per_prompt,
        }

    def normalized_params(self, kind: str) -> dict[str, Any]:
        """The parameters as every spec will hold them (sizes rounded up to 32, defaults filled)."""
        from api_client.client import _validated  # the client's own message format
        from schemas.specs import EditParams, GenerationParams

        params_type = EditParams if kind == "edit" else GenerationParams
        params = {key: value for key, value in self.params().items() if value is not None}
        validated: Any = _validated(lambda: params_type(**params))
        return dict(validated.model_dump(mode="json"))

    def check(self, kind: str) -> None:
        """Validate the job parameters as every spec will (ConfigurationError naming the field), so a
        bad value (NaN guidance, priority 10) is reported before any file is read, uploaded or written."""
        from api_client.client import _validated
        from schemas.specs import T2ISpec

        self.normalized_params(kind)
        _validated(lambda: T2ISpec(prompt="check", model_name=self.model_name, priority=self.priority))


def run_t2i(client: Any, rows: Sequence[PromptRow], options: GenerationOptions) -> int:
    return _run(client, "t2i", rows, options, results_csv=None)


def run_edit(client: Any, rows: Sequence[EditRow], options: GenerationOptions, results_csv: Path) -> int:
    return _run(client, "edit", rows, options, results_csv=results_csv)


def _run(
    client: Any, kind: str, rows: Sequence[Row], options: GenerationOptions, results_csv: Path | None
) -> int:
    output_dir = options.output_dir
    _check_rows(kind, rows, options)  # a rerun with bad input fails exactly like a fresh run
    _check_writable(output_dir, results_csv)  # before anything is submitted
    params = options.normalized_params(kind)
    fingerprints = {
        row.index: request_fingerprint(kind, options.model_name, params, _request(row)) for row in rows
    }
    records = OutputRecords(output_dir)
    plan = _plan(records, rows, fingerprints, options)
    if plan.changed:
        _replace_or_refuse(records, plan.changed, options)
    todo_indexes = set(plan.todo)
    todo = [row for row in rows if row.index in todo_indexes]
    if plan.done:
        print(
            f"skipping {len(plan.done)} row(s) whose PNGs in {output_dir} match this request", file=sys.stderr
        )
    if not todo:
        print(f"nothing to do: all {len(rows)} output(s) already in {output_dir}")
        return int(ExitCode.OK)

    specs = [_spec(client, kind, row, options, fingerprints[row.index]) for row in todo]
    submitted = client.submit_many(
        specs,
        batch_name=options.batch_name or _default_batch_name(options),
        batch_indexes=[row.index for row in todo],
    )
    jobs = [_fresh_job(client, item.job, item.created) for item in submitted]
    reattached = sum(1 for item in submitted if not item.created)
    note = f" ({reattached} reattached from an earlier run)" if reattached else ""
    batch = _batch_note(submitted)
    print(
        f"submitted {len(jobs)} {kind} job(s) to model {options.model_name!r}{note}{batch}", file=sys.stderr
    )
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

    collector = _Collector(client, todo, records, fingerprints)
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
    return _summarise(final, todo, output_dir, results_csv, collector.images_written)


def _check_rows(kind: str, rows: Sequence[Row], options: GenerationOptions) -> None:
    """Every row as its spec will validate it, with no upload (local image paths pass the spec's
    reference check as they are); the message names the row."""
    from api_client.errors import ConfigurationError
    from schemas.specs import EditParams, EditSpec, GenerationParams, T2ISpec

    params = {key: value for key, value in options.params().items() if value is not None}
    for row in rows:
        try:
            if isinstance(row, PromptRow):
                T2ISpec(prompt=row.prompt, model_name=options.model_name, params=GenerationParams(**params))
            else:
                EditSpec(
                    instruction=row.instruction,
                    images=list(row.images),
                    model_name=options.model_name,
                    params=EditParams(**params),
                )
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
            where = ".".join(str(part) for part in first["loc"]) or "spec"
            raise ConfigurationError(f"row with index {row.index}: {where}: {first['msg']}") from None


def _request(row: Row) -> dict[str, Any]:
    if isinstance(row, PromptRow):
        return {"prompt": row.prompt}
    return {"instruction": row.instruction, "images": list(row.images)}


def _plan(
    records: OutputRecords, rows: Sequence[Row], fingerprints: dict[int, str], options: GenerationOptions
) -> ResumePlan:
    count = options.num_images_per_prompt
    if options.resume:
        return records.plan([(row.index, fingerprints[row.index]) for row in rows], count)
    indexes = [row.index for row in rows]  # --no_resume: every row runs again
    return ResumePlan(done=[], changed=[i for i in indexes if records.existing_outputs(i)], todo=indexes)


def _replace_or_refuse(records: OutputRecords, changed: list[int], options: GenerationOptions) -> None:
    """Outputs that this request did not make: refused with --no_overwrite, else removed now, so
    the folder never holds an image of another request (even when the new job then fails)."""
    shown = ", ".join(str(index) for index in changed[:_SHOWN_INDEXES])
    more = f" and {len(changed) - _SHOWN_INDEXES} more" if len(changed) > _SHOWN_INDEXES else ""
    if not options.overwrite:
        raise InputFileError(
            f"--no_overwrite: {options.output_dir} already holds images of a different request (or with no "
            f"record of theirs) for index(es) {shown}{more}; rerun without --no_overwrite to regenerate them, "
            "or choose another --output_dir"
        )
    why = "were made by another request" if options.resume else "are replaced (--no_resume)"
    print(f"regenerating {len(changed)} row(s) whose PNGs {why}: index {shown}{more}", file=sys.stderr)
    for index in changed:
        records.forget(index)
        for path in records.existing_outputs(index):
            path.unlink(missing_ok=True)


def _default_batch_name(options: GenerationOptions) -> str:
    return options.output_dir.resolve().name or str(options.output_dir)


def _batch_note(submitted: Sequence[Any]) -> str:
    batch_ids = {getattr(item.job, "batch_id", None) for item in submitted if item.created}
    batch_ids.discard(None)
    return f" as batch {next(iter(batch_ids))}" if len(batch_ids) == 1 else ""


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


def _spec(client: Any, kind: str, row: Row, options: GenerationOptions, fingerprint: str) -> Any:
    params = options.params()
    common = {"model_name": options.model_name, "priority": options.priority}
    key = _idempotency_key(kind, options, row.index, fingerprint) if options.resume else None
    if isinstance(row, PromptRow):
        return client.t2i_spec(row.prompt, idempotency_key=key, **common, **params)
    return client.edit_spec(row.instruction, list(row.images), idempotency_key=key, **common, **params)


def _idempotency_key(kind: str, options: GenerationOptions, index: int, fingerprint: str) -> str:
    # Same folder + index + request (input images by content) => same key, so a rerun finds the job
    # it submitted before; any change to the request is a new key, never another job's spec.
    material = {"output_dir": str(options.output_dir.resolve()), "index": index, "request": fingerprint}
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
    """Writes each row's PNGs as soon as its job succeeds, so Ctrl-C keeps finished images; the
    row's resume record follows its files."""

    def __init__(
        self, client: Any, rows: Sequence[Row], records: OutputRecords, fingerprints: dict[int, str]
    ) -> None:
        self._client = client
        self._rows = list(rows)
        self._records = records
        self._fingerprints = fingerprints
        self.finished: set[str] = set()
        self.records: list[ResultRecord] = []
        self.images_written = 0

    def collect(self, jobs: Sequence[JobView]) -> None:
        for row, job in zip(self._rows, jobs, strict=True):
            if job.id in self.finished or not job.is_terminal:
                continue
            names = self._write_images(row, job) if job.status == JobStatus.SUCCEEDED else []
            error = f"{job.error_type}: {job.error_message}" if job.error_type else ""
            fields = row.fields if isinstance(row, EditRow) else {"prompt": row.prompt}
            several = len(names) > 1
            for j, name in enumerate(names or [""]):
                self.records.append(
                    ResultRecord(
                        row.index,
                        fields,
                        name,
                        job.id,
                        job.seed,
                        job.status.value,
                        error,
                        image_index=j if several else None,
                    )
                )
            self.finished.add(job.id)

    def _write_images(self, row: Row, job: JobView) -> list[str]:
        artifacts = sorted(job.artifacts, key=lambda artifact: artifact.index)
        if not artifacts:
            return []
        names = output_names(row.index, len(artifacts))
        self._records.forget(row.index)
        for artifact, name in zip(artifacts, names, strict=True):
            # Whole, with the umask's mode.
            self._client.artifacts.download(artifact.uri, self._records.output_dir / name)
        self._records.remember(row.index, self._fingerprints[row.index], job.id, names)
        self.images_written += len(names)
        return names


def _write_results(results_csv: Path | None, records: list[ResultRecord]) -> None:
    if results_csv is not None and records:
        write_results_csv(results_csv, records)


def _summarise(
    jobs: Sequence[JobView], rows: Sequence[Row], output_dir: Path, results_csv: Path | None, images: int
) -> int:
    failed = [(row, job) for row, job in zip(rows, jobs, strict=True) if job.status != JobStatus.SUCCEEDED]
    for row, job in failed:
        reason = f": {job.error_type}: {job.error_message}" if job.error_type else ""
        print(f"index {row.index} job {job.id} {job.status.value}{reason}", file=sys.stderr)
    where = f"; results in {results_csv}" if results_csv else ""
    print(f"wrote {images} image(s) to {output_dir}{where}")
    if failed:
        print(f"{len(failed)} job(s) did not succeed; rerun the same command to retry them", file=sys.stderr)
        return int(ExitCode.JOBS_FAILED)
    return int(ExitCode.OK)
