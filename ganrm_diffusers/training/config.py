"""The trainers' shared configuration: `FinetuneConfig` (every trainer's dataclass extends it) and the
command-line options generated from it (`parse_config`; the convention is ganrm_diffusers.utils.options)."""

from __future__ import annotations

import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass

from ganrm_diffusers.generation.lora import DEFAULT_TARGET_MODULES, FLOW_TARGET_MODULES
from ganrm_diffusers.utils.errors import GanrmError
from ganrm_diffusers.utils.options import OptionParser, add_config_arguments, config_from_args, option

logger = logging.getLogger(__name__)


class TrainingConfigError(GanrmError, ValueError):
    """Settings that cannot train (no prompts, a batch larger than the data, a checkpoint of another run)."""


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    """Settings every trainer shares. Sampling settings serve on-the-fly data, PRDP's trajectories and evaluation."""

    pretrained_model: str = option(
        "", "diffusers SD 1.x/2.x, SDXL, SD3.x or FLUX.1 pipeline: folder or Hub id", required=True
    )
    output_dir: str = option("finetune-out", "where the LoRA, checkpoints, metrics and curves go")
    reward_model: str | None = option(None, "GAN-RM reward model folder or Hub id (ganrm train-rm)")
    prompts: str | None = option(None, "text file, one prompt per line (the prompts to sample and train on)")
    resolution: int | None = option(None, "image size in pixels (default: the pipeline's)")
    # LoRA
    lora_rank: int = option(4, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1)")
    lora_targets: str | None = option(
        None,
        "comma-separated modules that get a LoRA (default: UNets "
        f"{','.join(DEFAULT_TARGET_MODULES)}; flow transformers {','.join(FLOW_TARGET_MODULES)})",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW (less optimizer memory; needs bitsandbytes)")
    # Optimisation
    learning_rate: float = option(1e-4, "AdamW learning rate")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    lr_scheduler: str = option(
        "constant",
        "learning-rate schedule (diffusers.optimization.get_scheduler)",
        choices=("constant", "constant_with_warmup", "linear", "cosine"),
    )
    lr_warmup_steps: int = option(0, "warm-up optimizer steps of the schedule")
    train_batch_size: int = option(4, "examples per process per micro-batch (PRDP: samples per UNet call)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_train_steps: int = option(100, "optimizer steps")
    mixed_precision: str = option(
        "no", "accelerate mixed precision of the frozen weights", choices=("no", "fp16", "bf16")
    )
    seed: int = option(0, "seed of everything random: data order, noise, timesteps, samples")
    checkpoint_every: int = option(50, "write a checkpoint every this many optimizer steps (PRDP: epochs)")
    checkpoints_total_limit: int | None = option(2, "keep this many newest checkpoints (none: all)")
    resume: str | None = option(None, "'latest' or a checkpoint folder: continue that run exactly")
    # Sampling
    num_inference_steps: int = option(50, "DDIM steps when sampling")
    guidance_scale: float = option(5.0, "classifier-free guidance when sampling")
    eta: float = option(
        0.0, "DDIM eta when sampling; for flow-matching models the SDE noise level in [0, 1) (0: deterministic steps)"
    )
    max_sequence_length: int | None = option(None, "text tokens of SD3 / FLUX's T5 encoder (default: the pipeline's)")
    sample_batch_size: int | None = option(None, "samples per UNet call when sampling (default: all at once)")
    candidate_cache: str | None = option(
        None, "a folder where sampled candidates are kept and reused by runs that would sample the same ones"
    )
    # Evaluation (needs --reward_model)
    eval_every: int = option(0, "measure the mean reward of fixed samples every this many steps (0: start and end)")
    eval_prompts: int = option(8, "how many of the prompts the evaluation samples")
    eval_samples_per_prompt: int = option(2, "samples per evaluation prompt")

    # Settings whose change would make a resumed run another run.
    RESUME_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "pretrained_model",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "train_batch_size",
        "gradient_accumulation_steps",
        "seed",
    )

    @property
    def method(self) -> str:
        return "finetune"

    def check(self) -> None:
        if not self.pretrained_model:
            raise TrainingConfigError("--pretrained_model is required")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")


def parse_config(config_class: type[FinetuneConfig], argv: Sequence[str] | None = None, description: str = ""):
    parser = OptionParser(description=description or config_class.__doc__)
    add_config_arguments(parser, config_class)
    return config_from_args(config_class, parser.parse_args(argv))
