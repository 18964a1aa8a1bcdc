"""Diffusion-DPO on the best and worst of N candidates per prompt under the GAN-RM, as a LoRA.

    accelerate launch training/train_dpo.py --pretrained_model PIPELINE --reward_model RM --prompts prompts.txt \
        --output_dir out/dpo            # samples N candidates per prompt now: (best, worst) pairs
    accelerate launch training/train_dpo.py --pretrained_model PIPELINE --candidates DIR --output_dir out/dpo

The loss is Wallace et al. 2024's (ganrm_diffusers.training.losses.diffusion_dpo_loss, beta as its
DPO_BETA_CONVENTION says). The reference is the same UNet with its LoRA switched off: no second copy in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ganrm_diffusers.training.config import FinetuneConfig, TrainingConfigError, option, parse_config
from ganrm_diffusers.training.examples import PreferenceExamples, build_examples, config_prompts
from ganrm_diffusers.training.loop import Batch, reference_predict, train_on_examples
from ganrm_diffusers.training.losses import DPO_BETA_CONVENTION, diffusion_dpo_loss
from ganrm_diffusers.training.run import FinetuneRun, finish_run, setup_run

logger = logging.getLogger(__name__)

BETA_HELP = DPO_BETA_CONVENTION


@dataclass
class DPOConfig(FinetuneConfig):
    """Diffusion-DPO on (best, worst) of N candidates per prompt under the GAN-RM."""

    candidates: str | None = option(None, "a `ganrm sample` folder to train on (default: sample from --prompts now)")
    num_candidates: int = option(8, "candidates sampled per prompt when sampling now (at least 2: best and worst)")
    beta: float = option(5000.0, BETA_HELP)

    @property
    def method(self) -> str:
        return "dpo"

    def check(self) -> None:
        super().check()
        check_pair_candidates(self.num_candidates, sampling=not self.candidates)


def check_pair_candidates(num_candidates: int, sampling: bool = True) -> None:
    """DPO pairs the best and the worst of a prompt's candidates: one candidate would pair an image with itself."""
    if sampling and num_candidates < 2:
        raise TrainingConfigError(
            f"DPO pairs the best and the worst of each prompt's candidates: --num_candidates must be at least 2, "
            f"got {num_candidates}"
        )


def report_dropped_pairs(run: FinetuneRun, examples: PreferenceExamples) -> None:
    """Say how many (best, worst) pairs were left out (the same image, or tied rewards), and fail if all were."""
    if examples.dropped_pairs:
        message = (
            f"left out {examples.dropped_pairs} of {examples.dropped_pairs + len(examples)} (best, worst) pairs: "
            "winner and loser were the same image or had tied rewards"
        )
        logger.warning(message)
        run.print(message)
    if len(examples) == 0:
        raise TrainingConfigError(
            "no DPO pairs left: every prompt's best and worst candidates tied on reward (a constant reward model, "
            "or identical candidates: sample with more candidates or another seed)"
        )


def dpo_loss(run: FinetuneRun, batch: Batch):
    """Winners and losers in one model call, with the same noise and timestep per pair."""
    latents = torch.cat([batch.winners, batch.losers])
    noise, timesteps = torch.cat([batch.noise, batch.noise]), torch.cat([batch.timesteps, batch.timesteps])
    noisy, target = run.objective.noisy_and_target(latents, noise, timesteps)
    texts = batch.texts + batch.texts
    prediction = run.objective.predict(run.denoiser, noisy, timesteps, texts)
    reference = reference_predict(run, noisy, timesteps, texts)
    result = diffusion_dpo_loss(prediction, reference, target, run.config.beta)
    return result.loss, {"implicit_accuracy": float(result.implicit_accuracy)}


CURVES = (
    ("DPO loss", ("loss",)),
    ("implicit accuracy", ("implicit_accuracy",)),
    ("reward of fixed samples", ("eval_reward",)),
)


def train(config: DPOConfig, run: FinetuneRun | None = None) -> dict:
    """Run Diffusion-DPO; returns the run's summary (also in output_dir/metrics.json)."""
    run = run or setup_run(config)
    examples = build_examples(
        run, candidates=config.candidates, num_candidates=config.num_candidates, top_k=1, pairs=True
    )
    report_dropped_pairs(run, examples)
    eval_prompts = config_prompts(config) if config.prompts and run.reward_model is not None else None
    train_on_examples(run, examples, dpo_loss, eval_prompts=eval_prompts)
    margin = float((examples.winner_scores - examples.loser_scores).mean())
    summary = {"pairs": len(examples), "dropped_pairs": examples.dropped_pairs, "mean_score_margin": margin}
    return finish_run(run, CURVES, summary)


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DPOConfig, argv))


if __name__ == "__main__":
    main()
