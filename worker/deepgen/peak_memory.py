"""Peak memory of one generation call: CUDA's allocator peak, else the process's peak RSS growth."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context that measures the peak memory of its body (bytes in `peak_bytes`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._start_rss_kib = 0
        self._hwm_was_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._start_rss_kib = _status_kib("VmRSS") or 0
        try:
            # "5" resets the kernel's high-water mark (VmHWM) so the peak is this call's, not the process's.
            _CLEAR_REFS.write_text("5")
            self._hwm_was_reset = True
        except OSError:
            self._hwm_was_reset = False
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self._hwm_was_reset:
            peak_kib = _status_kib("VmHWM") or 0
        else:  # lifetime peak: an upper bound when the high-water mark cannot be reset
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_bytes = max(0, peak_kib - self._start_rss_kib) * 1024
