"""Flow-matching Euler sampling with batched classifier-free guidance.

Order of the CFG batch, schedule and noise: docs/engine.md, 'Sampling and CFG order'.

The loaded diffusers `FlowMatchEulerDiscreteScheduler` supplies the sigmas and the Euler step, so the
schedule is diffusers' own. With guidance > 1 the DiT runs once per step on the batch
[negative; positive]; otherwise it runs the positive branch alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from worker.deepgen.cuda_graphs import dit_step
from worker.deepgen.encoding import PromptConditioning
from worker.deepgen.types import GenerationStopped, StepCallback


def initial_noise(
    *,
    batch_size: int,
    latent_channels: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The reference's starting latents: one `randn` from a fresh generator on the DiT's device and dtype.

    Drawing on the device (a CUDA generator on GPU) and directly in bf16 is what makes a seed mean the
    same noise as in the reference tool. Several images of one prompt take one draw of `batch_size`
    rows, never one draw per image (docs/engine.md, 'Several images per prompt').
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch_size, latent_channels, height // vae_scale_factor, width // vae_scale_factor)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def dynamic_shift_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """`mu` for schedulers with `use_dynamic_shifting` (not SD3.5-M), as diffusers' SD3 pipeline."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def fresh_scheduler(scheduler: Any) -> Any:
    """A new scheduler with the loaded one's config: schedulers keep per-run state (step index)."""
    return scheduler.__class__.from_config(scheduler.config)


def prepare_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, device: torch.device
) -> torch.Tensor:
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = dynamic_shift_mu(scheduler.config, image_seq_len)
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps


def denoise(
    *,
    transformer: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: PromptConditioning,
    num_inference_steps: int,
    guidance_scale: float,
    reference_latents: Sequence[torch.Tensor] = (),
    step_callback: StepCallback | None = None,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Run the Euler loop from `latents` (b, C, h, w); every sample is conditioned by all references.

    `conditioning` holds b positive and b negative rows (`PromptConditioning.repeat` for b images of
    one prompt). With guidance the DiT batch is 2b rows, `[negative_0..b-1; positive_0..b-1]`, and
    latent i sits in rows i and b + i. `step_callback` is called once per step, whatever b.
    `cuda_graphs`: on CUDA, capture the DiT forward once and replay it every step (see `cuda_graphs`).
    """
    if conditioning.batch_size != latents.shape[0]:
        raise ValueError(
            f"conditioning for {conditioning.batch_size} sample(s) but {latents.shape[0]} latent(s)"
        )
    scheduler = fresh_scheduler(scheduler)
    # The DiT's diffusers config (read by attribute, as a test double's namespace is); nn.Module
    # types unknown attributes as Tensor | Module.
    dit_config: Any = transformer.config
    patch: int = dit_config.patch_size
    image_seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
    timesteps = prepare_timesteps(scheduler, num_inference_steps, image_seq_len, latents.device)
    use_guidance = guidance_scale > 1
    if use_guidance:
        context, pooled = conditioning.negative_then_positive()
    else:
        context, pooled = conditioning.positive()
    dit_dtype = transformer.dtype
    assert isinstance(
        dit_dtype, torch.dtype
    )  # the DiT's `dtype` property (nn.Module types it Tensor | Module)
    context, pooled = context.to(dit_dtype), pooled.to(dit_dtype)
    branch_count = 2 if use_guidance else 1
    dit_batch = branch_count * latents.shape[0]
    references = [list(reference_latents)] * dit_batch if reference_latents else None
    latents_dtype = latents.dtype
    total = len(timesteps)
    dit = dit_step(
        transformer,
        encoder_hidden_states=context,
        pooled_projections=pooled,
        reference_latents=references,
        cuda_graphs=cuda_graphs,
    )
    try:
        for index, timestep in enumerate(timesteps):
            model_input = torch.cat([latents] * branch_count) if use_guidance else latents
            # `timesteps` already live on the device: no host->device copy inside a captured forward.
            velocity = dit(model_input, timestep.expand(dit_batch))
            if use_guidance:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            # The scheduler steps in fp32 and returns the model output's dtype; keep the latents' dtype.
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0].to(latents_dtype)
            if step_callback is not None and step_callback(index + 1, total):
                raise GenerationStopped(index + 1, total)
    finally:
        dit.close()  # the graph and its memory pool live for this generation only
    return latents
