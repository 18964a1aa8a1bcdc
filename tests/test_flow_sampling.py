"""The stochastic flow step with log-probabilities (generation/flow_sampling.py), against the scheduler and the math."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ganrm_diffusers.generation.flow_sampling import flow_predicted_clean, flow_step_std, flow_step_with_log_prob


def schedule(steps: int = 10, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def gaussian_velocity(x: torch.Tensor, sigma: float, mean: float, std: float) -> torch.Tensor:
    """The exact velocity E[eps - x0 | x_sigma] when the data are N(mean, std^2) per element (x0 independent of
    eps, x_sigma = (1 - sigma) x0 + sigma eps): a flow whose every marginal is known in closed form."""
    variance = (1 - sigma) ** 2 * std**2 + sigma**2
    centred = x - (1 - sigma) * mean
    expected_x0 = mean + (1 - sigma) * std**2 / variance * centred
    expected_eps = sigma / variance * centred
    return expected_eps - expected_x0


def test_noise_level_zero_is_the_schedulers_ode_step_bit_for_bit():
    scheduler, ours = schedule(), schedule()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    reference, mine = sample.clone(), sample.clone()
    weight = torch.randn(4, 4, generator=generator)
    for index, t in enumerate(scheduler.timesteps):
        # Any velocity field will do; it depends on the state, so an early difference would grow.
        velocity_ref = torch.einsum("bchw,cd->bdhw", reference, weight) * 0.3
        reference = scheduler.step(velocity_ref, t, reference, return_dict=False)[0]
        velocity = torch.einsum("bchw,cd->bdhw", mine, weight) * 0.3
        mine, log_prob = flow_step_with_log_prob(ours.sigmas, velocity, index, mine, 0.0)
        assert torch.equal(log_prob, torch.zeros(3))
    assert torch.equal(mine, reference)


def test_log_prob_is_the_gaussian_density_of_the_step_in_float64():
    scheduler = schedule()
    generator = torch.Generator().manual_seed(1)
    sample, velocity = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(2, 4, 6, 6, generator=generator)
    for index in (0, 4, len(scheduler.timesteps) - 1):  # sigma = 1 (guarded), a middle step, the last step
        prev, log_prob = flow_step_with_log_prob(scheduler.sigmas, velocity, index, sample, 0.7, generator=generator)
        sigma, sigma_next = scheduler.sigmas[index].double(), scheduler.sigmas[index + 1].double()
        dt = sigma_next - sigma
        guarded = scheduler.sigmas[1].double() if sigma >= 1 else sigma
        std = 0.7 * torch.sqrt(sigma / (1 - guarded))
        x, v = sample.double(), velocity.double()
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        density = torch.distributions.Normal(mean, std * torch.sqrt(-dt)).log_prob(prev.double())
        expected = density.flatten(1).mean(dim=1)
        assert torch.allclose(log_prob.double(), expected, rtol=1e-5, atol=1e-5), (index, log_prob, expected)
        # The draw has that mean and spread (9 * 144 standard normal values: mean within 5 / sqrt(n)).
        z = ((prev.double() - mean) / (std * torch.sqrt(-dt))).flatten()
        assert abs(float(z.mean())) < 5 / math.sqrt(len(z)) and abs(float(z.std()) - 1) < 0.1


def test_rescoring_a_recorded_step_gives_its_log_prob_with_gradients_through_the_mean_only():
    scheduler = schedule()
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 4, 4, generator=generator)
    velocity = torch.randn(2, 4, 4, 4, generator=generator, requires_grad=True)
    prev, recorded = flow_step_with_log_prob(scheduler.sigmas, velocity.detach(), 3, sample, 0.5, generator=generator)
    _, again = flow_step_with_log_prob(scheduler.sigmas, velocity, 3, sample, 0.5, prev_sample=prev)
    assert torch.equal(again.detach(), recorded)
    again.sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0 and not prev.requires_grad


def test_half_precision_inputs_are_stepped_in_float32():
    scheduler = schedule()
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 4, 4, generator=generator).bfloat16()
    velocity = torch.randn(2, 4, 4, 4, generator=generator).bfloat16()
    prev, log_prob = flow_step_with_log_prob(
        scheduler.sigmas, velocity, 5, sample, 0.7, generator=torch.Generator().manual_seed(9)
    )
    prev32, log_prob32 = flow_step_with_log_prob(
        scheduler.sigmas, velocity.float(), 5, sample.float(), 0.7, generator=torch.Generator().manual_seed(9)
    )
    assert prev.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
    assert torch.equal(prev, prev32.bfloat16())
    # Scored as stored: the bf16 sample's density, computed in float32.
    _, rescored = flow_step_with_log_prob(scheduler.sigmas, velocity.float(), 5, sample.float(), 0.7, prev.float())
    assert torch.equal(log_prob, rescored)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_the_sde_keeps_the_flows_marginals(noise_level):
    """From pure noise, with the exact velocity of N(1.5, 0.5^2) data, the stochastic steps end at that
    distribution, as the ODE does: the SDE changes the paths, not where they go. (A wrong drift correction
    shifts or widens the result by far more than the tolerance; 100 steps keep the discretisation error small.)"""
    data_mean, data_std = 1.5, 0.5
    scheduler = schedule(steps=100, shift=1.0)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 200_000, generator=generator)
    for index in range(len(scheduler.timesteps)):
        sigma = float(scheduler.sigmas[index])
        velocity = gaussian_velocity(x, sigma, data_mean, data_std)
        x, _ = flow_step_with_log_prob(scheduler.sigmas, velocity, index, x, noise_level, generator=generator)
    assert abs(float(x.mean()) - data_mean) < 0.02 and abs(float(x.std()) - data_std) < 0.02


def test_std_and_predicted_clean():
    scheduler = schedule()
    assert flow_step_std(scheduler.sigmas, 0, 0.0) == 0
    assert flow_step_std(scheduler.sigmas, 0, 0.7) > flow_step_std(scheduler.sigmas, 5, 0.7) > 0
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    sigma = scheduler.sigmas[4]
    x = (1 - sigma) * x0 + sigma * eps
    assert torch.allclose(flow_predicted_clean(scheduler.sigmas, eps - x0, 4, x), x0, atol=1e-5)
