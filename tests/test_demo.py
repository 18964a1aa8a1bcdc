"""`ganrm demo --quick` end to end on the reduced world: every step runs and the report holds what it promises.

The reduced world's generator is barely trained, so nothing here checks quality; the figures of the full world are
in the demo report and the issue notes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from checks import assert_relative_close

from ganrm_diffusers.cli.main import main as ganrm_main
from ganrm_diffusers.demo.generators import Generator
from ganrm_diffusers.demo.run import (
    FLOW_FINETUNE_CANDIDATES,
    METHOD_GROUPS,
    PRUNING_RULE,
    QUICK_FINETUNE,
    TUNED_FLOW_FINETUNE,
    TUNED_PRUNING,
    DemoSettings,
    _pruning_choice,
    _tune_finetune,
)
from ganrm_diffusers.generation.lora import COMFYUI_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME
from ganrm_diffusers.reward.model import GANRewardModel


@pytest.fixture(scope="module")
def demo_out(reduced_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    every_group = ",".join(METHOD_GROUPS)  # `make demo` leaves "fk" out for time; here every group runs
    arguments = ["demo", "--quick", "--world", str(reduced_world.root), "--out", str(out), "--methods", every_group]
    assert ganrm_main(arguments) == 0
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


ROW_FIELDS = (
    "style_rate",
    "faint_rate",
    "blank_rate",
    "class_accuracy",
    "kid_to_target",
    "diversity",
)


def test_every_method_has_a_judged_row_on_the_same_seeds(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    methods = report["methods"]
    for name in ("base", "random_candidate", "best_of_8", "best_of_8_pruned", "sft", "dpo", "prdp"):
        row = methods[name]
        for key in ROW_FIELDS:
            assert math.isfinite(row[key]), (name, key)
            low, high = row[f"{key}_ci95"]
            assert low <= row[key] + 1e-9 and row[key] <= high + 1e-9, (name, key)
        assert 0.0 <= row["style_rate"] <= 1.0 and 0.0 <= row["class_accuracy"] <= 1.0, name
        assert math.isfinite(row["mean_reward"]) and row["unet_evaluations"] > 0, name
        assert row["count"] == report["evaluation"]["prompts"], name
        assert (demo_out / row["grid"]).is_file(), name
    # Each method beside its same-cost baseline, on the same prompts and seeds.
    assert methods["best_of_8"]["baseline"] == "random_candidate" and methods["dpo"]["baseline"] == "base"
    assert methods["random_candidate"]["unet_evaluations"] == methods["best_of_8"]["unet_evaluations"]
    assert methods["best_of_8"]["mean_reward"] >= methods["random_candidate"]["mean_reward"]
    assert methods["best_of_8_pruned"]["unet_evaluations"] < methods["best_of_8"]["unet_evaluations"]
    assert "expected" in methods["random_candidate"]["rates"]  # its figures: test_the_random_pick_row_is_...
    assert methods["base"]["drawn_as"].startswith("candidate 0")  # no second draw: test_base_is_candidate_0_...
    # Pruning's kept shares of best-of-N's gain come with paired intervals; full best-of-N keeps all of it.
    for gain in ("reward_gain_kept", "style_gain_kept"):
        assert methods["best_of_8"][gain] == pytest.approx(1.0) or math.isnan(methods["best_of_8"][gain])
        assert len(methods["best_of_8_pruned"][f"{gain}_ci95"]) == 2
    # The brightness-augmented reward model ranks best-of-8's own candidates: the same cost, the same baseline.
    augmented = methods["best_of_8_brightness_augmented_rm"]
    assert augmented["baseline"] == "random_candidate"
    assert augmented["unet_evaluations"] == methods["best_of_8"]["unet_evaluations"]
    for model in ("reward_model", "reward_model_brightness_augmented"):
        dimmed = report[model]["dimmed_scores_higher"]
        assert set(dimmed) == {"0.9", "0.8"} and all(0.0 <= share <= 1.0 for share in dimmed.values()), model
    assert (demo_out / "reward_model_brightness_augmented" / "model.safetensors").is_file()
    # FK resampling runs on a stochastic sampler, beside its own random pick.
    assert methods["fk_resample_same_cost_as_pruned"]["baseline"] == "random_candidate_eta1"
    # Settings are chosen on tuning seeds that never overlap the evaluation seeds.
    tuning, evaluation = report["settings"]["tuning"]["seed_range"], report["evaluation"]["seed_range"]
    assert tuning[0] > evaluation[1] or tuning[1] < evaluation[0]
    # Without --tune the pruning schedule is the recorded choice, and the report says no sweep ran here.
    assert report["settings"]["tuning"]["pruning"] == {"chosen": TUNED_PRUNING["unet"], "rule": PRUNING_RULE}
    assert report["world"]["clip_captions"] and report["goals"]
    report_md = (demo_out / "report.md").read_text()
    assert "| best_of_8_pruned |" in report_md and "| prdp |" in report_md and "grids/dpo.png" in report_md
    # The deterministic pruned row is read off the full run, checked against a real pruned run.
    check = methods["best_of_8_pruned"]["simulation_check"]
    assert check["prompts"] > 0 and check["agreeing"] == check["prompts"]
    assert f"picked the same candidate for {check['agreeing']} of them" in report_md


def test_the_flow_family_has_the_selection_rows_under_the_same_contract(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    family = report["families"]["sd3_flow"]
    methods = family["methods"]
    assert family["generator"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert math.isfinite(family["reward_model"]["auc"])
    for name in ("base", "random_candidate", "best_of_8", "best_of_8_pruned", "random_candidate_sde", "best_of_8_sde"):
        row = methods[name]
        for key in ROW_FIELDS:
            assert math.isfinite(row[key]), (name, key)
        assert row["count"] == family["evaluation"]["prompts"] and (demo_out / row["grid"]).is_file(), name
    assert methods["best_of_8"]["baseline"] == "random_candidate"
    assert methods["random_candidate"]["unet_evaluations"] == methods["best_of_8"]["unet_evaluations"]
    assert methods["best_of_8_pruned"]["unet_evaluations"] < methods["best_of_8"]["unet_evaluations"]
    check = methods["best_of_8_pruned"]["simulation_check"]  # the flow ODE is deterministic: read off, checked
    assert check["prompts"] > 0 and check["agreeing"] == check["prompts"]
    for name in ("fk_resample_same_cost_as_pruned", "fk_4_particles", "best_of_8_pruned_sde"):
        assert methods[name]["baseline"] == "random_candidate_sde", name
    tuning, evaluation = family["settings"]["tuning"]["seed_range"], family["evaluation"]["seed_range"]
    assert tuning[0] > evaluation[1] or tuning[1] < evaluation[0]
    assert family["settings"]["tuning"]["pruning"]["chosen"] == TUNED_PRUNING["flow"]
    assert any(goal["goal"].startswith("best-of-8") for goal in family["goals"])
    assert "## Family `sd3_flow`" in (demo_out / "report.md").read_text()
    # The flow generator fine-tuned by each trainer, judged beside its base, both LoRA files kept.
    for name in ("sft", "dpo", "prdp"):
        row = methods[name]
        assert row["baseline"] == "base" and row["count"] == family["evaluation"]["prompts"], name
        assert all(math.isfinite(row[key]) for key in ROW_FIELDS), name
        lora = demo_out / "lora" / "sd3_flow" / name
        assert (lora / DIFFUSERS_WEIGHT_NAME).is_file() and (lora / COMFYUI_WEIGHT_NAME).is_file(), name
        keys = safetensors.safe_open(str(lora / DIFFUSERS_WEIGHT_NAME), "pt").keys()
        assert all(key.startswith("transformer.") for key in keys), name
    chosen = family["settings"]["tuning"]["finetune"]["chosen"]
    assert {method: entry["label"] for method, entry in chosen.items()} == TUNED_FLOW_FINETUNE
    assert methods["prdp"]["settings"]["epochs"] == QUICK_FINETUNE["prdp"]["epochs"]  # --quick's, over the choice
    assert "Fine-tuning settings sft `" in (demo_out / "report.md").read_text()


def test_tune_chooses_the_flow_generators_finetuning_on_its_tuning_seeds(reduced_world, tmp_path):
    """`ganrm demo --tune` trains every flow candidate on the same candidates (sampled once, then shared with the
    demo's own rows) and judges it on the flow tuning seeds beside base sampled there."""
    settings = DemoSettings(out=tmp_path, quick=True, tune=True, tune_per_digit=1)  # as the flow family passes it
    model = GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(16,))
    tuning: dict = {}
    chosen = _tune_finetune(reduced_world, model, tuning, settings, ["sft", "dpo"], Generator.flow(reduced_world))
    record = tuning["finetune"]
    assert record["base"]["count"] == len(reduced_world.prompts)
    for method in ("sft", "dpo"):
        assert set(record[method]) == set(FLOW_FINETUNE_CANDIDATES[method])
        assert chosen[method] in FLOW_FINETUNE_CANDIDATES[method]
        assert all(row["count"] == len(reduced_world.prompts) for row in record[method].values())
    cache = tmp_path / "finetune" / "sd3_flow" / "candidates"
    assert len(list(cache.glob("candidates-*.safetensors"))) == 1  # four runs, one draw of the base's candidates


def test_tune_sweeps_the_pruning_schedules_on_the_tuning_seeds(reduced_world, tmp_path):
    """`ganrm demo --tune` chooses the schedule from a probe run on the tuning seeds and keeps every candidate's
    figures; the rule (no judge) picks the largest reward gain kept within half best-of-N's cost."""
    from ganrm_diffusers.demo.selection_study import PRUNE_CANDIDATES

    settings = DemoSettings(out=tmp_path, quick=True, tune=True)
    model = GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(16,))
    chosen, pruning = _pruning_choice(reduced_world, model, settings, Generator.unet(reduced_world))
    assert pruning["chosen"] == chosen and set(PRUNE_CANDIDATES) <= set(pruning["swept"])
    affordable = {name: row for name, row in pruning["swept"].items() if "prune" in row and row["unet_cost"] <= 0.5}
    assert chosen in affordable
    assert pruning["swept"][chosen]["reward_gain_kept"] == max(row["reward_gain_kept"] for row in affordable.values())


def test_the_rounds_row_reports_every_round(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    rounds = report["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(len(rounds))) and len(rounds) >= 2
    for entry in rounds:
        for key in ("auc_vs_current", "auc_vs_base", "style_rate", "kid_to_target", "class_accuracy"):
            assert math.isfinite(entry[key]), key
    assert rounds[0]["previous_auc_vs_current"] is None and math.isfinite(rounds[1]["previous_auc_vs_current"])
    row = report["methods"]["rounds"]
    for key in ROW_FIELDS:
        assert math.isfinite(row[key]), key
    assert row["style_rate"] == rounds[-1]["style_rate"]  # the last round's generator is the row
    # The row is the last round's generator: its LoRA is that round's.
    last = demo_out / "finetune" / "rounds" / f"round-{rounds[-1]['round']:02d}" / "lora" / DIFFUSERS_WEIGHT_NAME
    final = safetensors.torch.load_file(str(demo_out / "lora" / "rounds" / DIFFUSERS_WEIGHT_NAME))
    assert all(torch.equal(final[key], value) for key, value in safetensors.torch.load_file(str(last)).items())
    # Round 0 ranked the very candidates SFT and DPO drew from G_0: one draw in the cache per round's selection pool.
    prompts = len((demo_out / "finetune" / "prompts.txt").read_text().splitlines())
    cache = (demo_out / "finetune" / "candidates").glob("candidates-*.safetensors")
    pools = [
        path
        for path in cache
        if safetensors.safe_open(str(path), "pt").get_slice("latents").get_shape()[0] == 8 * prompts
    ]
    assert len(pools) == len(rounds)
    assert (demo_out / "rounds_curves.png").is_file() and "## GAN-RM rounds" in (demo_out / "report.md").read_text()


def test_the_flow_family_runs_gan_rms_adversarial_loop_beside_the_fixed_reward_rows(demo_out):
    """The report contract: families.<family>.methods has `rounds` and `prdp_adversarial` beside `dpo` and `prdp`
    with every judge field; families.<family>.rounds has one entry per round or refresh with the discriminator's AUC
    and the judges' figures; both loops' LoRAs are kept; their goals are reported."""
    report = json.loads((demo_out / "report.json").read_text())
    family = report["families"]["sd3_flow"]
    methods, stages = family["methods"], family["rounds"]
    for name in ("rounds", "prdp_adversarial", "dpo", "prdp"):
        assert all(math.isfinite(methods[name][key]) for key in (*ROW_FIELDS, "glyph_intensity")), name
        assert methods[name]["baseline"] == "base", name
    assert methods["prdp_adversarial"]["settings"]["epochs"] == methods["prdp"]["settings"]["epochs"]
    for loop in ("rounds", "prdp_adversarial"):
        entries = [entry for entry in stages if entry["loop"] == loop]
        assert [entry["stage"] for entry in entries] == list(range(1, len(entries) + 1)) and len(entries) >= 2
        for entry in entries:
            for key in ("auc_vs_current", "style_rate", "faint_rate", "class_accuracy", "kid_to_target"):
                assert math.isfinite(entry[key]), (loop, key)
        lora = demo_out / "lora" / "sd3_flow" / loop
        assert (lora / DIFFUSERS_WEIGHT_NAME).is_file() and (lora / COMFYUI_WEIGHT_NAME).is_file(), loop
        # The last stage's generator is the row's: its LoRA, saved at that stage, is the one the row samples.
        stage = "round" if loop == "rounds" else "refresh"
        number = entries[-1]["round"] if loop == "rounds" else entries[-1]["refresh"]
        last = demo_out / "finetune" / "sd3_flow" / loop / f"{stage}-{number:02d}" / "lora" / DIFFUSERS_WEIGHT_NAME
        final = safetensors.torch.load_file(str(lora / DIFFUSERS_WEIGHT_NAME))
        assert all(torch.equal(final[key], value) for key, value in safetensors.torch.load_file(str(last)).items())
        assert (demo_out / f"sd3_flow_{loop}_monitors.png").is_file()
    refreshes = [entry for entry in stages if entry["loop"] == "prdp_adversarial"]
    assert [entry["epoch"] for entry in refreshes] == list(range(1, methods["prdp"]["settings"]["epochs"] + 1))
    goals = {goal["goal"] for goal in family["loop_goals"]}
    assert any(goal.startswith("prdp_adversarial style rate / base") for goal in goals)
    assert any(goal.startswith("rounds style rate - dpo") for goal in goals)
    assert "### GAN-RM's adversarial loop" in (demo_out / "report.md").read_text()


@pytest.mark.parametrize("method", ["sft", "dpo", "prdp", "rounds"])
def test_each_trainer_left_both_lora_files(demo_out, method):
    folder = demo_out / "lora" / method
    for name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        with safetensors.safe_open(str(folder / name), framework="pt") as handle:
            assert len(list(handle.keys())) > 0
    assert (demo_out / f"{method}_curves.png").is_file()


def test_timing_stages_add_up_to_the_total(demo_out):
    timing = json.loads((demo_out / "report.json").read_text())["timing"]
    stages = [key for key in timing if key != "total"]
    assert {"world", "reward_models_and_base", "selection", "flow", "finetune"} <= set(stages)
    assert all(timing[key] >= 0 for key in stages)
    # The stages run one after another; only the report writing between them is outside every stage.
    assert sum(timing[key] for key in stages) == pytest.approx(timing["total"], rel=0.02, abs=1.0)


def test_the_random_pick_row_is_the_expectation_over_its_draw(reduced_world, tmp_path):
    """Rows.add with `candidates`: rates and reward are each prompt's candidates averaged, paired ratios use
    them; KID, diversity and the picture are the drawn images'."""
    from ganrm_diffusers.demo.run import Rows
    from ganrm_diffusers.world.metrics import Reference, evaluate, per_image

    targets, target_digits = reduced_world.heldout_target_images()
    others, other_digits = reduced_world.heldout_other_images()
    pool, pool_digits = torch.cat([targets, others]), np.array(list(target_digits) + list(other_digits))
    prompts, n = 6, 4
    index = torch.from_numpy(np.random.default_rng(0).integers(0, len(pool), prompts * n))
    candidates = pool[index]
    digits = pool_digits[index.numpy()[::n]]  # each prompt asks for its first candidate's digit
    drawn = candidates[n - 1 :: n]  # "the random draw": each prompt's last candidate
    judges = reduced_world.judges
    model = GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(16,))
    rows = Rows(reduced_world, model, Reference.of(judges, targets), tmp_path, 1)

    row = rows.add("random", drawn, digits, unet_evaluations=1, seconds=0.0, candidates=candidates)
    verdicts = per_image(judges, candidates, np.repeat(digits, n))
    for rate, key in (("style_rate", "style"), ("faint_rate", "faint"), ("class_accuracy", "correct")):
        assert row[rate] == pytest.approx(verdicts[key].mean(), abs=1e-12), rate
    assert row["mean_reward"] == pytest.approx(float(model.score(candidates).double().mean()), rel=1e-6)
    alone = evaluate(judges, drawn, digits, rows.reference)
    assert row["kid_to_target"] == alone["kid_to_target"] and row["diversity"] == alone["diversity"]
    best = rows.add("best", candidates[::n], digits, unet_evaluations=1, seconds=0.0, baseline="random")
    expected_style = verdicts["style"].reshape(prompts, n).mean(axis=1)
    if expected_style.mean():
        ratio = per_image(judges, candidates[::n], digits)["style"].mean() / expected_style.mean()
        assert best["style_ratio"] == pytest.approx(ratio, rel=1e-12)


def test_base_is_candidate_0_of_best_of_n(reduced_world, tmp_path):
    """The base row read off best-of-N's run is what sampling the evaluation seeds with the plain pipeline gives
    (up to float32 summation order: other batches), at the same UNet cost."""
    from ganrm_diffusers.demo.run import _base_from, _selection_runs
    from ganrm_diffusers.world.samples import sample_digits

    settings = DemoSettings(out=tmp_path, quick=True, methods=("selection",))
    model = GANRewardModel(backbone=reduced_world.backbone, pretrained=None, hidden_sizes=(16,))
    generator = Generator.unet(reduced_world)
    base = _base_from(_selection_runs(reduced_world, model, settings, generator))
    sampled = sample_digits(generator.load(), reduced_world, settings.evaluation, 7, "base", generator.sampling)
    assert_relative_close(base.images, sampled.images, 1e-4, "base read off best-of-N vs sampled")
    assert base.unet_evaluations == sampled.unet_evaluations and list(base.digits) == list(sampled.digits)
