"""Shared code of the LoRA fine-tuning trainers (`training/train_{sft,dpo,prdp,rounds}.py`, `ganrm train METHOD`).

One configuration style (a dataclass per trainer, all sharing `FinetuneConfig`, turned into command-line options
by `add_config_arguments`), one set-up (`setup_run`: accelerate, the pipeline, the LoRA of `ganrm_diffusers.lora`,
the sampler of `ganrm_diffusers.sampling`, the reward model), one checkpoint path (`ganrm_diffusers.training_state`),
one supervised loop for SFT and DPO (`train_on_examples`), and one way to finish a run (`finish_run`: the LoRA in
diffusers and kohya/ComfyUI format, metrics.json, curves.png).

Distributed runs (`accelerate launch --num_processes P`) split every optimizer step's examples across processes;
the examples of a step, their noise and their timesteps depend only on the seed, the epoch and the example, so P
processes with gradient accumulation A train like one process with accumulation P * A.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import typing
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.atomic import save_tensors_atomic, write_json_atomic, write_text_atomic
from ganrm_diffusers.errors import GanrmError
from ganrm_diffusers.lora import DEFAULT_TARGET_MODULES, adapters_disabled, add_lora, save_lora, unwrap_model
from ganrm_diffusers.sampling import Conditioning, DDIMLogProbSampler, encode_images
from ganrm_diffusers.selection import select_top_k
from ganrm_diffusers.training_state import (
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    read_tensors,
    resolve_resume,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "metrics.json"
CURVES_NAME = "curves.png"
DATA_DIR = "data"
PROMPT_CACHE_SIZE = 4096  # prompts whose text-encoder outputs a run keeps (SD 1.5: about 0.24 MB each)


class TrainingConfigError(GanrmError, ValueError):
    """Settings that cannot train (no prompts, a batch larger than the data, a checkpoint of another run)."""


def option(default: object = MISSING, help: str = "", **extra: object):  # noqa: A002 - argparse's word
    """A config field with its command-line help (and `choices`, `required`)."""
    return field(default=default, metadata={"help": help, **extra})


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    """Settings every trainer shares. Sampling settings serve on-the-fly data, PRDP's trajectories and evaluation."""

    pretrained_model: str = option("", "diffusers SD 1.x/2.x or SDXL pipeline: folder or Hub id", required=True)
    output_dir: str = option("finetune-out", "where the LoRA, checkpoints, metrics and curves go")
    reward_model: str | None = option(None, "GAN-RM reward model folder or Hub id (ganrm train-rm)")
    prompts: str | None = option(None, "text file, one prompt per line (the prompts to sample and train on)")
    resolution: int | None = option(None, "image size in pixels (default: the pipeline's)")
    # LoRA
    lora_rank: int = option(4, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1)")
    lora_targets: str = option(",".join(DEFAULT_TARGET_MODULES), "comma-separated UNet modules that get a LoRA")
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
    eta: float = option(0.0, "DDIM eta when sampling (0: deterministic steps)")
    sample_batch_size: int | None = option(None, "samples per UNet call when sampling (default: all at once)")
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


def _argument_type(annotation: object) -> type:
    """The scalar type of `int`, `float | None`, ... (None allowed through the default)."""
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return arguments[0] if arguments else annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[FinetuneConfig]) -> None:
    """One `--field` option per config field, with its default and help (booleans as --x/--no-x)."""
    hints = typing.get_type_hints(config_class)
    defaults = config_class()
    for item in fields(config_class):
        kind = _argument_type(hints[item.name])
        default = getattr(defaults, item.name)
        help_text = item.metadata.get("help", "")
        extra = {"choices": item.metadata["choices"]} if "choices" in item.metadata else {}
        if item.metadata.get("required"):
            parser.add_argument(f"--{item.name}", type=kind, required=True, help=help_text, **extra)
        elif kind is bool:
            parser.add_argument(
                f"--{item.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(f"--{item.name}", type=_none_or(kind), default=default, help=help_text + shown, **extra)


def _none_or(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def config_from_args(config_class: type[FinetuneConfig], args: argparse.Namespace) -> FinetuneConfig:
    values = {item.name: getattr(args, item.name) for item in fields(config_class) if hasattr(args, item.name)}
    return config_class(**values)


def parse_config(config_class: type[FinetuneConfig], argv: Sequence[str] | None = None, description: str = ""):
    parser = argparse.ArgumentParser(description=description or config_class.__doc__)
    add_config_arguments(parser, config_class)
    return config_from_args(config_class, parser.parse_args(argv))


# --------------------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class FinetuneRun:
    """Everything a trainer works with. `unet` is the accelerate-prepared (possibly DDP-wrapped) UNet with its LoRA;
    `model` the bare one. The pipeline's own UNet is that same bare UNet, so sampling uses the current weights."""

    config: FinetuneConfig
    accelerator: object
    pipe: object
    unet: torch.nn.Module
    sampler: DDIMLogProbSampler
    text_encoder: DDIMLogProbSampler  # the same pipeline without guidance: encodes training prompts, no negatives
    noise_scheduler: object
    reward_model: object | None
    weight_dtype: torch.dtype
    output_dir: Path
    metrics: MetricsLog
    started: float = field(default_factory=time.perf_counter)
    prompt_cache: dict = field(default_factory=dict)  # prompt -> its Conditioning, oldest first

    @property
    def model(self) -> torch.nn.Module:
        return unwrap_model(self.unet)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)


def setup_run(config: FinetuneConfig, *, pipe=None, reward_model=None, accelerator=None) -> FinetuneRun:
    """Load the pipeline (or use `pipe`), add the LoRA, load the reward model (or use `reward_model`), prepare the
    UNet for accelerate. The frozen weights take the mixed-precision dtype, the LoRA stays float32."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, DiffusionPipeline

    config.check()
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if pipe is None:
        try:
            pipe = DiffusionPipeline.from_pretrained(config.pretrained_model)
        except (OSError, ValueError) as error:
            raise TrainingConfigError(f"cannot load the pipeline {config.pretrained_model}: {error}") from error
    for name in ("unet", "vae"):
        if getattr(pipe, name, None) is None:
            raise TrainingConfigError(f"{config.pretrained_model} has no {name}: the trainers need SD 1.x/2.x or SDXL")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    if weight_dtype != torch.float32:
        pipe.to(dtype=weight_dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    unet = pipe.unet
    set_seed(config.seed)  # the LoRA's initial weights, and any randomness a trainer draws from the global RNGs
    if not hasattr(unet, "peft_config"):
        targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
        add_lora(unet, rank=config.lora_rank, alpha=config.lora_alpha, target_modules=targets)
    for parameter in unet.parameters():
        if parameter.requires_grad:  # trained weights in float32 whatever the frozen weights' dtype
            parameter.data = parameter.data.float()
    if reward_model is None and config.reward_model:
        from ganrm_diffusers.reward_model import GANRewardModel

        reward_model = GANRewardModel.from_pretrained(config.reward_model)
    if reward_model is not None:
        reward_model.to(accelerator.device).eval()
    sampler = DDIMLogProbSampler(
        pipe,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        eta=config.eta,
        chunk_size=config.sample_batch_size,
    )
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return FinetuneRun(
        config=config,
        accelerator=accelerator,
        pipe=pipe,
        unet=accelerator.prepare(unet),
        sampler=sampler,
        text_encoder=DDIMLogProbSampler(pipe, num_inference_steps=1, guidance_scale=1.0),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        reward_model=reward_model,
        weight_dtype=weight_dtype,
        output_dir=output_dir,
        metrics=MetricsLog(output_dir / METRICS_NAME, accelerator.is_main_process),
    )


def make_optimizer(run: FinetuneRun, num_training_steps: int):
    """AdamW over the LoRA and the learning-rate schedule; the schedule is stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    config = run.config
    optimizer = torch.optim.AdamW(
        run.trainable_parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=num_training_steps,
    )
    return run.accelerator.prepare(optimizer), lr_scheduler


def resume_if_asked(run: FinetuneRun, optimizer, lr_scheduler, output_dir: Path | None = None) -> dict | None:
    """Restore the checkpoint `--resume` names into the run (None when starting afresh); checks that it belongs to
    a run with the same data-defining settings."""
    output_dir = output_dir or run.output_dir
    if not run.config.resume and list_checkpoints(output_dir):
        raise TrainingConfigError(
            f"{output_dir} holds checkpoints of an earlier run: continue it with --resume latest, or train into "
            "another output_dir"
        )
    folder = resolve_resume(output_dir, run.config.resume)
    if folder is None:
        if run.config.resume:
            run.print(f"no checkpoint in {output_dir}: starting a new run")
        run.metrics.truncate(-1)  # a new run: forget the records of an earlier, checkpoint-less attempt
        return None
    recorded = read_checkpoint_state(folder).get("config", {})
    differing = [key for key in run.config.RESUME_KEYS if key in recorded and recorded[key] != getattr(run.config, key)]
    if differing:
        shown = ", ".join(f"{key}: {recorded[key]!r} there, {getattr(run.config, key)!r} now" for key in differing)
        raise TrainingConfigError(f"{folder} belongs to a run with other settings ({shown})")
    state = load_checkpoint(run.accelerator, folder, run.unet, optimizer, lr_scheduler)
    run.metrics.truncate(state["step"])
    run.print(f"resumed from {folder} (step {state['step']})")
    return state


def checkpoint(run: FinetuneRun, step: int, optimizer, lr_scheduler, state: dict, output_dir: Path | None = None):
    save_checkpoint(
        run.accelerator,
        output_dir or run.output_dir,
        step,
        run.unet,
        optimizer,
        lr_scheduler,
        {**state, "config": asdict(run.config)},
        total_limit=run.config.checkpoints_total_limit,
    )


def optimizer_step(run: FinetuneRun, optimizer, lr_scheduler) -> float:
    """Clip, step, schedule, zero; returns the gradient norm before clipping."""
    norm = float("nan")
    if run.config.max_grad_norm > 0:
        norm = float(run.accelerator.clip_grad_norm_(run.trainable_parameters(), run.config.max_grad_norm))
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# --------------------------------------------------------------------------------------------------------------
# Metrics and outputs


class MetricsLog:
    """metrics.jsonl: one JSON record per optimizer step (PRDP: per epoch), written by the main process."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Forget what a killed run logged after the checkpoint it resumes from (-1: everything)."""
        if self.enabled and self.path.is_file():
            kept = [record for record in self.records() if record.get("step", 0) <= step]
            text = "".join(json.dumps(record) + "\n" for record in kept)
            write_text_atomic(self.path, text)


def peak_memory() -> dict:
    """Peak resident memory of this process (VmHWM, MiB) and, on a GPU, peak allocated CUDA memory (MiB)."""
    memory = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                memory["peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        memory["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        memory["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def finish_run(
    run: FinetuneRun,
    curves: Sequence[tuple[str, Sequence[str]]],
    summary: dict | None = None,
    x_key: str = "step",
) -> dict:
    """Write the LoRA (diffusers + ComfyUI files), metrics.json and curves.png (`curves`: panel title and metric
    keys, against `x_key`); returns the summary."""
    run.accelerator.wait_for_everyone()
    summary = {
        "method": run.config.method,
        "config": asdict(run.config),
        "seconds": time.perf_counter() - run.started,
        **peak_memory(),
        **(summary or {}),
    }
    if run.is_main:
        diffusers_path, comfyui_path = save_lora(run.unet, run.output_dir, pretrained_model=run.config.pretrained_model)
        summary["lora"] = {"diffusers": str(diffusers_path), "comfyui": str(comfyui_path)}
        records = run.metrics.records()
        summary["final"] = records[-1] if records else {}
        write_json_atomic(run.output_dir / SUMMARY_NAME, summary)
        if records:
            from ganrm_diffusers.plots import plot_metric_curves

            title = f"{run.config.method} fine-tuning"
            plot_metric_curves(records, curves, run.output_dir / CURVES_NAME, title=title, x_key=x_key)
    run.accelerator.wait_for_everyone()
    return summary


# --------------------------------------------------------------------------------------------------------------
# Sampling and scoring


def read_prompts(config: FinetuneConfig) -> list[str]:
    from ganrm_diffusers.candidates import read_prompts_file

    if not config.prompts:
        raise TrainingConfigError("--prompts is required (a text file, one prompt per line)")
    return read_prompts_file(config.prompts)


def candidate_seeds(seed: int, prompt_index: int, count: int) -> list[int]:
    """The seeds of prompt `prompt_index`'s candidates: the rule of `ganrm sample`, so both give the same images."""
    from ganrm_diffusers.candidates import SampleSettings

    return SampleSettings(num_candidates=count, seed=seed).seeds(prompt_index)


def score_images(run: FinetuneRun, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    if run.reward_model is None:
        raise TrainingConfigError("this step scores images: pass --reward_model")
    prompts = list(prompts) if prompts is not None and run.reward_model.config.prompt_aware else None
    return run.reward_model.score(images, prompts).float()


@torch.no_grad()
def evaluate_reward(run: FinetuneRun, prompts: Sequence[str]) -> dict:
    """Mean reward of fixed samples (the same seeds every time) of the first `eval_prompts` prompts, all processes
    sampling the same set. The sampler draws with the run's eta and guidance; the UNet is in eval mode."""
    config = run.config
    if run.reward_model is None or config.eval_prompts < 1:
        return {}
    chosen = list(prompts)[: config.eval_prompts]
    per_prompt = config.eval_samples_per_prompt
    seeds = [10**9 + config.seed + index for index in range(len(chosen) * per_prompt)]
    was_training = run.model.training
    run.model.eval()
    trajectory = run.sampler.sample(chosen, seeds, height=config.resolution, width=config.resolution)
    run.model.train(was_training)
    rewards = score_images(run, trajectory.images, trajectory.prompts)
    return {"eval_reward": float(rewards.mean()), "eval_reward_std": float(rewards.std())}


# --------------------------------------------------------------------------------------------------------------
# Examples for SFT and DPO: the best (and worst) of N candidates per prompt, as latents


@dataclass
class PreferenceExamples:
    """Training examples as latents: `winners[i]` (and for DPO `losers[i]`) of prompt `prompts[prompt_ids[i]]`."""

    prompts: list[str]
    prompt_ids: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor | None = None
    winner_scores: torch.Tensor | None = None
    loser_scores: torch.Tensor | None = None
    dropped_pairs: int = 0  # DPO: (best, worst) pairs left out as the same image or tied rewards

    def __len__(self) -> int:
        return len(self.winners)

    def texts(self, ids: torch.Tensor) -> list[str]:
        return [self.prompts[int(self.prompt_ids[i])] for i in ids]

    def save(self, path: Path) -> None:
        tensors = {"prompt_ids": self.prompt_ids, "winners": self.winners}
        for name in ("losers", "winner_scores", "loser_scores"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        metadata = {"prompts": json.dumps(self.prompts), "dropped_pairs": str(self.dropped_pairs)}
        save_tensors_atomic(path, tensors, metadata)

    @classmethod
    def load(cls, path: Path) -> PreferenceExamples:
        tensors, metadata = read_tensors(path)
        dropped = int(metadata.get("dropped_pairs", 0))
        return cls(prompts=json.loads(metadata["prompts"]), **tensors, dropped_pairs=dropped)

    @classmethod
    def concatenate(cls, parts: Sequence[PreferenceExamples]) -> PreferenceExamples:
        prompts, ids = [], []
        for part in parts:
            ids.append(part.prompt_ids + len(prompts))
            prompts += part.prompts

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(value is None for value in values) else torch.cat(values)

        return cls(
            prompts=prompts,
            prompt_ids=torch.cat(ids),
            winners=joined("winners"),
            losers=joined("losers"),
            winner_scores=joined("winner_scores"),
            loser_scores=joined("loser_scores"),
            dropped_pairs=sum(part.dropped_pairs for part in parts),
        )


def choose_candidates(scores: torch.Tensor, group_size: int, top_k: int, pairs: bool):
    """Indices of the `top_k` best candidates of each group of `group_size` (prompt-major), their groups, and for
    DPO (`pairs`) the group's worst candidate for each of them. The rule is `select_top_k`'s, as in best-of-N.

    A pair whose winner is its loser, or whose rewards tie, teaches nothing (and a tie makes both the same index:
    ties go to the earlier candidate either way), so it is left out: returns (winners, groups, losers, how many
    pairs were left out)."""
    best = select_top_k(scores, top_k, group_size)
    if not pairs:
        return best.selected, best.groups, None, 0
    winners, groups = best.selected, best.groups
    losers = select_top_k(-scores.float(), 1, group_size).selected.repeat_interleave(top_k)
    scores = scores.float().cpu()
    keep = (winners != losers) & (scores[winners] > scores[losers])
    return winners[keep], groups[keep], losers[keep], int((~keep).sum())


def examples_from_candidates(
    prompts: Sequence[str], latents: torch.Tensor, scores: torch.Tensor, group_size: int, top_k: int, pairs: bool
) -> PreferenceExamples:
    """Examples from `group_size` scored candidate latents per prompt (prompt-major)."""
    scores = scores.float().cpu()
    winners, groups, losers, dropped = choose_candidates(scores, group_size, top_k, pairs)
    return PreferenceExamples(
        prompts=list(prompts),
        prompt_ids=groups.clone(),
        winners=latents[winners].float().cpu(),
        losers=None if losers is None else latents[losers].float().cpu(),
        winner_scores=scores[winners],
        loser_scores=None if losers is None else scores[losers],
        dropped_pairs=dropped,
    )


@torch.no_grad()
def sample_candidates(
    run: FinetuneRun, prompts: Sequence[str], prompt_indices: Sequence[int], num_candidates: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_candidates` samples of each prompt from the current model with `ganrm sample`'s seeds (prompt number
    `prompt_indices[i]` gets the same candidates whichever process samples it): (final latents, images in [0, 1]),
    prompt-major, on the CPU. Prompts share a sampler call up to `sample_batch_size` samples (default: one prompt
    per call, so that a prompt's candidates never depend on which prompts it was batched with)."""
    per_call = max(1, (run.config.sample_batch_size or num_candidates) // num_candidates)
    pairs = list(zip(prompts, prompt_indices, strict=True))
    latents, images = [], []
    run.model.eval()
    for start in tqdm(
        range(0, len(pairs), per_call),
        desc="sampling candidates",
        disable=not run.accelerator.is_local_main_process,
    ):
        part = pairs[start : start + per_call]
        seeds = [s for _, index in part for s in candidate_seeds(seed, index, num_candidates)]
        trajectory = run.sampler.sample(
            [text for text, _ in part], seeds, height=run.config.resolution, width=run.config.resolution
        )
        latents.append(trajectory.latents[:, -1].float().cpu())
        images.append(trajectory.images.cpu())
    run.model.train()
    return torch.cat(latents), torch.cat(images)


def sample_examples(
    run: FinetuneRun,
    prompts: Sequence[str],
    prompt_indices: Sequence[int],
    num_candidates: int,
    top_k: int,
    pairs: bool,
) -> PreferenceExamples:
    """Sample candidates, score them with the reward model, keep the best (and worst) as final latents (no VAE
    round trip)."""
    latents, images = sample_candidates(run, prompts, prompt_indices, num_candidates, run.config.seed)
    texts = [text for text in prompts for _ in range(num_candidates)]
    scores = score_images(run, images.to(run.device), texts)
    return examples_from_candidates(prompts, latents, scores, num_candidates, top_k, pairs)


def folder_examples(
    run: FinetuneRun, folder: Path, records: Sequence[dict], top_k: int, pairs: bool
) -> PreferenceExamples:
    """Examples from a `ganrm sample` folder: its recorded scores rank each prompt's candidates, and the chosen
    images are encoded with the pipeline's VAE."""
    from ganrm_diffusers.images import load_image, to_pixels

    by_prompt: dict[int, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt_index"], []).append(record)
    parts = []
    for index in tqdm(sorted(by_prompt), desc="encoding candidates", disable=not run.accelerator.is_local_main_process):
        group = sorted(by_prompt[index], key=lambda record: record["candidate"])
        scores = torch.tensor([record["score"] for record in group], dtype=torch.float32)
        winners, _, losers, dropped = choose_candidates(scores, len(group), top_k, pairs)
        chosen = winners.tolist() + ([] if losers is None else losers.tolist())
        # Every pair of a prompt may be left out: encode one image anyway, for the latents' shape.
        pixels = to_pixels([load_image(folder / group[i]["file_name"]) for i in chosen or [0]], device=run.device)
        latents = encode_images(run.pipe, pixels, run.config.sample_batch_size).cpu()[: len(chosen)]
        parts.append(
            PreferenceExamples(
                prompts=[group[0]["prompt"]],
                prompt_ids=torch.zeros(len(winners), dtype=torch.long),
                winners=latents[: len(winners)],
                losers=None if losers is None else latents[len(winners) :],
                winner_scores=scores[winners],
                loser_scores=None if losers is None else scores[losers],
                dropped_pairs=dropped,
            )
        )
    return PreferenceExamples.concatenate(parts)


def computed_in_parts(
    run: FinetuneRun,
    items: Sequence,
    part_path: Callable[[int, int], Path],
    compute: Callable[[list], object],
    save: Callable[[object, Path], None],
    load: Callable[[Path], object],
) -> list:
    """Split `items` across processes, `compute` each share and `save` it to `part_path(rank, processes)` unless
    that file exists (a resumed run reuses it), then every process `load`s every part: results in item order."""
    accelerator = run.accelerator
    path = part_path(accelerator.process_index, accelerator.num_processes)
    if not path.is_file():
        with accelerator.split_between_processes(list(items)) as mine:
            save(compute(list(mine)), path)
    accelerator.wait_for_everyone()
    return [load(part_path(rank, accelerator.num_processes)) for rank in range(accelerator.num_processes)]


def build_examples(
    run: FinetuneRun,
    *,
    candidates: str | None,
    num_candidates: int,
    top_k: int,
    pairs: bool,
) -> PreferenceExamples:
    """The training examples of SFT (`pairs=False`) or DPO (`pairs=True`): from a `ganrm sample` folder
    (`candidates`), else sampled now from the prompts file. Prepared in parts by all processes and kept in
    `<output_dir>/data/` (safetensors), so a resumed run trains on the very same examples."""
    kind = "pairs" if pairs else f"top{top_k}"

    def part_path(rank: int, processes: int) -> Path:
        return run.output_dir / DATA_DIR / f"{kind}-{rank}-of-{processes}.safetensors"

    if candidates:
        from ganrm_diffusers.candidates import read_records

        records = read_records(candidates)
        if not records:
            raise TrainingConfigError(f"{candidates} holds no candidates (no metadata.jsonl records)")
        groups = sorted({record["prompt_index"] for record in records})

        def compute(mine: list) -> PreferenceExamples:
            chosen = set(mine)
            subset = [record for record in records if record["prompt_index"] in chosen]
            return folder_examples(run, Path(candidates), subset, top_k, pairs)
    else:
        prompts = read_prompts(run.config)
        groups = list(range(len(prompts)))

        def compute(mine: list) -> PreferenceExamples:
            return sample_examples(run, [prompts[i] for i in mine], mine, num_candidates, top_k, pairs)

    if len(groups) < run.accelerator.num_processes:
        raise TrainingConfigError(
            f"{len(groups)} prompts cannot be shared by {run.accelerator.num_processes} processes"
        )
    parts = computed_in_parts(run, groups, part_path, compute, PreferenceExamples.save, PreferenceExamples.load)
    return PreferenceExamples.concatenate(parts)


# --------------------------------------------------------------------------------------------------------------
# The supervised loop of SFT and DPO


@dataclass
class Batch:
    """One process's micro-batch: example ids, their prompts, latents, noise and timesteps (fixed per example and
    epoch, so independent of how examples are split across processes and micro-batches)."""

    ids: torch.Tensor
    texts: list[str]
    winners: torch.Tensor
    losers: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def example_noise(ids: torch.Tensor, seed: int, epoch: int, shape: Sequence[int], num_timesteps: int):
    """Noise and a timestep per example, each from its own generator (seed, epoch, example)."""
    noise, timesteps = [], []
    for example in ids.tolist():
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + example)
        timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=generator)))
        noise.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(noise), torch.tensor(timesteps, dtype=torch.long)


def conditioning_kwargs(run: FinetuneRun, texts: Sequence[str]) -> dict:
    """The UNet's conditional (unguided) keyword arguments for these prompts, SDXL's added conditioning (and a
    guidance-distilled UNet's guidance embedding) included. The text encoders are frozen, so each prompt is
    encoded once and kept (up to PROMPT_CACHE_SIZE prompts)."""
    cache = run.prompt_cache
    missing = list(dict.fromkeys(text for text in texts if text not in cache))
    if missing:
        encoded = run.text_encoder.encode_prompts(missing, height=run.config.resolution, width=run.config.resolution)
        for index, text in enumerate(missing):
            cache[text] = encoded.select([index])
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    kwargs = Conditioning.concatenate([cache[text] for text in texts]).unet_kwargs(guided=False)
    timestep_cond = run.sampler.timestep_cond  # guidance-distilled UNets: trained at the guidance they sample with
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond.to(run.device, run.weight_dtype).expand(len(texts), -1)
    return kwargs


def denoising_target(run: FinetuneRun, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """(noisy latents, the UNet's training target) for the scheduler's prediction type."""
    scheduler = run.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return noisy, latents
    raise TrainingConfigError(f"unsupported prediction type {kind!r}")


def predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict, dtype) -> torch.Tensor:
    return unet(noisy.to(dtype), timesteps, **kwargs, return_dict=False)[0].float()


def reference_predict(run: FinetuneRun, noisy, timesteps, kwargs) -> torch.Tensor:
    """The base model's prediction: the same UNet with its adapters switched off, no gradients."""
    with torch.no_grad(), adapters_disabled(run.unet):
        return predict(run.model, noisy, timesteps, kwargs, run.weight_dtype)


BatchLoss = Callable[[FinetuneRun, Batch], tuple[torch.Tensor, dict]]


def train_on_examples(
    run: FinetuneRun,
    examples: PreferenceExamples,
    batch_loss: BatchLoss,
    *,
    eval_prompts: Sequence[str] | None = None,
    output_dir: Path | None = None,
) -> None:
    """SFT's and DPO's loop: `max_train_steps` optimizer steps over the examples in per-epoch shuffled order, each
    of `train_batch_size x processes x gradient_accumulation_steps` examples, `batch_loss` on each micro-batch;
    checkpoints every `checkpoint_every` steps into `output_dir` (default: the run's), resumable exactly."""
    config, accelerator = run.config, run.accelerator
    output_dir = output_dir or run.output_dir
    per_step = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise TrainingConfigError(
            f"an optimizer step takes {per_step} examples (train_batch_size x processes x accumulation) but there "
            f"are only {len(examples)}: lower --train_batch_size or add prompts"
        )
    optimizer, lr_scheduler = make_optimizer(run, config.max_train_steps)
    state = resume_if_asked(run, optimizer, lr_scheduler, output_dir) or {"step": 0}
    latent_shape = examples.winners.shape[1:]
    num_timesteps = run.noise_scheduler.config.num_train_timesteps
    if state["step"] == 0 and eval_prompts and (evaluation := evaluate_reward(run, eval_prompts)):
        run.metrics.append({"step": 0, **evaluation})
    run.model.train()
    bar = tqdm(
        range(state["step"], config.max_train_steps),
        initial=state["step"],
        total=config.max_train_steps,
        desc=f"{config.method} steps",
        disable=not accelerator.is_local_main_process,
    )
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)
        step_ids = epoch_order(len(examples), config.seed, epoch)[position * per_step : (position + 1) * per_step]
        logs: dict[str, float] = {}
        for micro in range(config.gradient_accumulation_steps):
            first = (micro * accelerator.num_processes + accelerator.process_index) * config.train_batch_size
            ids = step_ids[first : first + config.train_batch_size]
            noise, timesteps = example_noise(ids, config.seed, epoch, latent_shape, num_timesteps)
            batch = Batch(
                ids=ids,
                texts=examples.texts(ids),
                winners=examples.winners[ids].to(run.device),
                losers=None if examples.losers is None else examples.losers[ids].to(run.device),
                noise=noise.to(run.device),
                timesteps=timesteps.to(run.device),
            )
            last = micro == config.gradient_accumulation_steps - 1
            with accelerator.no_sync(run.unet) if not last else nullcontext(), accelerator.autocast():
                loss, batch_logs = batch_loss(run, batch)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            for key, value in {"loss": float(loss.detach()), **batch_logs}.items():
                logs[key] = logs.get(key, 0.0) + float(value) / config.gradient_accumulation_steps
        grad_norm = optimizer_step(run, optimizer, lr_scheduler)
        logs = _mean_over_processes(run, logs)
        record = {"step": step + 1, "epoch": epoch, **logs, "grad_norm": grad_norm, "lr": lr_scheduler.get_last_lr()[0]}
        done = step + 1
        if eval_prompts and (done == config.max_train_steps or (config.eval_every and done % config.eval_every == 0)):
            record.update(evaluate_reward(run, eval_prompts))
            run.model.train()
        run.metrics.append(record)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        if done % config.checkpoint_every == 0 or done == config.max_train_steps:
            next_epoch, next_position = divmod(done, steps_per_epoch)
            checkpoint(
                run,
                done,
                optimizer,
                lr_scheduler,
                {"epoch": next_epoch, "position": next_position, "examples": len(examples)},
                output_dir,
            )
    bar.close()


def _mean_over_processes(run: FinetuneRun, logs: dict[str, float]) -> dict[str, float]:
    if run.accelerator.num_processes == 1 or not logs:
        return logs
    values = torch.tensor(list(logs.values()), device=run.device, dtype=torch.float64)
    values = run.accelerator.reduce(values, reduction="mean")
    return dict(zip(logs, values.tolist(), strict=True))
