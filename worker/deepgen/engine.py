"""`DeepGenEngine`: one resident DeepGen model serving t2i and edit requests.

Each call: validate -> prompt strings -> LLM + connector conditioning -> (edit) reference latents ->
flow-match sampling -> VAE decode, with per-stage timings and the call's peak memory. Several input
images condition one edit: all of them sit in the VLM prompt's image blocks and are concatenated as
reference latents into the one sample's DiT sequence (the reference tool edited only the first;
docs/engine.md, 'Several input images'). `num_images_per_prompt` images come from one batched
denoise loop: the prompt (and the references) encoded once, one noise draw for the whole batch
(docs/engine.md, 'Several images per prompt').
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from worker.deepgen.encoding import PromptConditioning, encode_prompts
from worker.deepgen.imaging import decode_to_images, encode_references, vae_scale_factor
from worker.deepgen.offload import StagePlacement
from worker.deepgen.peak_memory import PeakMemory
from worker.deepgen.prompts import PromptTemplate
from worker.deepgen.sampling import denoise, initial_noise
from worker.deepgen.types import GenerationRequest, GenerationResult, StepCallback
from worker.deepgen.vision import (
    SIDE_MULTIPLE,
    VisionInputs,
    ceil_to_multiple,
    image_to_pixels,
    resize_edit_image,
    vision_inputs,
)

if TYPE_CHECKING:
    from worker.deepgen.loading import LoadedDeepGen

logger = logging.getLogger(__name__)

DEFAULT_T2I_SIDE = 512
MAX_INFERENCE_STEPS = 1000
SEED_LIMIT = 2**63
# The most images one call makes (schemas.specs.MAX_IMAGES_PER_PROMPT, repeated for direct engine use).
MAX_IMAGES_PER_PROMPT = 8


class InvalidGenerationRequest(ValueError):
    """The request cannot be run as given (the message says why)."""


@dataclass
class _PreparedPrompt:
    positive: str
    negative: str
    width: int
    height: int
    reference_pixels: list[torch.Tensor]
    vision: VisionInputs | None


class DeepGenEngine:
    def __init__(self, loaded: LoadedDeepGen) -> None:
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.vae = loaded.vae.eval()
        self.scheduler = loaded.scheduler
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.template = PromptTemplate.from_mapping(loaded.env.config.prompt_template)
        self.placement = StagePlacement(self.model, self.vae, self.device, loaded.env.offload)
        # The DiT always samples on the run device (offload or not): graphs need it to be CUDA.
        self.cuda_graphs = loaded.env.cuda_graphs is not False and self.device.type == "cuda"
        if loaded.env.cuda_graphs and not self.cuda_graphs:
            logger.info("DG_DEEPGEN_CUDA_GRAPHS ignored: the DiT runs on %s, not CUDA", self.device)
        self._check_image_token()
        transformer_config = self.model.transformer.config
        self.vae_scale = vae_scale_factor(self.vae)
        # The DiT's positional table caps the latent grid (pos_embed_max_size patches per side).
        self.max_side = (
            transformer_config["pos_embed_max_size"] * transformer_config["patch_size"] * self.vae_scale
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeepGenEngine:
        from worker.deepgen.env import read_deepgen_env
        from worker.deepgen.loading import load_deepgen

        return cls(load_deepgen(read_deepgen_env(environ)))

    @property
    def provenance(self) -> dict[str, str]:
        return dict(self.loaded.provenance)

    def _check_image_token(self) -> None:
        token_id = self.tokenizer.convert_tokens_to_ids(self.template.image_context)
        expected = int(self.model.lmm.config.image_token_id)
        if token_id != expected:
            raise ValueError(
                f"tokenizer maps {self.template.image_context!r} to {token_id} but the LLM config's "
                f"image_token_id is {expected}: the AR model folder is inconsistent"
            )

    def generate(
        self, request: GenerationRequest, step_callback: StepCallback | None = None
    ) -> GenerationResult:
        self._validate(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_LIMIT)
        timings: dict[str, float] = {}
        with torch.inference_mode(), PeakMemory(self.device) as peak:
            started = time.perf_counter()
            with self._timed(timings, "prepare"):
                prepared = self._prepare(request)
            with self._timed(timings, "encode"), self.placement.active("encoder"):
                conditioning = encode_prompts(
                    self.model,
                    self.tokenizer,
                    [prepared.positive],
                    [prepared.negative],
                    max_length=self.loaded.env.max_length,
                    vision=prepared.vision,
                )
            reference_latents: list[torch.Tensor] = []
            if prepared.reference_pixels:
                with self._timed(timings, "vae_encode"), self.placement.active("vae"):
                    reference_latents = encode_references(self.vae, prepared.reference_pixels, seed)
            with self._timed(timings, "denoise"), self.placement.active("dit"):
                latents = self._sample(
                    request, prepared, conditioning, reference_latents, seed, step_callback
                )
            with self._timed(timings, "decode"), self.placement.active("vae"):
                images = decode_to_images(self.vae, latents)
            timings["denoise_per_step"] = timings["denoise"] / request.num_inference_steps
            timings["total"] = time.perf_counter() - started
        return GenerationResult(
            images=images,
            seed=seed,
            width=prepared.width,
            height=prepared.height,
            peak_memory_bytes=peak.peak_bytes,
            timings=timings,
        )

    def _sample(
        self,
        request: GenerationRequest,
        prepared: _PreparedPrompt,
        conditioning: PromptConditioning,
        reference_latents: list[torch.Tensor],
        seed: int,
        step_callback: StepCallback | None,
    ) -> torch.Tensor:
        transformer = self.model.transformer
        count = request.num_images_per_prompt
        # One draw for the whole batch: its first row is the one-image draw of the same seed.
        latents = initial_noise(
            batch_size=count,
            latent_channels=transformer.config["in_channels"],
            height=prepared.height,
            width=prepared.width,
            vae_scale_factor=self.vae_scale,
            seed=seed,
            device=self.device,
            dtype=transformer.dtype,
        )
        return denoise(
            transformer=transformer,
            scheduler=self.scheduler,
            latents=latents,
            conditioning=conditioning.repeat(count),
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            reference_latents=[latent.to(self.device) for latent in reference_latents],
            step_callback=step_callback,
            cuda_graphs=self.cuda_graphs,
        )

    def _prepare(self, request: GenerationRequest) -> _PreparedPrompt:
        if request.kind == "t2i":
            width = ceil_to_multiple(request.width or DEFAULT_T2I_SIDE)
            height = ceil_to_multiple(request.height or DEFAULT_T2I_SIDE)
            return _PreparedPrompt(
                positive=self.template.text_to_image(request.prompt),
                negative=self.template.text_to_image(request.negative_prompt),
                width=width,
                height=height,
                reference_pixels=[],
                vision=None,
            )
        mode = self.loaded.env.image_resize_mode
        resized = [resize_edit_image(image, mode, request.width, request.height) for image in request.images]
        for index, image in enumerate(resized):
            if max(image.size) > self.max_side:
                raise InvalidGenerationRequest(
                    f"input image #{index} resizes to {image.width}x{image.height}, over the model's "
                    f"{self.max_side}-pixel limit"
                )
        width = ceil_to_multiple(request.width) if request.width else resized[0].width
        height = ceil_to_multiple(request.height) if request.height else resized[0].height
        pixels = [image_to_pixels(image, self.device, self.dtype) for image in resized]
        vision = vision_inputs(pixels)
        return _PreparedPrompt(
            positive=self.template.edit(request.prompt, vision.token_counts),
            negative=self.template.edit(request.negative_prompt, vision.token_counts),
            width=width,
            height=height,
            reference_pixels=pixels,
            vision=vision,
        )

    def _validate(self, request: GenerationRequest) -> None:
        if request.kind not in ("t2i", "edit"):
            raise InvalidGenerationRequest(f"unknown request kind {request.kind!r}; expected 't2i' or 'edit'")
        if not request.prompt or not request.prompt.strip():
            raise InvalidGenerationRequest("the prompt is empty")
        if request.kind == "edit" and not request.images:
            raise InvalidGenerationRequest("an edit needs at least one input image")
        if request.kind == "t2i" and request.images:
            raise InvalidGenerationRequest("t2i takes no input images; use kind='edit'")
        for image in request.images:
            if not isinstance(image, Image.Image) or image.width < 1 or image.height < 1:
                raise InvalidGenerationRequest("every input image must be a non-empty PIL image")
        for name, side in (("height", request.height), ("width", request.width)):
            if side is None:
                continue
            if isinstance(side, bool) or not isinstance(side, int) or side < 1:
                raise InvalidGenerationRequest(f"{name} must be a positive integer, got {side!r}")
            if ceil_to_multiple(side, SIDE_MULTIPLE) > self.max_side:
                raise InvalidGenerationRequest(
                    f"{name} {side} is over the model's {self.max_side}-pixel limit"
                )
        steps = request.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_INFERENCE_STEPS:
            raise InvalidGenerationRequest(
                f"num_inference_steps must be an integer in [1, {MAX_INFERENCE_STEPS}], got {steps!r}"
            )
        if not math.isfinite(request.guidance_scale) or request.guidance_scale < 0:
            raise InvalidGenerationRequest(
                f"guidance_scale must be finite and >= 0, got {request.guidance_scale!r}"
            )
        count = request.num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES_PER_PROMPT:
            raise InvalidGenerationRequest(
                f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_PROMPT}], got {count!r}"
            )
        if request.seed is not None and (
            isinstance(request.seed, bool) or not 0 <= request.seed < SEED_LIMIT
        ):
            raise InvalidGenerationRequest(f"seed must be an integer in [0, 2**63), got {request.seed!r}")

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            # Kernels run asynchronously on CUDA: wait for them so the time lands on its stage.
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
