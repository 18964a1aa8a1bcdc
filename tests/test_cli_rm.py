"""`ganrm train-rm`, `ganrm score` and `ganrm push` on folders of real image files."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from PIL import Image

from ganrm_diffusers.cli.main import main
from ganrm_diffusers.reward.model import GANRewardModel

GANRM = [sys.executable, "-m", "ganrm_diffusers.cli.main"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone, property_folders) -> Path:
    out = tmp_path_factory.mktemp("cli") / "rm"
    code = main(
        [
            "train-rm",
            "--positives", str(property_folders["positives"]),
            "--negatives", str(property_folders["negatives"]),
            "--pool", str(property_folders["pool"]),
            "--bootstrap_rounds", "1",
            "--bootstrap_m", "8",
            "--out", str(out),
            "--backbone", tiny_backbone,
            "--pretrained", "none",
            "--hidden_sizes", "32",
            "--device", "cpu",
            "--description", "noise with a red square",
        ]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.mark.parametrize(
    ("command", "expected"),
    [([], "train-rm"), (["train-rm"], "--positives"), (["score"], "--model"), (["push"], "--repo_id")],
)
def test_every_command_has_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and expected in capsys.readouterr().out


def test_train_rm_writes_checkpoint_metrics_and_curves(trained):
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "training_curves.png"} <= set(
        os.listdir(trained)
    )
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["metrics"]["val_auc"] >= 0.95 and [row["round"] for row in metrics["rounds"]] == [0, 1]
    assert Image.open(trained / "training_curves.png").size[0] > 500
    model = GANRewardModel.from_pretrained(trained)
    assert model.config.training["description"] == "noise with a red square"
    assert "noise with a red square" in (trained / "README.md").read_text()


def test_score_writes_ranked_records_and_a_grid(trained, property_folders, tmp_path, caplog):
    images = tmp_path / "to_score"
    shutil.copytree(property_folders["heldout_positives"], images / "pos")
    shutil.copytree(property_folders["heldout_negatives"], images / "neg")
    (images / "broken.png").write_bytes(b"not a png")
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "scores.json"
    assert main(["score", str(images), "--model", str(trained), "--out", str(out), "--device", "cpu"]) == 0

    records = json.loads(out.read_text())
    assert len(records) == 80 and [record["rank"] for record in records] == list(range(80))
    assert records == sorted(records, key=lambda record: -record["score"])
    assert all(0 < record["probability"] < 1 for record in records)
    top_half = [record["file"] for record in records[:40]]
    assert sum(name.startswith("pos/") for name in top_half) >= 36  # the target-like images rank first
    assert "broken.png" in caplog.text
    grid = Image.open(tmp_path / "scores_grid.png")
    assert grid.size[0] >= 8 * 100


def test_user_mistakes_are_one_line_errors_without_traceback(tmp_path, tiny_backbone, property_folders):
    empty = tmp_path / "empty"
    empty.mkdir()
    command = [
        *GANRM, "train-rm", "--positives", str(empty), "--negatives", str(property_folders["negatives"]),
        "--out", str(tmp_path / "out"), "--backbone", tiny_backbone, "--pretrained", "none", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert f"image folder {empty} holds no image files" in result.stderr
    assert "Traceback" not in result.stderr

    result = subprocess.run(
        [*GANRM, "score", str(property_folders["negatives"]), "--model", str(tmp_path / "missing_model")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "missing_model does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_rounds_without_a_pool_is_an_error(tmp_path, tiny_backbone, property_folders, capsys):
    code = main(
        [
            "train-rm", "--positives", str(property_folders["positives"]),
            "--negatives", str(property_folders["negatives"]), "--out", str(tmp_path / "out"),
            "--backbone", tiny_backbone, "--bootstrap_rounds", "2", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 2 and "--bootstrap_rounds needs --pool" in capsys.readouterr().err


def test_a_real_architecture_with_random_weights(tmp_path, property_folders):
    """`--pretrained none` builds a built-in open_clip architecture (ViT-B-32) with random weights, offline."""
    positives, negatives = tmp_path / "pos", tmp_path / "neg"
    for source, target in ((property_folders["positives"], positives), (property_folders["negatives"], negatives)):
        target.mkdir()
        for path in sorted(source.glob("*.png"))[:10]:
            shutil.copy(path, target)
    code = main(
        [
            "train-rm", "--positives", str(positives), "--negatives", str(negatives), "--out", str(tmp_path / "rm"),
            "--backbone", "ViT-B-32", "--pretrained", "none", "--max_epochs", "5", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["backbone"] == "ViT-B-32" and config["pretrained"] is None and config["embed_dim"] == 512
    assert config["backbone_in_checkpoint"] is True  # random weights cannot be found again by name


def test_push_uploads_the_folder(trained, monkeypatch, capsys):
    uploaded = {}

    class Repo:
        repo_id = "someone/ganrm-red"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded.update({name: Path(folder_path, name).read_bytes() for name in os.listdir(folder_path)})
        return "https://huggingface.co/someone/ganrm-red/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", "--model", str(trained), "--repo_id", "someone/ganrm-red"]) == 0
    assert set(uploaded) == {"config.json", "model.safetensors", "README.md"}
    assert uploaded["model.safetensors"] == (trained / "model.safetensors").read_bytes()
    assert "someone/ganrm-red" in capsys.readouterr().out


def test_negatives_sampled_from_a_pipeline(reduced_world, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 7\n")
    out = tmp_path / "rm"
    arguments = [
        "train-rm",
        "--positives", str(reduced_world.target_dir),
        "--pipeline", str(reduced_world.pipeline_dir),
        "--prompts", str(prompts),
        "--negatives_per_prompt", "8",
        "--num_inference_steps", "2",
        "--min_images_per_class", "8",
        "--out", str(out),
        "--backbone", reduced_world.backbone,
        "--pretrained", "none",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(arguments) == 0
    records = [json.loads(line) for line in (out / "negatives" / "metadata.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == ["a handwritten digit 1"] * 8 + ["a handwritten digit 7"] * 8
    assert len({record["seed"] for record in records}) == 16
    assert all((out / "negatives" / record["file_name"]).is_file() for record in records)

    # A second run reuses the sampled negatives rather than sampling again.
    mtime = (out / "negatives" / records[0]["file_name"]).stat().st_mtime_ns
    assert main(arguments) == 0
    assert (out / "negatives" / records[0]["file_name"]).stat().st_mtime_ns == mtime
    assert GANRewardModel.from_pretrained(out).config.backbone == reduced_world.backbone


def test_train_rm_without_negatives_or_pipeline_is_an_error(tmp_path, property_folders, capsys):
    code = main(["train-rm", "--positives", str(property_folders["positives"]), "--out", str(tmp_path / "rm")])
    assert code != 0 and "--pipeline and --prompts" in capsys.readouterr().err


def _option_parsers():
    """Every parser of `ganrm` (each sub-command) and of each trainer (`ganrm train METHOD`)."""
    from ganrm_diffusers.cli.main import build_parser
    from ganrm_diffusers.cli.train import METHODS, method_parser

    root = build_parser()
    commands = next(action for action in root._actions if isinstance(action, argparse._SubParsersAction))
    yield from commands.choices.items()
    for method in METHODS:
        yield f"train {method}", method_parser(method)[0]


def test_every_command_spells_its_options_one_way():
    """snake_case everywhere (as diffusers' scripts and accelerate); kebab-case only as a second, older spelling."""
    seen = 0
    for name, parser in _option_parsers():
        for action in parser._actions:
            long_options = [option for option in action.option_strings if option.startswith("--")]
            if not long_options or long_options[0] == "--help":
                continue
            canonical = long_options[0]
            assert "-" not in canonical[2:], f"`{name}` option {canonical} is not snake_case"
            assert canonical[2:] == action.dest, f"`{name}` option {canonical} stores into {action.dest}"
            seen += 1
    assert seen > 100


def test_old_kebab_spellings_still_work_with_a_warning(property_folders, tiny_backbone, tmp_path, capsys):
    from ganrm_diffusers.cli.main import build_parser

    parser = build_parser()
    old = parser.parse_args(
        ["train-rm", "--positives", "p", "--out", "o", "--epochs", "7", "--hidden-sizes", "8,4", "--prompt-aware"]
    )
    new = parser.parse_args(
        ["train-rm", "--positives", "p", "--out", "o", "--max_epochs", "7", "--hidden_sizes", "8,4", "--prompt_aware"]
    )
    assert vars(old) == vars(new)
    assert old.max_epochs == 7 and old.hidden_sizes == (8, 4) and old.prompt_aware is True
    err = capsys.readouterr().err
    for before, after in (("--epochs", "--max_epochs"), ("--hidden-sizes", "--hidden_sizes")):
        assert f"{before} is deprecated and will be removed in the next release: use {after}" in err
