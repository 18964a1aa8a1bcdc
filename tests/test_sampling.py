"""The shared DDIM sampler with log-probabilities: the step density, and that the loop is diffusers' real sampler."""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_relative_close
from diffusers import DDIMScheduler
from tiny_models import tiny_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline

from ganrm_diffusers.generation.lora import add_lora
from ganrm_diffusers.generation.sampling import DDIMLogProbSampler, ddim_step_std, ddim_step_with_log_prob

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
SEEDS = [11, 12, 13, 14]
STEPS = 4
# Our sampler against diffusers' pipeline, or a sample in another batch composition or chunking: the same values
# up to float32 accumulation order (which a few steps amplify in single elements), compared as whole vectors. A
# step with the wrong noise, seed or guidance errs by 1e-1 or more.
RTOL = 1e-4


def brute_force_step(scheduler: DDIMScheduler, eps, t: int, x, eta: float):
    """mu and sigma of the DDIM step written out from the formulas of DDIM (Song et al.), eq. 12 and 16."""
    a_t = scheduler.alphas_cumprod[t].double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_prev = scheduler.alphas_cumprod[prev_t].double() if prev_t >= 0 else scheduler.final_alpha_cumprod.double()
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0_hat = (x.double() - torch.sqrt(1 - a_t) * eps.double()) / torch.sqrt(a_t)
    mu = torch.sqrt(a_prev) * x0_hat + torch.sqrt(1 - a_prev - sigma**2) * eps.double()
    return mu, sigma


@pytest.mark.parametrize("step", [0, 5, 9])
def test_step_log_prob_is_the_gaussian_density(step):
    scheduler = tiny_scheduler()
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[step])
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    eps = torch.randn(3, 4, 8, 8, generator=generator, requires_grad=True)
    mu, sigma = brute_force_step(scheduler, eps.detach(), t, x, eta=1.0)
    # A sample near the step's distribution (spread 1.5 sigma), so that float32 keeps the density's digits.
    prev = (mu + 1.5 * sigma * torch.randn(3, 4, 8, 8, generator=generator)).float().requires_grad_()

    _, log_prob = ddim_step_with_log_prob(scheduler, eps, t, x, eta=1.0, prev_sample=prev)

    density = torch.distributions.Normal(mu, sigma).log_prob(prev.detach().double())
    # float32 against the float64 formula: float32's digits of a mean over 256 elements.
    assert_relative_close(log_prob, density.flatten(1).mean(dim=1), 1e-5, f"step {step}'s log-density")
    assert ddim_step_std(scheduler, t, 1.0) == pytest.approx(float(sigma), rel=1e-5)
    # Gradients flow through mu (the noise prediction), never into the recorded sample.
    log_prob.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert prev.grad is None


def test_drawn_step_is_the_schedulers_step():
    scheduler = tiny_scheduler()
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, log_prob = ddim_step_with_log_prob(
        scheduler, eps, t, x, eta=0.7, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]
    )
    theirs = scheduler.step(eps, t, x, eta=0.7, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    # The same step written another way (float32 both): a few ulps of the largest intermediate term.
    assert_relative_close(ours, theirs.prev_sample, 1e-5, "our DDIM step vs DDIMScheduler.step")
    # A drawn sample's density: x - mu = sigma * z, so log p = mean(-z^2 / 2) - log sigma - log sqrt(2 pi).
    mu, sigma = brute_force_step(scheduler, eps, t, x, eta=0.7)
    z = (ours.double() - mu) / sigma
    expected = (-(z**2) / 2).flatten(1).mean(dim=1) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    assert_relative_close(log_prob, expected, 1e-5, "log-density of a drawn step")


def test_deterministic_last_step_has_no_density():
    scheduler = DDIMScheduler.from_config(tiny_scheduler().config, set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(4)
    assert ddim_step_std(scheduler, scheduler.timesteps[-1], 1.0) == 0.0
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_log_prob(scheduler, eps, scheduler.timesteps[-1], x, eta=1.0, prev_sample=x)
    assert torch.equal(log_prob, torch.zeros(2))


@pytest.mark.parametrize(
    ("build", "eta", "guidance"),
    [
        (tiny_sd_pipeline, 1.0, 4.0),
        (tiny_sd_pipeline, 0.0, 4.0),
        (tiny_sd_pipeline, 1.0, 1.0),  # no classifier-free guidance: one UNet pass per step
        (tiny_sdxl_pipeline, 1.0, 4.0),
        (tiny_sdxl_pipeline, 0.0, 4.0),
        (tiny_sdxl_pipeline, 1.0, 1.0),
    ],
    ids=["sd", "sd-eta0", "sd-unguided", "sdxl", "sdxl-eta0", "sdxl-unguided"],
)
def test_sampler_is_diffusers_sampler(build, eta, guidance):
    """Same seeds, steps, eta and guidance: our trajectory ends in the latents and images of diffusers' pipeline."""
    pipe = build()
    sampler = DDIMLogProbSampler(pipe, num_inference_steps=STEPS, guidance_scale=guidance, eta=eta, chunk_size=3)
    trajectory = sampler.sample(PROMPTS, SEEDS)

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        eta=eta,
        generator=[torch.Generator().manual_seed(seed) for seed in SEEDS],
        output_type="latent",
    ).images
    assert_relative_close(trajectory.latents[:, -1], expected, RTOL, "final latents vs diffusers' pipeline")
    images = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
    expected_images = pipe.image_processor.postprocess(images, output_type="pt")
    assert_relative_close(trajectory.images, expected_images, RTOL, "images vs diffusers' pipeline")

    assert trajectory.latents.shape == (4, STEPS + 1, 4, 16, 16)
    assert trajectory.images.shape == (4, 3, 32, 32)
    assert trajectory.prompt_ids.tolist() == [0, 0, 1, 1]
    assert trajectory.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    if eta == 0:  # plain DDIM: deterministic steps, no density, nothing to train on
        assert torch.equal(trajectory.log_probs, torch.zeros(4, STEPS))
        assert sampler.stochastic_steps == []
    else:
        assert sampler.stochastic_steps == list(range(STEPS))
        assert torch.isfinite(trajectory.log_probs).all()


def test_trajectory_reproduces_from_its_seed_alone():
    pipe = tiny_sd_pipeline()
    sampler = DDIMLogProbSampler(pipe, num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0)
    batch = sampler.sample(PROMPTS, SEEDS)
    again = sampler.sample(PROMPTS, SEEDS)
    assert torch.equal(batch.latents, again.latents)
    # One sample on its own, from its seed, in another batch composition and chunking.
    alone = DDIMLogProbSampler(pipe, num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0, chunk_size=1)
    single = alone.sample([PROMPTS[1]], [SEEDS[3]])
    assert_relative_close(single.latents[0], batch.latents[3], RTOL, "a sample alone vs in a batch")
    assert_relative_close(single.log_probs[0], batch.log_probs[3], RTOL, "its log-probabilities alone vs in a batch")
    other_seed = sampler.sample([PROMPTS[1]], [SEEDS[2]])
    assert not torch.allclose(other_seed.latents[0, -1], batch.latents[3, -1], atol=1e-2)


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_recorded_steps_rescored_under_policy_and_reference(build):
    pipe = build()
    add_lora(pipe.unet, rank=4, alpha=4)
    with torch.no_grad():  # a LoRA that has "trained": lora_B away from its zero start
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    sampler = DDIMLogProbSampler(pipe, num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0)
    trajectory = sampler.sample(PROMPTS, SEEDS[:2])

    minibatch = trajectory.select([1])
    for step in range(STEPS):
        policy = sampler.log_prob(minibatch, step)
        # Rescored alone against recorded in a batch of two: another batch composition.
        assert_relative_close(policy, trajectory.log_probs[[1], step], RTOL, f"rescored step {step}")
    # The gradient reaches the LoRA weights only.
    sampler.log_prob(minibatch, 1).sum().backward()
    lora_grads = [p.grad for n, p in pipe.unet.named_parameters() if "lora_" in n]
    assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)

    # The reference is the base model: the same as a freshly built pipeline without any LoRA.
    base = DDIMLogProbSampler(build(), num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0)
    for step in (0, STEPS - 1):
        reference = sampler.reference_log_prob(minibatch, step)
        # The LoRA switched off against a UNet that never had one: another code path.
        assert_relative_close(reference, base.log_prob(minibatch, step), RTOL, f"reference at step {step}")
        assert not torch.allclose(reference, trajectory.log_probs[[1], step], atol=1e-3)
    assert all(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_sample_needs_whole_seeds_per_prompt():
    sampler = DDIMLogProbSampler(tiny_sd_pipeline(), num_inference_steps=2)
    with pytest.raises(ValueError, match="whole number of seeds per prompt"):
        sampler.sample(PROMPTS, [1, 2, 3])


def test_half_precision_trajectory_rescores_to_its_recorded_log_probs():
    """The step is computed in float32 and scored as stored, so a bf16 model's rescored steps equal the record."""
    pipe = tiny_sd_pipeline().to(torch.bfloat16)
    sampler = DDIMLogProbSampler(pipe, num_inference_steps=2, guidance_scale=1.0, eta=1.0)
    trajectory = sampler.sample(PROMPTS[:1], SEEDS[:2], decode=False)
    assert trajectory.latents.dtype == torch.bfloat16 and trajectory.log_probs.dtype == torch.float32
    for step in range(2):
        # The same bf16 UNet call on the same rows, the density in float32 of the stored sample both times: a
        # density of the unrounded float32 sample, or another UNet computation, would err at bf16's 1e-2.
        rescored = sampler.log_prob(trajectory, step)
        assert_relative_close(rescored, trajectory.log_probs[:, step], 1e-5, f"bf16 step {step} rescored")
