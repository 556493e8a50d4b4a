"""Tiny test configuration: the fields of `deepgen.py` at the sizes of the tiny random model.

Used with the folders written by `worker.deepgen.tiny.write_tiny_model` (`diffgentor tiny-model DIR`).
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
    num_queries=8,
    connector=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        _attn_implementation="sdpa",
    ),
    lmm=dict(
        type=Qwen2_5_VLForConditionalGeneration.from_pretrained,
        torch_dtype=torch.bfloat16,
        attn_implementation="sdpa",
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
    lora_rank=4,
    lora_alpha=8,
)
