"""`ganrm sample`: scored candidates as an imagefolder dataset, resumable, split across accelerate processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import assert_relative_close, import_or_skip
from PIL import Image
from tiny_models import tiny_sd_pipeline

from ganrm_diffusers.cli.main import main
from ganrm_diffusers.generation.candidates import PARTS_DIR, SETTINGS_NAME, read_records
from ganrm_diffusers.generation.pipeline import RewardGuidedPipeline
from ganrm_diffusers.reward.model import GANRewardModel

PROMPTS = [
    "a handwritten digit 0",
    "a handwritten digit 1",
    "a handwritten digit 2",
    "a handwritten digit 3",
    "a handwritten digit 4",
]
CANDIDATES = 3


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str) -> Path:
    """A reward-guided pipeline folder with its reward model inside (the backbone too: fully offline)."""
    torch.manual_seed(0)
    reward_model = GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)
    folder = tmp_path_factory.mktemp("sample_cli") / "pipeline"
    RewardGuidedPipeline.from_pipe(tiny_sd_pipeline(), reward_model=reward_model).save_pretrained(folder)
    return folder


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def sample_args(pipeline: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sample",
        "--pipeline",
        str(pipeline),
        "--prompts",
        str(prompts),
        "--num_candidates",
        str(CANDIDATES),
        "--num_inference_steps",
        "3",
        "--guidance_scale",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def comparable(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "score"} for record in records]


@pytest.fixture(scope="module")
def reference(saved_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single-process run over all prompts, seeds from 100: the folder every other run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    prompts = write_prompts(root / "prompts.txt", PROMPTS)
    assert main(sample_args(saved_pipeline, prompts, root / "out", "--seed", "100")) == 0
    return root / "out"


def test_sample_writes_every_candidate_with_prompt_seed_score_and_rank(saved_pipeline, reference):
    records = [json.loads(line) for line in (reference / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == len(PROMPTS) * CANDIDATES
    assert [record["seed"] for record in records] == list(range(100, 100 + len(PROMPTS) * CANDIDATES))
    assert [record["prompt"] for record in records] == [prompt for prompt in PROMPTS for _ in range(CANDIDATES)]
    for prompt in range(len(PROMPTS)):
        group = records[prompt * CANDIDATES : (prompt + 1) * CANDIDATES]
        assert sorted(record["rank"] for record in group) == list(range(CANDIDATES))
        assert max(group, key=lambda record: record["score"])["rank"] == 0
    # The scores are the reward model's scores of the written files (PNG quantisation aside).
    reward_model = GANRewardModel.from_pretrained(saved_pipeline / "reward_model")
    images = [Image.open(reference / record["file_name"]).convert("RGB") for record in records]
    recorded = [record["score"] for record in records]
    # Not the same numbers: the files hold the images rounded to 8 bits. That moves the scores by ~1e-3 relative;
    # a score recorded for another file errs by 1e-1.
    assert_relative_close(reward_model.score(images), recorded, 1e-2, "scores of the written files")
    assert not list((reference / PARTS_DIR).glob("*.jsonl"))  # merged into metadata.jsonl


def test_the_folder_loads_as_an_imagefolder_dataset(reference):
    datasets = import_or_skip("datasets", "`datasets` is not installed (pip install -e '.[dev]')")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(reference), split="train")
    assert len(dataset) == len(PROMPTS) * CANDIDATES
    assert {"image", "prompt", "seed", "score", "rank"} <= set(dataset.column_names)
    assert sorted(dataset["seed"]) == list(range(100, 100 + len(PROMPTS) * CANDIDATES))


def test_resume_skips_finished_prompts_and_refuses_other_settings(saved_pipeline, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(sample_args(saved_pipeline, write_prompts(tmp_path / "p.txt", PROMPTS[:3]), out, "--seed", "100")) == 0
    # As if the run was interrupted after prompt 2's records reached its part file, before the final merge.
    records = read_records(out)
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["prompt_index"] < 2))
    (out / PARTS_DIR / "process-0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records if r["prompt_index"] == 2)
    )
    stamps = {record["file_name"]: (out / record["file_name"]).stat().st_mtime_ns for record in records}
    capsys.readouterr()

    prompts = write_prompts(tmp_path / "all.txt", PROMPTS)
    assert main(sample_args(saved_pipeline, prompts, out, "--seed", "100")) == 0
    assert "(3 prompts were already done)" in capsys.readouterr().out
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())  # not sampled again
    assert comparable(read_records(out)) == comparable(read_records(reference))

    assert main(sample_args(saved_pipeline, prompts, out, "--seed", "5")) == 2
    assert "other settings (seed: 100 there, 5 now)" in capsys.readouterr().err
    changed = write_prompts(tmp_path / "changed.txt", ["something else", *PROMPTS[1:]])
    assert main(sample_args(saved_pipeline, changed, out, "--seed", "100")) == 2
    assert "sampled from other prompts" in capsys.readouterr().err
    assert json.loads((out / SETTINGS_NAME).read_text())["num_candidates"] == CANDIDATES


def test_a_pipeline_without_reward_model_needs_one(tmp_path, capsys):
    tiny_sd_pipeline().save_pretrained(tmp_path / "plain")
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:1])
    assert main(sample_args(tmp_path / "plain", prompts, tmp_path / "out")) == 2
    assert "holds no reward model: pass --reward_model" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_accelerate_processes_split_the_prompts_and_give_the_single_process_result(
    saved_pipeline, reference, tmp_path
):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    # `accelerate launch --cpu` starts one process unless an MPI launcher is installed; the torchrun-based
    # launcher starts two, and without a GPU they join as CPU workers (gloo).
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "ganrm_diffusers.cli.main",
        *sample_args(saved_pipeline, prompts, tmp_path / "double", "--seed", "100"),
    ]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: sampled 3 prompts" in result.stdout
    assert "process 1 of 2: sampled 2 prompts" in result.stdout

    single, double = read_records(reference), read_records(tmp_path / "double")
    assert comparable(double) == comparable(single)
    # The same candidates sampled by two processes of one thread each: the same scores up to float32 order.
    scores_double, scores_single = [r["score"] for r in double], [r["score"] for r in single]
    assert_relative_close(scores_double, scores_single, 1e-4, "scores of two processes vs one")
    for record in single:
        a = np.asarray(Image.open(reference / record["file_name"]), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "double" / record["file_name"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # thread counts differ: rounding may flip a pixel level
