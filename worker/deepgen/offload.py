"""Stage placement: with offload, only the active stage sits on the accelerator.

Stages: "encoder" (LLM with its vision tower, think queries, projectors, connector), "dit" (the
transformer) and "vae". Without offload every stage stays on the run device and `active` is free.

Weights are read-only at inference, so a stage keeps its CPU tensors while it runs on the device and
leaving a stage only points every parameter and buffer back at them: no device->host copy, and the
device copies are freed. Moves run outside inference mode so that parameters never become inference
tensors (those refuse in-place updates later, e.g. a state-dict load or LoRA merge).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from worker.deepgen.model import DeepGenModel

Stage = Literal["encoder", "dit", "vae"]
STAGES: tuple[Stage, ...] = ("encoder", "dit", "vae")
CPU = torch.device("cpu")


def stage_tensors(model: DeepGenModel, vae: nn.Module, stage: Stage) -> list[torch.Tensor]:
    """Every parameter and buffer of `stage`, each once (tied weights are one tensor)."""
    if stage == "encoder":
        modules: tuple[nn.Module, ...] = (
            model.lmm,
            model.connector,
            model.projector_1,
            model.projector_2,
            model.projector_3,
        )
        extra: list[torch.Tensor] = [model.meta_queries]  # a bare Parameter of the top-level module
    elif stage == "dit":
        modules, extra = (model.transformer,), []
    else:
        modules, extra = (vae,), []
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for tensor in [*extra, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


class StagePlacement:
    def __init__(self, model: DeepGenModel, vae: nn.Module, device: torch.device, offload: bool) -> None:
        self.model = model
        self.vae = vae
        self.device = device
        # Offloading to the CPU from the CPU would only copy tensors around.
        self.offload = offload and device.type != "cpu"
        home = CPU if self.offload else device
        with torch.inference_mode(False):
            for stage in STAGES:
                for tensor in stage_tensors(model, vae, stage):
                    tensor.data = tensor.data.to(home)

    @contextmanager
    def active(self, stage: Stage) -> Iterator[None]:
        if not self.offload:
            yield
            return
        tensors = stage_tensors(self.model, self.vae, stage)
        with torch.inference_mode(False):
            homes = [tensor.data for tensor in tensors]
        try:
            with torch.inference_mode(False):
                for tensor, home in zip(tensors, homes, strict=True):
                    tensor.data = home.to(self.device)
            yield
        finally:
            with torch.inference_mode(False):
                for tensor, home in zip(tensors, homes, strict=True):
                    tensor.data = home
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
