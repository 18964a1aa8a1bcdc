"""The denoising objectives SFT and DPO train with, one per kind of model: how a training example is noised, what
the model must predict, and the model's (unguided, conditional) prediction.

- `UNetObjective` (SD 1.x/2.x, SDXL): DDPM noise at a uniform timestep; the target is the noise, the velocity or
  the sample, as the scheduler's `prediction_type` says.
- `FlowMatchingObjective` (SD3.x, FLUX.1): x_sigma = (1 - sigma) x0 + sigma eps with the velocity target eps - x0,
  sigma drawn as the families' own training draws it (diffusers' SD3 / FLUX scripts): u ~ logit-normal(0, 1), the
  training schedule's sigma at index u * N (the scheduler's shift included).

A "timestep" of an example is its integer position in the training schedule (0 .. N - 1), drawn per example from
its own generator (seed, epoch, example), so it does not depend on how examples are batched or split across
processes. Text encoders are frozen: each prompt is encoded once and kept (up to `PROMPT_CACHE_SIZE` prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ganrm_diffusers.generation.sampling import Conditioning

PROMPT_CACHE_SIZE = 4096  # prompts whose text-encoder outputs a run keeps (SD 1.5: about 0.24 MB each)


class DenoisingObjective:
    """What a supervised trainer needs from a model family (see the module docstring)."""

    num_train_timesteps: int

    def __init__(self, encoder: object, resolution: int | None, weight_dtype: torch.dtype):
        self.encoder = encoder  # a sampler without guidance: it encodes training prompts
        self.resolution = resolution
        self.weight_dtype = weight_dtype
        self.cache: dict[str, Conditioning] = {}  # prompt -> its Conditioning, oldest first

    def draw(self, ids: torch.Tensor, seed: int, epoch: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and a training-schedule position per example, each from its own generator (seed, epoch, example)."""
        noise, positions = [], []
        for example in ids.tolist():
            generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + example)
            positions.append(self._position(generator))
            noise.append(torch.randn(tuple(shape), generator=generator))
        return torch.stack(noise), torch.tensor(positions, dtype=torch.long)

    def _position(self, generator: torch.Generator) -> int:
        raise NotImplementedError

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the noisy latents the model sees, its training target)."""
        raise NotImplementedError

    def predict(
        self, model: torch.nn.Module, noisy: torch.Tensor, positions: torch.Tensor, texts: Sequence[str]
    ) -> torch.Tensor:
        """The model's conditional prediction for `noisy` at `positions` for prompts `texts`, in float32."""
        raise NotImplementedError

    def conditioning(self, texts: Sequence[str]) -> Conditioning:
        """The unguided conditioning of each text, from the cache where it was encoded before."""
        missing = list(dict.fromkeys(text for text in texts if text not in self.cache))
        if missing:
            encoded = self.encoder.encode_prompts(missing, height=self.resolution, width=self.resolution)
            for index, text in enumerate(missing):
                self.cache[text] = encoded.select([index])
            while len(self.cache) > PROMPT_CACHE_SIZE:
                self.cache.pop(next(iter(self.cache)))
        return Conditioning.concatenate([self.cache[text] for text in texts])


class UNetObjective(DenoisingObjective):
    """DDPM noising of SD 1.x/2.x and SDXL UNets (see the module docstring). `encoder` is a `DDIMLogProbSampler`
    without guidance; a guidance-distilled UNet is trained at the guidance it samples with (`timestep_cond`)."""

    def __init__(
        self,
        encoder: object,
        noise_scheduler: object,
        resolution: int | None,
        weight_dtype: torch.dtype,
        timestep_cond: torch.Tensor | None = None,
    ):
        super().__init__(encoder, resolution, weight_dtype)
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.timestep_cond = timestep_cond

    def _position(self, generator: torch.Generator) -> int:
        return int(torch.randint(0, self.num_train_timesteps, (1,), generator=generator))

    def noisy_and_target(self, latents, noise, positions):
        scheduler = self.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, positions)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, positions)
        if kind == "sample":
            return noisy, latents
        from ganrm_diffusers.training.config import TrainingConfigError

        raise TrainingConfigError(f"unsupported prediction type {kind!r}")

    def predict(self, model, noisy, positions, texts):
        kwargs = self.conditioning(texts).unet_kwargs(guided=False)
        if self.timestep_cond is not None:
            kwargs["timestep_cond"] = self.timestep_cond.to(noisy.device, self.weight_dtype).expand(len(texts), -1)
        return model(noisy.to(self.weight_dtype), positions, **kwargs, return_dict=False)[0].float()


class FlowMatchingObjective(DenoisingObjective):
    """Rectified-flow noising of flow-matching transformers (see the module docstring). `encoder` is a
    `FlowLogProbSampler` whose family adapter makes the transformer call: without classifier-free guidance, with
    FLUX.1-dev's distilled guidance input at the scale it samples with."""

    def __init__(
        self,
        encoder: object,
        resolution: int | None,
        weight_dtype: torch.dtype,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        super().__init__(encoder, resolution, weight_dtype)
        from diffusers import FlowMatchEulerDiscreteScheduler

        # The training schedule, as diffusers' SD3 / FLUX scripts take it: a fresh scheduler's sigmas (its static
        # shift applied where the config has one), never the inference schedule the sampler set.
        schedule = FlowMatchEulerDiscreteScheduler.from_config(encoder.scheduler.config)
        self.sigmas = schedule.sigmas.float()
        self.timesteps = schedule.timesteps.float()
        self.num_train_timesteps = len(self.timesteps)
        self.logit_mean, self.logit_std = logit_mean, logit_std
        size = resolution or encoder.adapter._default_image_size()
        # The family's latent layout for this size (FLUX keeps its packed-token positions on the adapter).
        encoder.adapter._prepare_candidate_latents(1, size, size, weight_dtype, encoder.adapter._execution_device, None)

    def _position(self, generator: torch.Generator) -> int:
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((), generator=generator))
        return min(int(u * self.num_train_timesteps), self.num_train_timesteps - 1)

    def noisy_and_target(self, latents, noise, positions):
        sigma = self.sigmas[positions.cpu()].to(latents.device, torch.float32)
        sigma = sigma.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - sigma) * latents.float() + sigma * noise.float()
        return noisy, noise.float() - latents.float()

    def predict(self, model, noisy, positions, texts):
        timesteps = self.timesteps[positions.cpu()].to(noisy.device)
        conditioning = self.conditioning(texts)
        return self.encoder.velocity(model, noisy.to(self.weight_dtype), timesteps, conditioning).float()
