"""FlashAttention-2 padding semantics for any attention kernel of the LLM.

Why it matters: docs/engine.md, 'Padding semantics'.

The released model ran the LLM with FlashAttention-2 on left-padded batches. FA2 un-pads the batch,
so a pad query row gets an all-zero attention output and pad keys are never attended. SDPA/eager with
an ordinary 4-D mask give pad rows different states (or NaN), and pad states flow into the connector
and the pooled mean, so they change the image. This module registers kernels that reproduce FA2's
behaviour on top of `sdpa` or `eager`:

* the caller builds the boolean (B, 1, T, T) mask itself (causal AND key is valid, pad query rows
  all False) and passes it pre-built to the language model;
* the kernel lets pad rows attend to themselves (to avoid NaN), runs the base kernel, then zeroes
  the output at the pad query rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

EMULATION_PREFIX = "deepgen_fa2_padding_"
NATIVE_PADDING_KERNELS = ("flash_attention_2", "flash_attention_3")
_BASE_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "sdpa": sdpa_attention_forward,
    "eager": eager_attention_forward,
}


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) key validity -> (B, 1, T, T) boolean causal mask; pad query rows are all False."""
    length = attention_mask.shape[1]
    valid = attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return causal[None, None] & valid[:, None, None, :] & valid[:, None, :, None]


def _padded_kernel(base_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    base_kernel = _BASE_KERNELS[base_name]

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if attention_mask is None or attention_mask.dtype != torch.bool:
            raise ValueError(
                "the FA2 padding emulation expects the boolean mask built by causal_padding_mask"
            )
        query_length, key_length = query.shape[2], key.shape[2]
        mask = attention_mask[:, :, :, :key_length]
        query_is_pad = ~mask.any(dim=-1, keepdim=True)  # (B, 1, Q, 1)
        diagonal = torch.eye(query_length, key_length, dtype=torch.bool, device=mask.device)
        mask = mask | (query_is_pad & diagonal)
        if base_name == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        output, weights = base_kernel(module, query, key, value, mask, **kwargs)
        # Kernel output is (B, Q, heads, D); FA2 leaves the pad rows at zero.
        row_is_pad = query_is_pad[:, 0, :, 0][:, :, None, None]
        return output.masked_fill(row_is_pad, 0.0), weights

    return attention


for _name in _BASE_KERNELS:
    AttentionInterface.register(f"{EMULATION_PREFIX}{_name}", _padded_kernel(_name))


def emulated_kernel_name(base_name: str) -> str | None:
    """Kernel to run the LLM with for `base_name`, or None when `base_name` pads like FA2 natively."""
    if base_name.startswith(EMULATION_PREFIX):
        return base_name
    if base_name in NATIVE_PADDING_KERNELS:
        return None
    if base_name not in _BASE_KERNELS:
        raise ValueError(f"no FA2 padding emulation for attention kernel {base_name!r}")
    return f"{EMULATION_PREFIX}{base_name}"
