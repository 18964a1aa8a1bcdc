"""The trainers on tiny SD3 and FLUX.1 pipelines (flow matching): SFT, DPO and PRDP train only the LoRA and write
files that diffusers loads to the trained transformer's output; the objective is rectified flow's; a SIGKILLed run
resumes to the uninterrupted run's weights; two processes train like one with doubled accumulation; the round loop
runs unchanged; families the trainers do not serve are refused before loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from checks import assert_relative_close
from safetensors.torch import load_file
from tiny_models import tiny_flux2_klein_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

from ganrm_diffusers.generation.lora import COMFYUI_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, lora_state_dicts
from ganrm_diffusers.generation.pipeline import load_reward_guided_pipeline
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.training import dpo as train_dpo
from ganrm_diffusers.training import prdp as train_prdp
from ganrm_diffusers.training import rounds as train_rounds
from ganrm_diffusers.training import sft as train_sft
from ganrm_diffusers.training.config import TrainingConfigError
from ganrm_diffusers.training.objectives import FlowMatchingObjective
from ganrm_diffusers.training.run import setup_run
from ganrm_diffusers.training.state import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten digit 1", "a handwritten digit 4", "a handwritten digit 7", "a handwritten digit 9"]
FAST = {
    "num_inference_steps": 2,
    "eval_prompts": 0,
    "checkpoint_every": 2,
    "resolution": 32,
    "max_sequence_length": 16,
}
GUIDANCE = {"sd3": 3.0, "flux": 3.5}  # SD3: classifier-free guidance; FLUX.1-dev: its distilled guidance input
TRAINERS = {"sft": train_sft, "dpo": train_dpo, "prdp": train_prdp}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str) -> dict[str, Path]:
    from conftest import make_property_images, write_images

    root = tmp_path_factory.mktemp("flow_trainer_assets")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    torch.manual_seed(0)
    GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0).save_pretrained(
        root / "rm"
    )
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    write_images(root / "target", make_property_images(24, True, seed=1, size=32))
    names = ("sd3", "flux", "rm", "prompts", "target")
    return {name: root / (f"{name}.txt" if name == "prompts" else name) for name in names}


def common(assets: dict, model: str, out: Path, **overrides) -> dict:
    return {
        "pretrained_model": str(assets[model]),
        "reward_model": str(assets["rm"]),
        "prompts": str(assets["prompts"]),
        "output_dir": str(out),
        "guidance_scale": GUIDANCE[model],
        **FAST,
        **overrides,
    }


def configs(assets: dict, model: str, out: Path) -> dict:
    supervised = {"num_candidates": 2, "train_batch_size": 2, "max_train_steps": 3, "learning_rate": 1e-2}
    return {
        "sft": train_sft.SFTConfig(**common(assets, model, out / "sft"), **supervised),
        "dpo": train_dpo.DPOConfig(**common(assets, model, out / "dpo"), **supervised),
        "prdp": train_prdp.PRDPConfig(
            **common(assets, model, out / "prdp"),
            epochs=2,
            inner_steps=2,
            prompts_per_epoch=2,
            samples_per_prompt=3,
            train_batch_size=3,
            learning_rate=1e-2,
            clip_eps=1e-2,
            beta=1e-2,
        ),
    }


def lora_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / DIFFUSERS_WEIGHT_NAME)


def transformer_inputs(run) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Noisy latents in the family's layout, their timestep positions, and prompts: one unguided prediction."""
    generator = torch.Generator().manual_seed(5)
    latents = run.sampler.sample(PROMPTS[:2], [0, 1], height=32, width=32, decode=False).latents[:, -1]
    noise = torch.randn(latents.shape, generator=generator)
    positions = torch.tensor([700, 200])
    return run.objective.noisy_and_target(latents, noise, positions)[0], positions, PROMPTS[:2]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["sft", "dpo", "prdp"])
def test_trainer_trains_only_the_lora_and_diffusers_loads_it(assets, tmp_path, model, method):
    config = configs(assets, model, tmp_path)[method]
    run = setup_run(config)
    assert isinstance(run.objective, FlowMatchingObjective)
    frozen = {name: value.clone() for name, value in run.model.state_dict().items() if "lora_" not in name}
    summary = TRAINERS[method].train(config, run)

    out = Path(config.output_dir)
    for name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, "metrics.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert summary["final"]["step"] == 3 if method != "prdp" else summary["final"]["epoch"] == 2
    assert "peak_rss_mib" in summary
    # Only the LoRA moved: every frozen weight of the transformer is as it was, bit for bit.
    after = run.model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert any(value.abs().sum() > 0 for key, value in lora_of(out).items() if "lora_B" in key or "lora.up" in key)

    # A fresh pipeline with the file loaded by diffusers predicts what the trained transformer predicts.
    noisy, positions, texts = transformer_inputs(run)
    fresh = load_reward_guided_pipeline(assets[model])  # SD3 saved without T5 loads as our SD3 pipeline
    with torch.no_grad():
        base = run.objective.predict(fresh.transformer, noisy, positions, texts)
        fresh.load_lora_weights(out)
        loaded = run.objective.predict(fresh.transformer, noisy, positions, texts)
        trained = run.objective.predict(run.model, noisy, positions, texts)
    assert_relative_close(loaded, trained, 1e-4, f"{method} LoRA loaded by diffusers vs trained")
    assert (loaded - base).abs().max() > 1e-4


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_prdp_starts_on_policy_exactly(assets, tmp_path, model):
    """PRDP's first inner step: the current log-probs of the epoch's trajectories, in the same batches and precision
    as the rollout, equal theta_old's bit for bit (policy ratio 1, nothing clipped), and a fresh LoRA equals the
    reference."""
    config = configs(assets, model, tmp_path)["prdp"]
    run = setup_run(config)
    samples = train_prdp.sample_epoch(run, PROMPTS, epoch=0)
    assert run.sampler.eta == 0.7 and samples.steps == list(range(FAST["num_inference_steps"]))
    current = train_prdp.current_log_probs(run, samples)
    assert torch.equal(current, samples.old_log_probs)
    assert torch.equal(current, samples.ref_log_probs)  # lora_B starts at zero


def test_the_flow_objective_is_rectified_flow(assets, tmp_path):
    """x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, sigma from the training schedule at a logit-normal
    position (the same per example whatever the batch), the model's timestep sigma * 1000."""
    run = setup_run(configs(assets, "sd3", tmp_path)["sft"])
    objective = run.objective
    noise, positions = objective.draw(torch.tensor([3, 9, 3]), seed=1, epoch=0, shape=(4, 16, 16))
    assert torch.equal(noise[0], noise[2]) and positions[0] == positions[2] and not torch.equal(noise[0], noise[1])
    many = objective.draw(torch.arange(2000), seed=0, epoch=0, shape=(1,))[1].float() / objective.num_train_timesteps
    # logit-normal(0, 1) positions: median 1/2, and both tails drawn far less often than the middle
    assert abs(float(many.median()) - 0.5) < 0.03 and float(((many < 0.1) | (many > 0.9)).float().mean()) < 0.1
    latents = torch.randn(3, 4, 16, 16)
    noisy, target = objective.noisy_and_target(latents, noise, positions)
    sigma = objective.sigmas[positions].view(-1, 1, 1, 1)
    assert_relative_close(noisy, (1 - sigma) * latents + sigma * noise, 1e-6, "noisy latents")
    assert torch.equal(target, noise - latents)
    assert torch.allclose(objective.timesteps[positions], objective.sigmas[positions] * 1000, rtol=1e-5)


@pytest.mark.slow
def test_sigkilled_flow_run_resumes_to_the_uninterrupted_weights(assets, tmp_path):
    settings = common(
        assets,
        "sd3",
        tmp_path / "killed",
        num_candidates=2,
        train_batch_size=1,
        max_train_steps=6,
        learning_rate=1e-2,
        checkpoint_every=2,
    )
    arguments = [f"--{key}={value}" for key, value in {**settings, "checkpoints_total_limit": 10}.items()]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "training" / "train_dpo.py"), *arguments],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list_checkpoints(tmp_path / "killed") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = list_checkpoints(tmp_path / "killed")
    assert written and int(written[-1].name.split("-")[1]) < 6, "killed before the first or after the last checkpoint"
    train_dpo.train(train_dpo.DPOConfig(**settings, resume="latest"))
    train_dpo.train(train_dpo.DPOConfig(**{**settings, "output_dir": str(tmp_path / "straight")}))
    resumed, straight = lora_of(tmp_path / "killed"), lora_of(tmp_path / "straight")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


@pytest.mark.slow
def test_two_flow_processes_train_like_one_with_doubled_accumulation(assets, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    settings = {"num_candidates": 2, "train_batch_size": 1, "max_train_steps": 3, "learning_rate": 1e-2}
    settings["adam_epsilon"] = 1e-4  # see the UNet test: keeps near-zero gradients from taking full-size steps
    two = common(assets, "sd3", tmp_path / "two", **settings)
    command = [*launcher, str(REPO / "training" / "train_dpo.py"), *[f"--{k}={v}" for k, v in two.items()]]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = train_dpo.DPOConfig(**common(assets, "sd3", tmp_path / "one", **settings, gradient_accumulation_steps=2))
    train_dpo.train(config)
    initial = lora_state_dicts(setup_run(replace(config, output_dir=str(tmp_path / "initial"))).denoiser)[0]
    one, two = lora_of(tmp_path / "one"), lora_of(tmp_path / "two")
    assert max(float((one[key] - initial[key]).abs().max()) for key in one) > 1e-3
    update_two = {key: two[key] - initial[key] for key in one}
    update_one = {key: one[key] - initial[key] for key in one}
    assert_relative_close(update_two, update_one, 1e-2, "LoRA update of 2 processes vs 1 with doubled accumulation")


@pytest.mark.slow
def test_the_round_loop_runs_on_a_flow_model(assets, tmp_path, tiny_backbone):
    config = train_rounds.RoundsConfig(
        **common(
            assets,
            "sd3",
            tmp_path / "rounds",
            reward_model=None,
            num_candidates=4,
            train_batch_size=2,
            max_train_steps=2,
            learning_rate=1e-2,
        ),
        target_dir=str(assets["target"]),
        rounds=2,
        bootstrap_m=4,
        rm_backbone=tiny_backbone,
        rm_pretrained=None,
        rm_hidden_sizes="32",
        rm_max_epochs=10,
        finetune="dpo",
    )
    summary = train_rounds.train(config)
    out = Path(config.output_dir)
    loras = [lora_of(out / f"round-{index:02d}" / "lora") for index in range(2)]
    assert any(not torch.equal(loras[0][key], loras[1][key]) for key in loras[0])
    assert all(torch.equal(loras[1][key], value) for key, value in lora_of(out).items())  # the final LoRA
    assert [entry["round"] for entry in summary["rounds"]] == [0, 1]
    for entry in summary["rounds"]:
        assert 0 <= entry["auc_vs_current"] <= 1 and 0 <= entry["auc_vs_base"] <= 1


def test_families_the_trainers_do_not_serve_are_refused_before_loading(assets, tmp_path):
    tiny_flux2_klein_pipeline().save_pretrained(tmp_path / "klein")
    config = train_sft.SFTConfig(pretrained_model=str(tmp_path / "klein"), output_dir=str(tmp_path / "out"))
    with pytest.raises(TrainingConfigError, match="SD3.x and FLUX.1"):
        setup_run(config)
    with pytest.raises(TrainingConfigError, match="noise level"):
        setup_run(replace(config, pretrained_model=str(assets["sd3"]), eta=1.0))


def adversarial_prdp(assets: dict, out: Path, **overrides) -> train_prdp.PRDPConfig:
    base = configs(assets, "sd3", out)["prdp"]
    return replace(
        base,
        output_dir=str(out),
        epochs=4,
        adversarial=True,
        target_dir=str(assets["target"]),
        refresh_every=2,
        rm_replay=1,
        rm_max_epochs=5,
        checkpoint_every=1,
        checkpoints_total_limit=10,
        **overrides,
    )


def test_adversarial_prdp_refreshes_the_discriminator_against_the_current_generator(assets, tmp_path):
    config = adversarial_prdp(assets, tmp_path / "adversarial")
    summary = train_prdp.train(config)
    out = Path(config.output_dir)
    refreshes = summary["refreshes"]
    assert [(entry["refresh"], entry["epoch"]) for entry in refreshes] == [(1, 2), (2, 4)]
    assert [entry["replayed_windows"] for entry in refreshes] == [0, 1]  # the replay of the window before
    for entry in refreshes:
        assert 0 <= entry["auc_vs_current"] <= 1 and 0 <= entry["previous_auc_vs_current"] <= 1
    # Each refresh keeps the generator and the discriminator of its moment; the heads differ from the start's.
    heads = [
        GANRewardModel.from_pretrained(folder).head.state_dict()
        for folder in (assets["rm"], out / "refresh-01" / "reward_model", out / "refresh-02" / "reward_model")
    ]
    for earlier, later in zip(heads, heads[1:], strict=False):
        assert any(not torch.equal(earlier[key], later[key]) for key in earlier)
    assert all(torch.equal(lora_of(out / "refresh-02" / "lora")[key], value) for key, value in lora_of(out).items())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records if "auc_vs_current" in record] == [2, 4]


def test_adversarial_prdp_resumes_to_the_uninterrupted_run(assets, tmp_path, monkeypatch):
    """Stopped in epoch 4 (inside the second window, one epoch of it observed), resumed from the epoch-3 checkpoint:
    the same refreshes and the same LoRA as a run never stopped."""
    straight = train_prdp.train(adversarial_prdp(assets, tmp_path / "straight"))
    sample_epoch = train_prdp.sample_epoch

    def stop_at_the_last_epoch(run, prompts, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return sample_epoch(run, prompts, epoch)

    monkeypatch.setattr(train_prdp, "sample_epoch", stop_at_the_last_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_prdp.train(adversarial_prdp(assets, tmp_path / "stopped"))
    monkeypatch.setattr(train_prdp, "sample_epoch", sample_epoch)
    resumed = train_prdp.train(adversarial_prdp(assets, tmp_path / "stopped", resume="latest"))
    assert [entry["auc_vs_current"] for entry in resumed["refreshes"]] == [
        entry["auc_vs_current"] for entry in straight["refreshes"]
    ]
    one, two = lora_of(tmp_path / "straight"), lora_of(tmp_path / "stopped")
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_adversarial_prdp_needs_target_images(assets, tmp_path):
    with pytest.raises(TrainingConfigError, match="--target_dir"):
        replace(adversarial_prdp(assets, tmp_path / "x"), target_dir="").check()
