"""The supervised loop SFT and DPO share (`train_on_examples`): batches, noise, the denoising target, the
reference prediction, and the loss a method passes in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.lora import adapters_disabled
from ganrm_diffusers.generation.sampling import Conditioning
from ganrm_diffusers.training.config import TrainingConfigError
from ganrm_diffusers.training.examples import PreferenceExamples, evaluate_reward
from ganrm_diffusers.training.run import (
    PROMPT_CACHE_SIZE,
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
