"""A fine-tuning run: set-up (accelerate, the pipeline, the LoRA, the shared sampler, the reward model),
optimizer, checkpoints and resume, metrics, and the finished outputs (the LoRA in diffusers and kohya/ComfyUI
format, metrics.json, curves.png).

Distributed runs (`accelerate launch --num_processes P`) split every optimizer step's examples across processes;
the examples of a step, their noise and their timesteps depend only on the seed, the epoch and the example, so P
processes with gradient accumulation A train like one process with accumulation P * A.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.flow_sampler import DEFAULT_NOISE_LEVEL, FlowLogProbSampler
from ganrm_diffusers.generation.lora import (
    DEFAULT_TARGET_MODULES,
    FLOW_TARGET_MODULES,
    add_lora,
    save_lora,
    unwrap_model,
)
from ganrm_diffusers.generation.sampling import DDIMLogProbSampler
from ganrm_diffusers.training.config import FinetuneConfig, TrainingConfigError
from ganrm_diffusers.training.objectives import DenoisingObjective, FlowMatchingObjective, UNetObjective
from ganrm_diffusers.training.state import (
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    resolve_resume,
    save_checkpoint,
)
from ganrm_diffusers.utils.atomic import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "metrics.json"
CURVES_NAME = "curves.png"
DATA_DIR = "data"
# The reward-guided pipeline classes of the families the trainers fine-tune (generation.pipeline.FAMILIES).
TRAINABLE_FAMILIES = (
    "RewardGuidedPipeline",
    "RewardGuidedXLPipeline",
    "RewardGuidedSD3Pipeline",
    "RewardGuidedFluxPipeline",
)


# --------------------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class FinetuneRun:
    """Everything a trainer works with. `denoiser` is the accelerate-prepared (possibly DDP-wrapped) UNet or
    transformer with its LoRA; `model` the bare one. The pipeline's own denoiser is that same bare model, so sampling
    uses the current weights. `sampler` draws trajectories with log-probabilities (DDIM for UNets, the flow SDE for
    flow-matching transformers); `objective` is how SFT and DPO noise examples and what the model predicts."""

    config: FinetuneConfig
    accelerator: object
    pipe: object
    denoiser: torch.nn.Module
    sampler: DDIMLogProbSampler | FlowLogProbSampler
    objective: DenoisingObjective
    reward_model: object | None
    weight_dtype: torch.dtype
    output_dir: Path
    metrics: MetricsLog
    started: float = field(default_factory=time.perf_counter)

    @property
    def model(self) -> torch.nn.Module:
        return unwrap_model(self.denoiser)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.denoiser.parameters() if parameter.requires_grad]

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)


def setup_run(config: FinetuneConfig, *, pipe=None, reward_model=None, accelerator=None) -> FinetuneRun:
    """Load the pipeline (or use `pipe`), add the LoRA, load the reward model (or use `reward_model`), prepare the
    denoiser for accelerate. The frozen weights take the mixed-precision dtype, the LoRA stays float32."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.check()
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if pipe is None:
        pipeline_class = _trainable_pipeline_class(config.pretrained_model)
        try:
            pipe = pipeline_class.from_pretrained(config.pretrained_model)
        except (OSError, ValueError) as error:
            raise TrainingConfigError(f"cannot load the pipeline {config.pretrained_model}: {error}") from error
    flow = _is_flow_pipeline(pipe)
    for name in ("transformer" if flow else "unet", "vae"):
        if getattr(pipe, name, None) is None:
            raise TrainingConfigError(
                f"{config.pretrained_model} has no {name}: the trainers need SD 1.x/2.x, SDXL, SD3.x or FLUX.1"
            )
    pipe.set_progress_bar_config(disable=True)
    # One move: cast while moving, so the device never holds the full-precision weights (48 GB for FLUX.1's 12B).
    pipe.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    denoiser = pipe.transformer if flow else pipe.unet
    set_seed(config.seed)  # the LoRA's initial weights, and any randomness a trainer draws from the global RNGs
    if not hasattr(denoiser, "peft_config"):
        default = FLOW_TARGET_MODULES if flow else DEFAULT_TARGET_MODULES
        targets = [name.strip() for name in (config.lora_targets or "").split(",") if name.strip()] or list(default)
        add_lora(denoiser, rank=config.lora_rank, alpha=config.lora_alpha, target_modules=targets)
    for parameter in denoiser.parameters():
        if parameter.requires_grad:  # trained weights in float32 whatever the frozen weights' dtype
            parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if reward_model is None and config.reward_model:
        from ganrm_diffusers.reward.model import GANRewardModel

        reward_model = GANRewardModel.from_pretrained(config.reward_model)
    if reward_model is not None:
        reward_model.to(accelerator.device).eval()
    sampler, objective = (_flow_parts if flow else _unet_parts)(pipe, config, weight_dtype)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return FinetuneRun(
        config=config,
        accelerator=accelerator,
        pipe=pipe,
        denoiser=accelerator.prepare(denoiser),
        sampler=sampler,
        objective=objective,
        reward_model=reward_model,
        weight_dtype=weight_dtype,
        output_dir=output_dir,
        metrics=MetricsLog(output_dir / METRICS_NAME, accelerator.is_main_process),
    )


def _unet_parts(pipe, config: FinetuneConfig, weight_dtype: torch.dtype):
    """DDIM with log-probs for sampling; DDPM noising for SFT and DPO, prompts encoded without guidance."""
    from diffusers import DDPMScheduler

    sampler = DDIMLogProbSampler(
        pipe,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        eta=1.0 if config.eta is None else config.eta,
        chunk_size=config.sample_batch_size,
    )
    encoder = DDIMLogProbSampler(pipe, num_inference_steps=1, guidance_scale=1.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Guidance-distilled UNets are trained at the guidance they sample with.
    objective = UNetObjective(encoder, scheduler, config.resolution, weight_dtype, sampler.timestep_cond)
    return sampler, objective


def _flow_parts(pipe, config: FinetuneConfig, weight_dtype: torch.dtype):
    """The flow SDE with log-probs for sampling (eta: its noise level); rectified-flow noising for SFT and DPO, with
    the family's unguided call (FLUX.1-dev keeps its distilled guidance input at the sampling scale)."""
    eta = DEFAULT_NOISE_LEVEL if config.eta is None else config.eta
    if not 0 <= eta < 1:
        raise TrainingConfigError(
            f"--eta is the flow SDE's noise level for flow-matching models, in [0, 1) (Flow-GRPO uses 0.7); got {eta}"
        )
    kwargs = {"max_sequence_length": config.max_sequence_length} if config.max_sequence_length else {}
    sampler = FlowLogProbSampler(
        pipe,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        eta=eta,
        chunk_size=config.sample_batch_size,
        **kwargs,
    )
    distilled = getattr(pipe.transformer.config, "guidance_embeds", False)
    encoder = FlowLogProbSampler(
        pipe, num_inference_steps=1, guidance_scale=config.guidance_scale if distilled else 1.0, eta=0.0, **kwargs
    )
    return sampler, FlowMatchingObjective(encoder, config.resolution, weight_dtype)


def _is_flow_pipeline(pipe) -> bool:
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def _trainable_pipeline_class(pretrained_model: str) -> type:
    """The class to load a pipeline with, refusing before any weights are read a pipeline the trainers cannot
    fine-tune (a family without a reward-guided adapter, or FLUX.2 klein and Qwen-Image, whose training is not wired).
    UNet pipelines load as they were saved; flow ones as their family's reward-guided pipeline, which also loads SD3
    saved without its T5 encoder."""
    from diffusers import DiffusionPipeline

    from ganrm_diffusers.generation.pipeline import UnsupportedPipelineError, reward_guided_class_for

    try:
        index = DiffusionPipeline.load_config(pretrained_model)
    except (OSError, ValueError):
        return DiffusionPipeline  # its from_pretrained names the problem
    try:
        family = reward_guided_class_for(index)
    except UnsupportedPipelineError as error:
        raise TrainingConfigError(str(error)) from error
    if family.__name__ not in TRAINABLE_FAMILIES:
        raise TrainingConfigError(
            f"{pretrained_model} is a {index.get('_class_name')}: the trainers fine-tune SD 1.x/2.x, SDXL, SD3.x and "
            "FLUX.1 (best-of-N serves it: load_reward_guided_pipeline)"
        )
    return DiffusionPipeline if "unet" in index else family


def make_optimizer(run: FinetuneRun, num_training_steps: int):
    """AdamW (8-bit with --use_8bit_adam) over the LoRA and the learning-rate schedule; the schedule is stepped
    once per optimizer step."""
    from diffusers.optimization import get_scheduler

    config = run.config
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise TrainingConfigError(
                "--use_8bit_adam needs bitsandbytes, which is not installed here (pip install bitsandbytes; it needs a "
                "CUDA GPU): train without --use_8bit_adam"
            ) from error
        optimizer_class = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_class(
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
    state = load_checkpoint(run.accelerator, folder, run.denoiser, optimizer, lr_scheduler)
    run.metrics.truncate(state["step"])
    run.print(f"resumed from {folder} (step {state['step']})")
    return state


def checkpoint(run: FinetuneRun, step: int, optimizer, lr_scheduler, state: dict, output_dir: Path | None = None):
    save_checkpoint(
        run.accelerator,
        output_dir or run.output_dir,
        step,
        run.denoiser,
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
        diffusers_path, comfyui_path = save_lora(
            run.denoiser, run.output_dir, pretrained_model=run.config.pretrained_model
        )
        summary["lora"] = {"diffusers": str(diffusers_path), "comfyui": str(comfyui_path)}
        records = run.metrics.records()
        summary["final"] = records[-1] if records else {}
        run.print("peak memory: " + ", ".join(f"{key} {value:.0f}" for key, value in peak_memory().items()))
        write_json_atomic(run.output_dir / SUMMARY_NAME, summary)
        if records:
            from ganrm_diffusers.utils.plots import plot_metric_curves

            title = f"{run.config.method} fine-tuning"
            plot_metric_curves(records, curves, run.output_dir / CURVES_NAME, title=title, x_key=x_key)
    run.accelerator.wait_for_everyone()
    return summary
