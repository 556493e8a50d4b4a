"""The connector between the LLM and the DiT: a stack of SigLIP-style pre-LN encoder layers.

Bidirectional attention over the whole sequence with no mask, no positional embedding and no final
norm (docs/engine.md, 'Connector and conditioning'). Parameter names match the checkpoint's
`connector.*` keys (docs/engine.md, 'Checkpoint key names').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

CONNECTOR_ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ConnectorConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"connector hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.attn_implementation not in CONNECTOR_ATTENTION_KERNELS:
            raise ValueError(
                f"connector attn_implementation must be one of {CONNECTOR_ATTENTION_KERNELS}, "
                f"got {self.attn_implementation!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ConnectorAttention(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.attn_implementation = config.attn_implementation
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        query = self._split_heads(self.q_proj(hidden_states))
        key = self._split_heads(self.k_proj(hidden_states))
        value = self._split_heads(self.v_proj(hidden_states))
        dropout = self.dropout if self.training else 0.0
        if self.attn_implementation == "eager":
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
            # Softmax in fp32 as the eager kernels of transformers do, then back to the working dtype.
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            attended = torch.matmul(weights, value)
        else:
            # Without a mask flash-attention-2 and SDPA compute the same function; SDPA picks the
            # flash kernel itself on CUDA, so "flash_attention_2" needs no flash-attn package here.
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(attended)


class ConnectorMLP(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.activation = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class ConnectorLayer(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ConnectorAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConnectorMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ConnectorEncoder(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ConnectorLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states
