"""DeepGenSD3Transformer: stock SD3 parity, reference tokens and padding masks."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from worker.deepgen import tiny
from worker.deepgen.transformer import DeepGenSD3Transformer, pairwise_attention_mask


@pytest.fixture(scope="module")
def transformers_pair(tiny_model: tiny.TinyModelPaths) -> tuple[SD3Transformer2DModel, DeepGenSD3Transformer]:
    stock = SD3Transformer2DModel.from_pretrained(tiny_model.diffusion, subfolder="transformer").eval()
    ours = DeepGenSD3Transformer.from_pretrained(tiny_model.diffusion, subfolder="transformer").eval()
    return stock, ours


def dit_inputs(transformer: SD3Transformer2DModel, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    return {
        "hidden_states": torch.randn(batch, config.in_channels, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 5, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        "timestep": torch.full((batch,), 700.0),
    }


def test_same_parameter_names_as_stock(transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer]) -> None:
    stock, ours = transformers_pair
    assert stock.state_dict().keys() == ours.state_dict().keys()
    assert ours.config.dual_attention_layers  # the attn2 branch is exercised


def test_without_references_equals_stock_sd3(
    transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer],
) -> None:
    stock, ours = transformers_pair
    inputs = dit_inputs(stock, batch=2)
    with torch.inference_mode():
        torch.testing.assert_close(ours(**inputs).sample, stock(**inputs).sample, atol=1e-6, rtol=1e-6)


def test_references_condition_the_output_and_are_cut_off(
    transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer],
) -> None:
    _, ours = transformers_pair
    inputs = dit_inputs(ours, batch=1)
    reference = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        plain = ours(**inputs).sample
        conditioned = ours(**inputs, reference_latents=[[reference]]).sample
    assert conditioned.shape == plain.shape == inputs["hidden_states"].shape
    assert not torch.allclose(conditioned, plain, atol=1e-4)


def test_padded_batch_equals_each_sample_alone(
    transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer],
) -> None:
    """Right padding + pairwise mask (joint and attn2) make pad tokens invisible to real ones."""
    _, ours = transformers_pair
    inputs = dit_inputs(ours, batch=2, seed=1)
    generator = torch.Generator().manual_seed(2)
    references = [
        [torch.randn(16, 8, 8, generator=generator)],
        [torch.randn(16, 8, 8, generator=generator), torch.randn(16, 4, 6, generator=generator)],
    ]
    with torch.inference_mode():
        batched = ours(**inputs, reference_latents=references).sample
        for row in range(2):
            alone = ours(**{name: value[row : row + 1] for name, value in inputs.items()},
                         reference_latents=references[row : row + 1]).sample
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_pairwise_mask_forces_the_diagonal() -> None:
    valid = torch.tensor([[True, True, False]])
    mask = pairwise_attention_mask(valid)[0, 0]
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_builds_on_the_meta_device(tiny_model: tiny.TinyModelPaths) -> None:
    config = DeepGenSD3Transformer.load_config(tiny_model.diffusion, subfolder="transformer")
    with torch.device("meta"):
        transformer = DeepGenSD3Transformer.from_config(config)
    assert all(parameter.is_meta for parameter in transformer.parameters())
