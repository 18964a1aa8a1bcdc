"""`ganrm sample`: every best-of-N candidate of a prompt file, scored, as an imagefolder dataset (for SFT and DPO).

Runs unchanged under `accelerate launch --num_processes K ganrm sample ...` (prompts are split across processes)
and resumes where it stopped. The loop itself is `ganrm_diffusers.generation.candidates.write_candidate_folder`.
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
from ganrm_diffusers.utils.options import add_config_arguments, add_option, config_from_args

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sample = subparsers.add_parser(
        "sample",
        help="sample N scored candidates per prompt into an image folder with metadata.jsonl",
        description="Generate --num_candidates images for every prompt of --prompts, score each with the reward "
        "model, and write them with prompt, seed, score and rank to an imagefolder dataset (metadata.jsonl). "
        "Prompts already done are skipped; under `accelerate launch` the prompts are split across processes.",
    )
    add_option(sample, "prompts", required=True, type=Path, help="text file, one prompt per line")
    add_option(sample, "out", required=True, type=Path, help="output folder (resumed if it exists)")
    add_config_arguments(sample, SampleSettings, exclude=("pipeline",))
    add_option(
        sample,
        "pipeline",
        required=True,
        help="diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, SD3.x, FLUX.1, FLUX.2 klein, Qwen-Image): folder or Hub id",
    )
    add_option(sample, "prompts_per_call", type=int, default=1, help="prompts sampled together in one call")
    add_option(sample, "candidate_batch_size", type=int, help="candidates per UNet call (default: all)")
    add_option(sample, "dtype", choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on the CPU")
    sample.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    from ganrm_diffusers.generation.pipeline import PipelineInputError, load_reward_guided_pipeline
    from ganrm_diffusers.reward.model import GANRewardModel

    prompts = read_prompts_file(args.prompts)
    sources = {name: _source(getattr(args, name)) for name in ("pipeline", "reward_model", "lora")}
    settings = config_from_args(SampleSettings, args, **sources)
    finished_prompts(args.out, prompts, settings)  # a folder of another run fails now, before loading anything
    device = default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reward_model = GANRewardModel.from_pretrained(args.reward_model) if args.reward_model else None
    pipe = load_reward_guided_pipeline(args.pipeline, reward_model=reward_model)
    if pipe.reward_model is None:
        raise PipelineInputError(f"{args.pipeline} holds no reward model: pass --reward_model")
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
