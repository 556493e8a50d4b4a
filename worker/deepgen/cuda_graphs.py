"""The DiT forward of one generation, eager or replayed as a CUDA graph (`DG_DEEPGEN_CUDA_GRAPHS`).

A full-size DiT step is bound by CPU-side kernel launches (~2000 small ops per forward, ~22 ms of GPU
work in ~84 ms on an H100). Within one generation every DiT input has a fixed shape, so the forward is
captured once and replayed every step: per step only the latent model input and the timestep are
copied into static buffers; context, pooled projections and reference latents are constant for the
generation and copied once.

The graph lives for one generation (`close()` frees it): it bakes in the addresses of the DiT weights,
which change whenever stage offload moves the DiT back onto the GPU (and could change after a
LoRA/state-dict load), and its private memory pool holds a forward's activations. Capture costs
`WARMUP_CALLS` eager forwards plus the capture itself, small against the launch time saved over a
generation's steps, so a cross-generation cache is not worth its memory or its invalidation rules.

If anything fails while warming up or capturing, a warning is logged (once per distinct error) and
that generation runs eagerly: a graph is a speed-up, never a reason to fail a job.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Warm-up forwards on the capture stream before capturing (PyTorch's CUDA-graph docs): they run lazy
# one-time work (processor install, cuBLAS handle and workspace for that stream, kernel selection)
# outside the capture.
WARMUP_CALLS = 2

# Counts of "captured", "replayed", "fell_back" since process start: the GPU check and benchmark read
# them to prove that the graph path really ran (identical output alone could mean a silent fallback).
graph_counts: Counter[str] = Counter()
_warned: set[str] = set()


class DiTStep(Protocol):
    """One generation's DiT: `(latent model input, per-row timesteps) -> velocity`, then `close()`."""

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


# Given a zero-argument forward over static buffers and their device, capture it: returns
# (replay, static output). The CUDA implementation is `capture_cuda_graph`; tests inject a CPU stand-in.
Capture = Callable[[Callable[[], torch.Tensor], torch.device], tuple[Callable[[], None], torch.Tensor]]


class EagerDiT:
    """The plain forward, exactly as the sampling loop has always called it."""

    def __init__(
        self,
        transformer: nn.Module,
        *,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        reference_latents: Sequence[Sequence[torch.Tensor]] | None,
    ) -> None:
        self.transformer = transformer
        self.context = encoder_hidden_states
        self.pooled = pooled_projections
        self.references = reference_latents

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=self.context,
            pooled_projections=self.pooled,
            timestep=timestep,
            reference_latents=self.references,
            return_dict=False,
        )[0]

    def close(self) -> None:
        pass


class GraphedDiT:
    """Captures the DiT forward on the first call and replays it on every later one.

    Every call must pass tensors of the first call's shape, dtype and device (true within one
    generation). The returned velocity is a clone: the static output is overwritten by the next replay.
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        reference_latents: Sequence[Sequence[torch.Tensor]] | None,
        capture: Capture | None = None,
    ) -> None:
        self._eager = EagerDiT(
            transformer,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            reference_latents=reference_latents,
        )
        self._capture = capture if capture is not None else capture_cuda_graph
        self._replay: Callable[[], None] | None = None
        self._static_output: torch.Tensor | None = None
        self._static_hidden: torch.Tensor | None = None
        self._static_timestep: torch.Tensor | None = None
        self._static_forward: EagerDiT | None = None
        self.fell_back = False
        self._closed = False

    @property
    def captured(self) -> bool:
        """A graph is held now (False again after `close`)."""
        return self._replay is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.fell_back or self._closed:
            return self._eager(hidden_states, timestep)
        if self._replay is None:
            try:
                self._capture_forward(hidden_states, timestep)
            except Exception as error:  # any capture failure means "run eagerly"
                if type(error).__name__ == "SoftTimeLimitExceeded":
                    raise  # Celery's soft time limit: the job must end, not fall back and run on
                self._fall_back(error)
                return self._eager(hidden_states, timestep)
        assert self._static_hidden is not None and self._static_timestep is not None
        assert self._replay is not None and self._static_output is not None
        _check_same(self._static_hidden, hidden_states, "hidden_states")
        _check_same(self._static_timestep, timestep, "timestep")
        self._static_hidden.copy_(hidden_states)
        self._static_timestep.copy_(timestep)
        self._replay()
        graph_counts["replayed"] += 1
        return self._static_output.clone()

    def _capture_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> None:
        eager = self._eager
        # Own copies: the graph reads these addresses on every replay, whatever the caller frees.
        static_rows: list[list[torch.Tensor]] | None = None
        if eager.references:
            distinct: dict[int, torch.Tensor] = {}
            for refs in eager.references:
                for ref in refs:
                    if id(ref) not in distinct:
                        distinct[id(ref)] = ref.clone()
            # Keep the caller's sharing (CFG rows share one list of reference tensors), which the
            # DiT uses to patchify each distinct reference once.
            shared_rows: dict[int, list[torch.Tensor]] = {}
            static_rows = [
                shared_rows.setdefault(id(refs), [distinct[id(ref)] for ref in refs])
                for refs in eager.references
            ]
        self._static_hidden = hidden_states.clone()
        # `expand` gives a stride-0 view; the buffer must own one element per row.
        self._static_timestep = timestep.contiguous().clone()
        self._static_forward = EagerDiT(
            eager.transformer,
            encoder_hidden_states=eager.context.clone(),
            pooled_projections=eager.pooled.clone(),
            reference_latents=static_rows,
        )
        static_hidden, static_timestep, forward = (
            self._static_hidden,
            self._static_timestep,
            self._static_forward,
        )
        self._replay, self._static_output = self._capture(
            lambda: forward(static_hidden, static_timestep), hidden_states.device
        )
        graph_counts["captured"] += 1

    def _fall_back(self, error: Exception) -> None:
        self.fell_back = True
        graph_counts["fell_back"] += 1
        self.close()
        message = f"{type(error).__name__}: {error}"
        if message not in _warned:
            _warned.add(message)
            logger.warning(
                "CUDA graph capture of the DiT failed, running this generation eagerly (%s)",
                message,
                exc_info=error,
            )

    def close(self) -> None:
        """Free the graph, its memory pool and the static buffers (the wrapper then runs eagerly)."""
        self._closed = True  # a closed wrapper must never replay a freed graph
        self._replay = None
        self._static_output = None
        self._static_hidden = None
        self._static_timestep = None
        self._static_forward = None


def _check_same(static: torch.Tensor, given: torch.Tensor, name: str) -> None:
    # A replay reads the captured shapes; anything else would be silently wrong.
    if static.shape != given.shape or static.dtype != given.dtype or static.device != given.device:
        raise ValueError(
            f"{name} changed from {tuple(static.shape)} {static.dtype} {static.device} to "
            f"{tuple(given.shape)} {given.dtype} {given.device} within one captured generation"
        )


def capture_cuda_graph(
    forward: Callable[[], torch.Tensor], device: torch.device
) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm up `forward` on a side stream, capture it there, return (replay, static output)."""
    # Streams and graphs belong to the current device: make it the DiT's (cuda:1 as well as cuda:0).
    with torch.cuda.device(device):
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)  # the static buffers were written on the caller's stream
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                forward()
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture on the warmed-up stream (its cuBLAS workspace exists); "thread_local" leaves other
        # threads of the worker free to use CUDA while this one captures.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            output = forward()

    def replay() -> None:
        # The closure keeps the graph (and its memory pool) alive until the wrapper drops it.
        with torch.cuda.device(device):
            graph.replay()

    return replay, output


def dit_step(
    transformer: nn.Module,
    *,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    reference_latents: Sequence[Sequence[torch.Tensor]] | None,
    cuda_graphs: bool,
) -> DiTStep:
    """The DiT callable for one generation: graphed when asked for and the inputs are on CUDA."""
    if cuda_graphs and encoder_hidden_states.device.type == "cuda":
        return GraphedDiT(
            transformer,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            reference_latents=reference_latents,
        )
    return EagerDiT(
        transformer,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        reference_latents=reference_latents,
    )
