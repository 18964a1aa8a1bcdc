"""`ganrm demo --quick` end to end on the reduced world: every step runs and the report holds what it promises.

The reduced world's generator is barely trained, so nothing here checks quality; the figures of the full world are
in the demo report and the issue notes."""

from __future__ import annotations

import json
import math

import pytest
import safetensors

from ganrm_diffusers.cli import main as ganrm_main
from ganrm_diffusers.lora import COMFYUI_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME
from ganrm_diffusers.reward_model import GANRewardModel


@pytest.fixture(scope="module")
def demo_out(reduced_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    assert ganrm_main(["demo", "--quick", "--world", str(reduced_world.root), "--out", str(out)]) == 0
    return out


def test_report_has_the_reward_model_figures(demo_out, reduced_world):
    report = json.loads((demo_out / "report.json").read_text())
    rm = report["reward_model"]
    for key in ("auc", "auc_style_among_real", "spearman_reward_vs_style", "train_seconds"):
        assert math.isfinite(rm[key]), key
    assert 0.0 <= rm["auc"] <= 1.0 and 0.0 <= rm["auc_style_among_real"] <= 1.0
    assert rm["heldout_sizes"]["target"] == reduced_world.info["sizes"]["heldout_target"]
    assert report["world"]["base"] == reduced_world.info["figures"]["base"]

    model = GANRewardModel.from_pretrained(demo_out / "reward_model")
    assert model.config.backbone == reduced_world.backbone
    assert (demo_out / "reward_model" / "training_curves.png").is_file()
    assert (demo_out / "heldout_by_reward.png").is_file()


def test_every_method_has_a_judged_row(demo_out):
    methods = json.loads((demo_out / "report.json").read_text())["methods"]
    for name in ("base", "random_candidate", "best_of_8", "best_of_8_pruned", "sft", "dpo", "prdp"):
        row = methods[name]
        assert 0.0 <= row["style_rate"] <= 1.0 and 0.0 <= row["class_accuracy"] <= 1.0, name
        assert math.isfinite(row["mean_reward"]) and row["unet_evaluations"] > 0, name
    # Same seeds, same candidates: best-of-8 cannot select below the mean of its candidates.
    assert methods["best_of_8"]["mean_reward"] >= methods["random_candidate"]["mean_reward"]
    assert methods["best_of_8_pruned"]["unet_evaluations"] < methods["best_of_8"]["unet_evaluations"]
    report_md = (demo_out / "report.md").read_text()
    assert "| best_of_8_pruned |" in report_md and "| prdp |" in report_md


@pytest.mark.parametrize("method", ["sft", "dpo", "prdp"])
def test_each_trainer_left_both_lora_files(demo_out, method):
    folder = demo_out / "lora" / method
    for name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        with safetensors.safe_open(str(folder / name), framework="pt") as handle:
            assert len(list(handle.keys())) > 0
    assert (demo_out / f"{method}_curves.png").is_file()
