"""Tiny random-weight DeepGen models written in the real on-disk layouts.

`write_tiny_model(DIR)` writes `DIR/ar/` (a Qwen2.5-VL folder with a locally built tokenizer),
`DIR/diffusion/` (diffusers `transformer/ vae/ scheduler/`, no text encoders: DeepGen never loads
them) and `DIR/checkpoint.safetensors` / `DIR/checkpoint.pt` with the released checkpoint's key
names (docs/engine.md, 'Checkpoint key names') at the sizes of the `deepgen_tiny` config, which keep
the invariants of docs/engine.md, 'Tiny model'. The engine
loads them through `DG_DEEPGEN_*` exactly as it loads real weights. Everything is seeded, so two
calls write the same tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from worker.deepgen.geometry import SD35_MEDIUM_TRANSFORMER, SD35_MEDIUM_VAE
from worker.deepgen.model import selected_layer_indices
from worker.deepgen.vision import CLIP_MEAN, CLIP_STD

TINY_CONFIG_NAME = "deepgen_tiny"
SEED = 20260101

# Qwen2.5's special tokens in the real tokenizer's order (ids 151643..151656 there; here they
# follow the small trained vocabulary, so code must read ids from the tokenizer and config).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2's pre-tokenizer split pattern (digits one by one, words, punctuation runs, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_TRAINING_TEXT = (
    "Generate an image: a red cat sitting on a blue chair under the sun.",
    "Make the sky purple and add two birds flying over the mountains.",
    "A photo of a small wooden house next to a lake, at night, with stars.",
    "Replace the dog with a white horse; keep the background unchanged.",
    "user assistant system image picture colour color style painting 0123456789",
)
TOKENIZER_VOCAB_SIZE = 400  # trained BPE tokens before the special tokens

TEXT_HIDDEN = 64
TEXT_LAYERS = 32  # 32..37 layers keep the six-layer pick (docs/engine.md, 'Layer picks')
VISION_HIDDEN = 32


@dataclass(frozen=True)
class TinyModelPaths:
    root: Path
    ar: Path
    diffusion: Path
    checkpoint_safetensors: Path
    checkpoint_pt: Path


def write_tiny_model(directory: Path) -> TinyModelPaths:
    """Write the tiny AR folder, diffusion folder and both checkpoint files under `directory`."""
    from worker.deepgen.configuration import load_config

    config = load_config(TINY_CONFIG_NAME)
    root = Path(directory)
    paths = TinyModelPaths(
        root=root,
        ar=root / "ar",
        diffusion=root / "diffusion",
        checkpoint_safetensors=root / "checkpoint.safetensors",
        checkpoint_pt=root / "checkpoint.pt",
    )
    root.mkdir(parents=True, exist_ok=True)
    _write_ar_folder(paths.ar)
    transformer_config = _write_diffusion_folder(paths.diffusion)
    state = tiny_checkpoint_state(
        num_queries=config.num_queries,
        text_hidden=TEXT_HIDDEN,
        num_selected_layers=len(selected_layer_indices(TEXT_LAYERS)),
        connector_hidden=config.connector.hidden_size,
        connector_intermediate=config.connector.intermediate_size,
        connector_layers=config.connector.num_hidden_layers,
        transformer_config=transformer_config,
    )
    save_file(state, str(paths.checkpoint_safetensors))
    torch.save(state, paths.checkpoint_pt)
    return paths


def tiny_env(paths: TinyModelPaths, **overrides: str) -> dict[str, str]:
    """The `DG_DEEPGEN_*` variables that point the engine at a tiny model (safetensors checkpoint).

    Overrides use the variable name without the prefix, e.g. `tiny_env(p, CHECKPOINT=str(p.checkpoint_pt))`.
    """
    env = {
        "DG_DEEPGEN_CONFIG": TINY_CONFIG_NAME,
        "DG_DEEPGEN_DIFFUSION_MODEL_PATH": str(paths.diffusion),
        "DG_DEEPGEN_AR_MODEL_PATH": str(paths.ar),
        "DG_DEEPGEN_CHECKPOINT": str(paths.checkpoint_safetensors),
        "DG_DEEPGEN_DEVICE": "cpu",
    }
    for name, value in overrides.items():
        env[f"DG_DEEPGEN_{name.upper()}"] = value
    return env


def tiny_checkpoint_state(
    *,
    num_queries: int,
    text_hidden: int,
    num_selected_layers: int,
    connector_hidden: int,
    connector_intermediate: int,
    connector_layers: int,
    transformer_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict with the released checkpoint's key families at the given sizes."""
    from diffusers.models.transformers import SD3Transformer2DModel

    generator = torch.Generator().manual_seed(SEED + 1)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    pooled_dim = int(transformer_config["pooled_projection_dim"])
    joint_dim = int(transformer_config["joint_attention_dim"])
    state: dict[str, torch.Tensor] = {
        "meta_queries": random(num_queries, text_hidden),
        "projector_1.weight": random(connector_hidden, num_selected_layers * text_hidden),
        "projector_1.bias": random(connector_hidden),
        "projector_2.weight": random(pooled_dim, connector_hidden),
        "projector_2.bias": random(pooled_dim),
        "projector_3.weight": random(joint_dim, connector_hidden),
        "projector_3.bias": random(joint_dim),
    }
    for layer in range(connector_layers):
        prefix = f"connector.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{prefix}.self_attn.{proj}.weight"] = random(connector_hidden, connector_hidden)
            state[f"{prefix}.self_attn.{proj}.bias"] = random(connector_hidden)
        for norm in ("layer_norm1", "layer_norm2"):
            state[f"{prefix}.{norm}.weight"] = 1.0 + random(connector_hidden)
            state[f"{prefix}.{norm}.bias"] = random(connector_hidden)
        state[f"{prefix}.mlp.fc1.weight"] = random(connector_intermediate, connector_hidden)
        state[f"{prefix}.mlp.fc1.bias"] = random(connector_intermediate)
        state[f"{prefix}.mlp.fc2.weight"] = random(connector_hidden, connector_intermediate)
        state[f"{prefix}.mlp.fc2.bias"] = random(connector_hidden)
    # The checkpoint carries full DiT weights (not deltas), other values than the base folder's,
    # so a test can tell that they were loaded; the sin-cos pos_embed buffer comes along.
    torch.manual_seed(SEED + 2)
    dit = SD3Transformer2DModel.from_config(dict(transformer_config))
    for name, tensor in dit.state_dict().items():
        state[f"transformer.{name}"] = tensor.detach().clone().contiguous()
    return state


def _write_ar_folder(folder: Path) -> dict[str, int]:
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    vocab_size = _round_up(len(tokenizer), 64)  # a padded vocabulary, as the real 151936 > 151665
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[2, 3, 3]),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=VISION_HIDDEN,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            out_hidden_size=TEXT_HIDDEN,
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
    ).save_pretrained(folder)
    # The real folder's image-processor settings (not used by DeepGen's own pixel path).
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return ids


def build_tokenizer():  # -> transformers.PreTrainedTokenizerBase
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_TRAINING_TEXT, trainer=trainer)
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return Qwen2Tokenizer(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,  # type: ignore[arg-type]  # annotated str, but None (no unknown token) is accepted
        bos_token=None,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )


def _write_diffusion_folder(folder: Path) -> dict[str, object]:
    # Not from the `diffusers` top level: there type checkers see the placeholder classes for installs without torch.
    from diffusers.models import AutoencoderKL
    from diffusers.models.transformers import SD3Transformer2DModel
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED + 3)
    # The released geometry (geometry.py) shrunk: same layout, tiny widths and depths.
    transformer = SD3Transformer2DModel(
        **{
            **SD35_MEDIUM_TRANSFORMER,
            "sample_size": 32,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 32,
            # 64 x 2 x 8 = 1024 px: room for fix_pixels' non-square sizes (~512^2 area) at tiny cost.
            "pos_embed_max_size": 64,
            "dual_attention_layers": (0,),
        }
    )
    transformer.save_pretrained(folder / "transformer")
    vae = AutoencoderKL(
        **{
            **SD35_MEDIUM_VAE,
            "block_out_channels": (8, 8, 8, 8),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 64,
        }
    )
    vae.save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    # A real SD3.5 folder also lists text encoders; DeepGen never loads them, so none are written.
    model_index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None],
        "text_encoder_2": [None, None],
        "text_encoder_3": [None, None],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "tokenizer_3": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return dict(transformer.config)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.deepgen.tiny DIR` (the `diffgentor tiny-model DIR` command calls this)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight DeepGen model in the real layouts."
    )
    parser.add_argument("directory", type=Path, help="where to write ar/, diffusion/ and the checkpoints")
    args = parser.parse_args(argv)
    paths = write_tiny_model(args.directory)
    for name, value in tiny_env(paths).items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
