"""Stage placement: with offload, only the active stage sits on the accelerator.

Stages: "encoder" (LLM with its vision tower, think queries, projectors, connector), "dit" (the
transformer) and "vae". Without offload every stage stays on the run device and `active` is free.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from worker.deepgen.model import DeepGenModel

Stage = Literal["encoder", "dit", "vae"]
CPU = torch.device("cpu")


class StagePlacement:
    def __init__(self, model: DeepGenModel, vae: nn.Module, device: torch.device, offload: bool) -> None:
        self.model = model
        self.vae = vae
        self.device = device
        # Offloading to the CPU from the CPU would only copy tensors around.
        self.offload = offload and device.type != "cpu"
        home = CPU if self.offload else device
        for stage in ("encoder", "dit", "vae"):
            self._move(stage, home)

    def _move(self, stage: Stage, device: torch.device) -> None:
        if stage == "encoder":
            model = self.model
            for module in (
                model.lmm,
                model.connector,
                model.projector_1,
                model.projector_2,
                model.projector_3,
            ):
                module.to(device)
            # A bare Parameter on the top-level module: moving the whole model would move the DiT too.
            model.meta_queries.data = model.meta_queries.data.to(device)
        elif stage == "dit":
            self.model.transformer.to(device)
        else:
            self.vae.to(device)

    @contextmanager
    def active(self, stage: Stage) -> Iterator[None]:
        if not self.offload:
            yield
            return
        self._move(stage, self.device)
        try:
            yield
        finally:
            self._move(stage, CPU)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
