"""The world's text-to-image model: Stable Diffusion's parts at toy size, trained on the digits.

AutoencoderKL (two blocks: images twice the latent size) + UNet2DConditionModel (cross-attention on the text
encoder's hidden states) + CLIPTextModel + the real CLIP tokenizer + DDIM, as in SD 1.x. As in SD, the text encoder
is a CLIP text tower, frozen: the world CLIP's own (see clip_training.text_encoder_from_clip). A random text encoder
would not do: prompts that differ in one token get nearly equal hidden states, and the UNet never learns to tell
them apart. Prompts are "a handwritten digit 7"; one in ten training examples gets the empty prompt, for
classifier-free guidance. Saved with `save_pretrained`, it loads with `StableDiffusionPipeline.from_pretrained(folder)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

UNCONDITIONAL_FRACTION = 0.1  # share of training examples with the empty prompt (classifier-free guidance)


def prompt_for(digit: int) -> str:
    return f"a handwritten digit {digit}"


def noise_scheduler() -> DDIMScheduler:
    """DDIM over a cosine schedule: with so few latent pixels, SD's scaled-linear schedule leaves too much signal
    at the last step for sampling from pure noise."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_vae(image_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=False,
    )


def build_unet(latent_size: int, block_out_channels: Sequence[int], cross_attention_dim: int) -> UNet2DConditionModel:
    depth = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * depth,
        up_block_types=("CrossAttnUpBlock2D",) * depth,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def train_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
) -> AutoencoderKL:
    """Fit the autoencoder to `pixels` (NCHW in [0, 1]), then set its scaling_factor so latents have unit spread."""
    images = pixels * 2 - 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    vae.train()
    progress = tqdm(range(steps), desc="world: autoencoder", leave=False)
    for _ in progress:
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        # A light KL term, as in SD: latents stay near unit scale without blurring the digits.
        loss = F.mse_loss(reconstruction, batch) + 1e-3 * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    _share_output_channels(vae)
    latents = encode(vae, pixels, scaling_factor=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def _share_output_channels(vae: AutoencoderKL) -> None:
    """The world's digits are gray: give the decoder's three output channels one shared filter (their average,
    which training has already brought close), so every decoded image is exactly grayscale RGB."""
    conv = vae.decoder.conv_out
    conv.weight.copy_(conv.weight.mean(dim=0, keepdim=True).expand_as(conv.weight))
    conv.bias.fill_(conv.bias.mean())


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """Latents (posterior means, scaled as the pipeline scales them) of NCHW pixels in [0, 1]."""
    factor = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    latents = [vae.encode(batch * 2 - 1).latent_dist.mode() for batch in pixels.split(256)]
    return torch.cat(latents) * factor


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The hidden states the pipeline feeds the UNet for each prompt (padded to the tokenizer's full length)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    prompt_states: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    ema_decay: float,
    generator: torch.Generator,
) -> None:
    """Denoising training (epsilon prediction): example i is conditioned on the text states
    `prompt_states[prompt_index[i]]`, or on the last row (the empty prompt) a tenth of the time. Ends with the
    EMA weights in `unet`, frozen."""
    scheduler = DDPMScheduler.from_config(noise_scheduler().config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    unet.train().requires_grad_(True)
    empty = len(prompt_states) - 1
    progress = tqdm(range(steps), desc="world: denoiser", leave=False)
    for _ in progress:
        batch = torch.randint(0, len(latents), (batch_size,), generator=generator)
        unconditional = torch.rand(batch_size, generator=generator) < UNCONDITIONAL_FRACTION
        states = prompt_states[torch.where(unconditional, empty, prompt_index[batch])]
        clean = latents[batch]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, states).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(unet.parameters())
        progress.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
