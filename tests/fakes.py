"""Test doubles shared by several test modules (import from here, never from another test module)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from PIL import Image

from worker.deepgen.types import GenerationRequest, GenerationResult, GenerationStopped, StepCallback


class FakeEngine:
    """Draws a flat image; `on_step(step)` lets a test act in the middle of a run."""

    provenance: ClassVar[dict[str, str]] = {"config": "fake", "device": "cpu"}

    def __init__(self, color: tuple[int, int, int] = (200, 10, 10)) -> None:
        self.color = color
        self.calls: list[GenerationRequest] = []
        self.on_step: Callable[[int], None] = lambda step: None
        self.error: BaseException | None = None

    def generate(self, request: GenerationRequest, step_callback: StepCallback | None = None) -> GenerationResult:
        self.calls.append(request)
        if self.error is not None:
            raise self.error
        total = request.num_inference_steps
        for step in range(1, total + 1):
            self.on_step(step)
            if step_callback is not None and step_callback(step, total):
                raise GenerationStopped(step, total)
        width = request.width or request.images[0].width
        height = request.height or request.images[0].height
        return GenerationResult(Image.new("RGB", (width, height), self.color), request.seed or 0,
                                width, height, 0, {})
