"""The supervised loop SFT and DPO share (`train_on_examples`): batches, their noise and timesteps (from the run's
`objective`, see objectives.py), the reference prediction, and the loss a method passes in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.lora import adapters_disabled
from ganrm_diffusers.training.config import TrainingConfigError
from ganrm_diffusers.training.examples import PreferenceExamples, evaluate_reward
from ganrm_diffusers.training.run import (
    FinetuneRun,
    checkpoint,
    make_optimizer,
    optimizer_step,
    resume_if_asked,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The supervised loop of SFT and DPO


@dataclass
class Batch:
    """One process's micro-batch: example ids, their prompts, latents, noise and timesteps (positions in the
    training schedule; fixed per example and epoch, so independent of how examples are split across processes and
    micro-batches)."""

    ids: torch.Tensor
    texts: list[str]
    winners: torch.Tensor
    losers: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def reference_predict(run: FinetuneRun, noisy: torch.Tensor, timesteps: torch.Tensor, texts: list[str]):
    """The base model's prediction: the same denoiser with its adapters switched off, no gradients."""
    with torch.no_grad(), adapters_disabled(run.denoiser):
        return run.objective.predict(run.model, noisy, timesteps, texts)


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
            noise, timesteps = run.objective.draw(ids, config.seed, epoch, latent_shape)
            batch = Batch(
                ids=ids,
                texts=examples.texts(ids),
                winners=examples.winners[ids].to(run.device),
                losers=None if examples.losers is None else examples.losers[ids].to(run.device),
                noise=noise.to(run.device),
                timesteps=timesteps.to(run.device),
            )
            last = micro == config.gradient_accumulation_steps - 1
            with accelerator.no_sync(run.denoiser) if not last else nullcontext(), accelerator.autocast():
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
