"""The trainers' flow sampler (`FlowLogProbSampler`) on tiny SD3 and FLUX.1 pipelines: noise level 0 is the plain
pipeline's sampler, the recorded log-probabilities are what rescoring gives (the policy ratio of PRDP's first inner
step is exactly 1), the reference is the LoRA switched off, and samples do not depend on their batch."""

from __future__ import annotations

import pytest
import torch
from checks import assert_relative_close
from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline

from ganrm_diffusers.generation.flow_sampler import FlowLogProbSampler
from ganrm_diffusers.generation.lora import add_lora

PROMPTS = ["a handwritten digit 3", "a photo of a cat"]
SIZE, STEPS = 32, 4
BUILDS = {"sd3": (tiny_sd3_pipeline, 4.0), "flux": (tiny_flux_pipeline, 3.5)}
RTOL = 1e-4  # another batch composition: float32 accumulation order over a few steps (see checks.py)


@pytest.fixture(scope="module", params=sorted(BUILDS))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(family: str):
    return BUILDS[family][0]()


def sampler(pipe, family: str, eta: float = 0.7, **kwargs) -> FlowLogProbSampler:
    guidance = BUILDS[family][1]
    return FlowLogProbSampler(
        pipe, num_inference_steps=STEPS, guidance_scale=guidance, eta=eta, max_sequence_length=16, **kwargs
    )


def test_noise_level_zero_is_the_plain_pipelines_sampler(family, pipe):
    trajectory = sampler(pipe, family, eta=0.0).sample(PROMPTS, [5, 6], height=SIZE, width=SIZE)
    assert torch.equal(trajectory.log_probs, torch.zeros_like(trajectory.log_probs))
    for index, seed in enumerate([5, 6]):
        plain = pipe(
            prompt=PROMPTS[index],
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=STEPS,
            guidance_scale=BUILDS[family][1],
            height=SIZE,
            width=SIZE,
            max_sequence_length=16,
            output_type="pt",
        ).images
        assert_relative_close(trajectory.images[index : index + 1], plain, RTOL, f"image of seed {seed}")


def test_rescoring_the_rollout_gives_its_log_probs_exactly(family, pipe):
    """PRDP's first inner step: the same batch, the same precision, the same weights give the recorded values bit for
    bit, so the policy ratio to theta_old is exactly 1."""
    flow = sampler(pipe, family, chunk_size=3)
    trajectory = flow.sample(PROMPTS, [1, 2, 3, 4], height=SIZE, width=SIZE)
    assert flow.stochastic_steps == list(range(STEPS))  # every step of the flow SDE has noise, the last one too
    assert torch.isfinite(trajectory.log_probs).all() and (trajectory.log_probs != 0).all()
    for step in flow.stochastic_steps:
        assert torch.equal(flow.log_prob(trajectory, step), trajectory.log_probs[:, step])


def test_the_reference_is_the_transformer_without_its_lora(family):
    pipe = BUILDS[family][0]()
    add_lora(pipe.transformer, rank=2, target_modules=("to_q", "to_k", "to_v"))
    flow = sampler(pipe, family)
    trajectory = flow.sample(PROMPTS, [7, 8], height=SIZE, width=SIZE)
    # lora_B starts at zero: the reference and the policy agree until training moves it.
    assert torch.equal(flow.reference_log_prob(trajectory, 1), flow.log_prob(trajectory, 1))
    for name, parameter in pipe.transformer.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    with torch.enable_grad():
        log_prob = flow.log_prob(trajectory, 1)
        log_prob.sum().backward()
    assert not torch.equal(flow.reference_log_prob(trajectory, 1), log_prob.detach())
    lora_grads = [p.grad for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    assert lora_grads and all(grad is not None for grad in lora_grads)
    frozen = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_a_sample_does_not_depend_on_its_batch(family, pipe):
    flow = sampler(pipe, family)
    together = flow.sample(PROMPTS, [11, 12, 13, 14], height=SIZE, width=SIZE)
    alone = flow.sample([PROMPTS[1]], [13], height=SIZE, width=SIZE)
    assert_relative_close(alone.latents, together.latents[2:3], RTOL, "the trajectory of seed 13")
    assert_relative_close(alone.images, together.images[2:3], RTOL, "the image of seed 13")


def test_a_trajectory_of_another_schedule_is_refused(family, pipe):
    flow = sampler(pipe, family)
    trajectory = flow.sample(PROMPTS[:1], [0], height=SIZE, width=SIZE)
    other = FlowLogProbSampler(pipe, num_inference_steps=STEPS + 1, guidance_scale=BUILDS[family][1])
    with pytest.raises(ValueError, match="other timesteps"):
        other.log_prob(trajectory, 0)
    with pytest.raises(ValueError, match="noise level"):
        sampler(pipe, family, eta=1.0)
