"""Stochastic steps with log-probabilities for flow-matching models (SD3.x, FLUX), shared by pipelines and trainers.

A flow-matching transformer predicts a velocity v = eps - x0 along x_sigma = (1 - sigma) x0 + sigma eps, and
`FlowMatchEulerDiscreteScheduler` integrates the ODE: x' = x + (sigma' - sigma) v. That sampler is deterministic, so
it has no density to train a policy on and nothing for FK resampling to diversify. The SDE with the same marginals
(Flow-GRPO, arXiv 2505.05470) turns each step into a Gaussian:

    std_t = a * sqrt(sigma / (1 - sigma))                     (a: the noise level; 1 - sigma guarded at sigma = 1)
    mu    = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,   dt = sigma' - sigma < 0
    x'    = mu + std_t sqrt(-dt) z

Conventions (they are the DDIM sampler's, see `sampling.py`, so PRDP's beta and eps mean the same for both):
- log p(x' | x, c) is the Gaussian log-density averaged (not summed) over the latent's elements;
- gradients flow only through mu; the recorded x' is data;
- the step is computed in float32 whatever the model's dtype (bf16 would bias the policy ratio);
- noise level 0 is the Euler ODE step, computed with the scheduler's own expression (bit-identical images); it has no
  density and its log-probability is recorded as 0.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def flow_step_std(sigmas: torch.Tensor, step_index: int, noise_level: float) -> float:
    """std_t of the SDE at step `step_index` of a schedule `sigmas` (descending, ending in 0). At sigma = 1 the
    formula's 1 - sigma vanishes; as in Flow-GRPO it then uses the schedule's second sigma."""
    sigma = float(sigmas[step_index])
    if noise_level == 0 or sigma == 0:
        return 0.0
    guarded = float(sigmas[1]) if sigma >= 1 else sigma
    return noise_level * math.sqrt(sigma / (1 - guarded))


def flow_step_with_log_prob(
    sigmas: torch.Tensor,
    velocity: torch.Tensor,
    step_index: int,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow step x_sigma -> x_sigma' and its log-probability, shape (batch,), mean over the latent's elements.

    `sigmas` is the scheduler's schedule after `set_timesteps` (`scheduler.sigmas`). Draws x' with `generator` (one
    per sample) unless `prev_sample` is given; then it scores that recorded transition. Returns x' in the sample's
    dtype; gradients reach the log-probability only through mu.
    """
    dtype = sample.dtype
    sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
    dt = (sigma_next - sigma).to(torch.float32)  # the scheduler's own float32 difference, not a float64 one
    std = flow_step_std(sigmas, step_index, noise_level)
    if std == 0:
        # Exactly FlowMatchEulerDiscreteScheduler.step's expression, so noise level 0 reproduces the ODE sampler.
        mean = sample.to(torch.float32) + dt.to(sample.device) * velocity
    else:
        x, v = sample.float(), velocity.float()
        sigma, dt_value = float(sigma), float(dt)
        mean = x * (1 + std**2 / (2 * sigma) * dt_value) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt_value
    step_std = std * math.sqrt(-float(dt))
    if prev_sample is None:
        prev_sample = mean.detach()
        if step_std > 0:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            prev_sample = prev_sample + step_std * noise
    # Scored as stored (in the latents' dtype), so that rescoring a recorded step gives the recorded value.
    prev_sample = prev_sample.detach().to(dtype)
    if step_std == 0:
        return prev_sample, torch.zeros(len(sample), device=sample.device)
    log_density = -((prev_sample.float() - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - _LOG_SQRT_2PI
    return prev_sample, log_density.mean(dim=tuple(range(1, log_density.ndim)))


def flow_predicted_clean(sigmas: torch.Tensor, velocity: torch.Tensor, step_index: int, sample: torch.Tensor):
    """The predicted clean latents x0_hat = x_sigma - sigma v (what pruning judges), in the sample's dtype."""
    sigma = sigmas[step_index].to(torch.float32)
    return (sample.float() - sigma.to(sample.device) * velocity.float()).to(sample.dtype)
