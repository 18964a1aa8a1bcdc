"""Best-of-N with a GAN-RM reward model for flow-matching transformers: SD3.x, FLUX.1, FLUX.2 [klein], Qwen-Image.

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2TokenizerFast,
    Qwen3ForCausalLM,
    T5EncoderModel,
    T5TokenizerFast,
)

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

    def _timestep_shift(self, height: int, width: int, num_inference_steps: int) -> float | None:
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
        mu = self._timestep_shift(height, width, num_inference_steps)
        shift = {} if mu is None else {"mu": mu}
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **shift
        )
        self.scheduler.set_begin_index(0)
        return timesteps, num_inference_steps

    def _model_output(self, latents, t, conditioning, chunk, model: torch.nn.Module | None = None):
        velocities = [
            self._velocity(latents[start : start + chunk], t, conditioning.select(slice(start, start + chunk)), model)
            for start in range(0, len(latents), chunk)
        ]
        return torch.cat(velocities)

    def _velocity(
        self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The (guided) velocity of a chunk of latents at timestep `t` (the scheduler's units), computed by `model`:
        default the pipeline's transformer; the trainers pass theirs (accelerate-wrapped, LoRA on or off)."""
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

    def _from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w), scaled as `encode_images` gives them, in the layout the sampler works in."""
        return latents

    def _default_image_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _packed_tokens(self, height: int, width: int) -> int:
        """Image tokens of a family that packs 2x2 latent patches into one token (FLUX, Qwen-Image)."""
        return (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))

    def _decode_with(self, to_images: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, chunk: int):
        """Images in [0, 1], float32: `to_images` (a family's own latent layout and VAE call, output in [-1, 1])
        on `chunk` latents at a time."""
        images = [to_images(part.to(self.vae.device)).float() for part in latents.split(chunk)]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


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

    def _timestep_shift(self, height: int, width: int, num_inference_steps: int) -> float | None:
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        patch = self.transformer.config.patch_size
        tokens = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        return self._resolution_shift(tokens, default_max_shift=1.16)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels
        return self.prepare_latents(count, channels, height, width, dtype, device, generators)

    def _velocity(self, latents, t, conditioning, model=None):
        guided = self.do_classifier_free_guidance
        model_input = torch.cat([latents] * 2) if guided else latents
        embeds, pooled = conditioning.prompt_embeds, conditioning.text_embeds
        if guided:
            embeds = torch.cat([conditioning.negative_prompt_embeds, embeds])
            pooled = torch.cat([conditioning.negative_text_embeds, pooled])
        velocity = (model or self.transformer)(
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
        negatives = _per_prompt(negative_prompt, len(prompts))
        negative_2 = None if negative_prompt_2 is None else _per_prompt(negative_prompt_2, len(prompts))
        negative, negative_pooled, self._negative_text_ids = encode(negatives, negative_2)
        return Conditioning(embeds, negative, pooled, negative_pooled)

    def _default_sigmas(self, num_inference_steps: int) -> np.ndarray:
        return _linear_sigmas(num_inference_steps)

    def _timestep_shift(self, height: int, width: int, num_inference_steps: int) -> float:
        return self._resolution_shift(self._packed_tokens(height, width), default_max_shift=1.15)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels // 4
        latents, self._latent_image_ids = self.prepare_latents(
            count, channels, height, width, dtype, device, generators
        )
        self._image_size = (height, width)
        return latents

    def _velocity(self, latents, t, conditioning, model=None):
        timestep = t.expand(len(latents)).to(latents.dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([len(latents)], self.guidance_scale, device=latents.device, dtype=torch.float32)

        def call(embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
            return (model or self.transformer)(
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

    def _from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._pack_latents(latents, *latents.shape)  # 2x2 patches as tokens, as FLUX samples them

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * 2


class RewardGuidedFlux2KleinPipeline(FlowFamilyMixin, Flux2KleinPipeline):
    """Best-of-N FLUX.2 [klein] with a GAN-RM reward model (see `RewardGuidedMixin.__call__`). Guidance is true
    classifier-free guidance (two transformer calls) when `guidance_scale > 1` and the model is not step-distilled
    (`is_distilled`), against `negative_prompt` (default "", the base pipeline's fixed negative).
    max_sequence_length and text_encoder_out_layers (the Qwen3 layers stacked into the text embedding) are accepted
    as keywords. With `output_type="latent"` the latents are the VAE's, unpacked and de-normalised, as the base
    pipeline returns them."""

    _optional_components = ["reward_model"]
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = 4.0

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        text_encoder: Qwen3ForCausalLM,
        tokenizer: Qwen2TokenizerFast,
        transformer: Flux2Transformer2DModel,
        is_distilled: bool = False,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
        self.register_modules(reward_model=reward_model)

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
    ) -> Conditioning:
        def encode(texts: list[str]) -> torch.Tensor:
            return self.encode_prompt(
                prompt=texts,
                device=device,
                max_sequence_length=max_sequence_length,
                text_encoder_out_layers=text_encoder_out_layers,
            )[0]

        embeds = encode(prompts)
        if not self.do_classifier_free_guidance:
            return Conditioning(embeds)
        return Conditioning(
            embeds, encode(_per_prompt("" if negative_prompt is None else negative_prompt, len(prompts)))
        )

    def _default_sigmas(self, num_inference_steps: int) -> np.ndarray:
        return _linear_sigmas(num_inference_steps)

    def _timestep_shift(self, height: int, width: int, num_inference_steps: int) -> float:
        # FLUX.2's shift depends on the number of steps as well as on the image size.
        return compute_empirical_mu(self._packed_tokens(height, width), num_inference_steps)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels // 4
        latents, self._latent_ids = self.prepare_latents(count, channels, height, width, dtype, device, generators)
        self._latent_grid = (height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2))
        return latents

    def _velocity(self, latents, t, conditioning, model=None):
        timestep = t.expand(len(latents)).to(latents.dtype) / 1000
        image_ids = self._latent_ids[:1].expand(len(latents), -1, -1)  # every candidate has the same positions

        def call(embeds: torch.Tensor) -> torch.Tensor:
            return (model or self.transformer)(
                hidden_states=latents.to(self.transformer.dtype),
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=embeds,
                txt_ids=self._prepare_text_ids(embeds).to(latents.device),
                img_ids=image_ids,
                joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )[0][:, : latents.size(1)]

        velocity = call(conditioning.prompt_embeds)
        if conditioning.negative_prompt_embeds is None:
            return velocity
        negative = call(conditioning.negative_prompt_embeds)
        return negative + self.guidance_scale * (velocity - negative)

    def _output_latents(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._latent_grid
        ids = self._latent_ids[:1].expand(len(latents), -1, -1)
        patches = self._unpack_latents_with_ids(latents, ids, height, width)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(patches)
        return self._unpatchify_latents(patches * std + mean)

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        def to_images(part: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(self._output_latents(part).to(self.vae.dtype), return_dict=False)[0]

        return self._decode_with(to_images, latents, chunk)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * 2


class RewardGuidedQwenImagePipeline(FlowFamilyMixin, QwenImagePipeline):
    """Best-of-N Qwen-Image with a GAN-RM reward model (see `RewardGuidedMixin.__call__`). As in the base pipeline,
    true classifier-free guidance (with its norm rescaling) runs when `true_cfg_scale > 1` (default 4.0) and a
    `negative_prompt` is given; `guidance_scale` is the distilled-guidance input, used only by a transformer with a
    guidance embedding (which requires it). true_cfg_scale and max_sequence_length are accepted as keywords. With
    `output_type="latent"` the latents are packed, as the base pipeline returns them."""

    _optional_components = ["reward_model"]
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = None

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLQwenImage,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Qwen2Tokenizer,
        transformer: QwenImageTransformer2DModel,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self.register_modules(reward_model=reward_model)

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
        true_cfg_scale: float = 4.0,
        max_sequence_length: int = 512,
    ) -> Conditioning:
        if self.transformer.config.guidance_embeds and self.guidance_scale is None:
            raise PipelineInputError("this Qwen-Image transformer is guidance-distilled: pass guidance_scale")
        if max_sequence_length > 1024:
            raise PipelineInputError(f"max_sequence_length is at most 1024 for Qwen-Image, got {max_sequence_length}")

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.encode_prompt(prompt=texts, device=device, max_sequence_length=max_sequence_length)

        embeds, mask = encode(prompts)
        self._true_cfg_scale = true_cfg_scale
        if not (true_cfg_scale > 1 and negative_prompt is not None):
            return Conditioning(embeds, prompt_mask=mask)
        negative, negative_mask = encode(_per_prompt(negative_prompt, len(prompts)))
        return Conditioning(embeds, negative, prompt_mask=mask, negative_prompt_mask=negative_mask)

    def _default_sigmas(self, num_inference_steps: int) -> np.ndarray:
        return _linear_sigmas(num_inference_steps)

    def _timestep_shift(self, height: int, width: int, num_inference_steps: int) -> float:
        return self._resolution_shift(self._packed_tokens(height, width), default_max_shift=1.15)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        channels = self.transformer.config.in_channels // 4
        self._image_size = (height, width)
        return self.prepare_latents(count, channels, height, width, dtype, device, generators)

    def _velocity(self, latents, t, conditioning, model=None):
        count = len(latents)
        height, width = self._image_size
        shapes = [[(1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)]] * count
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([count], self.guidance_scale, device=latents.device, dtype=torch.float32)

        def call(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return (model or self.transformer)(
                hidden_states=latents,
                timestep=t.expand(count).to(latents.dtype) / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=shapes,
                attention_kwargs=self.joint_attention_kwargs or {},
                return_dict=False,
            )[0]

        velocity = call(conditioning.prompt_embeds, conditioning.prompt_mask)
        if conditioning.negative_prompt_embeds is None:
            return velocity
        negative = call(conditioning.negative_prompt_embeds, conditioning.negative_prompt_mask)
        guided = negative + self._true_cfg_scale * (velocity - negative)
        # Qwen-Image rescales the guided velocity to the conditional one's norm, token by token.
        return guided * (torch.norm(velocity, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        height, width = self._image_size
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)

        def to_images(part: torch.Tensor) -> torch.Tensor:
            video = self._unpack_latents(part, height, width, self.vae_scale_factor).to(self.vae.dtype)
            mean = torch.tensor(config.latents_mean).view(shape).to(video)
            inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(video)
            return self.vae.decode(video / inverse_std + mean, return_dict=False)[0][:, :, 0]  # one frame

        return self._decode_with(to_images, latents, chunk)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * 2


def _linear_sigmas(num_inference_steps: int) -> np.ndarray:
    """The default sigmas of FLUX.1, FLUX.2 and Qwen-Image: 1 down to 1/n, before the scheduler's shift."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def _per_prompt(value: str | list[str], count: int) -> list[str]:
    return [value] * count if isinstance(value, str) else list(value)
