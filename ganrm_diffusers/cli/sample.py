"""`ganrm sample`: every best-of-N candidate of a prompt file, scored, as an imagefolder dataset (for SFT and DPO).

Runs unchanged under `accelerate launch --num_processes K ganrm sample ...` (prompts are split across processes)
and resumes where it stopped. The loop itself is `ganrm_diffusers.candidates.write_candidate_folder`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ganrm_diffusers.generation.candidates import (
    SampleSettings,
    default_device,
    finished_prompts,
    read_prompts_file,
    write_candidate_folder,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    defaults = SampleSettings()
    sample = subparsers.add_parser(
        "sample",
        help="sample N scored candidates per prompt into an image folder with metadata.jsonl",
        description="Generate --num-candidates images for every prompt of --prompts, score each with the reward "
        "model, and write them with prompt, seed, score and rank to an imagefolder dataset (metadata.jsonl). "
        "Prompts already done are skipped; under `accelerate launch` the prompts are split across processes.",
    )
    sample.add_argument("--pipeline", required=True, help="diffusers SD 1.x/2.x or SDXL pipeline: folder or Hub id")
    sample.add_argument(
        "--reward-model", help="reward model folder or Hub id (default: the one saved with the pipeline)"
    )
    sample.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    sample.add_argument("--num-candidates", type=int, default=defaults.num_candidates, help="candidates per prompt")
    sample.add_argument("--out", required=True, type=Path, help="output folder (resumed if it exists)")
    sample.add_argument("--steps", type=int, default=defaults.num_inference_steps, help="denoising steps")
    sample.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    sample.add_argument("--height", type=int)
    sample.add_argument("--width", type=int)
    sample.add_argument("--negative-prompt")
    sample.add_argument("--eta", type=float, default=defaults.eta, help="DDIM eta (0: deterministic steps)")
    sample.add_argument("--seed", type=int, default=defaults.seed, help="candidate j of prompt i gets seed + i*N + j")
    sample.add_argument("--lora", help="a LoRA (file, folder or Hub id) to load into the pipeline first")
    sample.add_argument("--prompts-per-call", type=int, default=1, help="prompts sampled together in one call")
    sample.add_argument("--candidate-batch-size", type=int, help="candidates per UNet call (default: all)")
    sample.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on the CPU")
    sample.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    from ganrm_diffusers.generation.pipeline import PipelineInputError, load_reward_guided_pipeline
    from ganrm_diffusers.reward.model import GANRewardModel

    prompts = read_prompts_file(args.prompts)
    settings = SampleSettings(
        num_candidates=args.num_candidates,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        eta=args.eta,
        seed=args.seed,
        pipeline=_source(args.pipeline),
        reward_model=_source(args.reward_model),
        lora=_source(args.lora),
    )
    finished_prompts(args.out, prompts, settings)  # a folder of another run fails now, before loading anything
    device = default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reward_model = GANRewardModel.from_pretrained(args.reward_model) if args.reward_model else None
    pipe = load_reward_guided_pipeline(args.pipeline, reward_model=reward_model)
    if pipe.reward_model is None:
        raise PipelineInputError(f"{args.pipeline} holds no reward model: pass --reward-model")
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    report = write_candidate_folder(
        pipe,
        prompts,
        args.out,
        settings,
        prompts_per_call=args.prompts_per_call,
        candidate_batch_size=args.candidate_batch_size,
    )
    if report.num_processes > 1:
        print(
            f"process {report.process_index} of {report.num_processes}: sampled {len(report.written_prompts)} prompts"
        )
    if report.process_index == 0:
        print(
            f"{report.total_records} candidates of {len(prompts)} prompts in {report.folder} "
            f"({report.skipped_prompts} prompts were already done)"
        )
    return 0


def _source(name: str | None) -> str | None:
    """A local path made absolute (so a resumed run may name it differently), or a Hub id as given."""
    if name is None:
        return None
    return str(Path(name).resolve()) if Path(name).exists() else name
