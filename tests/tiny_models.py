"""Tiny random Stable Diffusion 1.x and SDXL pipelines built from configs, offline, for tests.

Same seed, same weights: building twice gives two independent pipelines with identical parameters, which is how
tests get a "fresh pipeline" to load a saved LoRA into. The real CLIP tokenizer comes from open_clip's bundled
vocabulary. Images are 32x32 by default (16x16 latents), a few UNet calls a second on a CPU.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ganrm_diffusers.world.tokenizer import build_clip_tokenizer

TEXT_HIDDEN_SIZE = 32
IMAGE_SIZE = 32  # pixels; the two-block VAE halves it


@functools.lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def tiny_tokenizer() -> CLIPTokenizer:
    """The real 49408-token CLIP tokenizer (shared, read-only)."""
    return _tokenizer()


def tiny_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's own schedule settings."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    )


def _text_config(hidden_size: int = TEXT_HIDDEN_SIZE) -> CLIPTextConfig:
    tokenizer = tiny_tokenizer()
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_act="gelu",
    )


def tiny_sd_unet(cross_attention_dim: int = TEXT_HIDDEN_SIZE, block_out_channels: tuple[int, ...] = (32, 64)):
    """An SD-1.x-shaped UNet (cross-attention on the text encoder's hidden states), about 1 M parameters."""
    depth = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def tiny_sd_pipeline(seed: int = 0, cross_attention_dim: int = TEXT_HIDDEN_SIZE) -> StableDiffusionPipeline:
    """A random SD-1.x-shaped pipeline with a DDIM scheduler. Another `cross_attention_dim` makes another "base
    model" (as SD 2.x differs from SD 1.x): its text encoder's width follows."""
    torch.manual_seed(seed)
    unet = tiny_sd_unet(cross_attention_dim)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(_text_config(hidden_size=cross_attention_dim))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-shaped pipeline: two text encoders (hidden states concatenated to 64), pooled text embeddings
    and size/crop time ids as added conditioning, linear attention projections, a DDIM scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN_SIZE,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
    )
    vae = tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
