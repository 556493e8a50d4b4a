"""Edit-image preparation (docs/engine.md, 'Input images and output size' and 'Vision tower inputs').

* `resize_edit_image`: the DG resize modes (LANCZOS, every side ceil'ed to a multiple of 32).
* `image_to_pixels`: uint8 RGB -> CHW tensor in [-1, 1], computed in the run dtype as the reference.
* `vision_inputs`: the 28/32 bilinear rescale, CLIP normalisation and Qwen2-VL patch order for the ViT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES: tuple[str, ...] = ("fix_pixels", "dynamic", "direct")
SIDE_MULTIPLE = 32  # VAE /8 x DiT patch 2 x ViT patch 14*2/28 all divide it
TARGET_SIDE = 512
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_PATCH = 14
VIT_TEMPORAL_PATCH = 2
VIT_SPATIAL_MERGE = 2


def ceil_to_multiple(value: float, multiple: int = SIDE_MULTIPLE) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def edit_image_size(
    width: int, height: int, mode: str, target_width: int | None = None, target_height: int | None = None
) -> tuple[int, int]:
    """(width, height) an input image is resized to before it conditions an edit."""
    if mode == "fix_pixels":
        ratio = TARGET_SIDE / math.sqrt(width * height)
        return ceil_to_multiple(width * ratio), ceil_to_multiple(height * ratio)
    if mode == "dynamic":
        longest = max(width, height)
        ratio = TARGET_SIDE / longest if longest > TARGET_SIDE else 1.0
        return ceil_to_multiple(width * ratio), ceil_to_multiple(height * ratio)
    if mode == "direct":
        if target_width is None or target_height is None:
            raise ValueError("image resize mode 'direct' needs both width and height in the request")
        return ceil_to_multiple(target_width), ceil_to_multiple(target_height)
    raise ValueError(f"unknown image resize mode {mode!r}; expected one of {RESIZE_MODES}")


def resize_edit_image(
    image: Image.Image, mode: str, target_width: int | None = None, target_height: int | None = None
) -> Image.Image:
    rgb = image.convert("RGB")
    size = edit_image_size(rgb.width, rgb.height, mode, target_width, target_height)
    if size == rgb.size:
        return rgb
    return rgb.resize(size, resample=Image.Resampling.LANCZOS)


def image_to_pixels(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB image -> (3, H, W) in [-1, 1]; the division runs in `dtype` (bf16 on CUDA) as the reference's."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).to(device=device, dtype=dtype).permute(2, 0, 1)
    return 2 * (pixels / 255) - 1


@dataclass
class VisionInputs:
    """Flattened ViT patches of one sample's reference images and their (t, h, w) patch grids."""

    patches: torch.Tensor  # (sum of t*h*w, 3 * 2 * 14 * 14)
    grid_thw: torch.Tensor  # (n_images, 3), int64
    token_counts: list[int]  # LLM tokens per image after the 2x2 merge


def qwen_patches(normalized: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(3, H, W) normalised frame -> Qwen2-VL processor patches and its (t, h, w) grid.

    The still frame is repeated on a temporal axis of 2; patches are ordered by 2x2 merge block
    (row-major), then row and column inside the block; each vector is (channel, time, y, x).
    """
    channels, height, width = normalized.shape
    grid_h, grid_w = height // VIT_PATCH, width // VIT_PATCH
    merge = VIT_SPATIAL_MERGE
    frames = normalized.unsqueeze(0).expand(VIT_TEMPORAL_PATCH, -1, -1, -1)
    blocks = frames.reshape(
        1, VIT_TEMPORAL_PATCH, channels, grid_h // merge, merge, VIT_PATCH, grid_w // merge, merge, VIT_PATCH
    )
    ordered = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = ordered.reshape(grid_h * grid_w, channels * VIT_TEMPORAL_PATCH * VIT_PATCH * VIT_PATCH)
    return patches, (1, grid_h, grid_w)


def vision_inputs(pixel_images: Sequence[torch.Tensor]) -> VisionInputs:
    """ViT inputs for the reference images, each a 32-aligned (3, H, W) tensor in [-1, 1]."""
    all_patches: list[torch.Tensor] = []
    grids: list[tuple[int, int, int]] = []
    for pixels in pixel_images:
        _, height, width = pixels.shape
        if height % SIDE_MULTIPLE or width % SIDE_MULTIPLE:
            raise ValueError(
                f"reference image sides must be multiples of {SIDE_MULTIPLE}, got {width}x{height}"
            )
        # The ViT sees the image at 28/32 of its size so that 32-pixel cells become 28 = 2 merged patches.
        scaled = F.interpolate(
            pixels.unsqueeze(0), size=(height * 7 // 8, width * 7 // 8), mode="bilinear", align_corners=False
        )[0]
        unit = (scaled + 1) / 2
        mean = torch.tensor(CLIP_MEAN, device=unit.device, dtype=unit.dtype)[:, None, None]
        std = torch.tensor(CLIP_STD, device=unit.device, dtype=unit.dtype)[:, None, None]
        patches, grid = qwen_patches((unit - mean) / std)
        all_patches.append(patches)
        grids.append(grid)
    merge_area = VIT_SPATIAL_MERGE * VIT_SPATIAL_MERGE
    return VisionInputs(
        patches=torch.cat(all_patches),
        grid_thw=torch.tensor(grids, dtype=torch.long),
        token_counts=[t * h * w // merge_area for t, h, w in grids],
    )
