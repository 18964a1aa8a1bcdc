"""Best-of-N, early pruning and FK resampling in the embedded world: the selection rows of the demo report.

`selection_runs` runs every method on the same prompts with the same candidate seeds (candidate j of prompt i has
seed `seeds[i * N + j]` in every method, so differences between methods are not sampling noise) and returns what each
selected, with its cost; the demo judges the images. Runs:

- `best_of_8`: full best-of-N (N = `num_candidates`, 8 by default), keeping every candidate;
- `best_of_8_pruned`: best-of-N with the given `PruneSchedule` (chosen on tuning seeds by `pruning_sweep`). With
  the deterministic sampler a survivor is exactly the candidate of the full run (the pipeline tests check it bit for
  bit), so the row is read off the full run, which also scores every candidate's x0 at the schedule's checkpoints:
  the schedule's own selection code on those scores, the schedule's own cost. A real pruned run on the first
  `check_prompts` prompts checks the reading (`extra["simulation_check"]`: how many picks agree);
- with `stochastic=True`, `best_of_8_eta1`, `best_of_8_pruned_eta1`, `fk_resample_same_cost_as_pruned` and
  `fk_4_particles`: Feynman-Kac-style resampling needs a stochastic sampler, so FK is compared with best-of-N and
  pruning run with the same DDIM eta = 1 and the same seeds (for a flow-matching pipeline: the stochastic flow
  step at `stochastic_eta`, its noise level, with the rows suffixed `stochastic_suffix`).

`random_pick` draws the `random_candidate` row's images from a full run: one of the N candidates of each prompt,
drawn uniformly with a fixed seed, the same cost as best-of-N and no reward (the demo judges the row's rates and reward
as the expectation over that draw, from all the run's candidates). `pruning_sweep` simulates many pruning
schedules from one probe run, for choosing a schedule on tuning seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from ganrm_diffusers.generation.pipeline import load_reward_guided_pipeline, reward_guided_class_for
from ganrm_diffusers.generation.pruning import FKResampling, PruneSchedule, count_model_rows
from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.world.metrics import paired_share

# Pruning schedules the demo's sweep compares on tuning seeds, each at most half the UNet evaluations of best-of-8.
PRUNE_CANDIDATES: dict[str, PruneSchedule] = {
    "8to2_at30": PruneSchedule(at=(0.3,), keep=(0.25,)),
    "8to4to2_at20_40": PruneSchedule(at=(0.2, 0.4), keep=(0.5, 0.5)),
    "8to3_at20": PruneSchedule(at=(0.2,), keep=(0.375,)),
    "8to1_at40": PruneSchedule(at=(0.4,), keep=(0.125,)),
    "8to4_at10_then_2_at30": PruneSchedule(at=(0.1, 0.3), keep=(0.5, 0.5)),
    "8to2_at20": PruneSchedule(at=(0.2,), keep=(0.25,)),
}


@dataclass
class _Run:
    """One method over all prompts: the selected images (NCHW in [0, 1], CPU), their rewards, all candidates'
    rewards when they were all finished, the UNet rows and the seconds it took."""

    images: torch.Tensor
    scores: torch.Tensor
    candidate_scores: torch.Tensor | None
    candidate_images: torch.Tensor | None
    unet_rows: int
    seconds: float
    extra: dict = field(default_factory=dict)
    seeds: list[int | None] = field(default_factory=list)  # the seed of each selected image
    checkpoint_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # steps done -> (prompts, N) x0 rewards


def _run(
    pipe: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    num_candidates: int,
    prompts_per_call: int,
    keep_candidates: bool,
    progress: bool,
    description: str,
    **call_kwargs: object,
) -> _Run:
    images, scores, candidate_scores, candidate_images, rows, seconds = [], [], [], [], 0, 0.0
    chosen_seeds, early = [], {}
    for start in tqdm(range(0, len(prompts), prompts_per_call), desc=description, disable=not progress, leave=False):
        part = prompts[start : start + prompts_per_call]
        part_seeds = seeds[start * num_candidates : (start + len(part)) * num_candidates]
        begin = time.perf_counter()
        with count_model_rows(pipe.denoiser) as counter:
            output = pipe(
                part,
                num_candidates=num_candidates,
                seeds=part_seeds,
                output_type="pt",
                return_candidates=keep_candidates,
                **call_kwargs,
            )
        seconds += time.perf_counter() - begin
        rows += counter[0]
        images.append(output.images.cpu())
        scores.append(output.scores)
        chosen_seeds.extend(output.seeds)
        for steps, values in (output.checkpoint_scores or {}).items():
            early.setdefault(steps, []).append(values.view(len(part), -1))
        if keep_candidates:
            candidate_scores.append(output.candidate_scores)
            candidate_images.append(output.candidates.cpu())
    return _Run(
        images=torch.cat(images),
        scores=torch.cat(scores),
        candidate_scores=torch.cat(candidate_scores) if keep_candidates else None,
        candidate_images=torch.cat(candidate_images) if keep_candidates else None,
        unet_rows=rows,
        seconds=seconds,
        seeds=chosen_seeds,
        checkpoint_scores={steps: torch.cat(parts) for steps, parts in sorted(early.items())},
    )


def selection_runs(
    pipeline: str | Path | DiffusionPipeline,
    reward_model: GANRewardModel,
    prompts: list[str],
    seeds: list[int],
    *,
    schedule: PruneSchedule,
    num_candidates: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    stochastic: bool = True,
    stochastic_eta: float = 1.0,
    stochastic_suffix: str = "_eta1",
    fk_lambda: float = 2.0,
    prompts_per_call: int = 50,
    progress: bool = True,
    check_prompts: int = 20,
    **pipeline_kwargs: object,
) -> dict[str, _Run]:
    """The runs of the module docstring on `prompts`, candidate j of prompt i drawn from `seeds[i * N + j]`;
    `pipeline_kwargs` (e.g. SD3's max_sequence_length) go to every pipeline call."""
    if len(seeds) != len(prompts) * num_candidates:
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts x {num_candidates} candidates")
    pipe = _reward_guided(pipeline, reward_model)
    name = f"best_of_{num_candidates}"
    common = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, **pipeline_kwargs}

    def run(description: str, keep_candidates: bool = False, candidates: int = num_candidates, **kwargs) -> _Run:
        # Fewer particles: the first seeds of each prompt's candidates.
        run_seeds = [
            s for i in range(len(prompts)) for s in seeds[i * num_candidates : i * num_candidates + candidates]
        ]
        result = _run(
            pipe,
            prompts,
            run_seeds,
            candidates,
            prompts_per_call,
            keep_candidates,
            progress,
            description,
            **common,
            **kwargs,
        )
        prune = kwargs.get("prune")
        return replace(
            result,
            extra={
                **({"eta": kwargs["eta"]} if "eta" in kwargs else {}),
                **({"prune": _describe(prune)} if prune is not None else {}),
                **({"particles": candidates} if candidates != num_candidates else {}),
            },
        )

    # Every candidate's x0 scored at the schedule's checkpoints, all kept: the full run, and what pruning sees.
    recorder = PruneSchedule(at=schedule.at, keep=(1.0,) * len(schedule.at))
    full = replace(run(name, keep_candidates=True, prune=recorder), extra={})
    check = _run(
        pipe,
        prompts[:check_prompts],
        seeds[: check_prompts * num_candidates],
        num_candidates,
        prompts_per_call,
        False,
        progress,
        f"{name} pruned (check)",
        prune=schedule,
        **common,
    )
    pruned = _read_pruned(full, check, schedule, num_candidates, num_inference_steps, seeds)
    runs = {name: full, f"{name}_pruned": pruned}
    if stochastic:
        eta, suffix = stochastic_eta, stochastic_suffix
        runs[f"{name}{suffix}"] = run(f"{name} eta={eta:g}", keep_candidates=True, eta=eta)
        runs[f"{name}_pruned{suffix}"] = run(f"{name} pruned eta={eta:g}", prune=schedule, eta=eta)
        same_cost = FKResampling(at=schedule.at, keep=schedule.keep, lambda_=fk_lambda)
        runs["fk_resample_same_cost_as_pruned"] = run("FK same cost", prune=same_cost, eta=eta)
        half = num_candidates // 2
        particles = FKResampling(at=(0.2, 0.4, 0.6), lambda_=fk_lambda)
        runs[f"fk_{half}_particles"] = run(f"FK {half} particles", candidates=half, prune=particles, eta=eta)
    return runs


def _read_pruned(
    full: _Run, check: _Run, schedule: PruneSchedule, num_candidates: int, num_steps: int, seeds: list[int]
) -> _Run:
    """The pruned row read off the full run (see the module docstring), with the real pruned run `check` on the
    first prompts as evidence that the reading is what pruning does (the same candidate, by its seed)."""
    prompts = len(full.scores)
    final = full.candidate_scores.view(prompts, num_candidates)
    probe = _Probe(full.checkpoint_scores, final, torch.empty(0), torch.empty(0), num_steps)
    chosen = _simulated_choice(schedule, probe)
    index = torch.arange(prompts) * num_candidates + chosen
    rows_per_evaluation = full.unet_rows // (prompts * num_candidates * num_steps)  # 2 with classifier-free guidance
    evaluations = schedule.unet_evaluations(num_candidates, num_steps, 1) * prompts
    checked = len(check.scores)
    agreeing = sum(check.seeds[i] == seeds[int(index[i])] for i in range(checked))
    return _Run(
        images=full.candidate_images[index],
        scores=final[torch.arange(prompts), chosen],
        candidate_scores=None,
        candidate_images=None,
        unet_rows=evaluations * rows_per_evaluation,
        seconds=full.seconds * schedule.cost_fraction(num_candidates, num_steps),
        extra={
            "prune": _describe(schedule),
            "read_off": "the full run's candidates and x0 rewards (survivors are the full run's candidates)",
            "simulation_check": {"prompts": checked, "agreeing": agreeing, "unet_rows": check.unet_rows},
        },
    )


def random_pick(full: _Run, num_candidates: int, seed: int = 0) -> _Run:
    """One of the N candidates of each prompt, drawn uniformly (fixed seed): what the base model gives at the cost
    of best-of-N, with no reward involved."""
    prompts = len(full.scores)
    picks = torch.from_numpy(np.random.default_rng(seed).integers(0, num_candidates, prompts))
    index = torch.arange(prompts) * num_candidates + picks
    return _Run(
        images=full.candidate_images[index],
        scores=full.candidate_scores[index],
        candidate_scores=None,
        candidate_images=None,
        unet_rows=full.unet_rows,
        seconds=full.seconds,
        extra={**full.extra, "picked_candidates": picks.tolist()[:10]},
    )


def choose_schedule(swept: dict[str, dict], max_cost: float = 0.5) -> str:
    """The swept schedule a user could choose without a judge: the largest share of best-of-N's reward gain kept
    within `max_cost` of its UNet evaluations (ties: the cheaper)."""
    affordable = {name: row for name, row in swept.items() if "prune" in row and row["unet_cost"] <= max_cost + 1e-9}
    if not affordable:
        raise ValueError(f"no swept schedule costs at most {max_cost} of best-of-N")
    return max(affordable, key=lambda name: (affordable[name]["reward_gain_kept"], -affordable[name]["unet_cost"]))


@dataclass
class _Probe:
    """Every candidate of a best-of-N run with the reward of its x0 prediction at checkpoints (steps done ->
    (prompts, N)), its final reward, and what the judges say of its final image (both (prompts, N))."""

    checkpoint_scores: dict[int, torch.Tensor]
    final_scores: torch.Tensor
    has_style: torch.Tensor
    correct: torch.Tensor
    num_steps: int


def _probe(
    pipe: DiffusionPipeline,
    judges: object | None,
    prompts_per_digit: int,
    num_candidates: int,
    fractions: tuple[float, ...],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    prompts_per_call: int,
    progress: bool = True,
    pipeline_kwargs: dict | None = None,
) -> _Probe:
    """One best-of-N run that also scores every candidate's x0 prediction at `fractions` of the steps (a
    `PruneSchedule` that keeps everything), with the seeds `selection_runs` uses (candidate j of prompt i: seed + i * N + j)."""
    from ganrm_diffusers.world.generator import prompt_for

    digits = np.repeat(np.arange(10), prompts_per_digit)
    prompts = [prompt_for(int(digit)) for digit in digits]
    probe = PruneSchedule(at=fractions, keep=(1.0,) * len(fractions))
    early: dict[int, list[torch.Tensor]] = {}
    final, has_style, correct = [], [], []
    for start in tqdm(range(0, len(prompts), prompts_per_call), desc="probe", disable=not progress, leave=False):
        part = prompts[start : start + prompts_per_call]
        output = pipe(
            part,
            num_candidates=num_candidates,
            seed=seed + start * num_candidates,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **(pipeline_kwargs or {}),
            output_type="pt" if judges is not None else "latent",
            prune=probe,
            return_candidates=True,
        )
        final.append(output.candidate_scores.view(len(part), num_candidates))
        for steps, scores in output.checkpoint_scores.items():
            early.setdefault(steps, []).append(scores.view(len(part), num_candidates))
        if judges is not None:
            images = output.candidates.cpu()
            expected = np.repeat(digits[start : start + len(part)], num_candidates)
            recognised = judges.is_correct(images, expected)
            has_style.append(judges.has_style(images, expected, recognised).view(len(part), num_candidates))
            correct.append(torch.as_tensor(recognised).view(len(part), num_candidates))
    return _Probe(
        checkpoint_scores={steps: torch.cat(parts) for steps, parts in sorted(early.items())},
        final_scores=torch.cat(final),
        has_style=torch.cat(has_style) if has_style else torch.empty(0),
        correct=torch.cat(correct) if correct else torch.empty(0),
        num_steps=num_inference_steps,
    )


def _simulated_choice(schedule: PruneSchedule, probe: _Probe) -> torch.Tensor:
    """The candidate (per prompt) that `schedule` with top_k = 1 would return, from the probe's scores alone.

    Exact for a deterministic sampler: a survivor's trajectory does not depend on the others, so its x0 rewards
    and final reward are those of the probe run (up to float noise of batch composition)."""
    prompts, candidates = probe.final_scores.shape
    run = schedule.start(probe.num_steps, 1, list(range(prompts * candidates)), candidates)
    live = torch.arange(candidates).repeat(prompts, 1)
    for step in sorted(run.checkpoints):
        scores = torch.gather(probe.checkpoint_scores[step + 1], 1, live)
        live = torch.gather(live, 1, run.survivors(step, scores).parents)
    final = torch.gather(probe.final_scores, 1, live)
    best = select_top_k(final.flatten(), 1, group_size=live.shape[1]).selected % live.shape[1]
    return torch.gather(live, 1, best.view(prompts, 1)).squeeze(1)


def pruning_sweep(
    pipeline: str | Path | DiffusionPipeline,
    reward_model: GANRewardModel,
    judges: object,
    schedules: dict[str, PruneSchedule],
    *,
    prompts_per_digit: int = 50,
    num_candidates: int = 8,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    prompts_per_call: int = 50,
    progress: bool = True,
    **pipeline_kwargs: object,
) -> dict[str, dict]:
    """Many pruning settings from one probe run (for choosing a default): the rows that `selection_runs` would
    measure for each schedule (top_k = 1), simulated from every candidate's x0 and final rewards, with the UNet
    cost computed from the schedule. Also `best_of_{N}` and `random_candidate` from the same run."""
    pipe = _reward_guided(pipeline, reward_model)
    fractions = tuple(sorted({fraction for schedule in schedules.values() for fraction in schedule.at}))
    probe = _probe(
        pipe,
        judges,
        prompts_per_digit,
        num_candidates,
        fractions,
        seed,
        num_inference_steps,
        guidance_scale,
        prompts_per_call,
        progress,
        pipeline_kwargs,
    )
    prompts = probe.final_scores.shape[0]
    rows_index = torch.arange(prompts)
    baseline = {
        "style_rate": float(probe.has_style.float().mean()),
        "class_accuracy": float(probe.correct.float().mean()),
        "mean_reward": float(probe.final_scores.mean()),
    }

    def row(chosen: torch.Tensor, cost: float) -> dict:
        values = {
            "style_rate": float(probe.has_style[rows_index, chosen].float().mean()),
            "class_accuracy": float(probe.correct[rows_index, chosen].float().mean()),
            "mean_reward": float(probe.final_scores[rows_index, chosen].mean()),
            "unet_cost": cost,
        }
        values["reward_gain"] = values["mean_reward"] - baseline["mean_reward"]
        return values

    def gains_kept(chosen: torch.Tensor) -> dict:
        """The shares of best-of-N's reward and style gains over the random pick that the choice keeps."""
        kept = {}
        for key, values in (("reward", probe.final_scores.double()), ("style", probe.has_style.double())):
            kept[f"{key}_gain_kept"], kept[f"{key}_gain_kept_ci95"] = paired_share(
                values[rows_index, chosen].numpy(), values[rows_index, best].numpy(), values.mean(dim=1).numpy()
            )
        return kept

    best = probe.final_scores.argmax(dim=1)
    full = row(best, 1.0)
    rows = {"random_candidate": {**baseline, "reward_gain": 0.0}, f"best_of_{num_candidates}": full}
    for label, schedule in schedules.items():
        chosen = _simulated_choice(schedule, probe)
        simulated = row(chosen, schedule.cost_fraction(num_candidates, num_inference_steps))
        rows[label] = {**simulated, **gains_kept(chosen), "prune": _describe(schedule)}
    return rows


def _reward_guided(pipeline: str | Path | DiffusionPipeline, reward_model: GANRewardModel) -> DiffusionPipeline:
    """The reward-guided pipeline of the pipeline's family (a UNet or a flow-matching one), from a folder or
    wrapping a loaded pipeline."""
    if isinstance(pipeline, (str, Path)):
        pipe = load_reward_guided_pipeline(pipeline, reward_model=reward_model)
    else:
        family = reward_guided_class_for({"_class_name": type(pipeline).__name__})
        pipe = family.from_pipe(pipeline, reward_model=reward_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _describe(schedule: PruneSchedule | FKResampling) -> dict:
    description = {"kind": type(schedule).__name__, "at": list(schedule.at), "keep": list(schedule.keep)}
    if isinstance(schedule, FKResampling):
        description.update(lambda_=schedule.lambda_, potential=schedule.potential)
    return description
