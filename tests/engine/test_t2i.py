"""Text-to-image through the production path: DG_DEEPGEN_* -> load_deepgen -> DeepGenEngine."""

from __future__ import annotations

import pytest
import torch

from tests.support import load_tiny_engine, png_bytes, png_digest
from worker.deepgen import tiny
from worker.deepgen.engine import DeepGenEngine, InvalidGenerationRequest
from worker.deepgen.peak_memory import PeakMemory
from worker.deepgen.types import GenerationRequest, GenerationStopped

STEPS = 3


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def t2i(prompt: str = "a red cube on a table", **fields: object) -> GenerationRequest:
    values: dict[str, object] = {"height": 64, "width": 64, "num_inference_steps": STEPS, "seed": 7}
    values.update(fields)
    return GenerationRequest(kind="t2i", prompt=prompt, **values)  # type: ignore[arg-type]


def test_same_seed_gives_byte_identical_png(engine: DeepGenEngine) -> None:
    first = engine.generate(t2i())
    second = engine.generate(t2i())
    assert png_bytes(first.image) == png_bytes(second.image)
    assert first.seed == second.seed == 7


def test_other_seed_or_prompt_changes_the_image(engine: DeepGenEngine) -> None:
    base = png_digest(engine.generate(t2i()).image)
    assert png_digest(engine.generate(t2i(seed=8)).image) != base
    assert png_digest(engine.generate(t2i(prompt="a blue sphere in the sky")).image) != base


def test_sizes_are_rounded_up_to_multiples_of_32(engine: DeepGenEngine) -> None:
    result = engine.generate(t2i(height=50, width=90, num_inference_steps=2))
    assert (result.width, result.height) == (96, 64)
    assert result.image.size == (96, 64)
    assert result.image.mode == "RGB"


def test_missing_seed_is_drawn_and_returned(engine: DeepGenEngine) -> None:
    drawn = engine.generate(t2i(seed=None, num_inference_steps=2))
    replay = engine.generate(t2i(seed=drawn.seed, num_inference_steps=2))
    assert png_bytes(drawn.image) == png_bytes(replay.image)


def test_result_reports_stage_timings_and_peak_memory(engine: DeepGenEngine) -> None:
    result = engine.generate(t2i())
    for stage in ("encode", "denoise", "denoise_per_step", "decode", "total"):
        assert result.timings[stage] > 0
    # On the CPU it is RSS growth, which may be 0 once the allocator's pages are warm.
    assert isinstance(result.peak_memory_bytes, int) and result.peak_memory_bytes >= 0


def test_peak_memory_sees_a_transient_allocation() -> None:
    size = 64 * 1024 * 1024
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(size // 4, dtype=torch.float32)
        del block
    assert peak.peak_bytes >= size * 0.9


def _record_dit_batches(engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
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


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_at_most_one_runs_a_single_dit_branch(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch, guidance: float
) -> None:
    batches = _record_dit_batches(engine, monkeypatch)
    engine.generate(t2i(guidance_scale=guidance))
    assert batches == [1] * STEPS


def test_guidance_above_one_batches_both_branches_in_one_call(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _record_dit_batches(engine, monkeypatch)
    engine.generate(t2i(guidance_scale=4.0))
    assert batches == [2] * STEPS


def test_guidance_changes_the_image(engine: DeepGenEngine) -> None:
    guided = engine.generate(t2i(guidance_scale=4.0, negative_prompt="blurry"))
    unguided = engine.generate(t2i(guidance_scale=1.0, negative_prompt="blurry"))
    assert png_bytes(guided.image) != png_bytes(unguided.image)


def test_step_callback_sees_every_step(engine: DeepGenEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(t2i(), step_callback=lambda step, total: calls.append((step, total)) and None)
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_step_callback_can_stop_the_generation(engine: DeepGenEngine) -> None:
    calls: list[int] = []

    def stop_after_two(step: int, total: int) -> bool:
        calls.append(step)
        return step == 2

    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(t2i(), step_callback=stop_after_two)
    assert (stopped.value.step, stopped.value.total) == (2, STEPS)
    assert calls == [1, 2]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"height": 0}, "height must be a positive integer"),
        ({"width": 4096}, "pixel limit"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_requests_fail_clearly(
    engine: DeepGenEngine, fields: dict[str, object], message: str
) -> None:
    prompt = str(fields.pop("prompt", "a cat"))
    with pytest.raises(InvalidGenerationRequest, match=message):
        engine.generate(t2i(prompt, **fields))
