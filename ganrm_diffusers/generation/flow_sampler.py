"""The trainers' sampler for flow-matching models: trajectories of the stochastic flow step (`flow_sampling`) with a
log-probability per step, for every flow family the reward-guided pipelines serve (SD3.x, FLUX.1, FLUX.2 klein,
Qwen-Image).

It drives the family's own adapter (`pipeline_flow`): prompt encoding, starting noise, the transformer call with its
guidance and decoding are the very code best-of-N runs, so a trainer samples what the pipelines sample. It offers the
interface of `sampling.DDIMLogProbSampler` (`sample`, `log_prob`, `reference_log_prob`, `stochastic_steps`,
`encode_prompts`), which is what PRDP, the examples of SFT and DPO, and evaluation use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from ganrm_diffusers.generation.flow_sampling import flow_step_std, flow_step_with_log_prob
from ganrm_diffusers.generation.lora import adapters_disabled
from ganrm_diffusers.generation.pipeline import reward_guided_class_for
from ganrm_diffusers.generation.pipeline_flow import FlowFamilyMixin
from ganrm_diffusers.generation.sampling import Conditioning, Trajectory, encode_images, seeds_per_prompt

DEFAULT_NOISE_LEVEL = 0.7  # Flow-GRPO's a; the SDE's noise level must stay below 1


def flow_adapter(pipe: DiffusionPipeline) -> FlowFamilyMixin:
    """The reward-guided pipeline of `pipe`'s flow family over the same modules, with a scheduler of its own (so the
    sampler's timesteps never change the pipeline's). Raises `UnsupportedPipelineError` for other families and
    ValueError for a UNet one."""
    family = type(pipe) if isinstance(pipe, FlowFamilyMixin) else reward_guided_class_for(_model_index(pipe))
    if not issubclass(family, FlowFamilyMixin):
        raise ValueError(f"{type(pipe).__name__} is not a flow-matching pipeline")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    adapter = family.from_pipe(pipe, scheduler=scheduler)
    adapter.set_progress_bar_config(disable=True)
    return adapter


def _model_index(pipe: DiffusionPipeline) -> dict:
    denoiser = getattr(pipe, "transformer", None)
    return {"_class_name": type(pipe).__name__, "transformer": ["diffusers", type(denoiser).__name__]}


class FlowLogProbSampler:
    """The stochastic flow step at noise level `eta` (in [0, 1)) with the family's guidance, over a flow pipeline.

    `sample` records `Trajectory`s (latents in the family's own layout, FLUX's packed ones included); `log_prob`
    scores a recorded step under a transformer (with gradients through mu; pass the accelerate-wrapped one when
    training) and `reference_log_prob` under the same transformer with its LoRA adapters disabled. `chunk_size` caps
    the samples per transformer or VAE call. Each sample's noise comes from its own `torch.Generator` seeded with its
    seed, so a sample does not depend on its batch, its chunk or the device; with eta = 0 a sample is the plain base
    pipeline's image of that seed. Family options (max_sequence_length, true_cfg_scale, ...) go in
    `conditioning_kwargs`.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        eta: float = DEFAULT_NOISE_LEVEL,
        chunk_size: int | None = None,
        generator_device: str = "cpu",
        negative_prompt: str | None = None,
        **conditioning_kwargs: object,
    ):
        if not 0 <= eta < 1:
            raise ValueError(f"eta is the flow SDE's noise level, in [0, 1); got {eta}")
        self.adapter = flow_adapter(pipe)
        self.adapter.set_call_state(guidance_scale)
        self.pipe = pipe
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.chunk_size = chunk_size
        self.generator_device = generator_device
        self.negative_prompt = negative_prompt
        self.conditioning_kwargs = conditioning_kwargs
        size = self.adapter._default_image_size()
        self._set_timesteps(size, size)

    @property
    def guidance_scale(self) -> float | None:
        return self.adapter.guidance_scale

    @property
    def transformer(self) -> torch.nn.Module:
        return self.adapter.transformer

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.adapter.scheduler

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with noise, the only ones with a log-probability to train on."""
        sigmas = self.scheduler.sigmas
        return [i for i in range(len(self.scheduler.timesteps)) if flow_step_std(sigmas, i, self.eta) > 0]

    def _set_timesteps(self, height: int, width: int) -> None:
        device = self.adapter._execution_device
        self.adapter._prepare_timesteps(self.num_inference_steps, device, None, None, height, width)
        self._size = (height, width)

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.adapter._default_image_size()
        return height or default, width or default

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Conditioning:
        """Conditioning for `num_per_prompt` samples of each prompt, prompt-major, with the family's encoders."""
        height, width = self._image_size(height, width)
        prompts = list(prompts)
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        device = self.adapter._execution_device
        rows = self.adapter._encode_conditioning(prompts, negative, height, width, device, **self.conditioning_kwargs)
        return rows.select(torch.arange(len(prompts)).repeat_interleave(num_per_prompt))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images (B, 3, H, W) in [0, 1] in the layout this sampler's trajectories have (FLUX: packed)."""
        latents = encode_images(self.adapter, images, self.chunk_size)
        return self.adapter._from_vae_latents(latents)

    def velocity(
        self, model: torch.nn.Module | None, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The family's (guided) velocity of `latents` at `timestep` under `model` (default: the transformer)."""
        chunk = self.chunk_size or len(latents)
        return self.adapter._model_output(latents, timestep, conditioning, chunk, model)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        model: torch.nn.Module | None = None,
        decode: bool = True,
    ) -> Trajectory:
        """Sample len(seeds) trajectories, len(seeds) / len(prompts) per prompt, prompt-major; seeds[i] seeds sample i."""
        prompts, seeds = list(prompts), [int(seed) for seed in seeds]
        per_prompt = seeds_per_prompt(prompts, seeds)
        height, width = self._image_size(height, width)
        self._set_timesteps(height, width)
        conditioning = self.encode_prompts(prompts, per_prompt, negative_prompt, height, width)
        generators = [torch.Generator(self.generator_device).manual_seed(seed) for seed in seeds]
        device, dtype = self.adapter._execution_device, conditioning.prompt_embeds.dtype
        latents = self.adapter._prepare_candidate_latents(len(seeds), height, width, dtype, device, generators)
        sigmas = self.scheduler.sigmas
        trajectory, log_probs = [latents], []
        for index, timestep in enumerate(self.adapter.progress_bar(self.scheduler.timesteps)):
            velocity = self.velocity(model, latents, timestep, conditioning)
            latents, log_prob = flow_step_with_log_prob(sigmas, velocity, index, latents, self.eta, None, generators)
            trajectory.append(latents)
            log_probs.append(log_prob)
        images = self.adapter._decode(latents, self.chunk_size or len(seeds)) if decode else None
        return Trajectory.recorded(
            trajectory, log_probs, self.scheduler.timesteps, conditioning, images, prompts, seeds
        )

    def log_prob(self, trajectory: Trajectory, step: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log p(x_{sigma'} | x_sigma, c) of every sample's recorded step `step` under `model` (default: the
        pipeline's transformer), shape (B,), with gradients through mu. Select a minibatch first with
        `trajectory.select`: all of `trajectory` goes through the transformer in one graph."""
        if not torch.equal(trajectory.timesteps.cpu(), self.scheduler.timesteps.cpu()):
            raise ValueError(
                "the trajectory was sampled with other timesteps (steps or image size) than this sampler's"
            )
        timestep = self.scheduler.timesteps[step]
        sample, prev_sample = trajectory.latents[:, step], trajectory.latents[:, step + 1]
        velocity = self.velocity(model, sample, timestep, trajectory.conditioning)
        return flow_step_with_log_prob(self.scheduler.sigmas, velocity, step, sample, self.eta, prev_sample)[1]

    @torch.no_grad()
    def reference_log_prob(
        self, trajectory: Trajectory, step: int, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """`log_prob` under the reference model: the same transformer with its LoRA adapters disabled."""
        model = model or self.transformer
        with adapters_disabled(model):
            return self.log_prob(trajectory, step, model)
