"""`ganrm train METHOD`: the trainers of `training/` (sft, dpo, prdp, rounds) from the ganrm command line.

The options are the trainers' own config fields (one dataclass per trainer), so `ganrm train dpo --beta 5000 ...`
and `accelerate launch training/train_dpo.py --beta 5000 ...` are the same run. Several processes:
`accelerate launch --no_python ganrm train dpo ...`. A trainer (torch, diffusers, peft) is imported only when its
method is asked for, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import argparse
import importlib

from ganrm_diffusers.training.losses import DPO_BETA_CONVENTION

# method: (trainer module, config class name, one-line description)
METHODS = {
    "sft": (
        "ganrm_diffusers.training.sft",
        "SFTConfig",
        "supervised fine-tuning on the best of N candidates per prompt",
    ),
    "dpo": ("ganrm_diffusers.training.dpo", "DPOConfig", "Diffusion-DPO on (best, worst) of N candidates per prompt"),
    "prdp": (
        "ganrm_diffusers.training.prdp",
        "PRDPConfig",
        "online PRDP: reward-difference regression, proximal clipping",
    ),
    "rounds": (
        "ganrm_diffusers.training.rounds",
        "RoundsConfig",
        "GAN-RM rounds: retrain the reward model, then SFT/DPO",
    ),
}

BETA_CONVENTIONS = (
    f"Beta conventions: DPO's --beta is {DPO_BETA_CONVENTION}. PRDP's --beta turns reward differences "
    "(standardised within each prompt by default; reward_scale x GAN-RM logit with --reward_normalization none) "
    "into targets for log-ratio differences, log-probs being means over latent elements and log-ratios means over "
    "the stochastic steps, so beta and --clip_eps are per element and per step."
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    methods = "\n".join(f"  {name:8s}{summary}" for name, (_, _, summary) in METHODS.items())
    train = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA with a GAN-RM reward (sft, dpo, prdp, rounds)",
        description="Fine-tune a LoRA on a diffusers SD 1.x/2.x, SDXL, SD3.x or FLUX.1 pipeline with a GAN-RM reward. Each run "
        "writes pytorch_lora_weights.safetensors (diffusers) and pytorch_lora_weights_comfyui.safetensors (ComfyUI's "
        "LoraLoader), metrics.jsonl/json and curves.png to --output_dir, with checkpoints to continue from "
        "(--resume latest).\n\nMethods (`ganrm train METHOD --help` lists a method's options):\n"
        f"{methods}\n\n{BETA_CONVENTIONS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("method", choices=sorted(METHODS), help="the fine-tuning method")
    train.add_argument("options", nargs=argparse.REMAINDER, help="the method's options (see METHOD --help)")
    train.set_defaults(func=train_command)


def method_parser(method: str) -> tuple[argparse.ArgumentParser, type]:
    """The full option parser of one method, built from its trainer's config dataclass."""
    from ganrm_diffusers.utils.options import OptionParser, add_config_arguments

    module_name, class_name, _ = METHODS[method]
    config_class = getattr(importlib.import_module(module_name), class_name)
    parser = OptionParser(prog=f"ganrm train {method}", description=f"{config_class.__doc__} {BETA_CONVENTIONS}")
    add_config_arguments(parser, config_class)
    return parser, config_class


def train_command(args: argparse.Namespace) -> int:
    from ganrm_diffusers.utils.options import config_from_args

    parser, config_class = method_parser(args.method)
    config = config_from_args(config_class, parser.parse_args(args.options))
    summary = importlib.import_module(METHODS[args.method][0]).train(config)
    if summary and "lora" in summary:  # the main process wrote it
        print(f"LoRA: {summary['lora']['diffusers']} (ComfyUI: {summary['lora']['comfyui']})")
    return 0
