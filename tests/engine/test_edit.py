"""Image editing: one and several input images conditioning one edit, through DG_DEEPGEN_* loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.support import load_tiny_engine, png_bytes, striped_image
from worker.deepgen import tiny
from worker.deepgen.engine import DeepGenEngine, InvalidGenerationRequest
from worker.deepgen.types import GenerationRequest

RED_BLUE = striped_image(70, 50, ((220, 20, 20), (20, 20, 220)))
GREEN_WHITE = striped_image(40, 90, ((20, 200, 20), (250, 250, 250), (20, 200, 20)))


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def edit(*images: object, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {"num_inference_steps": 3, "seed": 11, "negative_prompt": " "}
    values.update(fields)
    return GenerationRequest(kind="edit", prompt="make the sky purple", images=images, **values)  # type: ignore[arg-type]


def test_output_size_is_the_first_image_resized(engine: DeepGenEngine) -> None:
    # dynamic mode: a small image keeps its size, each side ceil'ed to 32.
    result = engine.generate(edit(RED_BLUE))
    assert (result.width, result.height) == (96, 64)
    assert result.image.size == (96, 64)


def test_two_images_condition_one_edit(engine: DeepGenEngine) -> None:
    one = engine.generate(edit(RED_BLUE))
    two = engine.generate(edit(RED_BLUE, GREEN_WHITE))
    assert two.image.size == one.image.size == (96, 64)  # size from the first image
    assert png_bytes(two.image) != png_bytes(one.image)
    # Order matters: the first image defines the output and the image blocks are ordered.
    swapped = engine.generate(edit(GREEN_WHITE, RED_BLUE))
    assert swapped.image.size == (64, 96)


def test_every_reference_reaches_the_dit_sequence(
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
    engine.generate(edit(RED_BLUE, GREEN_WHITE, num_inference_steps=1, guidance_scale=4.0))
    # One DiT call on [negative; positive], both rows carrying both reference latents (/8 of 96x64, 64x96).
    assert seen == [[(16, 8, 12), (16, 12, 8)]] * 2


def test_edit_is_deterministic_for_a_seed(engine: DeepGenEngine) -> None:
    first = engine.generate(edit(RED_BLUE, GREEN_WHITE))
    second = engine.generate(edit(RED_BLUE, GREEN_WHITE))
    assert png_bytes(first.image) == png_bytes(second.image)


def test_explicit_size_overrides_the_first_image(engine: DeepGenEngine) -> None:
    result = engine.generate(edit(RED_BLUE, height=64, width=64))
    assert result.image.size == (64, 64)


def test_edit_timings_include_reference_encoding(engine: DeepGenEngine) -> None:
    result = engine.generate(edit(RED_BLUE))
    assert result.timings["vae_encode"] > 0


def test_edit_without_images_fails_clearly(engine: DeepGenEngine) -> None:
    with pytest.raises(InvalidGenerationRequest, match="at least one input image"):
        engine.generate(edit())


def test_t2i_with_images_fails_clearly(engine: DeepGenEngine) -> None:
    request = GenerationRequest(kind="t2i", prompt="a cat", images=(RED_BLUE,))
    with pytest.raises(InvalidGenerationRequest, match="no input images"):
        engine.generate(request)


def test_fix_pixels_mode_sizes_output_like_the_reference(tiny_model: tiny.TinyModelPaths) -> None:
    engine = load_tiny_engine(tiny_model, IMAGE_RESIZE_MODE="fix_pixels")
    # fix_pixels scales to ~512x512 area, sides ceil'ed to 32: 70x50 -> 608x448.
    result = engine.generate(edit(RED_BLUE))
    assert (result.width, result.height) == (608, 448)


def test_sizes_over_the_dit_position_table_fail_clearly(tiny_model: tiny.TinyModelPaths) -> None:
    engine = load_tiny_engine(tiny_model, IMAGE_RESIZE_MODE="fix_pixels")
    # A 300x20 strip keeps its aspect at ~512^2 area: 1984x160, past the tiny DiT's 1024-pixel table.
    with pytest.raises(InvalidGenerationRequest, match="1984x160"):
        engine.generate(edit(Image.new("RGB", (300, 20), (10, 200, 30))))


def test_reference_latents_are_seeded_posterior_samples(engine: DeepGenEngine) -> None:
    from worker.deepgen.imaging import encode_references
    from worker.deepgen.vision import image_to_pixels

    pixels = [image_to_pixels(RED_BLUE.resize((96, 64)), torch.device("cpu"), torch.float32)]
    with torch.inference_mode():
        same_a = encode_references(engine.vae, pixels, seed=3)[0]
        same_b = encode_references(engine.vae, pixels, seed=3)[0]
        other = encode_references(engine.vae, pixels, seed=4)[0]
    assert torch.equal(same_a, same_b)
    assert not torch.equal(same_a, other)  # a sample, not the posterior mode
