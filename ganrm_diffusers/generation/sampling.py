"""The one DDIM sampler with log-probabilities that every trainer uses (PRDP's policy view of a diffusion model).

A trajectory is B samples of T DDIM steps with eta > 0 and classifier-free guidance, recorded with everything needed
to score its transitions again later: the latents at every step, the per-step log-probabilities under the sampling
model, the timesteps, the text conditioning, the seeds and the decoded images. Works for Stable Diffusion 1.x/2.x and
SDXL pipelines (their own `encode_prompt` and `_get_add_time_ids` build the conditioning), and draws the same noise as
diffusers' pipelines for the same per-sample generators, so a trajectory is the real sampler's output.

Conventions (they rescale PRDP's beta and eps, so they live here, once):
- log p(x_{t-1} | x_t, c) is the Gaussian log-density of the DDIM step, averaged (not summed) over the latent's
  elements, as DDPO's ddim_step_with_logprob does: mu = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat,
  sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), x0_hat and eps_hat from the guided prediction;
- gradients flow only through mu: the recorded x_{t-1} is data;
- a step whose sigma is 0 (eta = 0, or the last step of a scheduler with `set_alpha_to_one=True`) is deterministic and
  has no density: its log-probability is recorded as 0, and `DDIMLogProbSampler.stochastic_steps` leaves it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from ganrm_diffusers.generation.lora import adapters_disabled

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Conditioning:
    """Text conditioning of each sample, as the UNet takes it; the negative_* halves are None without guidance.
    `text_embeds` (pooled) and `time_ids` (size and crop) are SDXL's added conditioning, None for SD 1.x/2.x."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    negative_text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    negative_time_ids: torch.Tensor | None = None
    # Qwen-Image's text attention masks (its prompts are padded to the longest); None: every token counts.
    prompt_mask: torch.Tensor | None = None
    negative_prompt_mask: torch.Tensor | None = None

    def select(self, index) -> Conditioning:
        return Conditioning(**{f.name: _take(getattr(self, f.name), index) for f in fields(self)})

    @classmethod
    def concatenate(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The conditioning of all samples of `parts`, in order (all parts built alike)."""

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return cls(**{f.name: joined(f.name) for f in fields(cls)})

    def unet_kwargs(self, guided: bool) -> dict:
        """Keyword arguments of one UNet call; a guided batch is [unconditional; conditional], as in diffusers."""

        def batch(negative: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
            return torch.cat([negative, positive]) if guided else positive

        kwargs = {"encoder_hidden_states": batch(self.negative_prompt_embeds, self.prompt_embeds)}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": batch(self.negative_text_embeds, self.text_embeds),
                "time_ids": batch(self.negative_time_ids, self.time_ids),
            }
        return kwargs


@dataclass
class Trajectory:
    """B sampled trajectories of T DDIM steps, prompt-major (samples of one prompt are consecutive).

    latents: (B, T + 1, C, h, w), x_T (the seed's noise) to x_0. log_probs: (B, T), log p(x_{t-1} | x_t, c) under the
    model that sampled. timesteps: (T,). images: (B, 3, H, W) in [0, 1], or None if not decoded. prompt_ids: (B,),
    the index of each sample's prompt in the call: PRDP pairs samples with the same id only.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning
    images: torch.Tensor | None
    prompts: list[str]
    prompt_ids: torch.Tensor
    seeds: list[int]

    @classmethod
    def recorded(
        cls,
        latents: list[torch.Tensor],
        log_probs: list[torch.Tensor],
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        images: torch.Tensor | None,
        prompts: list[str],
        seeds: list[int],
    ) -> Trajectory:
        """The trajectory a sampler recorded step by step: `latents` x_T .. x_0 and a log-probability per step, of
        len(seeds) samples of `prompts`, prompt-major (`seeds_per_prompt` each)."""
        per_prompt = seeds_per_prompt(prompts, seeds)
        return cls(
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=timesteps.clone(),
            conditioning=conditioning,
            images=images,
            prompts=[prompt for prompt in prompts for _ in range(per_prompt)],
            prompt_ids=torch.arange(len(prompts)).repeat_interleave(per_prompt),
            seeds=seeds,
        )

    def select(self, index) -> Trajectory:
        """The samples at `index` (a list or tensor of sample indices, or a slice)."""
        positions = range(len(self.seeds))[index] if isinstance(index, slice) else [int(i) for i in index]
        return Trajectory(
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            timesteps=self.timesteps,
            conditioning=self.conditioning.select(index),
            images=_take(self.images, index),
            prompts=[self.prompts[i] for i in positions],
            prompt_ids=self.prompt_ids[index],
            seeds=[self.seeds[i] for i in positions],
        )


def seeds_per_prompt(prompts: Sequence[str], seeds: Sequence[int]) -> int:
    """How many of `seeds` each prompt gets (prompt-major): a ValueError unless it is a whole number."""
    if not prompts or len(seeds) % len(prompts):
        raise ValueError(f"need a whole number of seeds per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    return len(seeds) // len(prompts)


def _take(tensor: torch.Tensor | None, index) -> torch.Tensor | None:
    if tensor is None:
        return None
    if not isinstance(index, slice):
        index = torch.as_tensor(index, dtype=torch.long, device=tensor.device)
    return tensor[index]


def ddim_step_std(scheduler: DDIMScheduler, timestep: int, eta: float) -> float:
    """sigma_t of the DDIM step from `timestep` to the previous one, with the scheduler's own schedule."""
    timestep = int(timestep)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return eta * float(scheduler._get_variance(timestep, prev_timestep)) ** 0.5


def ddim_step_with_log_prob(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and its log-probability, shape (batch,), mean over the latent's elements.

    Draws x_{t-1} with `generator` (one per sample, consumed exactly as `DDIMScheduler.step` consumes it) unless
    `prev_sample` is given; then it scores that recorded transition. Gradients reach the result only through mu.
    """
    timestep, dtype = int(timestep), sample.dtype
    # The scheduler's own step with zero noise is mu: it handles the prediction type and x0 clipping/thresholding.
    # In float32 even for half-precision models: late steps have a small sigma, and mu's rounding would dominate.
    noise_pred, sample = noise_pred.float(), sample.float()
    mean = scheduler.step(
        noise_pred, timestep, sample, eta=eta, variance_noise=torch.zeros_like(noise_pred)
    ).prev_sample
    std = ddim_step_std(scheduler, timestep, eta)
    if prev_sample is None:
        prev_sample = mean.detach()
        if eta > 0:  # diffusers draws the step's noise whenever eta > 0, even where sigma is 0
            noise = randn_tensor(noise_pred.shape, generator=generator, device=noise_pred.device, dtype=dtype)
            prev_sample = prev_sample + std * noise.float()
    # Scored as stored (in the latents' dtype), so that rescoring a recorded step gives the recorded value.
    prev_sample = prev_sample.detach().to(dtype)
    if std == 0:
        return prev_sample, torch.zeros(len(sample), device=sample.device)
    log_density = -((prev_sample.float() - mean) ** 2) / (2 * std**2) - math.log(std) - _LOG_SQRT_2PI
    return prev_sample, log_density.mean(dim=tuple(range(1, log_density.ndim)))


def is_guidance_distilled(unet_config: object) -> bool:
    """Whether a UNet takes its guidance scale as an input embedding (LCM-style `time_cond_proj_dim`): diffusers'
    pipelines then skip classifier-free guidance and pass `timestep_cond` instead."""
    return getattr(unet_config, "time_cond_proj_dim", None) is not None


def guidance_embedding(pipe: DiffusionPipeline, guidance_scale: float) -> torch.Tensor | None:
    """The `timestep_cond` of one latent, shape (1, time_cond_proj_dim), for a guidance-distilled UNet (None for
    others), as diffusers' SD/SDXL pipelines compute it: the embedding of (guidance_scale - 1)."""
    config = pipe.unet.config
    if not is_guidance_distilled(config):
        return None
    scale = torch.tensor([guidance_scale - 1.0])
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=config.time_cond_proj_dim)


def guided_noise_pred(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    guidance_scale: float,
    chunk_size: int | None = None,
    timestep_cond: torch.Tensor | None = None,
    guidance_rescale: float = 0.0,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """The scheduler's model output for `latents` at `timestep`: the UNet's prediction with classifier-free guidance
    when guidance_scale > 1 (diffusers' rule), `chunk_size` latents per UNet call (guidance doubles each call).
    With `timestep_cond` (see `guidance_embedding`) the UNet is guidance-distilled: it gets that embedding and one
    unguided pass, as in diffusers' pipelines. `guidance_rescale` and `cross_attention_kwargs` are the pipelines'
    arguments of the same names. The pipelines and every trainer's sampler call this one loop."""
    guided = guidance_scale > 1.0 and timestep_cond is None
    chunk_size = chunk_size or len(latents)
    predictions = []
    for start in range(0, len(latents), chunk_size):
        part = slice(start, start + chunk_size)
        model_input = torch.cat([latents[part]] * 2) if guided else latents[part]
        model_input = scheduler.scale_model_input(model_input, timestep)
        kwargs = conditioning.select(part).unet_kwargs(guided)
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond.to(model_input).expand(len(model_input), -1)
        prediction = unet(
            model_input, timestep, cross_attention_kwargs=cross_attention_kwargs, **kwargs, return_dict=False
        )[0]
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            if guidance_rescale > 0:
                prediction = rescale_noise_cfg(prediction, conditional, guidance_rescale=guidance_rescale)
        predictions.append(prediction)
    return torch.cat(predictions)


def _shift_factor(vae: torch.nn.Module) -> float:
    """The latent shift of SD3 / FLUX VAEs (latents = (z - shift) * scale); 0 for SD and SDXL, whose configs
    have none."""
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], float32, decoded as the pipeline decodes them (SDXL's latent statistics,
    SD3 / FLUX's shift and fp16 VAE upcasting included), `chunk_size` latents at a time. FLUX's packed latents are
    unpacked by its pipeline first."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # the fp16 SD/SDXL VAEs overflow; diffusers decodes them in float32 too
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    images = []
    try:
        for part in latents.split(chunk_size or len(latents)):
            part = part.to(vae.device, vae.dtype)
            if mean is not None and std is not None:
                shape = (1, -1, 1, 1)
                part = part * torch.tensor(std).view(shape).to(part) / vae.config.scaling_factor
                part = part + torch.tensor(mean).view(shape).to(part)
            else:
                part = part / vae.config.scaling_factor + _shift_factor(vae)
            images.append(vae.decode(part, return_dict=False)[0].float())
    finally:
        if upcast:
            vae.to(torch.float16)
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(pipe: DiffusionPipeline, images: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Latents of images (B, 3, H, W) in [0, 1], the inverse of `decode_latents`: the VAE posterior's mode, scaled
    as the UNet sees latents (SDXL's latent statistics included), float32, `chunk_size` images at a time."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    latents = []
    try:
        for part in images.split(chunk_size or len(images)):
            part = part.to(vae.device, vae.dtype) * 2 - 1
            encoded = vae.encode(part).latent_dist.mode().float()
            if mean is not None and std is not None:
                shape = (1, -1, 1, 1)
                encoded = (encoded - torch.tensor(mean).view(shape).to(encoded)) * vae.config.scaling_factor
                encoded = encoded / torch.tensor(std).view(shape).to(encoded)
            else:
                encoded = (encoded - _shift_factor(vae)) * vae.config.scaling_factor
            latents.append(encoded)
    finally:
        if upcast:
            vae.to(torch.float16)
    return torch.cat(latents)


class DDIMLogProbSampler:
    """DDIM with eta > 0 and classifier-free guidance over a diffusers SD 1.x/2.x or SDXL pipeline.

    `sample` records `Trajectory`s; `log_prob` scores a recorded step under the current UNet (with gradients through
    mu; pass the accelerate-wrapped UNet when training) and `reference_log_prob` under the same UNet with its LoRA
    adapters disabled (the frozen reference, no second copy). `chunk_size` caps the samples per UNet or VAE call
    (guidance doubles each chunk). Noise comes from one `torch.Generator(generator_device)` per sample seeded with
    its seed, so a sample does not depend on its batch, its chunk or the device.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        chunk_size: int | None = None,
        generator_device: str = "cpu",
    ):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.pipe = pipe
        # A DDIM scheduler of our own with the pipeline's schedule: the pipeline's scheduler stays as the user set it.
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.chunk_size = chunk_size
        self.generator_device = generator_device
        self.is_sdxl = pipe.unet.config.addition_embed_type == "text_time"
        self.timestep_cond = guidance_embedding(pipe, guidance_scale)  # None unless the UNet is guidance-distilled

    @property
    def guided(self) -> bool:
        # diffusers' rule for doing classifier-free guidance; guidance-distilled UNets embed the scale instead
        return self.guidance_scale > 1.0 and not is_guidance_distilled(self.pipe.unet.config)

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with sigma > 0, the only ones with a log-probability worth training on."""
        return [i for i, t in enumerate(self.scheduler.timesteps) if ddim_step_std(self.scheduler, t, self.eta) > 0]

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Conditioning:
        """Conditioning for `num_per_prompt` samples of each prompt, prompt-major, with the pipeline's encoders."""
        pipe, prompts = self.pipe, list(prompts)
        if not self.is_sdxl:
            embeds, negative = pipe.encode_prompt(prompts, pipe.device, num_per_prompt, self.guided, negative_prompt)
            return Conditioning(embeds, negative if self.guided else None)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=pipe.device,
            num_images_per_prompt=num_per_prompt,
            do_classifier_free_guidance=self.guided,
            negative_prompt=negative_prompt,
        )
        height, width = self._image_size(height, width)
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        )
        # Original and target size are the generated size, crop (0, 0): the SDXL pipeline's defaults.
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype, projection_dim)
        time_ids = time_ids.to(pipe.device).repeat(len(embeds), 1)
        if not self.guided:
            return Conditioning(embeds, text_embeds=pooled, time_ids=time_ids)
        return Conditioning(embeds, negative, pooled, negative_pooled, time_ids, time_ids)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images (B, 3, H, W) in [0, 1], as the UNet sees them (`encode_images`)."""
        return encode_images(self.pipe, images, self.chunk_size)

    def noise_pred(
        self, unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """`guided_noise_pred` with this sampler's scheduler, guidance scale and chunk size."""
        return guided_noise_pred(
            unet,
            self.scheduler,
            latents,
            timestep,
            conditioning,
            self.guidance_scale,
            self.chunk_size,
            self.timestep_cond,
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        unet: torch.nn.Module | None = None,
        decode: bool = True,
    ) -> Trajectory:
        """Sample len(seeds) trajectories, len(seeds) / len(prompts) per prompt, prompt-major; seeds[i] seeds sample i.

        The same prompts, seeds and settings give the latents of diffusers' pipeline called with
        `generator=[torch.Generator(generator_device).manual_seed(s) for s in seeds]` and a DDIM scheduler.
        """
        prompts, seeds = list(prompts), [int(seed) for seed in seeds]
        per_prompt = seeds_per_prompt(prompts, seeds)
        pipe, unet = self.pipe, unet or self.pipe.unet
        height, width = self._image_size(height, width)
        conditioning = self.encode_prompts(prompts, per_prompt, negative_prompt, height, width)
        generators = [torch.Generator(self.generator_device).manual_seed(seed) for seed in seeds]
        shape = (
            len(seeds),
            pipe.unet.config.in_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        dtype = conditioning.prompt_embeds.dtype
        latents = randn_tensor(shape, generator=generators, device=pipe.device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for timestep in pipe.progress_bar(self.scheduler.timesteps):
            noise_pred = self.noise_pred(unet, latents, timestep, conditioning)
            latents, log_prob = ddim_step_with_log_prob(
                self.scheduler, noise_pred, timestep, latents, self.eta, generator=generators
            )
            trajectory.append(latents)
            log_probs.append(log_prob)
        images = decode_latents(pipe, latents, self.chunk_size) if decode else None
        return Trajectory.recorded(
            trajectory, log_probs, self.scheduler.timesteps, conditioning, images, prompts, seeds
        )

    def log_prob(self, trajectory: Trajectory, step: int, unet: torch.nn.Module | None = None) -> torch.Tensor:
        """log p(x_{t-1} | x_t, c) of every sample's recorded step `step` under `unet` (default: the pipeline's),
        shape (B,), with gradients through mu. Select a minibatch first with `trajectory.select`: all of
        `trajectory` goes through the UNet in one graph (chunking saves no memory when gradients are kept)."""
        if not torch.equal(trajectory.timesteps.cpu(), self.scheduler.timesteps.cpu()):
            raise ValueError("the trajectory was sampled with other timesteps than this sampler's")
        timestep = self.scheduler.timesteps[step]
        sample, prev_sample = trajectory.latents[:, step], trajectory.latents[:, step + 1]
        noise_pred = self.noise_pred(unet or self.pipe.unet, sample, timestep, trajectory.conditioning)
        return ddim_step_with_log_prob(self.scheduler, noise_pred, timestep, sample, self.eta, prev_sample)[1]

    @torch.no_grad()
    def reference_log_prob(
        self, trajectory: Trajectory, step: int, unet: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """`log_prob` under the reference model: the same UNet with its LoRA adapters disabled."""
        unet = unet or self.pipe.unet
        with adapters_disabled(unet):
            return self.log_prob(trajectory, step, unet)

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return height or default, width or default
