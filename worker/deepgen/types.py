"""Public request/result types of the DeepGen engine (the contract the job system calls)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

# Called after every denoising step with (step, total), step counted from 1.
# Returning True asks the engine to stop: it raises GenerationStopped.
StepCallback = Callable[[int, int], "bool | None"]


class GenerationStopped(Exception):
    """The step callback asked the engine to stop (cancellation)."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"generation stopped by the step callback after step {step} of {total}")
        self.step = step
        self.total = total


@dataclass(frozen=True)
class GenerationRequest:
    kind: Literal["t2i", "edit"]
    prompt: str  # the t2i prompt or the edit instruction
    images: tuple[Image.Image, ...] = ()  # edit inputs; all of them condition one edit
    negative_prompt: str = ""
    guidance_scale: float = 4.0
    num_inference_steps: int = 50
    height: int | None = None  # None: 512 for t2i, the first input's resized size for edit
    width: int | None = None
    seed: int | None = None  # None: one is drawn and returned in the result
    # Images made from this prompt in one batched DiT call; image j starts from slice j of one noise
    # draw of shape (N, C, h, w) (docs/engine.md, 'Several images per prompt').
    num_images_per_prompt: int = 1


@dataclass
class GenerationResult:
    images: list[Image.Image]  # num_images_per_prompt images, in batch order
    seed: int
    width: int
    height: int
    peak_memory_bytes: int  # accelerator peak when on CUDA, else the process's peak RSS growth
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, denoise, decode, ...

    @property
    def image(self) -> Image.Image:
        """The first image (the only one when num_images_per_prompt is 1)."""
        return self.images[0]
