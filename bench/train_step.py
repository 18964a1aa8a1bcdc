"""Training step time: our Diffusion-DPO trainer against a reference DPO step, and our PRDP step against our DPO
step (SD) or against a Flow-GRPO step (SD3, FLUX.1), on the same model and batch.

    python bench/train_step.py                                  # tiny SD-shaped UNet (CPU)
    python bench/train_step.py --pipeline DIR                   # any saved SD 1.x pipeline
    python bench/train_step.py --sd15 --mixed-precision fp16    # SD1.5 architecture, 512 px (GPU)
    python bench/train_step.py --family sd3|flux                # small SD3- / FLUX.1-shaped transformer (CPU)
    python bench/train_step.py --family flux --full --bf16 --gradient-checkpointing  # FLUX.1-dev's, 1024 px (GPU)

SD. The reference is the training step of diffusers' research script
(examples/research_projects/diffusion_dpo/train_diffusion_dpo.py), written here from its description, not copied:
a dataset that decodes each (winner, loser) PNG pair and transforms it (resize, centre crop, [-1, 1], the two images
stacked on the channel axis) and tokenizes the caption; then per step the VAE encodes winners and losers, the text
encoder encodes the captions, winners and losers are noised with the same noise and timestep and go through the
LoRA UNet in one call, then once more with the adapters disabled (the reference model, no gradients), and the loss
is -logsigmoid(-beta/2 * (model_diff - ref_diff)), model_diff = mse_w - mse_l of the trained UNet, ref_diff the
same of the reference; backward, gradient clipping, AdamW and the learning-rate schedule under accelerate.

SD3 and FLUX.1 (`--family`; the random pipelines of bench/best_of_n.py, small or with `--full` the real
architectures at 1024 px). The reference DPO step is the same research-script step with the flow-matching noising
of diffusers' SD3 / FLUX DreamBooth LoRA scripts, also written from their description: the pipeline's own
`encode_prompt` per step, VAE latents (z - shift_factor) * scaling_factor, winners and losers sharing noise and a
sigma drawn logit-normal(0, 1) from a FlowMatchEulerDiscreteScheduler's training schedule, x = (1 - sigma) x0 +
sigma noise, FLUX latents packed into 2x2 tokens with their image and text ids and the distilled guidance input, the
velocity target noise - x0. PRDP is compared with a Flow-GRPO step (Liu et al. 2025), written plainly here (it
imports nothing from ganrm but the shared reward model): each epoch samples N prompts x B trajectories with the SDE
step (noise level 0.7) and per-step log-probs, standardises the rewards per prompt into advantages, then takes K
gradient steps, each recomputing the log-probs of every recorded transition under the current LoRA and taking the
clipped PPO surrogate plus Flow-GRPO's KL term to the reference (`--grpo-kl-beta`, 0.04 as its SD3 configs; 0
drops it and its reference pass). Flow-GRPO's EMA of the LoRA and its reward scoring in a thread pool are left out.

The DPO runs train a rank-4 LoRA (SD: to_q, to_k, to_v, to_out.0; flow: our FLOW_TARGET_MODULES, on both sides) on
the same (winner, loser) images and captions, `--batch-size` pairs per step, same resolution, learning rate and
beta. Ours reads them as a `ganrm sample` folder. Each run has its own process; a global optimizer-step hook
timestamps every optimizer step, and the step time is the median interval after `--warmup` steps (everything a
training iteration does: data, VAE encoding where the trainer does it per step, forward, reference forward,
backward, optimizer). PRDP's (and Flow-GRPO's) step time is its epoch time (sampling B trajectories for N prompts,
reference log-probs, scoring, K gradient steps) divided by K. Peak memory is printed beside each time: CUDA's peak
allocated memory on a GPU, else the process's peak resident memory (VmHWM), both restarted at the first optimizer
step, so that loading and set-up do not count (the peak up to then is printed too).

Prints `RATIO dpo_step <ours / reference> (goal <= 1: ...)` and, for SD, `RATIO prdp_step_vs_dpo_step <PRDP step /
our DPO step> (no goal)`, for SD3 and FLUX `RATIO prdp_step_vs_flow_grpo_step <PRDP step / Flow-GRPO step> (goal <=
1: ...)`; writes bench-out/train_step.json (SD3, FLUX: train_step_<family>.json; `--out`; the format is in
bench/results.py).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from results import REPO, Comparison, add_out_argument, device_name, write_results  # noqa: E402

DPO_GOAL = 1.0  # our DPO step / the reference step
PRDP_GOAL = 1.0  # flow families: our PRDP step / the Flow-GRPO step
LEARNING_RATE = 1e-5
LORA_RANK = 4
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
WORKERS = ("reference-dpo", "ganrm-dpo", "ganrm-prdp", "flow-grpo")
FLOW_FAMILIES = ("sd3", "flux")
FAMILY_NAMES = {"sd3": "SD3", "flux": "FLUX.1"}
# Guidance of the flow runs: Flow-GRPO samples SD3 with classifier-free guidance 4.5; FLUX.1-dev takes its distilled
# guidance as an input (both sides, DPO included, as our objective and diffusers' FLUX script do).
FLOW_GUIDANCE = {"sd3": 4.5, "flux": 3.5}
SMALL_SEQUENCE_LENGTH = 16  # T5 tokens of the small configs (the tiny T5 does not need 256 / 512)
# Flow-GRPO's settings (its SD3 configs), also our PRDP's defaults where both have one: noise level, learning rate,
# weight decay, gradient clipping.
GRPO_NOISE_LEVEL = 0.7
GRPO_CLIP_RANGE = 1e-4
GRPO_ADVANTAGE_CLIP = 5.0
GRPO_KL_BETA = 0.04
GRPO_LEARNING_RATE = 3e-4
GRPO_WEIGHT_DECAY = 1e-4


# --------------------------------------------------------------------------------------------------------------
# Inputs shared by the runs


def write_candidates(folder: Path, prompts: list[str], resolution: int) -> None:
    """A `ganrm sample` folder of random images, two candidates per prompt, the first scored higher."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    records = []
    for index, prompt in enumerate(prompts):
        for candidate in range(2):
            name = f"{index:06d}_{candidate:02d}.png"
            pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
            records.append(
                {
                    "file_name": name,
                    "prompt": prompt,
                    "prompt_index": index,
                    "candidate": candidate,
                    "seed": index * 2 + candidate,
                    "score": 1.0 - candidate,
                    "rank": candidate,
                }
            )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def sd_pipeline(args: argparse.Namespace, pipeline: Path) -> int:
    """Save the random SD-shaped pipeline unless --pipeline names one; returns the image size."""
    if not args.pipeline:
        from best_of_n import SD15, SMALL, random_sd_pipeline  # the bench's own random SD-shaped pipelines

        torch.manual_seed(0)
        random_sd_pipeline(SD15 if args.sd15 else SMALL).save_pretrained(pipeline)
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    return args.resolution or unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)


def flow_pipeline(args: argparse.Namespace, pipeline: Path) -> int:
    """Save best_of_n's random SD3- / FLUX.1-shaped pipeline (small, or the real architecture with --full) unless
    --pipeline names one; returns the image size (a saved pipeline's: its transformer's sample size in pixels, where
    FLUX.1's config has none its pipeline's default 128 latents)."""
    if args.pipeline:
        vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
        transformer_config = json.loads((pipeline / "transformer" / "config.json").read_text())
        latents = transformer_config.get("sample_size", 128)
        return args.resolution or latents * 2 ** (len(vae_config["block_out_channels"]) - 1)
    from best_of_n import FLUX_FULL, FLUX_SMALL, SD3_FULL, SD3_SMALL, random_flux_pipeline, random_sd3_pipeline

    build, shape = {
        "sd3": (random_sd3_pipeline, SD3_FULL if args.full else SD3_SMALL),
        "flux": (random_flux_pipeline, FLUX_FULL if args.full else FLUX_SMALL),
    }[args.family]
    torch.manual_seed(0)
    pipe = build(shape)
    if args.mixed_precision == "bf16":  # half the folder each run reads (FLUX.1-dev's transformer: 12B weights)
        pipe.to(dtype=torch.bfloat16)
    pipe.save_pretrained(pipeline)
    return args.resolution or shape["size"]


def build_inputs(args: argparse.Namespace, workdir: Path) -> dict:
    """The pipeline folder, the pairs (a `ganrm sample` folder), a prompt file and a small reward model."""
    pipeline = Path(args.pipeline) if args.pipeline else workdir / "pipeline"
    resolution = (sd_pipeline if args.family == "sd" else flow_pipeline)(args, pipeline)

    prompts = [f"a handwritten digit {index % 10}" for index in range(args.pairs)]
    write_candidates(workdir / "candidates", prompts, resolution)
    (workdir / "prompts.txt").write_text("\n".join(sorted(set(prompts))) + "\n")
    from best_of_n import small_reward_model  # a small open_clip reward model: PRDP's scoring is not what is timed

    (workdir / "clip").mkdir()
    small_reward_model(workdir / "clip").save_pretrained(workdir / "reward_model")
    return {
        "pipeline": str(pipeline),
        "resolution": resolution,
        "candidates": str(workdir / "candidates"),
        "prompts": str(workdir / "prompts.txt"),
        "reward_model": str(workdir / "reward_model"),
    }


# --------------------------------------------------------------------------------------------------------------
# The reference DPO step (diffusers' research script's training step, written from its description)


class PairImages(torch.utils.data.Dataset):
    """(winner, loser) PNG bytes and captions, decoded and transformed per item: resize, centre crop, [-1, 1], the
    winner's 3 channels then the loser's; the caption tokenized to the tokenizer's full length, or without a
    tokenizer kept as text (the flow scripts encode captions with the pipeline's `encode_prompt`)."""

    def __init__(self, folder: Path, resolution: int, tokenizer: object | None) -> None:
        from torchvision import transforms

        groups: dict[int, list[dict]] = {}
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            record = json.loads(line)
            groups.setdefault(record["prompt_index"], []).append(record)
        self.pairs = []
        for index in sorted(groups):
            ranked = sorted(groups[index], key=lambda record: -record["score"])
            files = [(folder / ranked[side]["file_name"]).read_bytes() for side in (0, -1)]
            self.pairs.append((files[0], files[1], ranked[0]["prompt"]))
        self.tokenizer = tokenizer
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        winner, loser, caption = self.pairs[index]
        images = [self.transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in (winner, loser)]
        if self.tokenizer is None:
            return {"pixel_values": torch.cat(images), "caption": caption}
        tokens = self.tokenizer(
            caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True
        )
        return {"pixel_values": torch.cat(images), "input_ids": torch.tensor(tokens.input_ids)}


@dataclass
class ReferenceRun:
    accelerator: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    weight_dtype: torch.dtype
    vae_batch_size: int

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet


def load_frozen(path: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """The pipeline's tokenizer, text encoder, VAE, UNet and DDPM scheduler; models frozen, on `device` in `dtype`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    models = [
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        AutoencoderKL.from_pretrained(path, subfolder="vae"),
        UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
    ]
    for model in models:
        model.requires_grad_(False)
        model.to(device, dtype=dtype)
    return tokenizer, *models, DDPMScheduler.from_pretrained(path, subfolder="scheduler")


def setup_reference(inputs: dict, args: argparse.Namespace) -> ReferenceRun:
    """Accelerate, the frozen models in the mixed-precision dtype, a float32 LoRA, AdamW, a constant schedule."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    set_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_frozen(
        inputs["pipeline"], accelerator.device, weight_dtype
    )
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )
    trained = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trained:
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
    dataset = PairImages(Path(inputs["candidates"]), inputs["resolution"], tokenizer)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    return ReferenceRun(
        accelerator,
        unet,
        vae,
        text_encoder,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        dataloader,
        weight_dtype,
        vae_batch_size=2 * args.batch_size,
    )


def noised_latents(run: ReferenceRun, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Winners then losers encoded by the VAE, noised with one noise and timestep per pair; (noisy, target, t)."""
    pixels = torch.cat(pixel_values.to(run.accelerator.device, run.weight_dtype).chunk(2, dim=1))
    with torch.no_grad():
        latents = torch.cat([run.vae.encode(part).latent_dist.sample() for part in pixels.split(run.vae_batch_size)])
    latents = latents * run.vae.config.scaling_factor
    pairs = len(latents) // 2
    noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
    steps = run.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (pairs,), device=latents.device).repeat(2)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    if run.noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, run.noise_scheduler.get_velocity(latents, noise, timesteps), timesteps
    return noisy, noise, timesteps


def winner_minus_loser(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per pair: the winner's mean squared error minus the loser's."""
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    winners, losers = errors.chunk(2)
    return winners - losers


def reference_dpo_loss(run: ReferenceRun, batch: dict, beta: float) -> torch.Tensor:
    noisy, target, timesteps = noised_latents(run, batch["pixel_values"])
    with torch.no_grad():
        hidden = run.text_encoder(batch["input_ids"].to(run.accelerator.device))[0].repeat(2, 1, 1)
    model_diff = winner_minus_loser(run.unet(noisy, timesteps, hidden).sample, target)
    bare = run.accelerator.unwrap_model(run.unet)
    bare.disable_adapters()
    with torch.no_grad():
        ref_diff = winner_minus_loser(run.unet(noisy, timesteps, hidden).sample, target)
    bare.enable_adapters()
    return -F.logsigmoid(-beta / 2 * (model_diff - ref_diff)).mean()


def train_reference(run: ReferenceRun | FlowReferenceRun, steps: int, beta: float, dpo_loss: Callable) -> None:
    """`steps` optimizer steps of `dpo_loss`, the data loader restarted (reshuffled) at each epoch."""
    run.denoiser.train()
    trained = [parameter for parameter in run.denoiser.parameters() if parameter.requires_grad]
    done = 0
    while done < steps:
        for batch in run.dataloader:
            with run.accelerator.accumulate(run.denoiser):
                loss = dpo_loss(run, batch, beta)
                run.accelerator.backward(loss)
                if run.accelerator.sync_gradients:
                    run.accelerator.clip_grad_norm_(trained, 1.0)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad()
            float(loss.detach())  # logged each step, as the script does
            done += 1
            if done == steps:
                return


# --------------------------------------------------------------------------------------------------------------
# The flow families' reference side: diffusers' SD3 / FLUX.1 pipelines driven as diffusers' scripts and Flow-GRPO
# drive them (nothing from ganrm: the LoRA targets are the only thing shared with our side, on purpose)


def frozen_flow_pipeline(path: str, family: str, device: torch.device, dtype: torch.dtype) -> object:
    """diffusers' own SD3 / FLUX.1 pipeline class, every model frozen on `device` in `dtype` (a folder saved without
    SD3's T5 loads without it, as SD3 runs with zero T5 embeddings)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "flux":
        pipe = FluxPipeline.from_pretrained(path)
    else:
        index = json.loads((Path(path) / "model_index.json").read_text())
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if not (index.get(name) or [None])[0]}
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **absent)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.to(device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_flow_lora(transformer: torch.nn.Module, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """Our LoRA (rank, alpha, our flow targets) on the transformer, trained weights in float32; returns them."""
    from peft import LoraConfig

    from ganrm_diffusers.generation.lora import FLOW_TARGET_MODULES

    transformer.add_adapter(
        LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=list(FLOW_TARGET_MODULES)
        )
    )
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    for parameter in trained:
        parameter.data = parameter.data.float()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return trained


class FlowCalls:
    """How the reference side calls an SD3 / FLUX.1 pipeline's models: the pipeline's `encode_prompt`, then the
    transformer directly (SD3: classifier-free guidance as one doubled batch when `guided`; FLUX: 2x2-packed latent
    tokens with their image and text ids, timesteps / 1000 and the distilled guidance input). Conditioning is a tuple
    of per-sample tensors (embeds, pooled[, negative, negative pooled]), so rows select with one index."""

    def __init__(self, pipe: object, family: str, resolution: int, args: argparse.Namespace) -> None:
        from diffusers import FluxPipeline

        self.pipe, self.family, self.resolution = pipe, family, resolution
        self.guidance_scale = args.guidance_scale
        self.text_kwargs = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
        transformer = pipe.transformer
        self.device, self.dtype = transformer.device, transformer.dtype
        self.text_ids = None  # FLUX: set by `encode` (one row per text token, the same for every prompt)
        self.image_ids = None
        if family == "flux":
            tokens = resolution // pipe.vae_scale_factor // 2
            self.image_ids = FluxPipeline._prepare_latent_image_ids(None, tokens, tokens, self.device, self.dtype)

    def classifier_free(self, guided: bool) -> bool:
        return guided and self.family == "sd3" and self.guidance_scale > 1

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool) -> tuple[torch.Tensor, ...]:
        if self.family == "flux":
            embeds, pooled, self.text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, **self.text_kwargs
            )
            return embeds, pooled
        cfg = self.classifier_free(guided)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=cfg,
            **self.text_kwargs,
        )
        return (embeds, pooled, negative, negative_pooled) if cfg else (embeds, pooled)

    def velocity(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: tuple[torch.Tensor, ...],
        guided: bool,
    ) -> torch.Tensor:
        """The transformer's velocity of `latents` (FLUX: packed) at `timesteps` (the scheduler's units)."""
        embeds, pooled = conditioning[:2]
        if self.family == "flux":
            guidance = None
            if self.pipe.transformer.config.guidance_embeds:
                guidance = torch.full((len(latents),), self.guidance_scale, device=latents.device)
            return model(
                hidden_states=latents,
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=self.text_ids,
                img_ids=self.image_ids,
                return_dict=False,
            )[0]
        if not self.classifier_free(guided):
            return model(
                hidden_states=latents,
                timestep=timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        negative, negative_pooled = conditioning[2:]
        both = model(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([negative, embeds]),
            pooled_projections=torch.cat([negative_pooled, pooled]),
            return_dict=False,
        )[0]
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def predict(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: tuple
    ) -> torch.Tensor:
        """The unguided velocity of VAE-shaped latents (B, C, h, w): FLUX packs them and unpacks its prediction."""
        if self.family != "flux":
            return self.velocity(model, noisy, timesteps, conditioning, guided=False)
        from diffusers import FluxPipeline

        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
        velocity = self.velocity(model, packed, timesteps, conditioning, guided=False)
        factor = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * factor, width * factor, factor)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of images in [-1, 1], sampled from the posterior: (z - shift_factor) * scaling_factor."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def initial_latents(self, count: int) -> torch.Tensor:
        """Gaussian starting latents in the family's sampling layout (drawn on the device)."""
        channels = self.pipe.transformer.config.in_channels
        size = self.resolution
        if self.family == "flux":
            return self.pipe.prepare_latents(count, channels // 4, size, size, self.dtype, self.device, None)[0]
        return self.pipe.prepare_latents(count, channels, size, size, self.dtype, self.device, None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32."""
        vae = self.pipe.vae
        if self.family == "flux":
            from diffusers import FluxPipeline

            latents = FluxPipeline._unpack_latents(
                latents, self.resolution, self.resolution, self.pipe.vae_scale_factor
            )
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(latents, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


@dataclass
class FlowReferenceRun:
    accelerator: object
    transformer: torch.nn.Module
    calls: FlowCalls
    schedule: object  # the training schedule: a fresh FlowMatchEulerDiscreteScheduler's timesteps and sigmas
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer


def setup_flow_reference(inputs: dict, args: argparse.Namespace) -> FlowReferenceRun:
    """As setup_reference, with the family's pipeline, our flow LoRA targets and the training schedule of diffusers'
    SD3 / FLUX scripts (a copy of the pipeline's scheduler, never set to inference steps)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    set_seed(0)
    pipe = frozen_flow_pipeline(inputs["pipeline"], args.family, accelerator.device, weight_dtype)
    trained = add_flow_lora(pipe.transformer, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
    dataset = PairImages(Path(inputs["candidates"]), inputs["resolution"], tokenizer=None)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    calls = FlowCalls(pipe, args.family, inputs["resolution"], args)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        pipe.transformer, optimizer, dataloader, lr_scheduler
    )
    schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return FlowReferenceRun(accelerator, transformer, calls, schedule, optimizer, lr_scheduler, dataloader)


def reference_flow_dpo_loss(run: FlowReferenceRun, batch: dict, beta: float) -> torch.Tensor:
    """Winners then losers encoded by the VAE and noised with one noise and sigma per pair, the captions encoded,
    the LoRA transformer then the same with its adapters disabled, against the velocity target noise - x0."""
    pixels = torch.cat(batch["pixel_values"].chunk(2, dim=1))
    latents = run.calls.encode_pixels(pixels)
    pairs = len(latents) // 2
    noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
    # logit-normal(0, 1) positions in the training schedule, as the scripts' "logit_normal" weighting scheme draws
    u = torch.sigmoid(torch.randn(pairs))
    indices = (u * run.schedule.config.num_train_timesteps).long().repeat(2)
    timesteps = run.schedule.timesteps[indices].to(latents.device)
    sigmas = run.schedule.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    target = noise - latents
    conditioning = tuple(torch.cat([part, part]) for part in run.calls.encode(batch["caption"], guided=False))
    model_diff = winner_minus_loser(run.calls.predict(run.transformer, noisy, timesteps, conditioning), target)
    bare = run.accelerator.unwrap_model(run.transformer)
    bare.disable_adapters()
    with torch.no_grad():
        ref_diff = winner_minus_loser(run.calls.predict(run.transformer, noisy, timesteps, conditioning), target)
    bare.enable_adapters()
    return -F.logsigmoid(-beta / 2 * (model_diff - ref_diff)).mean()


# --------------------------------------------------------------------------------------------------------------
# The Flow-GRPO step (Liu et al. 2025, github.com/yifan123/flow_grpo), written plainly


def sde_step(
    sigmas: list[float],
    index: int,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Flow-GRPO's SDE step x_sigma -> x_sigma' in float32: (x', log p(x' | x) averaged over the latent's elements
    with gradients through the mean, the mean, the step's std). Draws x' unless `prev_sample` is given. `sigmas` is
    the schedule as Python floats: no device round trip per step."""
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    dt = sigma_next - sigma
    # std_t = a sqrt(sigma / (1 - sigma)), with the schedule's second sigma at sigma = 1
    std = noise_level * math.sqrt(sigma / (1 - (sigmas[1] if sigma >= 1 else sigma)))
    x, v = sample.float(), velocity.float()
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std * math.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + step_std * torch.randn_like(mean)
    prev_sample = prev_sample.detach().float()
    log_prob = -((prev_sample - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, step_std


@dataclass
class Rollout:
    """An epoch's samples, prompt-major: latents before and after each step, their log-probs under the sampling
    LoRA, each sample's conditioning, its advantage (its reward standardised within its prompt)."""

    latents: torch.Tensor  # (n, T + 1, ...), float32
    log_probs: torch.Tensor  # (n, T)
    conditioning: tuple[torch.Tensor, ...]
    advantages: torch.Tensor  # (n,)


@dataclass
class GRPORun:
    accelerator: object
    transformer: torch.nn.Module
    calls: FlowCalls
    schedule: object  # the sampling schedule: a FlowMatchEulerDiscreteScheduler set to T steps
    sigmas: list[float]  # its sigmas
    optimizer: torch.optim.Optimizer
    trained: list[torch.nn.Parameter]
    reward_model: torch.nn.Module
    prompts: list[str]


def sampling_schedule(pipe: object, family: str, steps: int, resolution: int, device: torch.device) -> object:
    """The base pipeline's schedule of `steps` steps: FLUX's linear sigmas with its resolution-dependent shift mu
    (SD3's static shift; mu where its scheduler shifts dynamically)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = scheduler.config
    patch = 2 if family == "flux" else pipe.transformer.config.patch_size
    tokens = (resolution // pipe.vae_scale_factor // patch) ** 2
    mu = calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15 if family == "flux" else 1.16),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps) if family == "flux" else None
    scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
    return scheduler


def setup_grpo(inputs: dict, args: argparse.Namespace) -> GRPORun:
    """Accelerate accumulating over every (batch, step) piece of a gradient step, as Flow-GRPO accumulates over
    timesteps; the frozen models in the mixed-precision dtype, the same float32 LoRA, AdamW, the reward model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ganrm_diffusers.reward.model import GANRewardModel  # the reward model both sides score with

    samples = args.prdp_prompts * args.prdp_samples
    pieces = math.ceil(samples / args.batch_size) * args.prdp_steps
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=pieces)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    set_seed(0)
    pipe = frozen_flow_pipeline(inputs["pipeline"], args.family, accelerator.device, weight_dtype)
    trained = add_flow_lora(pipe.transformer, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(
        trained, lr=GRPO_LEARNING_RATE, betas=(0.9, 0.999), weight_decay=GRPO_WEIGHT_DECAY, eps=1e-8
    )
    calls = FlowCalls(pipe, args.family, inputs["resolution"], args)
    schedule = sampling_schedule(pipe, args.family, args.prdp_steps, inputs["resolution"], accelerator.device)
    transformer, optimizer = accelerator.prepare(pipe.transformer, optimizer)
    reward_model = GANRewardModel.from_pretrained(inputs["reward_model"]).to(accelerator.device).eval()
    prompts = Path(inputs["prompts"]).read_text().splitlines()
    sigmas = schedule.sigmas.tolist()
    return GRPORun(accelerator, transformer, calls, schedule, sigmas, optimizer, trained, reward_model, prompts)


@torch.no_grad()
def grpo_sample(run: GRPORun, texts: list[str]) -> tuple:
    """One sampling batch: (latents (n, T + 1, ...), log-probs (n, T), conditioning, images)."""
    conditioning = run.calls.encode(texts, guided=True)
    latents = run.calls.initial_latents(len(texts)).float()
    trajectory, log_probs = [latents], []
    for index, timestep in enumerate(run.schedule.timesteps):
        with run.accelerator.autocast():
            velocity = run.calls.velocity(
                run.transformer, latents, timestep.expand(len(texts)), conditioning, guided=True
            )
        latents, log_prob, _, _ = sde_step(run.sigmas, index, latents, velocity, GRPO_NOISE_LEVEL)
        trajectory.append(latents)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), conditioning, run.calls.decode(latents)


def grpo_rollout(run: GRPORun, epoch: int, args: argparse.Namespace) -> Rollout:
    """N prompts x B samples in batches of 2 x --batch-size (our PRDP's sampling batch), scored, advantages per
    prompt."""
    rng = np.random.default_rng([0, epoch])
    drawn = rng.choice(len(run.prompts), size=args.prdp_prompts, replace=args.prdp_prompts > len(run.prompts))
    texts = [run.prompts[index] for index in drawn for _ in range(args.prdp_samples)]
    run.transformer.eval()
    chunk = 2 * args.batch_size
    batches = [grpo_sample(run, texts[start : start + chunk]) for start in range(0, len(texts), chunk)]
    latents, log_probs, conditioning, images = zip(*batches, strict=True)
    prompt_aware = run.reward_model.config.prompt_aware
    rewards = run.reward_model.score(torch.cat(images), texts if prompt_aware else None).float()
    grouped = rewards.view(args.prdp_prompts, args.prdp_samples)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True, correction=0) + 1e-4)
    return Rollout(
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        conditioning=tuple(torch.cat(parts) for parts in zip(*conditioning, strict=True)),
        advantages=advantages.flatten(),
    )


def grpo_loss(run: GRPORun, rollout: Rollout, rows: torch.Tensor, step: int, kl_beta: float) -> torch.Tensor:
    """The clipped PPO surrogate of the recorded transitions `rows` at `step` under the current LoRA, plus beta x
    the KL of its step to the reference's (the adapters disabled): ||mu - mu_ref||^2 / (2 std^2)."""
    sample, recorded = rollout.latents[rows, step], rollout.latents[rows, step + 1]
    conditioning = tuple(part[rows] for part in rollout.conditioning)
    timesteps = run.schedule.timesteps[step].expand(len(rows))
    sigmas = run.sigmas
    with run.accelerator.autocast():
        velocity = run.calls.velocity(run.transformer, sample, timesteps, conditioning, guided=True)
    _, log_prob, mean, std = sde_step(sigmas, step, sample, velocity, GRPO_NOISE_LEVEL, recorded)
    advantages = rollout.advantages[rows].clamp(-GRPO_ADVANTAGE_CLIP, GRPO_ADVANTAGE_CLIP)
    ratio = torch.exp(log_prob - rollout.log_probs[rows, step])
    clipped = ratio.clamp(1.0 - GRPO_CLIP_RANGE, 1.0 + GRPO_CLIP_RANGE)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
    if kl_beta == 0:
        return loss
    bare = run.accelerator.unwrap_model(run.transformer)
    bare.disable_adapters()
    with torch.no_grad(), run.accelerator.autocast():
        reference = run.calls.velocity(run.transformer, sample, timesteps, conditioning, guided=True)
    bare.enable_adapters()
    reference_mean = sde_step(sigmas, step, sample, reference, GRPO_NOISE_LEVEL, recorded)[2]
    kl = ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)
    return loss + kl_beta * kl.mean()


def grpo_gradient_step(run: GRPORun, rollout: Rollout, args: argparse.Namespace) -> None:
    """One optimizer step over every recorded transition: shuffled samples in batches of --batch-size, each batch
    through every step, gradients accumulated (accelerate steps the optimizer after the last piece only)."""
    run.transformer.train()
    order = torch.randperm(len(rollout.advantages))
    for start in range(0, len(order), args.batch_size):
        rows = order[start : start + args.batch_size]
        for step in range(rollout.log_probs.shape[1]):
            with run.accelerator.accumulate(run.transformer):
                loss = grpo_loss(run, rollout, rows, step, args.grpo_kl_beta)
                run.accelerator.backward(loss)
                if run.accelerator.sync_gradients:
                    run.accelerator.clip_grad_norm_(run.trained, 1.0)
                run.optimizer.step()
                run.optimizer.zero_grad()


def train_grpo(run: GRPORun, args: argparse.Namespace) -> None:
    """A warm-up epoch and --prdp-epochs timed ones, K gradient steps each, as our PRDP run."""
    for epoch in range(1 + args.prdp_epochs):
        rollout = grpo_rollout(run, epoch, args)
        for _ in range(args.prdp_inner_steps):
            grpo_gradient_step(run, rollout, args)


# --------------------------------------------------------------------------------------------------------------
# Workers: one run each, in a process of its own


def peak_memory_mib() -> float:
    """Peak memory so far, MiB: CUDA's peak allocated on a GPU, else the process's peak resident memory (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_memory() -> None:
    """Restart the peak: CUDA's allocator statistics; on Linux VmHWM too (clear_refs 5 resets only the mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def record_optimizer_steps(memory: dict[str, float]) -> list[float]:
    """Timestamps of every optimizer step in this process (a global post-step hook, so it sees any trainer's). At
    the first step the peak memory so far (loading, set-up, the first step) goes into `memory["setup_peak_mib"]`
    and the peak restarts, so that the peak at the end is the training steps'."""
    stamps: list[float] = []

    def hook(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            memory["setup_peak_mib"] = peak_memory_mib()
            reset_peak_memory()

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(hook)
    return stamps


def trainer_options(args: argparse.Namespace) -> dict:
    """Our trainers' settings that depend on the family: SD's LoRA targets as before; for SD3 and FLUX our flow
    targets (the reference's too), the guidance, the T5 prompt length and gradient checkpointing of both sides."""
    if args.family == "sd":
        return {"lora_targets": ",".join(LORA_TARGETS)}
    from ganrm_diffusers.generation.lora import FLOW_TARGET_MODULES

    options = {
        "lora_targets": ",".join(FLOW_TARGET_MODULES),
        "guidance_scale": args.guidance_scale,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    if args.max_sequence_length:
        options["max_sequence_length"] = args.max_sequence_length
    return options


def run_ganrm_dpo(inputs: dict, args: argparse.Namespace, out: Path, steps: int) -> None:
    from ganrm_diffusers.training.dpo import DPOConfig, train

    train(
        DPOConfig(
            pretrained_model=inputs["pipeline"],
            candidates=inputs["candidates"],
            output_dir=str(out),
            resolution=inputs["resolution"],
            train_batch_size=args.batch_size,
            max_train_steps=steps,
            learning_rate=LEARNING_RATE,
            beta=args.beta,
            lora_rank=LORA_RANK,
            checkpoint_every=10**6,
            mixed_precision=args.mixed_precision,
            eval_prompts=0,
            **trainer_options(args),
        )
    )


def run_ganrm_prdp(inputs: dict, args: argparse.Namespace, out: Path) -> None:
    from ganrm_diffusers.training.prdp import PRDPConfig, train

    train(
        PRDPConfig(
            pretrained_model=inputs["pipeline"],
            reward_model=inputs["reward_model"],
            prompts=inputs["prompts"],
            output_dir=str(out),
            resolution=inputs["resolution"],
            epochs=1 + args.prdp_epochs,
            inner_steps=args.prdp_inner_steps,
            prompts_per_epoch=args.prdp_prompts,
            samples_per_prompt=args.prdp_samples,
            num_inference_steps=args.prdp_steps,
            train_batch_size=args.batch_size,
            sample_batch_size=args.batch_size * 2,
            lora_rank=LORA_RANK,
            checkpoint_every=10**6,
            mixed_precision=args.mixed_precision,
            eval_prompts=0,
            **trainer_options(args),
        )
    )


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.workdir))
    memory: dict[str, float] = {}
    stamps = record_optimizer_steps(memory)
    steps = args.warmup + args.steps
    if args.worker == "reference-dpo" and args.family == "sd":
        train_reference(setup_reference(inputs, args), steps, args.beta, reference_dpo_loss)
    elif args.worker == "reference-dpo":
        train_reference(setup_flow_reference(inputs, args), steps, args.beta, reference_flow_dpo_loss)
    elif args.worker == "flow-grpo":
        train_grpo(setup_grpo(inputs, args), args)
    elif args.worker == "ganrm-dpo":
        run_ganrm_dpo(inputs, args, out, steps)
    else:
        run_ganrm_prdp(inputs, args, out)
    record = {"stamps": stamps, "peak_mib": peak_memory_mib(), **memory}
    (Path(args.workdir) / f"{args.worker}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------------------------
# The runs, side by side


@dataclass
class Timing:
    """A worker's seconds per step (the fastest of its runs) and peak memory in MiB (the largest of its runs):
    over the training steps, and up to the end of its first step (loading and set-up included)."""

    seconds: float
    peak_mib: float
    setup_peak_mib: float


def step_seconds(name: str, stamps: list[float], args: argparse.Namespace) -> float:
    """DPO: the median interval between optimizer steps after the warm-up ones. PRDP and Flow-GRPO: whole epochs
    after the first (warm-up) one, divided by their K steps each."""
    if name in ("ganrm-prdp", "flow-grpo"):
        first = args.prdp_inner_steps - 1
        return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
    return float(statistics.median(np.diff(stamps[args.warmup :])))


def run_worker(name: str, workdir: Path) -> dict:
    """One run in a process of its own; the timestamps of its optimizer steps and its peak memory."""
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir)]
    command += ["--inputs", str(workdir / "inputs.json"), *sys.argv[1:]]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if completed.returncode:
        print(completed.stdout[-2000:], completed.stderr[-4000:])
        raise SystemExit(f"{name} failed")
    return json.loads((workdir / f"{name}.json").read_text())


def worker_order(args: argparse.Namespace) -> list[str]:
    """The two DPO runs alternate `--repeats` times; SD's PRDP runs once (it has no goal), the flow families' PRDP
    alternates with Flow-GRPO `--repeats` times."""
    dpo = [name for _ in range(args.repeats) for name in ("reference-dpo", "ganrm-dpo")]
    if args.family == "sd":
        return [*dpo, "ganrm-prdp"]
    return dpo + [name for _ in range(args.repeats) for name in ("flow-grpo", "ganrm-prdp")]


def time_workers(args: argparse.Namespace, workdir: Path) -> dict[str, Timing]:
    """Seconds per step and peak memory of each worker, in `worker_order`; the fastest run of each counts (load from
    other processes only ever slows a run down)."""
    runs: dict[str, list[Timing]] = {}
    for name in worker_order(args):
        started = time.perf_counter()
        record = run_worker(name, workdir)
        stamps = record["stamps"]
        timing = Timing(step_seconds(name, stamps, args), record["peak_mib"], record["setup_peak_mib"])
        runs.setdefault(name, []).append(timing)
        print(
            f"{name:14s} {timing.seconds * 1000:9.1f} ms/step  peak {timing.peak_mib:7.0f} MiB "
            f"(set-up {timing.setup_peak_mib:.0f} MiB)  ({len(stamps)} steps, "
            f"{time.perf_counter() - started:.0f} s with start-up)"
        )
    return {
        name: Timing(
            min(timing.seconds for timing in timings),
            max(timing.peak_mib for timing in timings),
            max(timing.setup_peak_mib for timing in timings),
        )
        for name, timings in runs.items()
    }


def run_settings(args: argparse.Namespace, inputs: dict) -> dict:
    settings = {
        "pipeline": args.pipeline or ("random SD1.5 architecture" if args.sd15 else "small random SD-shaped pipeline"),
        "resolution": inputs["resolution"],
        "batch_size": args.batch_size,
        "pairs": args.pairs,
        "lora_rank": LORA_RANK,
        "beta": args.beta,
        "mixed_precision": args.mixed_precision,
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "threads": args.threads,
    }
    if args.family == "sd":
        return settings
    size = "full-size" if args.full else "small"
    return {
        "family": args.family,
        **settings,
        "pipeline": args.pipeline or f"{size} random {FAMILY_NAMES[args.family]}-shaped pipeline",
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length or "the pipeline's",
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_memory": ("CUDA max allocated" if torch.cuda.is_available() else "process VmHWM")
        + " over the training steps (set-up excluded)",
    }


def memory_settings(ours: Timing, reference: Timing) -> dict:
    return {
        "ours_peak_mib": round(ours.peak_mib),
        "reference_peak_mib": round(reference.peak_mib),
        "ours_setup_peak_mib": round(ours.setup_peak_mib),
        "reference_setup_peak_mib": round(reference.setup_peak_mib),
    }


def comparisons(results: dict[str, Timing], args: argparse.Namespace, settings: dict) -> list[Comparison]:
    dpo_statistic = (
        f"median step interval after {args.warmup} warm-up steps, {args.steps} steps timed; "
        f"fastest of {args.repeats} alternating runs"
    )
    prdp = {
        "prdp_prompts": args.prdp_prompts,
        "prdp_samples": args.prdp_samples,
        "prdp_steps": args.prdp_steps,
        "prdp_inner_steps": args.prdp_inner_steps,
        "prdp_epochs": args.prdp_epochs,
    }
    if args.family != "sd":
        return flow_comparisons(results, args, settings, dpo_statistic, prdp)
    return [
        Comparison(
            name="dpo_step",
            ours="our Diffusion-DPO step (training/train_dpo.py)",
            reference="the reference DPO step (diffusers' research train_diffusion_dpo.py step, in bench/train_step.py)",
            ours_seconds=results["ganrm-dpo"].seconds,
            reference_seconds=results["reference-dpo"].seconds,
            goal_max=DPO_GOAL,
            settings={**settings, "steps": args.steps, "warmup": args.warmup, "statistic": dpo_statistic},
        ),
        Comparison(
            name="prdp_step_vs_dpo_step",
            ours="our PRDP step (epoch time / K: sampling, reference log-probs, scoring, K gradient steps)",
            reference="our Diffusion-DPO step",
            ours_seconds=results["ganrm-prdp"].seconds,
            reference_seconds=results["ganrm-dpo"].seconds,
            goal_max=None,
            settings={**settings, **prdp, "statistic": "whole epochs after a warm-up epoch, divided by K"},
        ),
    ]


def flow_comparisons(
    results: dict[str, Timing], args: argparse.Namespace, settings: dict, dpo_statistic: str, prdp: dict
) -> list[Comparison]:
    family = FAMILY_NAMES[args.family]
    kl = f"with its KL term, beta {args.grpo_kl_beta:g}" if args.grpo_kl_beta else "without its KL term"
    ours_dpo, reference_dpo = results["ganrm-dpo"], results["reference-dpo"]
    ours_prdp, grpo = results["ganrm-prdp"], results["flow-grpo"]
    return [
        Comparison(
            name="dpo_step",
            ours=f"our Diffusion-DPO step on {family} (training/train_dpo.py, rectified flow)",
            reference=(
                "the reference flow DPO step (diffusers' research DPO step with the SD3 / FLUX DreamBooth LoRA "
                "scripts' flow-matching noising, in bench/train_step.py)"
            ),
            ours_seconds=ours_dpo.seconds,
            reference_seconds=reference_dpo.seconds,
            goal_max=DPO_GOAL,
            settings={
                **settings,
                "steps": args.steps,
                "warmup": args.warmup,
                "statistic": dpo_statistic,
                **memory_settings(ours_dpo, reference_dpo),
            },
        ),
        Comparison(
            name="prdp_step_vs_flow_grpo_step",
            ours=f"our PRDP step on {family} (epoch time / K: SDE sampling, reference log-probs, scoring, K steps)",
            reference=(
                f"a Flow-GRPO step (epoch time / K: SDE sampling with log-probs, scoring, K clipped-PPO steps {kl}; "
                "in bench/train_step.py)"
            ),
            ours_seconds=ours_prdp.seconds,
            reference_seconds=grpo.seconds,
            goal_max=PRDP_GOAL,
            settings={
                **settings,
                **prdp,
                "grpo_kl_beta": args.grpo_kl_beta,
                "statistic": f"whole epochs after a warm-up epoch, divided by K; fastest of {args.repeats} "
                "alternating runs",
                **memory_settings(ours_prdp, grpo),
            },
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", *FLOW_FAMILIES), default="sd", help="the model family")
    parser.add_argument("--pipeline", help="a saved pipeline of the family (default: a small random one)")
    parser.add_argument("--sd15", action="store_true", help="SD1.5 architecture with random weights at 512 px (GPU)")
    parser.add_argument("--full", action="store_true", help="SD3 / FLUX: the real architecture at 1024 px (GPU)")
    parser.add_argument("--resolution", type=int, help="image size (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=2, help="DPO pairs per step (PRDP: samples per UNet call)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the data set")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each DPO trainer (flow: and PRDP), alternating")
    parser.add_argument("--beta", type=float, default=5000.0, help="the DPO beta of both (the loss uses beta / 2)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--bf16", action="store_true", help="the same as --mixed-precision bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="SD3 / FLUX: both sides (GPU)")
    parser.add_argument("--guidance-scale", type=float, help="SD3 / FLUX (default: SD3 4.5 as Flow-GRPO, FLUX 3.5)")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        help=f"SD3 / FLUX T5 tokens (default {SMALL_SEQUENCE_LENGTH}; --full: 256/512)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prdp-prompts", type=int, default=2, help="PRDP (and Flow-GRPO): N prompts per epoch")
    parser.add_argument("--prdp-samples", type=int, default=2, help="PRDP (and Flow-GRPO): B trajectories per prompt")
    parser.add_argument("--prdp-steps", type=int, default=10, help="PRDP (and Flow-GRPO): sampling steps T")
    parser.add_argument("--prdp-inner-steps", type=int, default=2, help="PRDP (and Flow-GRPO): K gradient steps")
    parser.add_argument(
        "--prdp-epochs", type=int, default=3, help="PRDP (and Flow-GRPO): timed epochs (after a warm-up one)"
    )
    parser.add_argument("--grpo-kl-beta", type=float, default=GRPO_KL_BETA, help="Flow-GRPO's KL weight (0: none)")
    add_out_argument(parser, "train_step")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16:
        args.mixed_precision = "bf16"
    if args.family == "sd":
        flow_only = ("full", "gradient_checkpointing", "guidance_scale", "max_sequence_length")
        if any(getattr(args, name) for name in flow_only):
            parser.error("--full, --gradient-checkpointing, --guidance-scale, --max-sequence-length: SD3 / FLUX only")
        return args
    if args.sd15:
        parser.error("--sd15 is SD's; SD3 / FLUX take --full")
    if args.out == parser.get_default("out"):
        args.out = args.out.with_name(f"train_step_{args.family}.json")
    if args.guidance_scale is None:
        args.guidance_scale = FLOW_GUIDANCE[args.family]
    if args.max_sequence_length is None and not args.full:
        args.max_sequence_length = SMALL_SEQUENCE_LENGTH
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="ganrm-train-step-") as scratch:
        workdir = Path(scratch)
        inputs = build_inputs(args, workdir)
        (workdir / "inputs.json").write_text(json.dumps(inputs))
        settings = run_settings(args, inputs)
        print(
            f"pipeline {inputs['pipeline']} at {inputs['resolution']} px on {settings['device']}; DPO "
            f"{args.batch_size} pairs/step, PRDP N={args.prdp_prompts} B={args.prdp_samples} T={args.prdp_steps} "
            f"K={args.prdp_inner_steps}"
        )
        results = time_workers(args, workdir)
    bench = "train_step" if args.family == "sd" else f"train_step_{args.family}"
    write_results(args.out, bench, settings, comparisons(results, args, settings))


if __name__ == "__main__":
    main()
