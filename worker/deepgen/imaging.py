"""Latents <-> pixels through the VAE (docs/engine.md, 'Decoding' and 'Reference latents in the DiT').

Decoding follows the reference exactly. Encoding references takes a *sample* of the VAE posterior as
the reference does, but from a generator seeded with the request seed instead of the global RNG
(a deliberate deviation, docs/engine.md, 'Reference defects we fix'): the same seed then gives
byte-identical PNGs, and a job never touches process-global random state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

# Offset between the noise seed and the posterior-sample seed, so the two streams never coincide.
POSTERIOR_SEED_OFFSET = 0x5EED
# Images of one batch go through the VAE decoder one at a time: its activations at full resolution
# are the largest tensors of a generation and would grow with the batch, while the decode is a
# small share of the time (docs/engine.md, 'Several images per prompt').
DECODE_IMAGES_PER_CALL = 1


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift_factor(vae: Any) -> float:
    return float(vae.config.get("shift_factor") or 0.0)


def decode_to_images(
    vae: Any, latents: torch.Tensor, *, images_per_call: int = DECODE_IMAGES_PER_CALL
) -> list[Image.Image]:
    """Scaled latents (b, C, h, w) -> b RGB images: `clamp(127.5 x + 128, 0, 255)` truncated to uint8.

    The VAE decodes `images_per_call` latents at a time (docs/engine.md, 'Several images per prompt').
    """
    if images_per_call < 1:
        raise ValueError(f"images_per_call must be >= 1, got {images_per_call}")
    images: list[Image.Image] = []
    for chunk in latents.split(images_per_call):
        images.extend(_decode_chunk(vae, chunk))
    return images


def _decode_chunk(vae: Any, latents: torch.Tensor) -> list[Image.Image]:
    latents = latents / vae.config.scaling_factor + _shift_factor(vae)
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    # Same arithmetic (in the decoder's dtype) and truncation as the reference: ~round-half-up.
    pixels = (decoded * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array), mode="RGB") for array in arrays]


def encode_references(vae: Any, pixel_images: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Reference images (3, H, W) in [-1, 1] -> scaled latents (C, H/8, W/8), posterior samples."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed((seed + POSTERIOR_SEED_OFFSET) % 2**63)
    latents = []
    for pixels in pixel_images:
        posterior = vae.encode(pixels.unsqueeze(0).to(device, vae.dtype)).latent_dist
        sample = posterior.sample(generator=generator)
        latents.append(((sample - _shift_factor(vae)) * vae.config.scaling_factor)[0])
    return latents
