"""A larger custom configuration, as in the DeepGen backend docs' example (`deepgen_large`).

Only the fields given here differ from `deepgen.py`; everything else takes the reference defaults
(docs/engine.md, 'Config files').
Its connector and query sizes do not match the released checkpoint: it needs its own trained weights.
"""

import torch  # noqa: F401  (kept as in the docs' example)
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa: F401
from diffusers.models.transformers import SD3Transformer2DModel  # noqa: F401
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: F401

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    trust_remote_code=True,
    padding_side="right",
)

prompt_template = dict(
    IMG_START_TOKEN="<|vision_start|>",
    IMG_END_TOKEN="<|vision_end|>",
    IMG_CONTEXT_TOKEN="<|image_pad|>",
    # the other template fields take the reference defaults
)

model = dict(
    num_queries=256,  # More queries
    connector=dict(
        hidden_size=4096,  # Larger connector
        intermediate_size=16384,
        num_hidden_layers=8,
        num_attention_heads=64,
        _attn_implementation="flash_attention_2",
    ),
    # the other model fields take the reference defaults
    lora_rank=128,
    lora_alpha=256,
)
