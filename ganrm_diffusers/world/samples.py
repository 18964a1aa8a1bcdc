"""Sampling the world's prompts on fixed seeds: the evaluation and tuning sets every demo row shares.

An `EvaluationPlan` fixes the prompts (`per_digit` of each digit, digit-major) and the candidate seeds (candidate j of
prompt i has seed `first_seed + i * num_candidates + j`). A one-sample method (the base model, a fine-tuned model)
draws prompt i from candidate 0's seed, so cell (i, j) of every row's grid shows the same prompt and seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.pruning import count_model_rows, denoiser_of


@dataclass(frozen=True)
class EvaluationPlan:
    per_digit: int
    first_seed: int
    num_candidates: int = 8

    @property
    def digits(self) -> np.ndarray:
        return np.repeat(np.arange(10), self.per_digit)

    def prompts(self, world: object) -> list[str]:
        return [world.prompts[digit] for digit in self.digits]

    @property
    def candidate_seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + len(self.digits) * self.num_candidates))

    @property
    def single_seeds(self) -> list[int]:
        """The seed of each prompt's first candidate: what a one-sample method draws from."""
        return self.candidate_seeds[:: self.num_candidates]

    def describe(self) -> dict:
        last = self.first_seed + len(self.digits) * self.num_candidates - 1
        return {"prompts": len(self.digits), "per_digit": self.per_digit, "seed_range": [self.first_seed, last]}


@dataclass
class SampleSet:
    images: torch.Tensor  # NCHW in [0, 1], CPU
    digits: np.ndarray
    unet_evaluations: int
    seconds: float


def sample_digits(
    pipe: object,
    world: object,
    plan: EvaluationPlan,
    batch_size: int = 100,
    desc: str = "samples",
    sampling_kwargs: dict | None = None,
) -> SampleSet:
    """One sample per prompt of `plan` at `sampling_kwargs` (default: the world's recommended settings for its UNet
    generator), from each prompt's single seed."""
    digits, seeds = plan.digits, plan.single_seeds
    images = []
    started = time.perf_counter()
    with count_model_rows(denoiser_of(pipe)) as rows:
        for start in tqdm(range(0, len(digits), batch_size), desc=desc, leave=False):
            batch = slice(start, start + batch_size)
            output = pipe(
                prompt=[world.prompts[digit] for digit in digits[batch]],
                generator=[torch.Generator().manual_seed(seed) for seed in seeds[batch]],
                output_type="pt",
                **(world.sampling_kwargs if sampling_kwargs is None else sampling_kwargs),
            )
            images.append(output.images.float().cpu())
    return SampleSet(torch.cat(images), digits, sum(rows), time.perf_counter() - started)
