"""How values look on a page: times, durations, rates, progress bars, and redaction of every
string that may hold a URL (worker.redact) before it reaches a template."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from markupsafe import Markup, escape

from schemas.enums import JobStatus
from schemas.views import BatchCounts, BatchProgress, JobView
from worker.redact import redact_url, redact_urls_in

# Lifecycle order of the stacked progress bar: finished work from the left.
BAR_ORDER = (
    JobStatus.SUCCEEDED.value,
    JobStatus.FAILED.value,
    JobStatus.CANCELLED.value,
    JobStatus.RUNNING.value,
    JobStatus.QUEUED.value,
)
STATUS_ORDER = tuple(status.value for status in JobStatus)  # lifecycle order, for the counts line
BAR_WIDTH = 1000  # the SVG bar's viewBox width (rects in these units: no inline styles under the CSP)


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} UTC"


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def between(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return duration((end - start).total_seconds())


def rate(per_minute: float) -> str:
    if per_minute <= 0:
        return "-"
    if per_minute < 1:
        return f"{per_minute * 60:.1f} jobs/h"
    return f"{per_minute:.1f} jobs/min"


def eta(seconds: float | None, unfinished: int) -> str:
    if unfinished == 0:
        return "done"
    if seconds is None:
        return "unknown (nothing finished in the last 10 min)"
    return duration(seconds)


def bar(counts: BatchCounts | Mapping[str, int]) -> list[dict[str, Any]]:
    """The stacked bar's segments: status, x and width in BAR_WIDTH units, count."""
    values = _counts(counts) if isinstance(counts, BatchCounts) else counts
    total = sum(values.values())
    segments: list[dict[str, Any]] = []
    x = 0
    for status in BAR_ORDER:
        count = values.get(status, 0)
        width = min(round(BAR_WIDTH * count / total), BAR_WIDTH - x) if total else 0
        segments.append({"status": status, "x": x, "width": width, "count": count})
        x += width
    return segments


def _counts(counts: BatchCounts) -> dict[str, int]:
    """status -> count in lifecycle order (BatchCounts.as_dict without its enum lookups: this runs
    once per row of a 1,000-batch page)."""
    return {
        "queued": counts.queued,
        "running": counts.running,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
    }


def bar_svg(segments: list[dict[str, Any]], label: str) -> Markup:
    """The stacked progress bar as inline SVG: one rect per status that has jobs (rects, not inline
    styles: the CSP forbids those). Built here, not in a template: the batches page draws 1,000."""
    return Markup(_bar_svg(segments, str(escape(label))))


def _bar_svg(segments: list[dict[str, Any]], safe_label: str) -> str:
    rects = "".join(
        f'<rect class="seg {seg["status"]}" x="{seg["x"]}" width="{seg["width"]}" height="12"></rect>'
        for seg in segments
        if seg["width"]
    )
    return (
        f'<svg class="bar" viewBox="0 0 {BAR_WIDTH} 12" preserveAspectRatio="none" role="img" '
        f'aria-label="{safe_label}"><rect class="track" width="{BAR_WIDTH}" height="12"></rect>{rects}</svg>'
    )


def counts_text(counts: Mapping[str, int]) -> str:
    """`2 queued · 3 succeeded`: the statuses that have jobs, in lifecycle order."""
    shown = [f"{counts[status]} {status}" for status in STATUS_ORDER if counts.get(status)]
    return " · ".join(shown) if shown else "no jobs"


def batch_summary(progress: BatchProgress) -> dict[str, Any]:
    """Everything a batch row or header shows of its progress, each count computed once."""
    counts = _counts(progress.counts)
    total = sum(counts.values())
    unfinished = counts["queued"] + counts["running"]
    segments = bar(counts)
    return {
        "counts": counts,
        "total": total,
        "unfinished": unfinished,
        "finished": total - unfinished,
        "unsuccessful": counts["failed"] + counts["cancelled"],
        "segments": segments,
        "counts_text": counts_text(counts),
        "throughput": rate(progress.per_minute),
        "eta": eta(progress.eta_seconds, unfinished),
    }


def batch_rows_html(rows: list[dict[str, Any]]) -> Markup:
    """The batches table's rows (see batches.html for the table around them).

    Written with f-strings instead of a template loop: the page of 1,000 batches must render in
    well under 200 ms (bench/dashboard.py), and a Jinja2 loop with a dozen escaped fields per row
    took about 70 ms of that. Every value read from the database is escaped here; the counts,
    times, rates and the bar are built by this module from numbers.
    """
    out = []
    for row in rows:
        batch = row["batch"]
        bid = escape(batch.id)
        text = row["counts_text"]
        out.append(
            f'<tr data-batch-id="{bid}" data-live="{1 if row["unfinished"] else 0}">'
            f'<td><a href="/batches/{bid}">{escape(batch.name)}</a><br><code class="id">{bid[:8]}</code></td>'
            f'<td><a href="{escape(row["owner_link"])}">{escape(batch.owner)}</a></td>'
            f"<td>{escape(batch.model_name)}</td><td>{row['created']}</td>"
            f'<td class="wide">{_bar_svg(row["segments"], text)}'
            f'<span class="done"><span data-role="finished">{row["finished"]}</span>/'
            f'<span data-role="total">{row["total"]}</span> finished</span> '
            f'<span class="counts" data-role="counts">{text}</span></td>'
            f'<td data-role="throughput">{row["throughput"]}</td><td data-role="eta">{row["eta"]}</td></tr>'
        )
    return Markup("\n".join(out))


def progress_json(progress: BatchProgress) -> dict[str, Any]:
    """What the live update of a batch row receives (dashboard.js)."""
    summary = batch_summary(progress)
    return {
        key: summary[key]
        for key in ("counts", "counts_text", "total", "unfinished", "segments", "throughput", "eta")
    }


def text(value: Any) -> str:
    """Any value as one redacted string (URLs lose their passwords and signatures)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return redact_urls_in(value)
    if isinstance(value, Mapping | list | tuple):
        return redact_urls_in(json.dumps(value, default=str, sort_keys=True))
    return redact_urls_in(str(value))


def ref(value: str) -> str:
    """An image reference as given in a spec (path or URL), redacted."""
    return redact_url(value)


def prompt_of(job: JobView) -> str:
    spec = job.spec
    return str(spec.get("prompt") or spec.get("instruction") or "")


def image_count(job: JobView) -> int:
    if job.artifacts:
        return len(job.artifacts)
    params = job.spec.get("params") or {}
    return int(params.get("num_images_per_prompt") or 1)


def version(job: JobView, index: int = 0) -> str:
    """A cache-busting token for an artifact's URL (its content hash)."""
    for artifact in job.artifacts:
        if artifact.index == index:
            return artifact.sha256[:16]
    return ""
