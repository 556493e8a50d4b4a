"""Several images per prompt: one noise draw, one batched DiT call per step, N images back.

docs/engine.md, 'Several images per prompt'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.specs import MAX_IMAGES_PER_PROMPT, MIN_IMAGES_PER_PROMPT
from tests.support import load_tiny_engine, png_bytes, striped_image
from worker.deepgen import engine as engine_module
from worker.deepgen import tiny
from worker.deepgen.encoding import PromptConditioning
from worker.deepgen.engine import DeepGenEngine, InvalidGenerationRequest
from worker.deepgen.imaging import decode_to_images
from worker.deepgen.sampling import denoise, initial_noise
from worker.deepgen.types import GenerationRequest

STEPS = 3
RED_BLUE = striped_image(70, 50, ((220, 20, 20), (20, 20, 220)))


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def t2i(count: int = 1, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {"height": 64, "width": 96, "num_inference_steps": STEPS, "seed": 7}
    values.update(fields)
    return GenerationRequest(
        kind="t2i", prompt="a red cube on a table", num_images_per_prompt=count, **values
    )  # type: ignore[arg-type]


def edit(count: int = 1, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {"num_inference_steps": STEPS, "seed": 11, "negative_prompt": " "}
    values.update(fields)
    return GenerationRequest(
        kind="edit",
        prompt="make the sky purple",
        images=(RED_BLUE,),
        num_images_per_prompt=count,
        **values,  # type: ignore[arg-type]
    )


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def record_dit_batches(engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    transformer = engine.model.transformer
    batches: list[int] = []
    original = transformer.forward

    def counting_forward(*args: object, **kwargs: object) -> object:
        hidden_states = kwargs["hidden_states"]
        assert isinstance(hidden_states, torch.Tensor)
        batches.append(hidden_states.shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", counting_forward)
    return batches


def test_four_images_are_different_and_of_the_requested_size(engine: DeepGenEngine) -> None:
    result = engine.generate(t2i(4))
    assert len(result.images) == 4
    assert all(image.size == (96, 64) and image.mode == "RGB" for image in result.images)
    assert (result.width, result.height, result.seed) == (96, 64, 7)
    assert len({png_bytes(image) for image in result.images}) == 4
    assert result.image is result.images[0]
    for stage in ("encode", "denoise", "denoise_per_step", "decode", "total"):
        assert result.timings[stage] > 0
    assert isinstance(result.peak_memory_bytes, int) and result.peak_memory_bytes >= 0


@pytest.mark.parametrize(("guidance", "rows_per_image"), [(4.0, 2), (1.0, 1)])
def test_one_batched_dit_call_per_step(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch, guidance: float, rows_per_image: int
) -> None:
    batches = record_dit_batches(engine, monkeypatch)
    engine.generate(t2i(4, guidance_scale=guidance))
    assert batches == [4 * rows_per_image] * STEPS


def test_the_prompt_is_encoded_once_for_the_batch(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[tuple[int, int]] = []
    original = engine_module.encode_prompts

    def recording(*args: object, **kwargs: object) -> PromptConditioning:
        positive, negative = args[2], args[3]
        assert isinstance(positive, list) and isinstance(negative, list)
        rows.append((len(positive), len(negative)))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "encode_prompts", recording)
    engine.generate(t2i(4))
    assert rows == [(1, 1)]


def test_the_batch_starts_from_one_noise_draw(engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[tuple[int, int]] = []
    original = engine_module.initial_noise

    def recording(**kwargs: object) -> torch.Tensor:
        noise = original(**kwargs)  # type: ignore[arg-type]
        draws.append((int(kwargs["batch_size"]), int(kwargs["seed"])))  # type: ignore[call-overload]
        return noise

    monkeypatch.setattr(engine_module, "initial_noise", recording)
    engine.generate(t2i(4))
    assert draws == [(4, 7)]


def test_a_seed_means_the_same_noise_whatever_the_batch() -> None:
    """One draw of (N, C, h, w): its first row is the one-image draw, the others are new noise."""
    common = dict(latent_channels=16, height=64, width=96, vae_scale_factor=8, seed=7)
    cpu = torch.device("cpu")
    one = initial_noise(batch_size=1, device=cpu, dtype=torch.float32, **common)  # type: ignore[arg-type]
    four = initial_noise(batch_size=4, device=cpu, dtype=torch.float32, **common)  # type: ignore[arg-type]
    assert four.shape == (4, 16, 8, 12)
    assert torch.equal(four[:1], one)
    assert all(not torch.equal(four[row], four[0]) for row in range(1, 4))


def test_image_zero_of_a_batch_is_the_single_image_of_the_seed(engine: DeepGenEngine) -> None:
    """Same noise row and the same conditioning: image 0 of N=4 is the N=1 image up to batch-size
    dependent float rounding (exactly equal on this CPU for t2i); the others are other images."""
    single = pixels(engine.generate(t2i(1)).image)
    batch = [pixels(image) for image in engine.generate(t2i(4)).images]
    assert np.abs(batch[0] - single).max() <= 2
    for other in batch[1:]:
        assert np.abs(other - single).mean() > 10


def test_seeded_batches_are_deterministic(engine: DeepGenEngine) -> None:
    first = engine.generate(t2i(4))
    second = engine.generate(t2i(4))
    assert [png_bytes(image) for image in first.images] == [png_bytes(image) for image in second.images]
    other_seed = engine.generate(t2i(4, seed=8))
    assert png_bytes(other_seed.images[0]) != png_bytes(first.images[0])


def test_edit_makes_two_images_from_one_reference(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformer = engine.model.transformer
    seen: list[list[tuple[int, ...]]] = []
    original = transformer.forward

    def recording_forward(*args: object, **kwargs: object) -> object:
        references = kwargs["reference_latents"]
        assert isinstance(references, list)
        seen.extend([tuple(latent.shape) for latent in sample] for sample in references)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", recording_forward)
    result = engine.generate(edit(2, num_inference_steps=1))
    # One DiT call on [negative x 2; positive x 2], every row carrying the one reference latent.
    assert seen == [[(16, 8, 12)]] * 4
    assert [image.size for image in result.images] == [(96, 64)] * 2
    assert png_bytes(result.images[0]) != png_bytes(result.images[1])
    monkeypatch.undo()
    again = engine.generate(edit(2, num_inference_steps=1))
    assert [png_bytes(image) for image in again.images] == [png_bytes(image) for image in result.images]
    single = engine.generate(edit(1, num_inference_steps=1))
    assert np.abs(pixels(result.images[0]) - pixels(single.image)).max() <= 2


def test_progress_is_reported_per_step_not_per_image(engine: DeepGenEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(t2i(4), step_callback=lambda step, total: calls.append((step, total)) and None)
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_the_vae_decodes_one_image_at_a_time(engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    original = engine.vae.decode

    def recording_decode(latents: torch.Tensor, *args: object, **kwargs: object) -> object:
        decoded.append(latents.shape[0])
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(engine.vae, "decode", recording_decode)
    engine.generate(t2i(3))
    assert decoded == [1, 1, 1]


def test_chunked_decode_gives_the_batch_decode(engine: DeepGenEngine) -> None:
    latents = torch.randn((3, 16, 8, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        chunked = decode_to_images(engine.vae, latents, images_per_call=1)
        whole = decode_to_images(engine.vae, latents, images_per_call=3)
    assert len(chunked) == len(whole) == 3
    for one, other in zip(chunked, whole, strict=True):
        assert np.abs(pixels(one) - pixels(other)).max() <= 1


def test_stage_offload_runs_the_batch_in_its_stages(
    tiny_model: tiny.TinyModelPaths, engine: DeepGenEngine
) -> None:
    """With offload on (forced on the CPU, where the moves are no-ops but run), the batched DiT call
    runs inside the "dit" stage and every decode inside "vae"; the images equal the resident run's."""
    offloaded = load_tiny_engine(tiny_model)
    placement = offloaded.placement
    placement.offload = True
    active: list[str] = []
    seen: list[tuple[str, str, int]] = []
    original_active = placement.active

    @contextmanager
    def recording_active(stage: str) -> Iterator[None]:
        with original_active(stage):  # type: ignore[arg-type]
            active.append(stage)
            try:
                yield
            finally:
                active.pop()

    placement.active = recording_active  # type: ignore[method-assign]
    forward = offloaded.model.transformer.forward
    decode = offloaded.vae.decode

    def dit_forward(*args: object, **kwargs: object) -> object:
        hidden_states = kwargs["hidden_states"]
        assert isinstance(hidden_states, torch.Tensor)
        seen.append(("dit", active[-1], hidden_states.shape[0]))
        return forward(*args, **kwargs)

    def vae_decode(latents: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(("decode", active[-1], latents.shape[0]))
        return decode(latents, *args, **kwargs)

    offloaded.model.transformer.forward = dit_forward  # type: ignore[method-assign]
    offloaded.vae.decode = vae_decode  # type: ignore[method-assign]
    result = offloaded.generate(t2i(2))
    assert seen == [("dit", "dit", 4)] * STEPS + [("decode", "vae", 1)] * 2
    resident = engine.generate(t2i(2))
    assert [png_bytes(image) for image in result.images] == [png_bytes(image) for image in resident.images]


def test_conditioning_repeats_in_cfg_order() -> None:
    context = torch.stack([torch.full((3, 2), 1.0), torch.full((3, 2), -1.0)])  # [positive; negative]
    pooled = torch.tensor([[1.0], [-1.0]])
    repeated = PromptConditioning(context=context, pooled=pooled).repeat(3)
    assert repeated.batch_size == 3
    assert repeated.pooled.flatten().tolist() == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    cfg_context, cfg_pooled = repeated.negative_then_positive()
    assert cfg_pooled.flatten().tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert cfg_context[:, 0, 0].tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one prompt"):
        repeated.repeat(2)


def test_denoise_refuses_conditioning_of_another_batch_size(engine: DeepGenEngine) -> None:
    conditioning = PromptConditioning(context=torch.zeros(2, 4, 8), pooled=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="1 sample"):
        denoise(
            transformer=engine.model.transformer,
            scheduler=engine.scheduler,
            latents=torch.zeros(2, 16, 8, 8),
            conditioning=conditioning,
            num_inference_steps=1,
            guidance_scale=4.0,
        )


def test_engine_limit_is_the_spec_limit() -> None:
    assert (MIN_IMAGES_PER_PROMPT, MAX_IMAGES_PER_PROMPT) == (1, engine_module.MAX_IMAGES_PER_PROMPT)


@pytest.mark.parametrize("count", [0, -1, MAX_IMAGES_PER_PROMPT + 1, True, 2.0])
def test_bad_image_counts_fail_clearly(engine: DeepGenEngine, count: object) -> None:
    with pytest.raises(InvalidGenerationRequest, match="num_images_per_prompt"):
        engine.generate(t2i(count))  # type: ignore[arg-type]
