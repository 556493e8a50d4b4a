"""DeepGen 1.0 reference configuration (Qwen2.5-VL-3B + SD3.5-Medium-shaped DiT).

Values and fields are described in docs/engine.md, 'Config files' and 'Prompt templates'.

Values follow the released model. Fields the reference uses only for training are accepted and
reported as having no effect at inference. Paths come from the DG_DEEPGEN_* environment variables.
"""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import SD3Transformer2DModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    trust_remote_code=True,
    padding_side="right",
)

prompt_template = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
    STOP_WORDS=["<|im_end|>", "<|endoftext|>"],
    IMG_START_TOKEN="<|vision_start|>",
    IMG_END_TOKEN="<|vision_end|>",
    IMG_CONTEXT_TOKEN="<|image_pad|>",
    IMG_START_TOKEN_FOR_GENERATION=False,
    GENERATION="Generate an image: {input}",
    CFG="Generate an image.",
)

model = dict(
    num_queries=128,
    connector=dict(
        hidden_size=2048,
        intermediate_size=11946,
        num_hidden_layers=6,
        num_attention_heads=32,
        _attn_implementation="flash_attention_2",
    ),
    lmm=dict(
        type=Qwen2_5_VLForConditionalGeneration.from_pretrained,
        torch_dtype=torch.bfloat16,
        attn_implementation="flash_attention_2",
    ),
    tokenizer=tokenizer,
    prompt_template=prompt_template,
    freeze_lmm=True,
    transformer=dict(
        type=SD3Transformer2DModel.from_pretrained,
        subfolder="transformer",
        torch_dtype=torch.bfloat16,
    ),
    scheduler=dict(
        type=FlowMatchEulerDiscreteScheduler.from_pretrained,
        subfolder="scheduler",
    ),
    vae=dict(
        type=AutoencoderKL.from_pretrained,
        subfolder="vae",
        torch_dtype=torch.bfloat16,
    ),
    pretrained_pth=None,
    use_activation_checkpointing=False,
    freeze_transformer=True,
    lora_rank=64,
    lora_alpha=128,
)
