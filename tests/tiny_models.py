"""Tiny random Stable Diffusion 1.x, SDXL, SD3 and FLUX.1 pipelines built from configs, offline, for tests.

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
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

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


def tiny_vae(**overrides: object) -> AutoencoderKL:
    """The two-block autoencoder (images twice the latent size); `overrides` change its config."""
    config = {
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "sample_size": IMAGE_SIZE,
    }
    return AutoencoderKL(**{**config, **overrides})


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


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random SD3-shaped pipeline without T5 (as SD3 runs with text_encoder_3=None): two CLIP encoders with
    projections (hidden states concatenated to 64, pooled to 64), a one-layer MMDiT, a flow-matching scheduler."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN_SIZE,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,
        pos_embed_max_size=IMAGE_SIZE // 2,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A random FLUX.1-shaped pipeline: CLIP (pooled) and a tiny T5 (hidden states) with a word-level tokenizer
    built in code, one double and one single stream block, a one-channel VAE (FLUX packs 2x2 latents into 4
    channels), the distilled guidance embedding of FLUX.1-dev (or none, as FLUX.1-schnell)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(_t5_tokenizer()),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,  # a model built from a config starts in training mode: no dropout at inference
        )
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """The tiny VAE with SD3 / FLUX's latent shift (latents = (z - shift) * scale)."""
    return tiny_vae(
        latent_channels=latent_channels,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@functools.lru_cache(maxsize=1)
def _t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for T5's tokenizer (no T5 vocabulary can be downloaded): pad 0, eos 1, unk 2."""
    words = ["<pad>", "</s>", "<unk>", "a", "an", "the", "handwritten", "digit", "cat", "dog", "photo", "of"]
    words += [str(digit) for digit in range(10)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )
