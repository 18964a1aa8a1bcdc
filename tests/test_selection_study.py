"""The best-of-N / pruning / FK measurement behind the demo report's `methods` rows, on the reduced world."""

from __future__ import annotations

import pytest
import torch

from ganrm_diffusers.demo.selection_study import (
    choose_schedule,
    pruning_sweep,
    random_pick,
    selection_runs,
)
from ganrm_diffusers.generation.pruning import FKResampling, PruneSchedule
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.world.generator import prompt_for

STEPS = 6
CANDIDATES = 4
CASCADE = PruneSchedule(at=(0.3, 0.6), keep=(0.5, 0.5))
PROMPTS = [prompt_for(digit) for digit in range(10)]
SEEDS = list(range(CANDIDATES * len(PROMPTS)))


@pytest.fixture(scope="module")
def reward_model(reduced_world) -> GANRewardModel:
    torch.manual_seed(0)
    return GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)


@pytest.fixture(scope="module")
def runs(reduced_world, reward_model):
    return selection_runs(
        reduced_world.pipeline_dir,
        reward_model,
        PROMPTS,
        SEEDS,
        schedule=CASCADE,
        num_candidates=CANDIDATES,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        fk_lambda=1.0,
        prompts_per_call=10,
        progress=False,
    )


def test_runs_use_the_same_seeds_and_count_what_each_method_costs(runs):
    assert list(runs) == [
        "best_of_4",
        "best_of_4_pruned",
        "best_of_4_eta1",
        "best_of_4_pruned_eta1",
        "fk_resample_same_cost_as_pruned",
        "fk_2_particles",
    ]
    guided_rows = 2 * 10  # classifier-free guidance: two UNet rows per candidate and step; ten prompts
    assert runs["best_of_4"].unet_rows == guided_rows * CANDIDATES * STEPS
    assert runs["best_of_4_pruned"].unet_rows == guided_rows * (4 + 4 + 2 + 2 + 1 + 1)
    fk = FKResampling(at=(0.2, 0.4, 0.6))
    assert runs["fk_2_particles"].unet_rows == guided_rows * fk.unet_evaluations(2, STEPS)
    assert runs["best_of_4_eta1"].extra == {"eta": 1.0} and runs["best_of_4"].extra == {}
    assert runs["fk_2_particles"].extra["particles"] == 2
    for name in ("best_of_4", "best_of_4_eta1"):
        full = runs[name]
        # The selected image is the best of its prompt's candidates, which are kept in seed order.
        grouped = full.candidate_scores.view(10, CANDIDATES)
        assert torch.equal(full.scores, grouped.max(dim=1).values)
        assert len(full.images) == 10 and len(full.candidate_images) == 10 * CANDIDATES
    # A pruned run picks among fewer finished candidates: never above the full run's best.
    assert (runs["best_of_4_pruned"].scores <= runs["best_of_4"].scores + 1e-4).all()


def test_the_pruned_row_read_off_the_full_run_is_what_a_pruned_run_picks(runs):
    """The deterministic pruned row comes from the full run's candidates and x0 rewards; a real pruned run over
    the same prompts (all ten here) picked the same candidate, by seed, for every prompt."""
    pruned, full = runs["best_of_4_pruned"], runs["best_of_4"]
    assert pruned.extra["simulation_check"] == {"prompts": 10, "agreeing": 10, "unet_rows": pruned.unet_rows}
    assert sorted(full.checkpoint_scores) == [round(0.3 * STEPS), round(0.6 * STEPS)]
    assert all(scores.shape == (10, CANDIDATES) for scores in full.checkpoint_scores.values())
    candidates = full.candidate_images.view(10, CANDIDATES, *full.candidate_images.shape[1:])
    for prompt in range(10):
        assert any(torch.equal(pruned.images[prompt], candidates[prompt, j]) for j in range(CANDIDATES))


def test_random_pick_takes_one_candidate_per_prompt_at_the_full_cost(runs):
    full = runs["best_of_4"]
    picked = random_pick(full, CANDIDATES, seed=0)
    again = random_pick(full, CANDIDATES, seed=0)
    assert torch.equal(picked.images, again.images) and picked.unet_rows == full.unet_rows
    assert len(picked.images) == 10
    candidates = full.candidate_images.view(10, CANDIDATES, *full.candidate_images.shape[1:])
    for prompt in range(10):
        assert any(torch.equal(picked.images[prompt], candidates[prompt, j]) for j in range(CANDIDATES))
    assert picked.scores.mean() <= full.scores.mean()


def test_the_sweep_simulates_what_a_pruned_run_selects(reduced_world, reward_model, runs):
    swept = pruning_sweep(
        reduced_world.pipeline_dir,
        reward_model,
        reduced_world.judges,
        {"default": PruneSchedule(), "cascade": CASCADE},
        prompts_per_digit=1,
        num_candidates=CANDIDATES,
        seed=0,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        prompts_per_call=10,
        progress=False,
    )
    for simulated, measured in (("cascade", "best_of_4_pruned"), ("best_of_4", "best_of_4")):
        assert swept[simulated]["mean_reward"] == pytest.approx(float(runs[measured].scores.mean()), abs=1e-4)
    assert swept["cascade"]["unet_cost"] == pytest.approx(14 / 24)
    cheaper = min(("default", "cascade"), key=lambda name: swept[name]["unet_cost"])
    assert choose_schedule(swept, max_cost=swept[cheaper]["unet_cost"]) == cheaper  # the only one that cheap
    with pytest.raises(ValueError, match="no swept schedule"):
        choose_schedule(swept, max_cost=0.1)
