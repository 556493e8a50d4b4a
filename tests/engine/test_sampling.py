"""Sampling: diffusers flow-match schedule semantics, batched CFG order and the reference noise draw."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from worker.deepgen.encoding import PromptConditioning
from worker.deepgen.sampling import denoise, initial_noise, prepare_timesteps

SHIFT = 3.0


def shifted(sigma: torch.Tensor | float) -> torch.Tensor | float:
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


def test_schedule_is_the_double_shifted_linspace_of_the_reference() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    steps = 5
    timesteps = prepare_timesteps(scheduler, steps, image_seq_len=16, device=torch.device("cpu"))
    sigma_min = shifted(1 / 1000)  # already shifted training minimum, ~0.002994
    expected_sigmas = shifted(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64))
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected_sigmas, atol=1e-6, rtol=1e-6)
    assert scheduler.sigmas[-1] == 0
    torch.testing.assert_close(timesteps.double(), expected_sigmas * 1000, atol=1e-3, rtol=1e-6)


class ConstantVelocityDiT(torch.nn.Module):
    """Predicts velocity = row index + 1 for each batch row, and records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=2)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict[str, object]] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, **kwargs: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = kwargs["hidden_states"]
        self.calls.append(kwargs)
        rows = torch.arange(1, hidden.shape[0] + 1, dtype=hidden.dtype).view(-1, 1, 1, 1)
        return (rows.expand_as(hidden).clone(),)


def conditioning() -> PromptConditioning:
    # rows [positive; negative], tagged so the DiT batch order can be read back.
    context = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), -1.0)])
    return PromptConditioning(context=context, pooled=torch.tensor([[1.0], [-1.0]]))


def test_euler_steps_integrate_the_velocity_over_sigma() -> None:
    dit = ConstantVelocityDiT()
    start = torch.zeros(1, 16, 4, 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    result = denoise(
        transformer=dit,
        scheduler=scheduler,
        latents=start,
        conditioning=conditioning(),
        num_inference_steps=4,
        guidance_scale=1.0,
    )
    # One branch predicting velocity 1 everywhere: x_end = x_0 + (0 - 1) * 1.
    torch.testing.assert_close(result, torch.full_like(start, -1.0))
    assert len(dit.calls) == 4
    assert all(call["encoder_hidden_states"][0, 0, 0] == 1.0 for call in dit.calls)  # positive only


def test_cfg_batch_is_negative_then_positive_and_combined() -> None:
    dit = ConstantVelocityDiT()
    guidance = 3.0
    result = denoise(
        transformer=dit,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        latents=torch.zeros(1, 16, 4, 4),
        conditioning=conditioning(),
        num_inference_steps=2,
        guidance_scale=guidance,
    )
    first = dit.calls[0]
    assert first["encoder_hidden_states"][:, 0, 0].tolist() == [-1.0, 1.0]
    assert first["pooled_projections"][:, 0].tolist() == [-1.0, 1.0]
    assert first["timestep"].shape == (2,)
    # uncond (row 0) predicts 1, cond (row 1) predicts 2: v = 1 + g * (2 - 1).
    torch.testing.assert_close(result, torch.full((1, 16, 4, 4), -(1 + guidance)))


def test_noise_is_one_seeded_randn_on_the_run_device_and_dtype() -> None:
    noise = initial_noise(
        batch_size=1,
        latent_channels=16,
        height=64,
        width=96,
        vae_scale_factor=8,
        seed=42,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
    )
    expected = torch.randn(
        (1, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.bfloat16
    )
    assert noise.dtype == torch.bfloat16 and noise.shape == (1, 16, 8, 12)
    assert torch.equal(noise, expected)
    other_seed = initial_noise(
        batch_size=1,
        latent_channels=16,
        height=64,
        width=96,
        vae_scale_factor=8,
        seed=43,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
    )
    assert not torch.equal(noise, other_seed)


@pytest.mark.parametrize("steps", [1, 3])
def test_step_count_matches_the_request(steps: int) -> None:
    dit = ConstantVelocityDiT()
    seen: list[tuple[int, int]] = []
    denoise(
        transformer=dit,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        latents=torch.zeros(1, 16, 4, 4),
        conditioning=conditioning(),
        num_inference_steps=steps,
        guidance_scale=4.0,
        step_callback=lambda step, total: seen.append((step, total)) and None,
    )
    assert seen == [(step, steps) for step in range(1, steps + 1)]
