"""Prompt encoding: templates, left padding, max length, layer picks and FA2 padding semantics."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.support import load_tiny_engine
from worker.deepgen import tiny
from worker.deepgen.encoding import (
    PromptTooLongError,
    encode_prompts,
    language_model,
    llm_hidden_states,
    rope_index,
    tokenize,
)
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.model import selected_layer_indices
from worker.deepgen.prompts import PromptTemplate
from worker.deepgen.types import GenerationRequest
from worker.deepgen.vision import qwen_patches, vision_inputs

TEMPLATE = PromptTemplate.from_mapping(None)
SHORT = TEMPLATE.text_to_image("a cat")
LONG = TEMPLATE.text_to_image("a very detailed painting of a cat sitting on a red chair next to a window")


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def test_prompt_strings_follow_the_reference_templates() -> None:
    assert SHORT == "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n"
    assert (
        TEMPLATE.text_to_image("")
        == "<|im_start|>user\nGenerate an image: <|im_end|>\n<|im_start|>assistant\n"
    )
    assert TEMPLATE.edit("add a hat", [2, 1]) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>\nadd a hat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert TEMPLATE.text_to_image("{input} {0}").count("{input} {0}") == 1  # braces in user text are literal


def test_selected_layers_are_deepest_first_and_capped_at_six() -> None:
    assert selected_layer_indices(36) == [35, 29, 23, 17, 11, 5]
    assert selected_layer_indices(32) == [31, 25, 19, 13, 7, 1]
    assert selected_layer_indices(8) == [7, 1]


def test_positive_and_negative_share_one_left_padded_batch(engine: DeepGenEngine) -> None:
    ids, mask = tokenize(engine.tokenizer, [LONG, SHORT], 1024, ["positive", "negative"])
    assert ids.shape[0] == 2 and mask[0].all()
    short_length = int(mask[1].sum())
    assert short_length < ids.shape[1]
    assert not mask[1, : ids.shape[1] - short_length].any() and mask[1, -short_length:].all()
    assert (ids[1, : ids.shape[1] - short_length] == engine.tokenizer.pad_token_id).all()


def test_prompt_over_max_length_fails_and_is_never_truncated(tiny_model: tiny.TinyModelPaths) -> None:
    engine = load_tiny_engine(tiny_model, MAX_LENGTH="24")
    request = GenerationRequest(
        kind="t2i", prompt="word " * 40, height=64, width=64, num_inference_steps=1, seed=1
    )
    with pytest.raises(PromptTooLongError, match="DG_DEEPGEN_MAX_LENGTH=24"):
        engine.generate(request)
    long_negative = GenerationRequest(
        kind="t2i",
        prompt="cat",
        negative_prompt="word " * 40,
        height=64,
        width=64,
        num_inference_steps=1,
        seed=1,
    )
    with pytest.raises(PromptTooLongError, match="negative"):
        engine.generate(long_negative)
    assert issubclass(PromptTooLongError, ValueError)


def test_hidden_state_index_i_is_the_raw_output_of_decoder_layer_i(engine: DeepGenEngine) -> None:
    ids, mask = tokenize(engine.tokenizer, [SHORT], 1024, ["positive"])
    decoder = language_model(engine.model.lmm)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        decoder.layers[index - 1].register_forward_hook(
            lambda _m, _i, out, index=index: captured.__setitem__(
                index, out[0] if isinstance(out, tuple) else out
            )
        )
        for index in engine.model.layer_indices
    ]
    try:
        with torch.inference_mode():
            states = llm_hidden_states(engine.model, ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(states) == len(decoder.layers) + 1
    for index in engine.model.layer_indices:
        assert torch.equal(states[index], captured[index])


def test_think_queries_continue_the_text_positions(engine: DeepGenEngine) -> None:
    ids, mask = tokenize(engine.tokenizer, [LONG, SHORT], 1024, ["positive", "negative"])
    queries = engine.model.num_queries
    full_ids = torch.cat([ids, ids.new_zeros(2, queries)], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(2, queries)], dim=1).long()
    positions = rope_index(
        engine.model.lmm, full_ids, full_mask, int(engine.model.lmm.config.image_token_id), None
    )
    for row in range(2):
        valid = int(mask[row].sum())
        expected = torch.arange(valid + queries)
        for axis in range(3):
            assert torch.equal(positions[axis, row, full_mask[row].bool()], expected)


def _pad_positions_and_states(engine: DeepGenEngine) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    ids, mask = tokenize(engine.tokenizer, [LONG, SHORT], 1024, ["positive", "negative"])
    with torch.inference_mode():
        states = llm_hidden_states(engine.model, ids, mask)
    return ~mask[1], states


def test_pad_states_follow_flash_attention_2_semantics(engine: DeepGenEngine) -> None:
    """FA2 gives pad rows a zero attention output: their state is embedding + MLP-only residuals."""
    pad, states = _pad_positions_and_states(engine)
    decoder = language_model(engine.model.lmm)
    with torch.inference_mode():
        expected = states[0][1, : int(pad.sum())]
        for layer_index, layer in enumerate(decoder.layers[: len(states) - 2]):
            expected = expected + layer.mlp(layer.post_attention_layernorm(expected))
            torch.testing.assert_close(states[layer_index + 1][1, : int(pad.sum())], expected)


def test_pad_states_do_not_depend_on_the_attention_kernel(tiny_model: tiny.TinyModelPaths) -> None:
    sdpa = load_tiny_engine(tiny_model, ATTENTION="sdpa")
    eager = load_tiny_engine(tiny_model, ATTENTION="eager")
    _, sdpa_states = _pad_positions_and_states(sdpa)
    _, eager_states = _pad_positions_and_states(eager)
    for index in sdpa.model.layer_indices:
        torch.testing.assert_close(sdpa_states[index], eager_states[index], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        sdpa_cond = encode_prompts(sdpa.model, sdpa.tokenizer, [LONG], [SHORT], max_length=1024)
        eager_cond = encode_prompts(eager.model, eager.tokenizer, [LONG], [SHORT], max_length=1024)
    torch.testing.assert_close(sdpa_cond.context, eager_cond.context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_cond.pooled, eager_cond.pooled, atol=1e-5, rtol=1e-5)


def test_plain_eager_padding_would_differ(engine: DeepGenEngine) -> None:
    """Guard for the tests above: without the emulation, eager masking gives other pad states.

    (Eager softmax over a fully masked row is uniform over every key; plain SDPA on this torch
    happens to return zeros for such rows, which is why the kernel choice mattered in the reference.)
    """
    pad, emulated = _pad_positions_and_states(engine)
    ids, mask = tokenize(engine.tokenizer, [LONG, SHORT], 1024, ["positive", "negative"])
    decoder = language_model(engine.model.lmm)
    with torch.inference_mode():
        embeds = decoder.get_input_embeddings()(ids)
        queries = engine.model.meta_queries[None].expand(2, -1, -1)
        full_mask = torch.cat([mask, mask.new_ones(2, queries.shape[1])], dim=1).long()
        full_ids = torch.cat([ids, ids.new_zeros(2, queries.shape[1])], dim=1)
        positions = rope_index(engine.model.lmm, full_ids, full_mask, -1, None)
        config = decoder.config
        kernel = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            plain = decoder(
                inputs_embeds=torch.cat([embeds, queries], dim=1),
                attention_mask=full_mask,
                position_ids=positions,
                output_hidden_states=True,
            ).hidden_states
        finally:
            config._attn_implementation = kernel
    last = engine.model.layer_indices[0]
    assert not torch.allclose(
        plain[last][1, : int(pad.sum())], emulated[last][1, : int(pad.sum())], atol=1e-3
    )
    # Valid positions agree: the emulation only changes what FA2 changes.
    torch.testing.assert_close(plain[last][0], emulated[last][0], atol=1e-4, rtol=1e-4)


def test_vit_patch_order_matches_qwen_processor() -> None:
    frame = torch.randn(3, 56, 84)
    # The NumPy/PIL processor: `Qwen2VLImageProcessorPil` in later transformers 5.x, where the plain name
    # needs torchvision; `Qwen2VLImageProcessor` itself in 5.0 (docs/engine.md, 'Library versions').
    processor_class = (
        getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    )
    processor = processor_class(do_resize=False, do_rescale=False, do_normalize=False)
    expected = processor(images=[frame.numpy()], return_tensors="pt", input_data_format="channels_first")
    patches, grid = qwen_patches(frame)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(patches, expected["pixel_values"].float())


def test_image_tokens_get_3d_positions_and_text_continues_after_them(engine: DeepGenEngine) -> None:
    """Qwen's M-RoPE for an edit row: (t, h, w) offset by the image start, text resumes at max + 1."""
    vision = vision_inputs([torch.zeros(3, 64, 96), torch.zeros(3, 32, 32)])  # merged grids 2x3 and 1x1
    prompt = TEMPLATE.edit("add a hat", vision.token_counts)
    ids, mask = tokenize(engine.tokenizer, [prompt, TEMPLATE.edit("", vision.token_counts)], 1024, ["p", "n"])
    queries = engine.model.num_queries
    full_ids = torch.cat([ids, ids.new_zeros(2, queries)], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(2, queries)], dim=1).long()
    image_token_id = int(engine.model.lmm.config.image_token_id)
    positions = rope_index(
        engine.model.lmm, full_ids, full_mask, image_token_id, vision.grid_thw.repeat(2, 1)
    )
    for row in range(2):
        valid = full_mask[row].bool()
        row_ids, row_positions = full_ids[row, valid], positions[:, row, valid]
        image_at = (row_ids == image_token_id).nonzero().flatten().tolist()
        first, second = image_at[:6], image_at[6:]
        assert len(second) == 1 and first == list(range(first[0], first[0] + 6))
        start = first[0]  # text before the first image counts 0..start-1
        assert torch.equal(row_positions[:, :start], torch.arange(start).expand(3, -1))
        grid = row_positions[:, first]
        assert grid[0].tolist() == [start] * 6
        assert grid[1].tolist() == [start + r for r in (0, 0, 0, 1, 1, 1)]
        assert grid[2].tolist() == [start + c for c in (0, 1, 2, 0, 1, 2)]
        # <|vision_end|><|vision_start|> then the 1x1 image: text resumes at max + 1 = start + 3.
        after = start + 3
        assert row_positions[:, first[-1] + 1].tolist() == [after] * 3
        assert row_positions[:, second[0]].tolist() == [after + 2] * 3
        tail = row_positions[:, second[0] + 1 :]
        expected_tail = torch.arange(after + 3, after + 3 + tail.shape[1]).expand(3, -1)
        assert torch.equal(tail, expected_tail)  # closing text and the think queries continue the count
