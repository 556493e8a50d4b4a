"""The DeepGen module tree: LLM, think queries, projectors, connector and DiT.

Attribute names are the checkpoint's key prefixes (docs/engine.md, 'Checkpoint key names'), so
`state_dict()` keys are exactly `meta_queries`, `projector_{1,2,3}.*`, `connector.*`, `transformer.*`
and `lmm.*`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.deepgen.connector import ConnectorConfig, ConnectorEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from worker.deepgen.transformer import DeepGenSD3Transformer

# At most six stacked hidden states, as DeepGen's later training code; 36 layers give six
# (docs/engine.md, 'Layer picks').
MAX_SELECTED_LAYERS = 6
SELECTED_LAYER_STRIDE = 6


def selected_layer_indices(num_hidden_layers: int) -> list[int]:
    """Indices into the LLM's `hidden_states` tuple, deepest first ([35, 29, 23, 17, 11, 5] for 36).

    Index i is the raw output of decoder layer i (index 0 is the embeddings); the final, normed state
    (index `num_hidden_layers`) is never picked.
    """
    if num_hidden_layers < 2:
        raise ValueError(f"the LLM needs at least 2 layers to pick hidden states, got {num_hidden_layers}")
    return list(range(num_hidden_layers - 1, 0, -SELECTED_LAYER_STRIDE))[:MAX_SELECTED_LAYERS]


def lmm_text_config(lmm: PreTrainedModel) -> Any:
    """The text (decoder) config of a Qwen2.5-VL model, across transformers config layouts."""
    config = lmm.config
    return getattr(config, "text_config", config)


class DeepGenModel(nn.Module):
    def __init__(
        self,
        *,
        lmm: PreTrainedModel,
        transformer: DeepGenSD3Transformer,
        connector: ConnectorConfig,
        num_queries: int,
    ) -> None:
        super().__init__()
        text_config = lmm_text_config(lmm)
        llm_hidden = int(text_config.hidden_size)
        self.layer_indices = selected_layer_indices(int(text_config.num_hidden_layers))
        self.lmm = lmm
        self.transformer = transformer
        self.meta_queries = nn.Parameter(torch.empty(num_queries, llm_hidden))
        nn.init.normal_(self.meta_queries, std=llm_hidden**-0.5)
        self.projector_1 = nn.Linear(len(self.layer_indices) * llm_hidden, connector.hidden_size)
        self.connector = ConnectorEncoder(connector)
        dit_config = transformer.config
        self.projector_2 = nn.Linear(connector.hidden_size, dit_config["pooled_projection_dim"])
        self.projector_3 = nn.Linear(connector.hidden_size, dit_config["joint_attention_dim"])

    @property
    def num_queries(self) -> int:
        return self.meta_queries.shape[0]

    def condition_dit(self, stacked_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked LLM hidden states `(B, T, n_sel*H)` -> (per-token context, pooled vector).

        Every position is kept, pads included, and the mean runs over all of them (docs/engine.md,
        'Connector and conditioning'): slicing to the queries would change the released model's behaviour.
        """
        connected = self.connector(self.projector_1(stacked_hidden))
        pooled = self.projector_2(connected.mean(dim=1))
        context = self.projector_3(connected)
        return context, pooled
