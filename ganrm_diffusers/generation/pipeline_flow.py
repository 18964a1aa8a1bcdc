"""Best-of-N with a GAN-RM reward model for flow-matching transformers: SD3.x and FLUX.1.

The loop is `RewardGuidedMixin.__call__` (candidates, pruning, FK, selection, outputs), the same as for UNets; this
module holds only what differs. `FlowFamilyMixin`: timesteps from sigmas (with the resolution-dependent shift `mu`
where the scheduler uses one), the Euler ODE step of `FlowMatchEulerDiscreteScheduler` or, with `eta > 0`, the
stochastic flow step of `flow_sampling` (eta is its noise level a), x0_hat = x - sigma v for pruning, decoding with
the VAE's shift. Then one small class per family for its text encoders, its latent layout and its transformer call:

    rm = GANRewardModel.from_pretrained("you/ganrm-my-style")
    pipe = RewardGuidedFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", reward_model=rm,
                                                    torch_dtype=torch.bfloat16).to("cuda")
    out = pipe("a cat", num_candidates=16, top_k=2, prune=True)

With eta = 0 (the default) a returned seed regenerates its image with the plain pipeline:
`FluxPipeline(...)(prompt, generator=torch.Generator("cpu").manual_seed(seed))` with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ganrm_diffusers.generation.flow_sampling import flow_predicted_clean, flow_step_with_log_prob
from ganrm_diffusers.generation.pipeline import PipelineInputError, RewardGuidedMixin
from ganrm_diffusers.generation.sampling import Conditioning, decode_latents
from ganrm_diffusers.reward.model import GANRewardModel


@dataclass
class FlowStepOutput:
    """One step of a flow sampler: the next latents, and the x0 prediction the step was made from (computed only
    when asked for: pruning needs it at its checkpoints, not at every step)."""

    prev_sample: torch.Tensor
    sigmas: torch.Tensor
    velocity: torch.Tensor
    step_index: int
    sample: torch.Tensor

    @property
    def pred_original_sample(self) -> torch.Tensor:
        return flow_predicted_clean(self.sigmas, self.velocity, self.step_index, self.sample)


class FlowFamilyMixin(RewardGuidedMixin):
    """What every flow-matching family shares (see the module docstring). A family class provides
    `_encode_conditioning`, `_prepare_candidate_latents`, `_velocity` (one model call for a chunk of candidates)
    and `_timestep_shift` (the `mu` its base pipeline passes to the scheduler, or None)."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def joint_attention_kwargs(self) -> dict | None:
        # The loop stores the call's `cross_attention_kwargs`; transformers call them joint attention kwargs.
        return self._cross_attention_kwargs

    def _timestep_shift(self, height: int, width: int) -> float | None:
        raise NotImplementedError

    def _default_sigmas(self, num_inference_steps: int) -> list[float] | None:
        return None

    def _resolution_shift(self, tokens: int, default_max_shift: float) -> float:
        """The schedule shift `mu` for `tokens` image tokens from the scheduler's config, with the defaults the
        family's base pipeline uses where the config has none (SD3: max_shift 1.16, FLUX: 1.15)."""
        config = self.scheduler.config
        return calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", default_max_shift),
        )

    def _prepare_timesteps(self, num_inference_steps, device, timesteps, sigmas, height, width):
        if timesteps is not None:
            raise PipelineInputError("flow-matching pipelines take `sigmas`, not `timesteps`")
        if sigmas is None and not self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = self._default_sigmas(num_inference_steps)
        mu = self._timestep_shift(height, width)
        shift = {} if mu is None else {"mu": mu}
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **shift
        )
        self.scheduler.set_begin_index(0)
        return timesteps, num_inference_steps

    def _model_output(self, latents, t, conditioning, chunk):
        velocities = [
            self._velocity(latents[start : start + chunk], t, conditioning.select(slice(start, start + chunk)))
            for start in range(0, len(latents), chunk)
        ]
        return torch.cat(velocities)

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def _denoise_step(self, model_output, t, step_index, latents, generators, eta):
        sigmas = self.scheduler.sigmas
        if eta == 0:  # the scheduler's own step: exactly the base pipeline's sampler
            prev_sample = self.scheduler.step(model_output, t, latents, return_dict=False)[0]
        else:
            prev_sample, _ = flow_step_with_log_prob(sigmas, model_output, step_index, latents, eta, None, generators)
        return FlowStepOutput(prev_sample.to(latents.dtype), sigmas, model_output, step_index, latents)

    def _check_eta(self, eta: float) -> None:
        super()._check_eta(eta)
        if eta > 0 and not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise PipelineInputError(
                f"eta > 0 (the stochastic flow step) needs FlowMatchEulerDiscreteScheduler's schedule; this pipeline "
                f"has {type(self.scheduler).__name__}: pass eta=0 or set a FlowMatchEulerDiscreteScheduler"
            )
        if eta >= 1:
            # std = eta * sqrt(sigma / (1 - sigma)) grows without bound near sigma = 1; Flow-GRPO uses 0.7, and
            # levels from 1 up are untested here, so a DDIM-style eta = 1 is refused rather than taken at its word.
            raise PipelineInputError(f"eta for flow-matching pipelines is the SDE noise level, in [0, 1); got {eta}")

    def _is_deterministic(self, eta: float) -> bool:
        return eta == 0 and not self.scheduler.config.get("stochastic_sampling", False)

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        return decode_latents(self, latents, chunk)

    def _default_image_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor


class RewardGuidedSD3Pipeline(FlowFamilyMixin, StableDiffusion3Pipeline):
    """Best-of-N Stable Diffusion 3.x with a GAN-RM reward model (see `RewardGuidedMixin.__call__`). SD3's own
    conditioning arguments prompt_2, prompt_3, negative_prompt_2, negative_prompt_3 and max_sequence_length are
    accepted as keywords; classifier-free guidance is batched [unconditional; conditional] as in the base pipeline."""

    # SD3 runs without its T5 encoder (zero T5 embeddings): a folder saved without one loads without arguments.
    _optional_components = [
        *StableDiffusion3Pipeline._optional_components,
        "text_encoder_3",
        "tokenizer_3",
        "reward_model",
    ]
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = 7.0

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
        image_encoder: object | None = None,
        feature_extractor: object | None = None,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(reward_model=reward_model)

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        max_sequence_length: int = 256,
    ) -> Conditioning:
        guided = self.do_classifier_free_guidance
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=guided,
            device=device,
            clip_skip=self.clip_skip,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
            lora_scale=(self.joint_attention_kwargs or {}).get("scale"),
        )
        if not guided:
            return Conditioning(embeds, text_embeds=pooled)
        return Conditioning(embeds, negative, pooled, negative_pooled)

    def _timestep_shift(self, height: int, width: int) -> float | None:
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        patch = self.transformer.config.patch_size
        tokens = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        return self._resolution_shift(tokens, default_max_shift=1.16)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels
        return self.prepare_latents(count, channels, height, width, dtype, device, generators)

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        guided = self.do_classifier_free_guidance
        model_input = torch.cat([latents] * 2) if guided else latents
        embeds, pooled = conditioning.prompt_embeds, conditioning.text_embeds
        if guided:
            embeds = torch.cat([conditioning.negative_prompt_embeds, embeds])
            pooled = torch.cat([conditioning.negative_text_embeds, pooled])
        velocity = self.transformer(
            hidden_states=model_input,
            timestep=t.expand(len(model_input)),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        if guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + self.guidance_scale * (conditional - unconditional)
        return velocity

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size


class RewardGuidedFluxPipeline(FlowFamilyMixin, FluxPipeline):
    """Best-of-N FLUX.1 with a GAN-RM reward model (see `RewardGuidedMixin.__call__`). `guidance_scale` is FLUX's
    distilled guidance (an input of the transformer, default 3.5; ignored by models without a guidance embedding);
    true classifier-free guidance runs when `true_cfg_scale > 1` and a `negative_prompt` is given, as in the base
    pipeline. prompt_2, negative_prompt_2, true_cfg_scale and max_sequence_length are accepted as keywords. With
    `output_type="latent"` the latents are FLUX's packed ones, as the base pipeline returns them."""

    _optional_components = [*FluxPipeline._optional_components, "reward_model"]
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = 3.5

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: object | None = None,
        feature_extractor: object | None = None,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(reward_model=reward_model)

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        max_sequence_length: int = 512,
    ) -> Conditioning:
        lora_scale = (self.joint_attention_kwargs or {}).get("scale")

        def encode(prompt: list[str], prompt_2: str | list[str] | None) -> tuple[torch.Tensor, ...]:
            return self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

        embeds, pooled, self._text_ids = encode(prompts, prompt_2)
        self._true_cfg_scale = true_cfg_scale
        if not (true_cfg_scale > 1 and negative_prompt is not None):
            return Conditioning(embeds, text_embeds=pooled)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        negative_2 = [negative_prompt_2] * len(prompts) if isinstance(negative_prompt_2, str) else negative_prompt_2
        negative, negative_pooled, self._negative_text_ids = encode(negatives, negative_2)
        return Conditioning(embeds, negative, pooled, negative_pooled)

    def _default_sigmas(self, num_inference_steps: int) -> list[float]:
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def _timestep_shift(self, height: int, width: int) -> float:
        tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        return self._resolution_shift(tokens, default_max_shift=1.15)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels // 4
        latents, self._latent_image_ids = self.prepare_latents(
            count, channels, height, width, dtype, device, generators
        )
        self._image_size = (height, width)
        return latents

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        timestep = t.expand(len(latents)).to(latents.dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([len(latents)], self.guidance_scale, device=latents.device, dtype=torch.float32)

        def call(embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=latents,
                timestep=timestep,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=self._latent_image_ids,
                joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )[0]

        velocity = call(conditioning.prompt_embeds, conditioning.text_embeds, self._text_ids)
        if conditioning.negative_prompt_embeds is None:
            return velocity
        negative = call(conditioning.negative_prompt_embeds, conditioning.negative_text_embeds, self._negative_text_ids)
        return negative + self._true_cfg_scale * (velocity - negative)

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        height, width = self._image_size
        return decode_latents(self, self._unpack_latents(latents, height, width, self.vae_scale_factor), chunk)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * 2
