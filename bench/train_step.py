"""Training step time: our Diffusion-DPO trainer against diffusers' research script, and our PRDP step against our
DPO step, on the same UNet and batch.

    python bench/train_step.py --diffusers-script /tmp/scratch/train_diffusion_dpo.py     # tiny SD-shaped UNet (CPU)
    python bench/train_step.py --pipeline DIR --diffusers-script ...                       # any saved SD pipeline
    python bench/train_step.py --sd15 --mixed-precision fp16 --diffusers-script ...         # SD1.5 architecture, 512 px (GPU)

The diffusers script (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py of huggingface/diffusers) is
not part of ganrm: fetch it into a scratch folder yourself and pass its path. Without it only our two trainers run.

Both DPO runs train a rank-4 LoRA on the same (winner, loser) image pairs and captions, `--batch-size` pairs per
step, same resolution, learning rate and beta (diffusers' beta_dpo = our beta / 2); the script reads them as a
parquet dataset (jpg_0, jpg_1, label_0, caption), ours as a `ganrm sample` folder. Each runs in its own process;
a global optimizer-step hook timestamps every optimizer step, and the step time is the median interval after
`--warmup` steps (everything a training iteration does: data, VAE encoding where the trainer does it per step,
forward, reference forward, backward, optimizer). PRDP's step time is its epoch time (sampling B trajectories for N
prompts, reference log-probs, scoring, K gradient steps) divided by K. Last lines: `dpo_ratio <ours / diffusers>`
(goal at most 1.0) and `prdp_vs_dpo <PRDP step / our DPO step>`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# Inputs shared by the runs


def build_inputs(args: argparse.Namespace, workdir: Path) -> dict:
    """The pipeline folder, the pair data in both formats, a prompt file and a small reward model."""
    pipeline = Path(args.pipeline) if args.pipeline else workdir / "pipeline"
    if not args.pipeline:
        from best_of_n import SD15, SMALL, random_sd_pipeline  # the bench's own random SD-shaped pipelines

        torch.manual_seed(0)
        random_sd_pipeline(SD15 if args.sd15 else SMALL).save_pretrained(pipeline)
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(pipeline)
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    resolution = args.resolution or unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    del config

    prompts = [f"a handwritten digit {index % 10}" for index in range(args.pairs)]
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8))
        for _ in range(2 * args.pairs)
    ]
    # Our format: a `ganrm sample` folder, two candidates per prompt, the first scored higher.
    folder = workdir / "candidates"
    folder.mkdir()
    records = []
    for index, prompt in enumerate(prompts):
        for candidate in range(2):
            name = f"{index:06d}_{candidate:02d}.png"
            images[2 * index + candidate].save(folder / name)
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
    # The research script's format: a parquet file of pairs with label_0 = 1 (jpg_0 preferred).
    import datasets

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    parquet = workdir / "pairs"
    parquet.mkdir()
    datasets.Dataset.from_dict(
        {
            "jpg_0": [png(images[2 * i]) for i in range(args.pairs)],
            "jpg_1": [png(images[2 * i + 1]) for i in range(args.pairs)],
            "label_0": [1] * args.pairs,
            "caption": prompts,
        }
    ).to_parquet(str(parquet / "train.parquet"))
    (workdir / "prompts.txt").write_text("\n".join(sorted(set(prompts))) + "\n")
    reward_model = workdir / "reward_model"
    from best_of_n import small_reward_model  # a small open_clip reward model: PRDP's scoring is not what is timed

    (workdir / "clip").mkdir()
    small_reward_model(workdir / "clip").save_pretrained(reward_model)
    return {
        "pipeline": str(pipeline),
        "resolution": resolution,
        "candidates": str(folder),
        "pairs": str(parquet),
        "prompts": str(workdir / "prompts.txt"),
        "reward_model": str(reward_model),
    }


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


def worker(args: argparse.Namespace) -> None:
    inputs = json.loads(Path(args.inputs).read_text())
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.workdir))
    stamps = record_optimizer_steps()
    steps = args.warmup + args.steps
    if args.worker == "diffusers-dpo":
        # The script imports wandb at the top; a stand-in module lets it import (no tracker is used).
        stub = Path(args.workdir) / "stubs"
        stub.mkdir(exist_ok=True)
        (stub / "wandb.py").write_text("")
        sys.path.insert(0, str(stub))
        sys.argv = [
            args.diffusers_script,
            f"--pretrained_model_name_or_path={inputs['pipeline']}",
            f"--dataset_name={inputs['pairs']}",
            "--dataset_split_name=train",
            f"--output_dir={out}",
            f"--resolution={inputs['resolution']}",
            f"--train_batch_size={args.batch_size}",
            f"--max_train_steps={steps}",
            "--checkpointing_steps=1000000",
            "--learning_rate=1e-5",
            "--lr_scheduler=constant",
            "--lr_warmup_steps=0",
            f"--beta_dpo={args.beta / 2:g}",  # the script parses an int
            "--rank=4",
            "--no_hflip",
            "--report_to=all",  # every installed tracker: none here
            f"--mixed_precision={args.mixed_precision}",
            f"--vae_encode_batch_size={2 * args.batch_size}",
            "--seed=0",
        ]
        runpy.run_path(args.diffusers_script, run_name="__main__")
    elif args.worker == "ganrm-dpo":
        from ganrm_training.train_dpo import DPOConfig, train

        train(
            DPOConfig(
                pretrained_model=inputs["pipeline"],
                candidates=inputs["candidates"],
                output_dir=str(out),
                resolution=inputs["resolution"],
                train_batch_size=args.batch_size,
                max_train_steps=steps,
                learning_rate=1e-5,
                beta=args.beta,
                lora_rank=4,
                checkpoint_every=10**6,
                mixed_precision=args.mixed_precision,
                eval_prompts=0,
            )
        )
    else:  # ganrm-prdp
        from ganrm_training.train_prdp import PRDPConfig, train

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
                lora_rank=4,
                checkpoint_every=10**6,
                mixed_precision=args.mixed_precision,
                eval_prompts=0,
            )
        )
    (Path(args.workdir) / f"{args.worker}.json").write_text(json.dumps(stamps))


def step_seconds(stamps: list[float], warmup: int) -> float:
    intervals = np.diff(stamps[warmup:])
    return float(statistics.median(intervals))


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", help="path of diffusers' train_diffusion_dpo.py (a scratch copy)")
    parser.add_argument("--pipeline", help="a saved SD 1.x pipeline (default: a small random SD-shaped one)")
    parser.add_argument("--sd15", action="store_true", help="SD1.5 architecture with random weights at 512 px (GPU)")
    parser.add_argument("--resolution", type=int, help="image size (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=2, help="DPO pairs per step (PRDP: samples per UNet call)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the data set")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each DPO trainer, alternating")
    parser.add_argument("--beta", type=float, default=5000.0, help="our DPO beta (the script gets beta / 2)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--prdp-prompts", type=int, default=2, help="PRDP: N prompts per epoch")
    parser.add_argument("--prdp-samples", type=int, default=2, help="PRDP: B trajectories per prompt")
    parser.add_argument("--prdp-steps", type=int, default=10, help="PRDP: sampling steps T")
    parser.add_argument("--prdp-inner-steps", type=int, default=2, help="PRDP: K gradient steps per epoch")
    parser.add_argument("--prdp-epochs", type=int, default=3, help="PRDP: timed epochs (after one warm-up epoch)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="ganrm-train-step-"))
    inputs = build_inputs(args, workdir)
    (workdir / "inputs.json").write_text(json.dumps(inputs))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"pipeline {inputs['pipeline']} at {inputs['resolution']} px on {device}; DPO {args.batch_size} pairs/step, "
        f"PRDP N={args.prdp_prompts} B={args.prdp_samples} T={args.prdp_steps} K={args.prdp_inner_steps}"
    )
    workers = ["ganrm-dpo", "ganrm-prdp"]
    if args.diffusers_script:
        workers.insert(0, "diffusers-dpo")
    else:
        print("no --diffusers-script: only our trainers run (see the docstring)")
    results: dict[str, list[float]] = {}
    # The two DPO runs alternate `--repeats` times (the fastest of each counts: load from other processes only
    # ever slows a run down); PRDP runs once.
    order = [name for _ in range(args.repeats) for name in workers if name != "ganrm-prdp"] + ["ganrm-prdp"]
    for name in order:
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--workdir",
            str(workdir),
            "--inputs",
            str(workdir / "inputs.json"),
            *sys.argv[1:],
        ]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if completed.returncode:
            print(completed.stdout[-2000:], completed.stderr[-4000:])
            raise SystemExit(f"{name} failed")
        stamps = json.loads((workdir / f"{name}.json").read_text())
        if name == "ganrm-prdp":
            # Epoch boundaries: K steps per epoch; time whole epochs after the first (warm-up) one.
            first = args.prdp_inner_steps - 1
            seconds = (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
        else:
            seconds = step_seconds(stamps, args.warmup)
        results.setdefault(name, []).append(seconds)
        print(
            f"{name:14s} {seconds * 1000:9.1f} ms/step  ({len(stamps)} steps, "
            f"{time.perf_counter() - started:.0f} s with start-up)"
        )
    results = {name: min(times) for name, times in results.items()}
    if "diffusers-dpo" in results:
        print(f"dpo_ratio {results['ganrm-dpo'] / results['diffusers-dpo']:.3f}")
    print(f"prdp_vs_dpo {results['ganrm-prdp'] / results['ganrm-dpo']:.3f}")


if __name__ == "__main__":
    main()
