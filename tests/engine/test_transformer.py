"""DeepGenSD3Transformer: stock SD3 parity, reference tokens and padding masks."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from worker.deepgen import tiny
from worker.deepgen import transformer as transformer_module
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


def test_same_parameter_names_as_stock(
    transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer],
) -> None:
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
            alone = ours(
                **{name: value[row : row + 1] for name, value in inputs.items()},
                reference_latents=references[row : row + 1],
            ).sample
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


def test_mask_only_when_padded(
    transformers_pair: tuple[SD3Transformer2DModel, DeepGenSD3Transformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unpadded batches (every engine call: CFG rows share their references) pass no mask, so CUDA
    SDPA keeps its flash kernels; padded ones mask every joint and attn2 call."""
    _, ours = transformers_pair
    masks: list[torch.Tensor | None] = []
    sdpa = transformer_module.F.scaled_dot_product_attention

    def recording_sdpa(
        *args: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: object
    ) -> torch.Tensor:
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_module.F, "scaled_dot_product_attention", recording_sdpa)
    inputs = dit_inputs(ours, batch=2, seed=3)
    generator = torch.Generator().manual_seed(4)
    shared = [torch.randn(16, 8, 8, generator=generator)]
    with torch.inference_mode():
        ours(**inputs, reference_latents=[shared, shared])
        calls = len(masks)
        assert calls == ours.config.num_layers + len(ours.config.dual_attention_layers)
        assert all(mask is None for mask in masks)
        ours(**inputs, reference_latents=[shared, [torch.randn(16, 4, 8, generator=generator)]])
    padded = masks[calls:]
    assert len(padded) == calls and all(mask is not None and mask.dtype == torch.bool for mask in padded)
    image_tokens, context_tokens = 16 + 16, inputs["encoder_hidden_states"].shape[1]
    assert {tuple(mask.shape[-2:]) for mask in padded if mask is not None} == {
        (image_tokens + context_tokens, image_tokens + context_tokens),
        (image_tokens, image_tokens),
    }
