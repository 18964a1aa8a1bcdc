"""Training step time: our Diffusion-DPO trainer against a reference DPO step, and our PRDP step against our DPO
step, on the same UNet and batch.

    python bench/train_step.py                                  # tiny SD-shaped UNet (CPU)
    python bench/train_step.py --pipeline DIR                   # any saved SD 1.x pipeline
    python bench/train_step.py --sd15 --mixed-precision fp16    # SD1.5 architecture, 512 px (GPU)

The reference is the training step of diffusers' research script
(examples/research_projects/diffusion_dpo/train_diffusion_dpo.py), written here from its description, not copied:
a dataset that decodes each (winner, loser) PNG pair and transforms it (resize, centre crop, [-1, 1], the two images
stacked on the channel axis) and tokenizes the caption; then per step the VAE encodes winners and losers, the text
encoder encodes the captions, winners and losers are noised with the same noise and timestep and go through the
LoRA UNet in one call, then once more with the adapters disabled (the reference model, no gradients), and the loss
is -logsigmoid(-beta/2 * (model_diff - ref_diff)), model_diff = mse_w - mse_l of the trained UNet, ref_diff the
same of the reference; backward, gradient clipping, AdamW and the learning-rate schedule under accelerate.

Both DPO runs train a rank-4 LoRA (to_q, to_k, to_v, to_out.0) on the same (winner, loser) images and captions,
`--batch-size` pairs per step, same resolution, learning rate and beta. Ours reads them as a `ganrm sample` folder.
Each run has its own process; a global optimizer-step hook timestamps every optimizer step, and the step time is the
median interval after `--warmup` steps (everything a training iteration does: data, VAE encoding where the trainer
does it per step, forward, reference forward, backward, optimizer). PRDP's step time is its epoch time (sampling B
trajectories for N prompts, reference log-probs, scoring, K gradient steps) divided by K.

Prints `RATIO dpo_step <ours / reference> (goal <= 1: ...)` and `RATIO prdp_step_vs_dpo_step <PRDP step / our DPO
step> (no goal)`; writes bench-out/train_step.json (`--out`; the format is in bench/results.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from results import REPO, Comparison, add_out_argument, device_name, write_results  # noqa: E402

DPO_GOAL = 1.0  # our DPO step / the reference step
LEARNING_RATE = 1e-5
LORA_RANK = 4
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
WORKERS = ("reference-dpo", "ganrm-dpo", "ganrm-prdp")


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


def build_inputs(args: argparse.Namespace, workdir: Path) -> dict:
    """The pipeline folder, the pairs (a `ganrm sample` folder), a prompt file and a small reward model."""
    pipeline = Path(args.pipeline) if args.pipeline else workdir / "pipeline"
    if not args.pipeline:
        from best_of_n import SD15, SMALL, random_sd_pipeline  # the bench's own random SD-shaped pipelines

        torch.manual_seed(0)
        random_sd_pipeline(SD15 if args.sd15 else SMALL).save_pretrained(pipeline)
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    resolution = args.resolution or unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)

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
    winner's 3 channels then the loser's; the caption tokenized to the tokenizer's full length."""

    def __init__(self, folder: Path, resolution: int, tokenizer: object) -> None:
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


def train_reference(run: ReferenceRun, steps: int, beta: float) -> None:
    """`steps` optimizer steps, the data loader restarted (reshuffled) at each epoch."""
    run.unet.train()
    trained = [parameter for parameter in run.unet.parameters() if parameter.requires_grad]
    done = 0
    while done < steps:
        for batch in run.dataloader:
            with run.accelerator.accumulate(run.unet):
                loss = reference_dpo_loss(run, batch, beta)
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
# Workers: one run each, in a process of its own


def record_optimizer_steps() -> list[float]:
    """Timestamps of every optimizer step in this process (a global post-step hook, so it sees any trainer's)."""
    stamps: list[float] = []

    def hook(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(hook)
    return stamps


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
            lora_targets=",".join(LORA_TARGETS),
            checkpoint_every=10**6,
            mixed_precision=args.mixed_precision,
            eval_prompts=0,
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
            lora_targets=",".join(LORA_TARGETS),
            checkpoint_every=10**6,
            mixed_precision=args.mixed_precision,
            eval_prompts=0,
        )
    )


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.workdir))
    stamps = record_optimizer_steps()
    steps = args.warmup + args.steps
    if args.worker == "reference-dpo":
        train_reference(setup_reference(inputs, args), steps, args.beta)
    elif args.worker == "ganrm-dpo":
        run_ganrm_dpo(inputs, args, out, steps)
    else:
        run_ganrm_prdp(inputs, args, out)
    (Path(args.workdir) / f"{args.worker}.json").write_text(json.dumps(stamps))


# --------------------------------------------------------------------------------------------------------------
# The runs, side by side


def step_seconds(name: str, stamps: list[float], args: argparse.Namespace) -> float:
    """DPO: the median interval between optimizer steps after the warm-up ones. PRDP: whole epochs after the first
    (warm-up) one, divided by their K steps each."""
    if name == "ganrm-prdp":
        first = args.prdp_inner_steps - 1
        return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
    return float(statistics.median(np.diff(stamps[args.warmup :])))


def run_worker(name: str, workdir: Path) -> list[float]:
    """One run in a process of its own; the timestamps of its optimizer steps."""
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir)]
    command += ["--inputs", str(workdir / "inputs.json"), *sys.argv[1:]]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if completed.returncode:
        print(completed.stdout[-2000:], completed.stderr[-4000:])
        raise SystemExit(f"{name} failed")
    return json.loads((workdir / f"{name}.json").read_text())


def time_workers(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Seconds per step of each worker. The two DPO runs alternate `--repeats` times and the fastest of each counts
    (load from other processes only ever slows a run down); PRDP runs once."""
    order = [name for _ in range(args.repeats) for name in WORKERS if name != "ganrm-prdp"] + ["ganrm-prdp"]
    results: dict[str, list[float]] = {}
    for name in order:
        started = time.perf_counter()
        stamps = run_worker(name, workdir)
        seconds = step_seconds(name, stamps, args)
        results.setdefault(name, []).append(seconds)
        print(
            f"{name:14s} {seconds * 1000:9.1f} ms/step  ({len(stamps)} steps, "
            f"{time.perf_counter() - started:.0f} s with start-up)"
        )
    return {name: min(times) for name, times in results.items()}


def run_settings(args: argparse.Namespace, inputs: dict) -> dict:
    return {
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


def comparisons(results: dict[str, float], args: argparse.Namespace, settings: dict) -> list[Comparison]:
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
    return [
        Comparison(
            name="dpo_step",
            ours="our Diffusion-DPO step (training/train_dpo.py)",
            reference="the reference DPO step (diffusers' research train_diffusion_dpo.py step, in bench/train_step.py)",
            ours_seconds=results["ganrm-dpo"],
            reference_seconds=results["reference-dpo"],
            goal_max=DPO_GOAL,
            settings={**settings, "steps": args.steps, "warmup": args.warmup, "statistic": dpo_statistic},
        ),
        Comparison(
            name="prdp_step_vs_dpo_step",
            ours="our PRDP step (epoch time / K: sampling, reference log-probs, scoring, K gradient steps)",
            reference="our Diffusion-DPO step",
            ours_seconds=results["ganrm-prdp"],
            reference_seconds=results["ganrm-dpo"],
            goal_max=None,
            settings={**settings, **prdp, "statistic": "whole epochs after a warm-up epoch, divided by K"},
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="a saved SD 1.x pipeline (default: a small random SD-shaped one)")
    parser.add_argument("--sd15", action="store_true", help="SD1.5 architecture with random weights at 512 px (GPU)")
    parser.add_argument("--resolution", type=int, help="image size (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=2, help="DPO pairs per step (PRDP: samples per UNet call)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the data set")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each DPO trainer, alternating")
    parser.add_argument("--beta", type=float, default=5000.0, help="the DPO beta of both (the loss uses beta / 2)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prdp-prompts", type=int, default=2, help="PRDP: N prompts per epoch")
    parser.add_argument("--prdp-samples", type=int, default=2, help="PRDP: B trajectories per prompt")
    parser.add_argument("--prdp-steps", type=int, default=10, help="PRDP: sampling steps T")
    parser.add_argument("--prdp-inner-steps", type=int, default=2, help="PRDP: K gradient steps per epoch")
    parser.add_argument("--prdp-epochs", type=int, default=3, help="PRDP: timed epochs (after one warm-up epoch)")
    add_out_argument(parser, "train_step")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    return parser.parse_args()


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
    write_results(args.out, "train_step", settings, comparisons(results, args, settings))


if __name__ == "__main__":
    main()
