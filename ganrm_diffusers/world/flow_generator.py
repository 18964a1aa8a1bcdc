"""The world's second text-to-image model: Stable Diffusion 3's parts at toy size, trained by flow matching.

SD3Transformer2DModel (joint attention over latent pixels and text tokens, conditioned on a pooled text embedding
through its adaptive norms) + two CLIPTextModelWithProjection in SD3's two CLIP slots (both the world CLIP's frozen
text tower, as the SD-shaped pipeline's text encoder is) + no T5 (SD3 runs without it: the pipeline puts zero rows in
its place) + the world's CLIP tokenizer + FlowMatchEulerDiscreteScheduler. It draws in the latent space of the world's
autoencoder, the very one the SD-shaped pipeline was trained with: a second generator over the same data and latents,
so that what differs between the two is the denoiser and the sampler, as between SD 1.x and SD3.

Training is rectified flow, as SD3's: x_t = (1 - sigma) x0 + sigma eps with a logit-normal sigma, the transformer
predicts eps - x0 at timestep sigma * 1000 (what the pipeline passes it), on latents scaled exactly as the pipeline
decodes them, with the text embeddings of the pipeline's own `encode_prompt`, so training and sampling see the same
numbers. One in ten examples gets the empty prompt, SD3's default negative prompt, for classifier-free guidance.

Saved with `save_pretrained`, it loads with
`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`. Sample it with the world's
`flow_sampling_kwargs`: they include `max_sequence_length`, the number of zero T5 rows, which the pipeline otherwise
sets to 256 and which this transformer was trained with (every text token costs the joint attention and the MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from ganrm_diffusers.world.generator import UNCONDITIONAL_FRACTION, encode


@dataclass(frozen=True)
class TransformerShape:
    """The transformer's size: a few joint blocks of a few heads (about 2.3 M parameters at the defaults)."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    pos_embed_max_size: int = 16


def build_transformer(
    latent_size: int, text_dim: int, pooled_dim: int, shape: TransformerShape = TransformerShape()
) -> SD3Transformer2DModel:
    """SD3's transformer on the autoencoder's 4-channel latents, one latent pixel per patch (the latents are 8x8).
    `text_dim` and `pooled_dim` are what encode_prompt gives: both CLIP encoders' widths side by side."""
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=shape.layers,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=shape.heads * shape.head_dim,  # text tokens join the image tokens at the inner width
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=shape.pos_embed_max_size,
    )


def flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3's sampler. shift 1: SD3 shifts towards high noise (3.0) for its 128x128 latents; 64 latent pixels hold
    little, and the measured recipe (shift 1) already draws the digits."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def flow_vae(vae: AutoencoderKL, pixels: torch.Tensor) -> AutoencoderKL:
    """The world's autoencoder with SD3's latent convention filled in: StableDiffusion3Pipeline decodes
    `latents / scaling_factor + shift_factor`, so shift_factor is the mean of the training latents (SD1's convention
    has none) and scaling_factor stays the world's (1 / their spread): centred latents of unit spread."""
    latents = encode(vae, pixels, scaling_factor=1.0)
    vae.register_to_config(shift_factor=float(latents.mean()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of NCHW pixels in [0, 1] as the pipeline's latents are: decoding them gives the pixels back."""
    return (encode(vae, pixels, scaling_factor=1.0) - vae.config.shift_factor) * vae.config.scaling_factor


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    transformer: SD3Transformer2DModel,
    shift: float = 1.0,
) -> StableDiffusion3Pipeline:
    """The same text encoder and tokenizer fill both CLIP slots (SD3's CLIP-L and OpenCLIP-G); no T5."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def encode_prompts(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt embeddings (hidden states, pooled) for each prompt, as its __call__ computes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def train_transformer(
    transformer: SD3Transformer2DModel,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    ema_decay: float,
    generator: torch.Generator,
) -> list[float]:
    """Rectified-flow training: example i is conditioned on prompt `prompt_index[i]` (rows of `prompt_embeds` and
    `pooled_embeds`), or on the last row (the empty prompt) a tenth of the time. Ends with the EMA weights in
    `transformer`, frozen; returns the loss of every step."""
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = one_cycle(optimizer, learning_rate, steps)
    ema = EMAModel(transformer.parameters(), decay=ema_decay)
    transformer.train().requires_grad_(True)
    empty = len(prompt_embeds) - 1
    losses = []
    progress = tqdm(range(steps), desc="world: flow transformer", leave=False)
    for _ in progress:
        batch = torch.randint(0, len(latents), (batch_size,), generator=generator)
        unconditional = torch.rand(batch_size, generator=generator) < UNCONDITIONAL_FRACTION
        rows = torch.where(unconditional, empty, prompt_index[batch])
        loss = flow_loss(transformer, latents[batch], prompt_embeds[rows], pooled_embeds[rows], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.step(transformer.parameters())
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    ema.copy_to(transformer.parameters())
    transformer.eval().requires_grad_(False)
    return losses


def one_cycle(
    optimizer: torch.optim.Optimizer, learning_rate: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The measured recipe's schedule: one cycle warming up over a tenth of the steps (the loss flattens well before
    the end, and the low final rate settles it). At least two warm-up steps: OneCycleLR divides by zero when its
    warm-up ends on step 0 (10 steps at 10 %), so a reduced build of any length runs."""
    warmup = max(2, round(0.1 * steps))
    total = max(steps, 2 * warmup)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=total, pct_start=warmup / total
    )


def flow_loss(
    transformer: SD3Transformer2DModel,
    clean: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """||v(x_t, t) - (eps - x0)||^2 at a logit-normal sigma (SD3's default: mean 0, spread 1), the velocity the
    Euler sampler integrates from sigma 1 (noise) to 0."""
    noise = torch.randn(clean.shape, generator=generator)
    sigmas = torch.sigmoid(torch.randn(len(clean), generator=generator))
    noisy = (1 - sigmas[:, None, None, None]) * clean + sigmas[:, None, None, None] * noise
    prediction = transformer(
        hidden_states=noisy,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_embeds,
        timestep=sigmas * 1000,
    ).sample
    return F.mse_loss(prediction, noise - clean)
