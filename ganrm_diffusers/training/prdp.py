"""PRDP (Deng et al., CVPR 2024) online with a GAN-RM reward, as a LoRA: reward-difference regression with proximal
clipping on trajectories the model samples itself.

    accelerate launch training/train_prdp.py --pretrained_model PIPELINE --reward_model RM --prompts prompts.txt \
        --output_dir out/prdp

Each epoch: theta_old is the current LoRA; N prompts are drawn and B trajectories sampled for each (DDIM, eta > 0,
guidance) with their per-step log-probabilities, scored by the reward model; then K gradient steps on
max((D - R/beta)^2, (D_clip - R/beta)^2) over all pairs of trajectories of the same prompt, D the difference of the
pair's log-ratios to the frozen reference (the UNet with its LoRA off), averaged over the stochastic steps, D_clip
the same with every per-step ratio clipped to theta_old's +- eps (ganrm_diffusers.losses.prdp_loss).

Defaults are the authors' small-scale settings (N 32, B 16, 50 DDIM steps with eta 1, guidance 5, weight decay
1e-4, grad-norm clip 1) except where a LoRA and a GAN-RM need otherwise, each the value the embedded world's demo
runs with. Rewards: the authors' beta 3e-5 goes with raw HPSv2 rewards, whose gaps within a prompt are about 100x
smaller than GAN-RM logit gaps; here rewards are standardised within each prompt by default
(--reward_normalization per_prompt: minus the prompt's mean, over its std across the B samples), so their
differences are O(1) whatever the reward model, and beta defaults to 30 (see BETA_HELP). Optimisation: the authors
fine-tune the whole UNet at lr 1e-5 with K 10 and eps 1e-6; a LoRA learns at the usual 3e-4 (ddpo-pytorch's), with
K 2 inner steps at that rate, and eps 1e-3, as 1e-6 per element clips a LoRA's log-ratios to nothing. Scale
convention: log-probabilities are means over latent elements and ratios means over steps, so beta and eps are per
element and per step. A warning names a beta that puts the targets R/beta more than 100x away from the log-ratio
gaps the run shows.

Adversarial (`--adversarial --target_dir TARGETS`, GAN-RM's loop online): every `refresh_every` epochs the reward
model's head is retrained on the target images against the samples PRDP drew in those epochs (and a replay of
earlier windows), so the reward follows the current generator and an exploit becomes a negative
(ganrm_diffusers.training.adversary). Each refresh records the refreshed head's held-out AUC against the current
generator and the old head's on the same images (the hacking alarm), and keeps the LoRA and the reward model of
that moment in output_dir/refresh-<k>/ for judging the run refresh by refresh.

The loss depends on all steps of a trajectory at once (through the mean over T), yet all B x T UNet evaluations
cannot keep their graphs at once on a real model. Each gradient step therefore takes the loss's gradient with
respect to the per-step log-ratios first (no UNet graph), then backpropagates `coefficient x log-prob` one chunk
of (samples, step) at a time: the exact gradient in bounded memory. Chunks whose coefficients are all zero (every
ratio clipped) are skipped.
"""

from __future__ import annotations

import json
import logging
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.flow_sampler import DEFAULT_NOISE_LEVEL
from ganrm_diffusers.generation.lora import save_lora
from ganrm_diffusers.generation.sampling import Trajectory
from ganrm_diffusers.reward.embedding_cache import embed_files
from ganrm_diffusers.reward.training import RewardTrainingConfig
from ganrm_diffusers.training.adversary import OnlineDiscriminator
from ganrm_diffusers.training.config import FinetuneConfig, TrainingConfigError, option, parse_config
from ganrm_diffusers.training.examples import config_prompts, evaluate_reward, score_images
from ganrm_diffusers.training.losses import normalize_rewards, prdp_loss, regression_scales
from ganrm_diffusers.training.run import (
    FinetuneRun,
    checkpoint,
    finish_run,
    make_optimizer,
    optimizer_step,
    resume_if_asked,
    setup_run,
)
from ganrm_diffusers.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

# Why 30: with per-prompt standardised rewards a pair's reward difference is O(1) (about 1.1 on average for B = 16),
# so beta 30 gives targets R/beta of about 0.04, in the range of the mean log-ratios a LoRA reaches; and 30 is the
# beta measured to work in the embedded world's demo on raw GAN-RM logit gaps of about 1, the same scale.
DEFAULT_BETA = 30.0
BETA_HELP = (
    "KL strength: the regression target of a pair is (reward difference) / beta. Convention: log-probs are means "
    "over latent elements and log-ratios means over the stochastic steps, so beta (and clip_eps) are per element "
    "and per step. The default 30 goes with per-prompt standardised rewards (differences of about 1, targets of "
    "about 0.04, the size of the log-ratios a LoRA reaches; 30 is also the beta measured to work in the demo on "
    "raw logit gaps of about 1). "
    "The authors' 3e-05 (small scale) / 3e-06 (large scale) go with raw HPSv2 rewards (--reward_normalization none)"
)
REWARD_NORMALIZATION_HELP = (
    "per_prompt: standardise the rewards within each prompt (minus the prompt's mean, divided by its std over the "
    "samples_per_prompt samples + 1e-4), so beta does not depend on the reward model's scale; none: reward_scale x "
    "GAN-RM logit as it is (the authors' setting, whose beta then must match the logit gaps)"
)
REWARD_SCALE_HELP = (
    "multiplies the GAN-RM logits before the loss (no effect with per_prompt normalisation). With none, 1 keeps "
    "logits, whose gaps between samples of one prompt are about 100x HPSv2's, so the authors' beta then means a "
    "100x weaker KL tie to the reference"
)
# A target R/beta more than this many times the log-ratio gaps the model shows means beta (or the reward scale)
# is off: the regression then asks for log-ratios the model never reaches, and nothing ties it to the reference.
TARGET_MISMATCH = 100.0
# Log-ratios start at exactly 0 (the LoRA starts as the base model): gaps below this count as this much, so that a
# sound run's targets (about 0.04) never warn while its log-ratios are still growing.
LOG_RATIO_FLOOR = 1e-3


@dataclass
class PRDPConfig(FinetuneConfig):
    """Online PRDP with a GAN-RM reward. Defaults follow the authors' small-scale setting (N, B, eta, weight decay)
    except where a LoRA and a GAN-RM need otherwise, each the value the embedded world's demo runs with: beta 30 for
    per-prompt standardised rewards (see --beta, --reward_normalization); learning rate 3e-4, the usual LoRA rate
    (ddpo-pytorch's), where the authors' 1e-5 fine-tunes the whole UNet; K = 2 inner steps at that rate; clip_eps
    1e-3 per element, as the authors' 1e-6 clips a LoRA's per-element log-ratios to nothing."""

    epochs: int = option(100, "epochs: each samples fresh trajectories, then takes inner_steps gradient steps")
    inner_steps: int = option(2, "K: gradient steps per epoch on that epoch's trajectories")
    prompts_per_epoch: int = option(32, "N: prompts drawn per epoch (split across processes)")
    samples_per_prompt: int = option(16, "B: trajectories per prompt; pairs are only formed within a prompt")
    beta: float = option(DEFAULT_BETA, BETA_HELP)
    clip_eps: float = option(1e-3, "proximal clipping of each per-step log-ratio around theta_old's (per element)")
    reward_normalization: str = option("per_prompt", REWARD_NORMALIZATION_HELP, choices=("per_prompt", "none"))
    reward_scale: float = option(1.0, REWARD_SCALE_HELP)
    learning_rate: float = option(3e-4, "AdamW learning rate (LoRA)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    eta: float | None = option(
        None,
        "noise of the sampled trajectories (> 0: PRDP needs stochastic steps); default: DDIM eta 1 for UNets, the "
        f"flow SDE's noise level {DEFAULT_NOISE_LEVEL} for flow-matching models",
    )
    checkpoint_every: int = option(10, "write a checkpoint every this many epochs (an epoch's samples are not kept)")
    max_train_steps: int = option(0, "unused by PRDP: it takes epochs x inner_steps optimizer steps")
    adversarial: bool = option(
        False, "refresh the reward model's head against the current generator's samples (needs --target_dir)"
    )
    target_dir: str = option("", "adversarial: folder of target images, the discriminator's positives")
    refresh_every: int = option(2, "adversarial: epochs between refreshes (and after the last epoch)")
    rm_replay: int = option(2, "adversarial: earlier windows of samples kept as negatives beside the newest")
    rm_max_epochs: int = option(30, "adversarial: head epochs per refresh (early stopping on held-out loss)")
    rm_fresh_head: bool = option(False, "adversarial: retrain the head from scratch at each refresh (not warm)")

    # An adversarial run's discriminator follows these: resuming with others would be another run.
    RESUME_KEYS: typing.ClassVar[tuple[str, ...]] = (
        *FinetuneConfig.RESUME_KEYS,
        "adversarial",
        "target_dir",
        "refresh_every",
        "rm_replay",
        "rm_max_epochs",
        "rm_fresh_head",
    )

    @property
    def method(self) -> str:
        return "prdp"

    def check(self) -> None:
        self.max_train_steps = self.epochs * self.inner_steps
        super().check()
        if self.eta is not None and self.eta <= 0:
            raise TrainingConfigError("PRDP needs stochastic steps: --eta must be > 0")
        if self.samples_per_prompt < 2:
            raise TrainingConfigError("PRDP compares trajectories of a prompt: --samples_per_prompt must be >= 2")
        if self.reward_normalization not in ("per_prompt", "none"):
            raise TrainingConfigError(
                f"--reward_normalization must be per_prompt or none, got {self.reward_normalization!r}"
            )
        if self.beta <= 0:
            raise TrainingConfigError(f"--beta must be positive, got {self.beta}")
        if self.adversarial and not self.target_dir:
            raise TrainingConfigError("--adversarial refreshes the reward model on target images: pass --target_dir")
        if self.refresh_every < 1 or self.rm_replay < 0 or self.rm_max_epochs < 1:
            raise TrainingConfigError("--refresh_every and --rm_max_epochs must be >= 1, --rm_replay >= 0")

    def reward_training(self) -> RewardTrainingConfig:
        """How each refresh trains the head (the reward trainer's defaults, this run's seed and epochs)."""
        return RewardTrainingConfig(max_epochs=self.rm_max_epochs, seed=self.seed)


@dataclass
class EpochSamples:
    """One process's share of an epoch: P prompts x B trajectories with their per-step log-probabilities under
    theta_old and the reference (stochastic steps only), and rewards."""

    trajectory: Trajectory
    steps: list[int]
    old_log_probs: torch.Tensor  # (P * B, S)
    ref_log_probs: torch.Tensor  # (P * B, S)
    rewards: torch.Tensor  # (P * B,), as the loss sees them (standardised per prompt unless normalization is none)
    logits: torch.Tensor  # (P * B,), the reward model's raw scores


def draw_prompts(num_prompts: int, count: int, seed: int, epoch: int) -> np.ndarray:
    """The prompt indices of an epoch (without repetition while there are enough prompts)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.choice(num_prompts, size=count, replace=count > num_prompts)


@torch.no_grad()
def sample_epoch(run: FinetuneRun, prompts: list[str], epoch: int) -> EpochSamples:
    config, accelerator = run.config, run.accelerator
    drawn = draw_prompts(len(prompts), config.prompts_per_epoch, config.seed, epoch)
    share = config.prompts_per_epoch // accelerator.num_processes
    slots = range(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    per_prompt = config.samples_per_prompt
    base = (config.seed * 7919 + epoch) * config.prompts_per_epoch * per_prompt
    seeds = [base + slot * per_prompt + sample for slot in slots for sample in range(per_prompt)]
    run.model.eval()
    trajectory = run.sampler.sample(
        [prompts[drawn[slot]] for slot in slots], seeds, height=config.resolution, width=config.resolution
    )
    steps = run.sampler.stochastic_steps
    reference = torch.stack([run.sampler.reference_log_prob(trajectory, step, run.model) for step in steps], dim=1)
    logits = score_images(run, trajectory.images, trajectory.prompts)
    rewards = normalize_rewards((logits * config.reward_scale).view(-1, per_prompt), config.reward_normalization)
    return EpochSamples(
        trajectory=trajectory,
        steps=steps,
        old_log_probs=trajectory.log_probs[:, steps].float(),
        ref_log_probs=reference.float(),
        rewards=rewards.flatten(),
        logits=logits,
    )


def prdp_step(run: FinetuneRun, samples: EpochSamples, current: torch.Tensor) -> dict:
    """Backpropagate the PRDP loss at the current LoRA, whose per-step log-probabilities are `current` (no graph):
    first d loss / d log-prob, then coefficient x log-prob through the UNet chunk by chunk."""
    config, accelerator = run.config, run.accelerator
    shape = (-1, config.samples_per_prompt, len(samples.steps))
    leaf = current.detach().clone().requires_grad_()
    loss = prdp_loss(
        leaf.view(shape),
        samples.old_log_probs.view(shape),
        samples.ref_log_probs.view(shape),
        samples.rewards.view(shape[:2]),
        config.beta,
        config.clip_eps,
    )
    loss.backward()
    coefficients = leaf.grad
    count = len(current)
    pieces = [
        (column, torch.arange(start, min(start + config.train_batch_size, count)))
        for column in range(len(samples.steps))
        for start in range(0, count, config.train_batch_size)
    ]
    # Skip all-zero pieces but keep at least one: the last backward is the one that synchronises processes.
    active = [piece for piece in pieces if coefficients[piece[1], piece[0]].abs().sum() > 0] or pieces[-1:]
    run.model.train()
    chunks: dict[int, Trajectory] = {}  # each chunk of rows selected once, not once per step (a copy of T + 1 latents)
    for number, (column, rows) in enumerate(active):
        last = number == len(active) - 1
        if int(rows[0]) not in chunks:
            chunks[int(rows[0])] = samples.trajectory.select(rows)
        chunk = chunks[int(rows[0])]
        with accelerator.no_sync(run.denoiser) if not last else nullcontext(), accelerator.autocast():
            log_prob = run.sampler.log_prob(chunk, samples.steps[column], run.denoiser)
            accelerator.backward((coefficients[rows, column].to(log_prob.device) * log_prob).sum())
    ratio = (current - samples.ref_log_probs).mean(dim=1)
    moved = (current - samples.old_log_probs).abs()
    scales = regression_scales(ratio.view(shape[:2]), samples.rewards.view(shape[:2]), config.beta)
    return {
        "loss": float(loss.detach()),
        "clipped_fraction": float((moved > config.clip_eps).float().mean()),
        "log_ratio": float(ratio.mean()),
        "target_scale": scales.target,
        "log_ratio_gap": scales.log_ratio_gap,
        "active_pieces": len(active) / len(pieces),
    }


def warn_on_target_mismatch(run: FinetuneRun, logs: list[dict]) -> bool:
    """Warn (log and print, on the main process) if this epoch's targets and log-ratio gaps are far apart; returns
    whether they are."""
    target, gap = (float(np.mean([entry[key] for entry in logs])) for key in ("target_scale", "log_ratio_gap"))
    message = target_mismatch(target, gap, run.config.beta)
    if message and run.is_main:
        logger.warning(message)
        run.print(f"warning: {message}")
    return message is not None


def target_mismatch(target_scale: float, log_ratio_gap: float, beta: float) -> str | None:
    """A warning when the regression targets R/beta are more than TARGET_MISMATCH times away from the log-ratio
    gaps the model shows (gaps below LOG_RATIO_FLOOR count as the floor when the targets are the larger)."""
    if target_scale <= 0:
        return None
    if target_scale > TARGET_MISMATCH * max(log_ratio_gap, LOG_RATIO_FLOOR):
        factor, direction = target_scale / max(log_ratio_gap, LOG_RATIO_FLOOR), "above"
    elif log_ratio_gap > LOG_RATIO_FLOOR and log_ratio_gap > TARGET_MISMATCH * target_scale:
        factor, direction = log_ratio_gap / target_scale, "below"
    else:
        return None
    return (
        f"PRDP's regression targets R/beta (mean {target_scale:.3g}) are {factor:.0f}x {direction} the log-ratio gaps "
        f"the model shows (mean {log_ratio_gap:.3g}; log-probs are means over latent elements, ratios means over "
        f"steps): beta={beta:g} does not fit the reward scale. Use --reward_normalization per_prompt with a beta "
        "of about 30, or scale beta with the reward gaps"
    )


@torch.no_grad()
def current_log_probs(run: FinetuneRun, samples: EpochSamples) -> torch.Tensor:
    run.model.eval()
    return torch.stack([run.sampler.log_prob(samples.trajectory, step, run.model) for step in samples.steps], dim=1)


def image_spread(images: torch.Tensor, per_prompt: int) -> float:
    """Mean over prompts of the pixel standard deviation across a prompt's samples: it falls to 0 on collapse."""
    grouped = images.float().view(-1, per_prompt, *images.shape[1:])
    return float(grouped.std(dim=1).mean())


CURVES = (
    ("reward per epoch (on-policy samples)", ("reward", "eval_reward")),
    ("PRDP loss", ("loss",)),
    ("diversity: pixel std within a prompt", ("image_spread",)),
)
ADVERSARIAL_CURVES = (
    *CURVES,
    ("discriminator held-out AUC vs the current generator", ("auc_vs_current", "previous_auc_vs_current")),
)


def train(config: PRDPConfig, run: FinetuneRun | None = None) -> dict:
    """Run PRDP; returns the run's summary (also in output_dir/metrics.json)."""
    config.check()
    run = run or setup_run(config)
    if run.reward_model is None:
        raise TrainingConfigError("PRDP scores its samples: pass --reward_model")
    prompts = config_prompts(config)
    processes = run.accelerator.num_processes
    if config.prompts_per_epoch % processes:
        raise TrainingConfigError(
            f"--prompts_per_epoch {config.prompts_per_epoch} must divide among {processes} processes"
        )
    optimizer, lr_scheduler = make_optimizer(run, config.epochs * config.inner_steps)
    adversary = online_discriminator(run) if config.adversarial else None
    if adversary is not None:
        run.reward_model = adversary.model
    state = resume_if_asked(run, optimizer, lr_scheduler) or {"step": 0, "epoch": 0}
    if adversary is not None and state["epoch"] > 0:
        adversary.load(adversary_file(run, state["epoch"]))
        run.reward_model = adversary.model
    if state["epoch"] == 0 and (evaluation := evaluate_reward(run, prompts)):
        run.metrics.append({"step": 0, "epoch": 0, **evaluation})
    bar = tqdm(
        range(state["epoch"], config.epochs),
        initial=state["epoch"],
        total=config.epochs,
        desc="prdp epochs",
        disable=not run.accelerator.is_local_main_process,
    )
    warned = False  # the target-scale warning, once per run
    for epoch in bar:
        samples = sample_epoch(run, prompts, epoch)
        logs = []
        for inner in range(config.inner_steps):
            # At the first step the model is theta_old: its log-probabilities are the recorded ones.
            current = samples.old_log_probs if inner == 0 else current_log_probs(run, samples)
            step_logs = prdp_step(run, samples, current)
            step_logs["grad_norm"] = optimizer_step(run, optimizer, lr_scheduler)
            logs.append(step_logs)
        step = (epoch + 1) * config.inner_steps
        rewards = run.accelerator.gather(samples.logits)
        warned = warned or warn_on_target_mismatch(run, logs)
        record = {
            "step": step,
            "epoch": epoch + 1,
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "image_spread": image_spread(samples.trajectory.images, config.samples_per_prompt),
            **{key: float(np.mean([entry[key] for entry in logs])) for key in logs[0]},
            "lr": lr_scheduler.get_last_lr()[0],
        }
        if config.eval_every and (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            record.update(evaluate_reward(run, prompts))
        if adversary is not None:
            record.update(refresh_if_due(run, adversary, samples, epoch + 1))
        run.metrics.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.3g}", refresh=False)
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
            if adversary is not None and run.is_main:  # before the checkpoint: a checkpoint never lacks its state
                save_adversary(run, adversary, epoch + 1)
            checkpoint(run, step, optimizer, lr_scheduler, {"epoch": epoch + 1})
    bar.close()
    summary = {"epochs": config.epochs}
    if adversary is not None:
        summary["refreshes"] = adversary.refreshes
    return finish_run(run, ADVERSARIAL_CURVES if adversary is not None else CURVES, summary, x_key="epoch")


# --------------------------------------------------------------------------------------------------------------
# Adversarial: the reward model follows the generator


def online_discriminator(run: FinetuneRun) -> OnlineDiscriminator:
    """A copy of the run's reward model as the starting discriminator (the caller's model is never changed), with
    the target images embedded once."""
    config = run.config
    model = run.reward_model.copy()
    if model.config.prompt_aware:
        raise TrainingConfigError("--adversarial refreshes image-only reward models (as GAN-RM); this is prompt-aware")
    targets = embed_files(model.encoder, config.target_dir, cache=None, strict=False, min_images=8).embeddings
    return OnlineDiscriminator(
        model=model,
        targets=targets.float().cpu(),
        config=config.reward_training(),
        replay=config.rm_replay,
        warm_start=not config.rm_fresh_head,
    )


def adversary_file(run: FinetuneRun, epoch: int) -> Path:
    """The discriminator's state at the checkpoint of `epoch`, in output_dir/adversary/ beside the checkpoints (a
    resumed run reads it from its own output_dir)."""
    return run.output_dir / "adversary" / f"epoch-{epoch:05d}.safetensors"


def save_adversary(run: FinetuneRun, adversary: OnlineDiscriminator, epoch: int) -> None:
    """Save the discriminator's state of `epoch`, keeping as many states as checkpoints_total_limit keeps
    checkpoints."""
    adversary.save(adversary_file(run, epoch))
    limit = run.config.checkpoints_total_limit
    if limit:
        for stale in sorted((run.output_dir / "adversary").glob("epoch-*.safetensors"))[:-limit]:
            stale.unlink(missing_ok=True)


def refresh_if_due(run: FinetuneRun, adversary: OnlineDiscriminator, samples: EpochSamples, epoch: int) -> dict:
    """Add the epoch's samples to the current window; at a refresh epoch (every refresh_every, and the last) refresh
    the discriminator, make it the run's reward model, and keep the LoRA and the reward model of that moment in
    output_dir/refresh-<k>/. Returns the refresh's monitors for the epoch's record ({} between refreshes)."""
    config = run.config
    adversary.observe(run.accelerator.gather(samples.trajectory.images.contiguous()))
    if epoch % config.refresh_every and epoch != config.epochs:
        return {}
    folder = run.output_dir / f"refresh-{len(adversary.refreshes) + 1:02d}"
    # The main process refreshes and saves; the others take its head, so every process scores with one model.
    if run.is_main:
        entry = adversary.refresh(epoch=epoch)
        save_lora(run.denoiser, folder / "lora", pretrained_model=config.pretrained_model)
        adversary.model.save_pretrained(folder / "reward_model")
        write_json_atomic(folder / "refresh.json", entry)
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        entry = json.loads((folder / "refresh.json").read_text())
        adversary.adopt(folder / "reward_model", entry)
    run.reward_model = adversary.model
    if run.is_main:
        run.print(
            f"refresh {entry['refresh']} (epoch {epoch}): AUC {entry['auc_vs_current']:.3f} against the current"
            f" generator ({entry['previous_auc_vs_current']:.3f} before the refresh)"
        )
    return {key: entry[key] for key in ("auc_vs_current", "previous_auc_vs_current")}


def main(argv: list[str] | None = None) -> None:
    train(parse_config(PRDPConfig, argv))


if __name__ == "__main__":
    main()
