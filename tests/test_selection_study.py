"""The best-of-N / pruning / FK measurement behind the demo report's `methods` rows, on the reduced world."""

from __future__ import annotations

import pytest
import torch

from ganrm_diffusers.pruning import FKResampling, PruneSchedule
from ganrm_diffusers.reward_model import GANRewardModel
from ganrm_diffusers.selection_study import early_reward_agreement, format_rows, pruning_sweep, selection_rows

STEPS = 6
CANDIDATES = 4


CASCADE = PruneSchedule(at=(0.3, 0.6), keep=(0.5, 0.5))


@pytest.fixture(scope="module")
def reward_model(reduced_world) -> GANRewardModel:
    torch.manual_seed(0)
    return GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)


@pytest.fixture(scope="module")
def rows(reduced_world, reward_model) -> dict[str, dict]:
    return selection_rows(
        reduced_world.pipeline_dir,
        reward_model,
        reduced_world.judges,
        prompts_per_digit=1,
        num_candidates=CANDIDATES,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        extra_prune_settings={"cascade": CASCADE},
        fk_lambda=1.0,
        prompts_per_call=10,
        progress=False,
    )


def test_rows_use_the_same_seeds_and_count_what_each_method_costs(rows):
    assert list(rows) == [
        "random_candidate",
        "best_of_4",
        "best_of_4_pruned",
        "cascade",
        "random_candidate_eta1",
        "best_of_4_eta1",
        "best_of_4_pruned_eta1",
        "fk_resample_same_cost_as_pruned",
        "fk_2_particles",
    ]
    guided_rows = 2 * 10  # classifier-free guidance: two UNet rows per candidate and step; ten prompts
    assert rows["best_of_4"]["unet_evaluations"] == guided_rows * CANDIDATES * STEPS
    assert rows["random_candidate"]["unet_evaluations"] == guided_rows * STEPS
    assert rows["best_of_4_pruned"]["unet_evaluations"] == guided_rows * PruneSchedule().unet_evaluations(4, STEPS)
    assert rows["cascade"]["unet_evaluations"] == guided_rows * (4 + 4 + 2 + 2 + 1 + 1)
    fk = FKResampling(at=(0.2, 0.4, 0.6))
    assert rows["fk_2_particles"]["unet_evaluations"] == guided_rows * fk.unet_evaluations(2, STEPS)
    assert rows["cascade"]["unet_cost"] == pytest.approx(14 / 24)

    for suffix in ("", "_eta1"):
        full, random = rows[f"best_of_4{suffix}"], rows[f"random_candidate{suffix}"]
        # The best candidate of each prompt beats the mean candidate; a pruned run picks among fewer finished ones.
        assert full["reward_gain"] == pytest.approx(full["mean_reward"] - random["mean_reward"], abs=1e-6)
        assert full["reward_gain"] > 0 and full["reward_gain_kept"] == pytest.approx(1.0)
        assert rows[f"best_of_4_pruned{suffix}"]["reward_gain"] <= full["reward_gain"] + 1e-4
    assert rows["cascade"]["reward_gain"] <= rows["best_of_4"]["reward_gain"] + 1e-4
    for row in rows.values():
        assert 0 <= row["style_rate"] <= 1 and 0 <= row["class_accuracy"] <= 1 and row["selections"] == 10
    table = format_rows(rows)
    assert table.splitlines()[0].startswith("method") and "best_of_4_pruned" in table


def test_the_sweep_simulates_what_a_pruned_run_measures(reduced_world, reward_model, rows):
    swept = pruning_sweep(
        reduced_world.pipeline_dir,
        reward_model,
        reduced_world.judges,
        {"default": PruneSchedule(), "cascade": CASCADE},
        prompts_per_digit=1,
        num_candidates=CANDIDATES,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        prompts_per_call=10,
        progress=False,
    )
    for simulated, measured in (("default", "best_of_4_pruned"), ("cascade", "cascade"), ("best_of_4", "best_of_4")):
        for key in ("style_rate", "class_accuracy", "mean_reward", "reward_gain", "unet_cost"):
            assert swept[simulated][key] == pytest.approx(rows[measured][key], abs=1e-4), (simulated, key)
    assert swept["random_candidate"]["mean_reward"] == pytest.approx(rows["random_candidate"]["mean_reward"], abs=1e-4)


def test_early_reward_agreement_is_measured_at_each_fraction(reduced_world, reward_model):
    rows = early_reward_agreement(
        reduced_world.pipeline_dir,
        reward_model,
        prompts_per_digit=1,
        num_candidates=CANDIDATES,
        fractions=(0.5, 0.99),
        num_inference_steps=STEPS,
    )
    assert list(rows) == ["after_3_of_6_steps", "after_6_of_6_steps"]
    for row in rows.values():
        assert -1 <= row["spearman"] <= 1 and 0 <= row["best_in_top_quarter"] <= row["best_in_top_half"] <= 1
    # After the last step the x0 prediction is the final image: early and final rewards agree.
    assert rows["after_6_of_6_steps"]["spearman"] == pytest.approx(1.0)
    assert rows["after_6_of_6_steps"]["best_in_top_quarter"] == 1.0
