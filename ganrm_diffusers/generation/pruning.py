"""Spending fewer UNet evaluations on best-of-N: early pruning, and Feynman-Kac-style resampling of candidates.

Full best-of-N denoises all N candidates to the end and keeps the best. Most of them are thrown away, and whether
a candidate will be good is often visible well before the last step: the scheduler's prediction of the clean image
(x0) is already a rough image. A *candidate schedule* says at which fractions of the denoising steps the pipeline
decodes and scores those predictions, and which candidates go on:

- `PruneSchedule(at=(0.3,), keep=(0.5,))`: after 30 % of the steps keep the best half of each prompt's candidates
  (by the reward of their predicted x0) and finish only those. Several points make a cascade:
  `PruneSchedule(at=(0.2, 0.5), keep=(0.5, 0.5))` goes 8 -> 4 -> 2. A survivor is exactly the image its seed gives
  without pruning (the same noise, the same steps), so pruning only decides which seeds are finished.
- `FKResampling(...)`: in the spirit of Feynman-Kac steering (Singhal et al., 2025), candidates are particles that
  are resampled in proportion to a potential of their intermediate reward: good particles are duplicated, bad ones
  dropped. Copies only diverge if the sampler adds noise (DDIM with eta > 0, an ancestral scheduler, or the
  stochastic flow step of flow-matching pipelines with eta > 0): on a deterministic sampler FK is refused (it would return copies of one image). A resampled image no longer comes from
  one seed alone: the pipeline returns its `Lineage` and no seed for it (it is reproducible from the same call).

Costs are counted in UNet evaluations: one latent through the UNet for one step (classifier-free guidance puts two
rows through the UNet per evaluation; `count_model_rows` counts rows, as a hook sees them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.utils.errors import GanrmError


class ScheduleError(GanrmError, ValueError):
    """A pruning or resampling schedule that cannot be followed."""


@dataclass
class Survivors:
    """What goes on after a checkpoint: for each prompt, indices into its live candidates (`parents`, shape
    (prompts, survivors)). With `inherit_identity` a survivor *is* its parent (its seed, its noise generator): the
    pruning case. Without it, survivor slot j takes its parent's latents but keeps slot j's own seed and noise
    generator, so duplicated parents diverge: the resampling case."""

    parents: torch.Tensor
    inherit_identity: bool


@dataclass(frozen=True)
class Lineage:
    """Where an `FKResampling` particle's latents come from. Candidates are numbered as in the call's seed list
    (`candidate_seeds`); each candidate number is a slot with its own seed and noise generator.

    ancestor: the candidate whose initial noise x_T the lineage started from, ancestor_seed its seed. parents: for
    each resampling checkpoint (keyed by the denoising steps done, as `checkpoint_scores`), the candidate whose
    latents the particle took there; up to that checkpoint its noise came from that candidate's generator, after
    the last one from its own `slot`'s. `seed` is the seed that regenerates the image with the plain pipeline:
    the slot's seed when the lineage never left the slot, else None."""

    ancestor: int
    ancestor_seed: int
    parents: dict[int, int]
    slot: int
    seed: int | None


def deterministic_steps(scheduler: object, eta: float) -> bool:
    """Whether the sampler's steps add no noise, so that copies of a particle stay identical (FK cannot work).

    Known deterministic: DDIM with eta = 0, DPM-Solver without an SDE variant, and Euler, Heun, LMS, PNDM, UniPC,
    DEIS and KDPM2 as diffusers pipelines call them. Others (DDPM, ancestral, SDE, LCM, TCD...) are taken as noisy.
    """
    name = type(scheduler).__name__
    if name.startswith("DDIM"):
        return eta == 0
    if name.startswith("DPMSolver") and name != "DPMSolverSDEScheduler":
        return not str(getattr(scheduler.config, "algorithm_type", "")).startswith("sde")
    return name in _DETERMINISTIC_SCHEDULERS


_DETERMINISTIC_SCHEDULERS = {
    "EulerDiscreteScheduler",  # stochastic only with s_churn, which pipelines never pass
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
}


def _checkpoint_steps(at: Sequence[float], num_steps: int) -> list[int]:
    """0-based indices of the steps after which each checkpoint acts (after round(f * T) steps, at least one)."""
    return [min(num_steps - 1, max(0, round(fraction * num_steps) - 1)) for fraction in at]


def _validate_fractions(at: Sequence[float], keep: Sequence[float], name: str) -> None:
    if len(at) != len(keep) or not at:
        raise ScheduleError(f"{name} needs one keep fraction per checkpoint, got at={tuple(at)} keep={tuple(keep)}")
    if any(not 0 < fraction < 1 for fraction in at) or list(at) != sorted(set(at)):
        raise ScheduleError(f"{name}.at must be increasing fractions of the steps in (0, 1), got {tuple(at)}")
    if any(not 0 < fraction <= 1 for fraction in keep):
        raise ScheduleError(f"{name}.keep must be fractions in (0, 1], got {tuple(keep)}")


def _survivor_count(live: int, fraction: float, top_k: int) -> int:
    """The best `fraction` of `live` candidates, rounded up, never fewer than the `top_k` images to return."""
    return min(live, max(top_k, math.ceil(fraction * live - 1e-9)))


class _Schedule:
    """What the two schedules share: checkpoints at fractions of the steps, and their UNet cost."""

    at: tuple[float, ...]
    keep: tuple[float, ...]

    def checkpoints(self, num_steps: int) -> list[int]:
        return _checkpoint_steps(self.at, num_steps)

    def live_counts(self, num_candidates: int, num_steps: int, top_k: int = 1) -> list[int]:
        """How many candidates of one prompt go through each of the `num_steps` steps."""
        counts, live = [], num_candidates
        checkpoints = dict(zip(self.checkpoints(num_steps), self.keep, strict=True))
        for step in range(num_steps):
            counts.append(live)
            if step in checkpoints:
                live = _survivor_count(live, checkpoints[step], top_k)
        return counts

    def unet_evaluations(self, num_candidates: int, num_steps: int, top_k: int = 1) -> int:
        """UNet evaluations for one prompt (full best-of-N costs num_candidates * num_steps)."""
        return sum(self.live_counts(num_candidates, num_steps, top_k))

    def cost_fraction(self, num_candidates: int, num_steps: int, top_k: int = 1) -> float:
        """UNet evaluations relative to full best-of-N."""
        return self.unet_evaluations(num_candidates, num_steps, top_k) / (num_candidates * num_steps)


@dataclass(frozen=True)
class PruneSchedule(_Schedule):
    """Early pruning: after `at[i]` of the denoising steps keep the best `keep[i]` fraction of each prompt's live
    candidates (rounded up, never fewer than `top_k`), ranked by the reward of the decoded x0 prediction.

    The default is the setting measured in the embedded world (see `ganrm_diffusers.demo.selection_study`):
    8 candidates -> 2 after 30 % of the steps costs 0.475x the UNet evaluations of best-of-8 at 50 steps (the cut
    after step 15), 0.49x at 25 steps (after step 8); decoding and scoring the x0 predictions come on top.
    """

    at: tuple[float, ...] = (0.3,)
    keep: tuple[float, ...] = (0.25,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", tuple(float(value) for value in self.at))
        object.__setattr__(self, "keep", tuple(float(value) for value in self.keep))
        _validate_fractions(self.at, self.keep, "PruneSchedule")

    def start(self, num_steps: int, top_k: int, seeds: Sequence[int], num_candidates: int) -> _PruneRun:
        return _PruneRun(self, dict(zip(self.checkpoints(num_steps), self.keep, strict=True)), top_k)


@dataclass
class _PruneRun:
    schedule: PruneSchedule
    keep_at: dict[int, float]
    top_k: int

    @property
    def checkpoints(self) -> set[int]:
        return set(self.keep_at)

    def survivors(self, step: int, scores: torch.Tensor) -> Survivors:
        """The best candidates of each prompt (rows of `scores`), in their original order."""
        prompts, live = scores.shape
        count = _survivor_count(live, self.keep_at[step], self.top_k)
        chosen = select_top_k(scores.flatten(), count, group_size=live).selected.view(prompts, count) % live
        return Survivors(parents=chosen.sort(dim=1).values, inherit_identity=True)


@dataclass(frozen=True)
class FKResampling(_Schedule):
    """Feynman-Kac-style particle resampling (Singhal et al., 2025, "A General Framework for Inference-time Scaling
    and Steering of Diffusion Models"): at each checkpoint, each prompt's particles are redrawn (multinomial, with
    replacement) with weights proportional to exp(`lambda_` * potential); `keep[i] < 1` shrinks the population
    at the same time (the equal-cost counterpart of pruning). At the end the pipeline keeps the `top_k` best.

    Potentials on the reward r_s of a lineage's x0 prediction at the checkpoints s so far:
    "max" (max_s r_s, the paper's recommended choice), "difference" (r_now - r_previous), "immediate" (r_now).
    Needs a stochastic sampler (eta > 0 with DDIM) so that duplicated particles diverge: the pipeline refuses a
    deterministic one (see `deterministic_steps`). A returned image comes with its `Lineage`.
    """

    at: tuple[float, ...] = (0.2, 0.4, 0.6)
    keep: tuple[float, ...] | None = None
    lambda_: float = 1.0
    potential: Literal["max", "difference", "immediate"] = "max"

    def __post_init__(self) -> None:
        at = tuple(float(value) for value in self.at)
        keep = tuple(float(value) for value in self.keep) if self.keep is not None else (1.0,) * len(at)
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "keep", keep)
        _validate_fractions(at, keep, "FKResampling")
        if self.potential not in ("max", "difference", "immediate"):
            raise ScheduleError(f"FKResampling.potential must be max, difference or immediate, got {self.potential!r}")
        if not self.lambda_ > 0:
            raise ScheduleError(f"FKResampling.lambda_ must be positive, got {self.lambda_}")

    def start(self, num_steps: int, top_k: int, seeds: Sequence[int], num_candidates: int) -> _FKRun:
        # Resampling draws come from the prompt's first seed: the same call gives the same particles.
        first_seeds = [int(seeds[index]) for index in range(0, len(seeds), num_candidates)]
        return _FKRun(self, dict(zip(self.checkpoints(num_steps), self.keep, strict=True)), top_k, first_seeds)


@dataclass
class _FKRun:
    schedule: FKResampling
    keep_at: dict[int, float]
    top_k: int
    prompt_seeds: list[int]
    history: torch.Tensor | None = None  # per live particle: running max, or the previous reward

    @property
    def checkpoints(self) -> set[int]:
        return set(self.keep_at)

    def survivors(self, step: int, scores: torch.Tensor) -> Survivors:
        scores = scores.float().cpu()
        prompts, live = scores.shape
        if torch.isnan(scores).any():
            raise ScheduleError("a particle's intermediate reward is NaN: check the images and the reward model")
        potential = self.schedule.potential
        if potential == "max":
            value = scores if self.history is None else torch.maximum(scores, self.history)
        elif potential == "difference":
            value = scores if self.history is None else scores - self.history
        else:
            value = scores
        weights = torch.softmax(self.schedule.lambda_ * value, dim=1)
        count = _survivor_count(live, self.keep_at[step], self.top_k)
        parents = (
            torch.stack(
                [
                    torch.multinomial(weights[row], count, replacement=True, generator=self._generator(row, step))
                    for row in range(prompts)
                ]
            )
            .sort(dim=1)
            .values
        )
        carried = value if potential == "max" else scores
        self.history = torch.gather(carried, 1, parents)
        return Survivors(parents=parents, inherit_identity=False)

    def _generator(self, row: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.prompt_seeds[row] * 1_000_003 + step) % (2**63 - 1))


CandidateSchedule = PruneSchedule | FKResampling


def as_schedule(prune: object) -> CandidateSchedule | None:
    """The pipeline's `prune` argument: None/False (no pruning), True (the default `PruneSchedule()`), a schedule."""
    if prune is None or prune is False:
        return None
    if prune is True:
        return PruneSchedule()
    if isinstance(prune, (PruneSchedule, FKResampling)):
        return prune
    raise ScheduleError(f"prune must be None, True, a PruneSchedule or an FKResampling, got {prune!r}")


# --------------------------------------------------------------------------------------------------------------
# Per-sample scheduler state


def select_scheduler_state(scheduler: object, index: torch.Tensor, batch_shape: torch.Size) -> None:
    """Keep only the rows `index` of every per-sample tensor a multistep scheduler carries between steps.

    Schedulers such as DPM-Solver++, UniPC or PNDM remember earlier model outputs and samples (tensors shaped like
    the latents, alone or in lists). DDIM and Euler carry none. Tensors of any other shape (timesteps, sigmas) are
    schedule, not state, and stay.
    """

    def pick(value: object) -> object:
        if isinstance(value, torch.Tensor) and value.shape == batch_shape:
            return value[index.to(value.device)]
        if isinstance(value, list) and any(
            isinstance(item, torch.Tensor) and item.shape == batch_shape for item in value
        ):
            return [pick(item) for item in value]
        return value

    for name, value in list(vars(scheduler).items()):
        picked = pick(value)
        if picked is not value:
            setattr(scheduler, name, picked)


def predicted_clean_latents(
    scheduler: object, step_output: object, noise_pred: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """The scheduler's prediction of the clean latents (x0) at this step.

    DDIM, DDPM, Euler and most single-step schedulers return it; for the others (DPM-Solver++, UniPC) it is computed
    from the noise prediction with the scheduler's alphas, for epsilon, v and sample prediction.
    """
    predicted = getattr(step_output, "pred_original_sample", None)
    if predicted is not None:
        return predicted
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ScheduleError(f"{type(scheduler).__name__} gives no x0 prediction to prune on; use DDIM or Euler")
    alpha = alphas.to(sample.device)[int(timestep)].to(sample.dtype)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * noise_pred
    if prediction_type == "sample":
        return noise_pred
    raise ScheduleError(f"cannot predict x0 for prediction type {prediction_type!r}")


# --------------------------------------------------------------------------------------------------------------
# Counting


@contextmanager
def count_model_rows(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count the rows (latents) that go through `model.forward` (a UNet or a flow-matching transformer) inside the
    block: `with count_model_rows(m) as n:`, then `n[0]`. With classifier-free guidance batched as in SD and SD3,
    each evaluation puts two rows through the model; FLUX's true CFG makes two calls of one row."""
    counter = [0]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter[0] += int(sample.shape[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


count_unet_rows = count_model_rows  # the name before flow-matching transformers


def denoiser_of(pipe: object) -> torch.nn.Module:
    """The model a pipeline evaluates at every step: its UNet, or its flow-matching transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer
