"""Prompt (and reference image) encoding: tokens -> LLM hidden states -> connector -> DiT conditioning.

Order of operations follows the reference exactly (docs/engine.md, 'Text encoding', 'Layer picks',
'Padding semantics', 'Connector and conditioning' and 'Edit prompt and image tokens'):
positives and negatives tokenised together and left-padded; 128 think queries appended; Qwen's own
`get_rope_index` for the 3-D positions; the inner language model (never the LM head) run with FA2
padding semantics; the picked hidden states concatenated deepest first; connector and projections.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.deepgen.model import DeepGenModel
from worker.deepgen.padding_attention import causal_padding_mask, emulated_kernel_name
from worker.deepgen.vision import VisionInputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class PromptTooLongError(ValueError):
    """A tokenised prompt is longer than DG_DEEPGEN_MAX_LENGTH (prompts are never truncated)."""


@dataclass
class PromptConditioning:
    """DiT conditioning for b samples: rows `[positive_0..b-1, negative_0..b-1]` as the LLM saw them."""

    context: torch.Tensor  # (2b, T, joint_attention_dim)
    pooled: torch.Tensor  # (2b, pooled_projection_dim)

    @property
    def batch_size(self) -> int:
        return self.context.shape[0] // 2

    def repeat(self, copies: int) -> PromptConditioning:
        """One prompt's conditioning for `copies` samples: rows `[positive x copies, negative x copies]`.

        The prompt is encoded once and its rows copied (docs/engine.md, 'Several images per prompt'),
        so every sample sees exactly the one-sample conditioning, padding included.
        """
        if self.batch_size != 1:
            raise ValueError(f"repeat() takes the conditioning of one prompt, not {self.batch_size}")
        if copies == 1:
            return self

        # Rows are [positive; negative]: repeating each in place gives [positive x n; negative x n].
        return PromptConditioning(
            context=self.context.repeat_interleave(copies, dim=0),
            pooled=self.pooled.repeat_interleave(copies, dim=0),
        )

    def positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        return self.context[:b], self.pooled[:b]

    def negative_then_positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG batch order of the reference DiT call: [negative; positive].

        docs/engine.md, 'Sampling and CFG order'.
        """
        b = self.batch_size
        context = torch.cat([self.context[b:], self.context[:b]])
        pooled = torch.cat([self.pooled[b:], self.pooled[:b]])
        return context, pooled


def language_model(lmm: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack without the LM head (transformers >= 4.52 nests it under `model`)."""
    inner = lmm.model
    return getattr(inner, "language_model", inner)


def vision_tower(lmm: PreTrainedModel) -> nn.Module:
    inner = getattr(lmm, "model", None)
    tower = getattr(inner, "visual", None) or getattr(lmm, "visual", None)
    if tower is None:
        raise AttributeError("the LLM has no vision tower (`model.visual` / `visual`)")
    return tower


def rope_index(
    lmm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_grid_thw: torch.Tensor | None,
) -> torch.Tensor:
    """Qwen's own 3-D M-RoPE positions (3, B, T), from `lmm.model` (>= 4.52) or `lmm` (<= 4.51)."""
    # Any: a Qwen-specific method whose owner and signature vary across transformers versions.
    owner: Any = lmm.model if hasattr(lmm.model, "get_rope_index") else lmm
    parameters = inspect.signature(owner.get_rope_index).parameters
    if "mm_token_type_ids" in parameters:
        token_types = (input_ids == image_token_id).to(torch.int32)
        positions, _ = owner.get_rope_index(
            input_ids, token_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
    else:
        positions, _ = owner.get_rope_index(input_ids, image_grid_thw, None, None, attention_mask)
    return positions


def enable_padding_emulation(lmm: PreTrainedModel) -> bool:
    """Switch the text decoder to an FA2-padding kernel; False if it already runs FA2 itself."""
    text_config = language_model(lmm).config
    kernel = emulated_kernel_name(text_config._attn_implementation)
    if kernel is None:
        return False
    if text_config._attn_implementation != kernel:
        text_config._attn_implementation = kernel
    return True


def tokenize(
    tokenizer: Any, texts: list[str], max_length: int, labels: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and bool mask; refuses (never truncates) any text over `max_length` tokens."""
    tokens = tokenizer(texts, add_special_tokens=True, padding=True, padding_side="left", return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    for label, length in zip(labels, mask.sum(dim=1).tolist(), strict=True):
        if length > max_length:
            raise PromptTooLongError(
                f"the {label} prompt is {length} tokens long (image placeholders included), over "
                f"DG_DEEPGEN_MAX_LENGTH={max_length}; shorten it or raise the limit"
            )
    return tokens["input_ids"], mask


def encode_prompts(
    model: DeepGenModel,
    tokenizer: Any,
    positive: list[str],
    negative: list[str],
    *,
    max_length: int,
    vision: VisionInputs | None = None,
) -> PromptConditioning:
    """Encode b positive and b negative prompt strings (already templated) into DiT conditioning.

    With `vision`, every row carries the same reference images: their embeddings replace the
    `<|image_pad|>` embeddings of each row in order.
    """
    if len(positive) != len(negative):
        raise ValueError("positive and negative prompts must pair up one to one")
    labels = [f"positive #{i}" for i in range(len(positive))] + [
        f"negative #{i}" for i in range(len(negative))
    ]
    input_ids, text_mask = tokenize(tokenizer, positive + negative, max_length, labels)
    hidden_states = llm_hidden_states(model, input_ids, text_mask, vision)
    stacked = torch.cat([hidden_states[index] for index in model.layer_indices], dim=-1)
    context, pooled = model.condition_dit(stacked.to(model.projector_1.weight.dtype))
    return PromptConditioning(context=context, pooled=pooled)


def llm_hidden_states(
    model: DeepGenModel,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    vision: VisionInputs | None = None,
) -> tuple[torch.Tensor, ...]:
    """All hidden states (embeddings, then each decoder layer) for left-padded rows + think queries."""
    lmm = model.lmm
    decoder = language_model(lmm)
    embed_tokens = decoder.get_input_embeddings()
    embedding_weight = embed_tokens.weight
    assert isinstance(embedding_weight, torch.Tensor)  # a Parameter (nn.Module types it Tensor | Module)
    device = embedding_weight.device
    image_token_id = int(lmm.config.image_token_id)
    rows = input_ids.shape[0]
    input_ids, text_mask = input_ids.to(device), text_mask.to(device).bool()

    inputs_embeds = embed_tokens(input_ids)
    image_grid_thw = None
    if vision is not None:
        image_grid_thw = vision.grid_thw.to(device).repeat(rows, 1)
        inputs_embeds = _insert_image_embeddings(lmm, inputs_embeds, input_ids, image_token_id, vision)

    # Think queries: id 0 only feeds the position computation, the mask marks them valid.
    num_queries = model.num_queries
    full_ids = torch.cat([input_ids, input_ids.new_zeros(rows, num_queries)], dim=1)
    full_mask = torch.cat([text_mask, text_mask.new_ones(rows, num_queries)], dim=1)
    position_ids = rope_index(lmm, full_ids, full_mask.long(), image_token_id, image_grid_thw)
    queries = model.meta_queries.to(inputs_embeds.dtype)[None].expand(rows, -1, -1)
    inputs_embeds = torch.cat([inputs_embeds, queries], dim=1)

    if enable_padding_emulation(lmm):
        attention: torch.Tensor | dict[str, torch.Tensor] = {"full_attention": causal_padding_mask(full_mask)}
    else:
        attention = full_mask.long()  # FA2 proper: it un-pads from the 2-D mask itself
    outputs = decoder(
        inputs_embeds=inputs_embeds,
        attention_mask=attention,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    return tuple(outputs.hidden_states)


def _insert_image_embeddings(
    lmm: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    vision: VisionInputs,
) -> torch.Tensor:
    tower = vision_tower(lmm)
    tower_dtype = next(tower.parameters()).dtype
    output = tower(
        vision.patches.to(inputs_embeds.device, tower_dtype),
        grid_thw=vision.grid_thw.to(inputs_embeds.device),
    )
    image_embeds = output.pooler_output if hasattr(output, "pooler_output") else output
    placeholder = input_ids == image_token_id
    per_row = placeholder.sum(dim=1)
    expected = sum(vision.token_counts)
    if image_embeds.shape[0] != expected or bool((per_row != expected).any()):
        raise ValueError(
            f"image placeholder count {per_row.tolist()} does not match the {expected} vision tokens "
            "of the reference images (tokenizer and LLM config disagree on the image token?)"
        )
    all_rows = image_embeds.to(inputs_embeds.dtype).repeat(input_ids.shape[0], 1)
    return inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), all_rows)
