"""scripts/readme_figures.py: README regions rewritten from a demo report and bench results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_figures.py"

README = """# project

Intro text that must stay.

<!-- figures:results:start -->
old results table 0.123
<!-- figures:results:end -->

Between the regions.

<!-- figures:speed:start -->
old speed 9.999x
<!-- figures:speed:end -->

Tail text.
"""


def load_script():
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(style: float, **extra: object) -> dict:
    return {
        "style_rate": style,
        "style_rate_ci95": [style - 0.01, style + 0.01],
        "faint_rate": 0.021,
        "blank_rate": 0.0,
        "class_accuracy": 0.944,
        "kid_to_target": 0.00123,
        "diversity": 1.5,
        "unet_evaluations": 25000,
        **extra,
    }


def fake_report() -> dict:
    return {
        "world": {"build_seconds": 361.4},
        "timing": {"world": 3.0, "reward_models_and_base": 90.0, "selection": 330.0, "total": 425.0},
        "reward_model": {
            "auc": 0.9561,
            "auc_style_among_real": 0.9874,
            "spearman_reward_vs_style": 0.84,
            "dimmed_scores_higher": {"0.9": 1.0, "0.8": 0.997},
        },
        "reward_model_brightness_augmented": {"auc": 0.9, "dimmed_scores_higher": {"0.9": 0.5, "0.8": 0.503}},
        "methods": {
            "dpo": row(0.796, style_ratio=7.51, style_ratio_ci95=[6.9, 8.2]),
            "best_of_8_pruned": row(0.546),
            "base": row(0.106),
            "fk_4_particles": {"style_rate": 0.333},
            "best_of_8": row(0.528, style_ratio=4.98, style_ratio_ci95=[4.31, 5.77]),
            "best_of_8_brightness_augmented_rm": row(0.321),
            "random_candidate": row(0.104),
            "sft": row(0.248),
        },
        "settings": {
            "tuning": {
                "seeds": [50000000, 50000499],
                "dpo": {"learning_rate": 0.001, "beta": 5000.0},
                "pruning": {"chosen": "8to2_at30", "rule": "r", "swept": {"8to2_at30": {}}},
                "finetune": {"chosen": {"dpo": {"label": "beta_5000"}}, "rule": "r"},
            }
        },
    }


def fake_bench() -> dict:
    return {
        "schema": 1,
        "bench": "scoring",
        "created": "2025-01-31T12:00:00+00:00",
        "torch": "2.9.1",
        "settings": {"batch": 16, "threads": 2, "device": "cpu"},
        "comparisons": [
            {
                "name": "score_vs_encode_image",
                "ours": "GANRewardModel.score",
                "reference": "encode_image",
                "ours_seconds": 0.1007,
                "reference_seconds": 0.1,
                "ratio": 1.007,
                "goal": "<= 1.05",
                "goal_met": True,
                "settings": {"batch": 16, "threads": 2, "device": "cpu"},
            }
        ],
        "figures": [{"name": "head_training_seconds", "value": 0.331, "unit": "s", "description": "head training"}],
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    report = tmp_path / "demo-out" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps(fake_report()))
    bench = tmp_path / "bench-out"
    bench.mkdir()
    (bench / "scoring.json").write_text(json.dumps(fake_bench()))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return {"report": report, "bench": bench, "readme": readme}


def run(paths: dict[str, Path]) -> int:
    argv = ["--report", str(paths["report"]), "--bench", str(paths["bench"]), "--readme", str(paths["readme"])]
    return load_script().main(argv)


def region(text: str, name: str) -> str:
    return text.split(f"<!-- figures:{name}:start -->")[1].split(f"<!-- figures:{name}:end -->")[0]


def test_regions_rewritten_from_report_and_bench(inputs: dict[str, Path]) -> None:
    assert run(inputs) == 0
    text = inputs["readme"].read_text()
    results, speed = region(text, "results"), region(text, "speed")
    assert "0.123" not in results and "9.999x" not in speed
    for figure in ("0.796 [0.786, 0.806]", "7.51x [6.90, 8.20]", "0.944", "0.00123", "25 000", "0.956", "0.987"):
        assert figure in results
    assert "361 s" in results and "learning_rate 0.001" in results and "seeds: 50000000 to 50000499" in results
    assert "pruning: chose 8to2_at30 (r); every candidate's figures are in report.json" in results
    assert "finetune: chose dpo beta_5000 (r) in an earlier tuning run on these seeds; this report holds no" in results
    assert "for 100% (GAN-RM, `reward_model`) and 50% (with brightness views" in results
    assert "demo run took 7.1 minutes (world 0.1, reward models and base 1.5, selection 5.5)." in results
    names = ("base", "random_candidate", "best_of_8", "best_of_8_brightness_augmented_rm", "best_of_8_pruned")
    order = [results.index(f"`{name}`") for name in names]
    order += [results.index(f"`{name}`") for name in ("fk_4_particles", "sft", "dpo")]
    assert order == sorted(order)
    fk_row = next(line for line in results.splitlines() if "`fk_4_particles`" in line)
    assert "0.333" in fk_row and "–" in fk_row
    assert (
        "`score_vs_encode_image` **1.007** (goal <= 1.05, met; 100.7 ms / 100.0 ms)" in speed and "threads 2" in speed
    )
    assert "head training: 0.33 s" in speed
    outside = text.replace(results, "").replace(speed, "")
    assert outside == README.replace(region(README, "results"), "").replace(region(README, "speed"), "")


def test_second_run_is_idempotent(inputs: dict[str, Path]) -> None:
    run(inputs)
    first = inputs["readme"].read_text()
    run(inputs)
    assert inputs["readme"].read_text() == first


def test_one_table_per_family(inputs: dict[str, Path]) -> None:
    report = fake_report()
    report["families"] = {"thin": {"methods": report.pop("methods")}, "bold": {"methods": {"base": row(0.222)}}}
    inputs["report"].write_text(json.dumps(report))
    run(inputs)
    results = region(inputs["readme"].read_text(), "results")
    assert "**Family `thin`**" in results and "**Family `bold`**" in results and "0.222" in results
    assert results.count("| method |") == 2


def test_an_undefined_interval_says_so(inputs: dict[str, Path]) -> None:
    """A ratio whose bootstrap interval is undefined (JSON NaN bounds: the baseline drew no styled image in some
    resamples) reads as such, never as a bare ratio that looks like it had no interval computed."""
    report = fake_report()
    report["methods"]["dpo"] = row(0.105, style_ratio=7.0, style_ratio_ci95=[float("nan"), float("nan")])
    inputs["report"].write_text(json.dumps(report))
    run(inputs)
    assert "| 7.00x [undefined] |" in region(inputs["readme"].read_text(), "results")


def test_missing_markers_fail_clearly(inputs: dict[str, Path]) -> None:
    broken = README.replace("<!-- figures:speed:start -->\n", "")
    inputs["readme"].write_text(broken)
    with pytest.raises(SystemExit, match="figures:speed:start"):
        run(inputs)
    assert inputs["readme"].read_text() == broken


@pytest.mark.parametrize(("missing", "message"), [("report", "make demo"), ("bench", "make bench")])
def test_missing_inputs_fail_clearly(inputs: dict[str, Path], missing: str, message: str) -> None:
    target = inputs[missing]
    for path in sorted(target.glob("*")) if target.is_dir() else [target]:
        path.unlink()
    with pytest.raises(SystemExit, match=message):
        run(inputs)
    assert inputs["readme"].read_text() == README


def test_one_region_needs_only_its_own_input(inputs: dict[str, Path]) -> None:
    (inputs["bench"] / "scoring.json").unlink()  # no bench results: the speed region cannot be written
    argv = ["--report", str(inputs["report"]), "--bench", str(inputs["bench"]), "--readme", str(inputs["readme"])]
    with pytest.raises(SystemExit):
        load_script().main(argv)
    assert inputs["readme"].read_text() == README  # nothing written
    assert load_script().main([*argv, "--regions", "results"]) == 0
    text = inputs["readme"].read_text()
    assert "0.796 [0.786, 0.806]" in region(text, "results") and "old speed 9.999x" in region(text, "speed")
