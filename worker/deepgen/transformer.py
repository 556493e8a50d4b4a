"""SD3 DiT with reference-latent tokens in the image sequence ("Kontext" concatenation).

Specified in docs/engine.md, 'Reference latents in the DiT'.

`DeepGenSD3Transformer` keeps diffusers' `SD3Transformer2DModel` config keys, submodules and parameter
names (so the checkpoint's `transformer.*` keys load unchanged) and replaces only the forward pass and
the attention processor:

* every reference latent goes through the same `pos_embed` as the target (own size, same centre crop
  of the shared sin-cos table, no offset); tokens are concatenated `[target, ref_1, ref_2, ...]`;
* samples whose sequences differ in length are right-padded with zeros; a boolean pairwise mask
  (valid_i AND valid_j, diagonal forced so pad rows attend to themselves) is applied in the joint
  attention (context tokens always valid) and in the dual-attention `attn2` branch (image tokens only);
* the output keeps only the target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers import SD3Transformer2DModel

# SD3Transformer2DModel from `diffusers.models`, not the top level: there type checkers see the placeholder
# class diffusers defines for installs without torch.

ReferenceLatents = Sequence[Sequence[torch.Tensor]]


def pairwise_attention_mask(token_is_valid: torch.Tensor) -> torch.Tensor:
    """(B, N) validity -> (B, 1, N, N) boolean SDPA mask with the diagonal forced True.

    A pad row would otherwise have no key to attend to and SDPA would return NaN for it.
    """
    pairwise = token_is_valid[:, :, None] & token_is_valid[:, None, :]
    diagonal = torch.eye(token_is_valid.shape[1], dtype=torch.bool, device=token_is_valid.device)
    return (pairwise | diagonal).unsqueeze(1)


@dataclass(frozen=True)
class PaddingMasks:
    """Pairwise SDPA masks of one padded DiT batch, built once per forward for every block.

    `joint` covers `[image tokens, context tokens]` (context always valid), `image` the image tokens
    alone (the dual-attention `attn2` branch).
    """

    joint: torch.Tensor  # (B, 1, N + C, N + C) bool
    image: torch.Tensor  # (B, 1, N, N) bool

    @classmethod
    def build(cls, image_token_is_valid: torch.Tensor, context_length: int) -> PaddingMasks:
        context_is_valid = image_token_is_valid.new_ones(image_token_is_valid.shape[0], context_length)
        joint_is_valid = torch.cat([image_token_is_valid, context_is_valid], dim=1)
        return cls(
            joint=pairwise_attention_mask(joint_is_valid), image=pairwise_attention_mask(image_token_is_valid)
        )


class MaskedJointAttnProcessor:
    """SD3 joint attention (and the image-only `attn2`) with an optional image-token padding mask.

    Without `padding_masks` it computes exactly diffusers' `JointAttnProcessor2_0` (no mask, so SDPA
    may pick its flash kernel on CUDA).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_masks: PaddingMasks | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("pass padding as padding_masks; a raw attention_mask is not supported")
        batch_size, image_length, _ = hidden_states.shape
        heads = attn.heads

        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch_size, -1, heads, projected.shape[-1] // heads).transpose(1, 2)

        query = split_heads(attn.to_q(hidden_states))
        key = split_heads(attn.to_k(hidden_states))
        value = split_heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if encoder_hidden_states is not None:
            context_query = split_heads(attn.add_q_proj(encoder_hidden_states))
            context_key = split_heads(attn.add_k_proj(encoder_hidden_states))
            context_value = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)
            if padding_masks is not None:
                mask = padding_masks.joint
        elif padding_masks is not None:
            mask = padding_masks.image

        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
        attended = attended.transpose(1, 2).reshape(batch_size, -1, attended.shape[1] * attended.shape[3])
        attended = attended.to(query.dtype)

        image_out = attn.to_out[1](attn.to_out[0](attended[:, :image_length]))
        if encoder_hidden_states is None:
            return image_out
        context_out = attended[:, image_length:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out


class DeepGenSD3Transformer(SD3Transformer2DModel):
    """`SD3Transformer2DModel` whose forward accepts reference latents per sample.

    `__init__` is inherited unchanged so that `from_pretrained`/`from_config` see the stock config
    signature; the masked processor is installed on first use instead.
    """

    def _ensure_masked_processors(self) -> None:
        first_attention = self.transformer_blocks[0].attn
        if not (
            isinstance(first_attention, Attention)
            and isinstance(first_attention.processor, MaskedJointAttnProcessor)
        ):
            # diffusers types the argument as a closed union of its own processor classes; any
            # processor with the `__call__(attn, hidden_states, ...)` protocol is accepted at runtime.
            self.set_attn_processor(MaskedJointAttnProcessor())  # type: ignore[arg-type]

    def _image_tokens(
        self, hidden_states: torch.Tensor, reference_latents: ReferenceLatents | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patchified `[target, refs...]` tokens per sample, right-padded, and their validity mask."""
        target_tokens = self.pos_embed(hidden_states).contiguous()
        if not reference_latents or all(len(refs) == 0 for refs in reference_latents):
            return target_tokens, None
        batch_size = hidden_states.shape[0]
        if len(reference_latents) != batch_size:
            raise ValueError(
                f"reference_latents has {len(reference_latents)} entries for a batch of {batch_size}"
            )
        # CFG rows share their reference tensors: patchify each distinct one once.
        patchified: dict[int, torch.Tensor] = {}

        def ref_tokens(ref: torch.Tensor) -> torch.Tensor:
            if id(ref) not in patchified:
                patchified[id(ref)] = self.pos_embed(ref.unsqueeze(0).to(hidden_states.dtype))[0]
            return patchified[id(ref)]

        sequences = [
            torch.cat([sample_tokens, *(ref_tokens(ref) for ref in refs)], dim=0)
            for sample_tokens, refs in zip(target_tokens, reference_latents, strict=True)
        ]
        lengths = [sequence.shape[0] for sequence in sequences]
        longest = max(lengths)
        if all(length == longest for length in lengths):
            # Nothing padded: an all-True mask is the same function, and leaving it out keeps the
            # fast (flash / memory-efficient) SDPA kernels available on CUDA.
            return torch.stack(sequences), None
        padded = target_tokens.new_zeros(batch_size, longest, target_tokens.shape[-1])
        token_is_valid = torch.zeros(batch_size, longest, dtype=torch.bool, device=target_tokens.device)
        for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
            padded[row, :length] = sequence
            token_is_valid[row, :length] = True
        return padded, token_is_valid

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        reference_latents: ReferenceLatents | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Predict the flow velocity of `hidden_states` (B, C, H, W).

        `reference_latents[b]` lists the already scaled VAE latents (C, h_j, w_j) conditioning sample b.
        """
        self._ensure_masked_processors()
        height, width = hidden_states.shape[-2:]
        patch = self.config["patch_size"]  # a FrozenDict, typed as a plain dict
        target_length = (height // patch) * (width // patch)

        tokens, token_is_valid = self._image_tokens(hidden_states, reference_latents)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        attention_kwargs = (
            {}
            if token_is_valid is None
            else {"padding_masks": PaddingMasks.build(token_is_valid, context.shape[1])}
        )
        for block in self.transformer_blocks:
            context, tokens = block(
                hidden_states=tokens,
                encoder_hidden_states=context,
                temb=temb,
                joint_attention_kwargs=attention_kwargs,
            )

        tokens = self.proj_out(self.norm_out(tokens[:, :target_length], temb))
        output = tokens.reshape(
            tokens.shape[0], height // patch, width // patch, patch, patch, self.out_channels
        )
        output = torch.einsum("nhwpqc->nchpwq", output).reshape(
            tokens.shape[0], self.out_channels, height, width
        )
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
