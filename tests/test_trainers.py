"""The trainers (training/train_*.py) on tiny SD and SDXL pipelines: they run and write loadable LoRAs, a 2-process
run equals one process with doubled accumulation, a SIGKILLed run resumes to the uninterrupted run's weights, the
chunked PRDP gradient is the exact gradient, and the round loop keeps every round's reward model and LoRA."""

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
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

from ganrm_diffusers.generation.candidates import SampleSettings
from ganrm_diffusers.generation.lora import COMFYUI_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, lora_state_dicts
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.training import dpo as train_dpo
from ganrm_diffusers.training import prdp as train_prdp
from ganrm_diffusers.training import rounds as train_rounds
from ganrm_diffusers.training import sft as train_sft
from ganrm_diffusers.training.config import TrainingConfigError
from ganrm_diffusers.training.losses import prdp_loss
from ganrm_diffusers.training.run import setup_run
from ganrm_diffusers.training.state import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten digit 1", "a handwritten digit 4", "a handwritten digit 7", "a handwritten digit 9"]
FAST = {"num_inference_steps": 2, "guidance_scale": 3.0, "eval_prompts": 0, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str) -> dict[str, Path]:
    """Saved tiny SD and SDXL pipelines, a tiny reward model, a prompt file and target images."""
    from conftest import make_property_images, write_images

    root = tmp_path_factory.mktemp("trainer_assets")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    torch.manual_seed(0)
    GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0).save_pretrained(
        root / "rm"
    )
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    write_images(root / "target", make_property_images(24, True, seed=1, size=32))
    return {
        "sd": root / "sd",
        "sdxl": root / "sdxl",
        "rm": root / "rm",
        "prompts": root / "prompts.txt",
        "target": root / "target",
    }


def common(assets: dict, model: str, out: Path, **overrides) -> dict:
    return {
        "pretrained_model": str(assets[model]),
        "reward_model": str(assets["rm"]),
        "prompts": str(assets["prompts"]),
        "output_dir": str(out),
        **FAST,
        **overrides,
    }


def lora_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / DIFFUSERS_WEIGHT_NAME)


def configs(assets: dict, model: str, out: Path) -> dict:
    return {
        "sft": train_sft.SFTConfig(
            **common(assets, model, out / "sft"),
            num_candidates=2,
            train_batch_size=2,
            max_train_steps=3,
            learning_rate=1e-2,
        ),
        "dpo": train_dpo.DPOConfig(
            **common(assets, model, out / "dpo"),
            num_candidates=2,
            train_batch_size=2,
            max_train_steps=3,
            learning_rate=1e-2,
        ),
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


TRAINERS = {"sft": train_sft, "dpo": train_dpo, "prdp": train_prdp}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["sft", "dpo", "prdp"])
def test_trainer_writes_a_lora_that_diffusers_loads(assets, tmp_path, model, method):
    config = configs(assets, model, tmp_path)[method]
    run = setup_run(config)
    summary = TRAINERS[method].train(config, run)

    out = Path(config.output_dir)
    for name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, "metrics.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["method"] == method
    assert summary["final"]["step"] == 3 if method != "prdp" else summary["final"]["epoch"] == 2
    assert all(name.endswith((".safetensors", ".json")) for path in list_checkpoints(out) for name in os.listdir(path))
    assert any(value.abs().sum() > 0 for key, value in lora_of(out).items() if "lora.up" in key)
    kohya = load_file(out / COMFYUI_WEIGHT_NAME)
    assert any(key.endswith(".alpha") for key in kohya) and all(key.startswith("lora_unet_") for key in kohya)

    # A fresh pipeline with the file loaded by diffusers predicts what the trained UNet predicts, not the base.
    fresh = DiffusionPipeline.from_pretrained(assets[model])
    inputs = unet_inputs(run)
    with torch.no_grad():
        base = fresh.unet(*inputs[:2], **inputs[2]).sample
        fresh.load_lora_weights(out)
        loaded = fresh.unet(*inputs[:2], **inputs[2]).sample
        trained = run.model(*inputs[:2], **inputs[2]).sample
    # diffusers' loader against the trained adapters: the same prediction up to float32 order, as a whole; a LoRA at
    # the wrong strength or on the wrong modules errs by about the LoRA's own effect (the next line).
    assert_relative_close(loaded, trained, 1e-4, f"{method} LoRA loaded by diffusers vs trained")
    assert (loaded - base).abs().max() > 1e-3


def unet_inputs(run) -> tuple:
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    conditioning = run.sampler.encode_prompts(PROMPTS[:2])
    return sample, torch.tensor([800, 200]), conditioning.unet_kwargs(guided=False)


# --------------------------------------------------------------------------------------------------------------
# Distributed and resumed runs end where a plain run ends


def dpo_arguments(assets: dict, out: Path, **overrides) -> list[str]:
    settings = common(assets, "sd", out, num_candidates=2, train_batch_size=1, max_train_steps=6, learning_rate=1e-2)
    settings.update(overrides)
    return [f"--{key}={value}" for key, value in settings.items()]


def run_script(arguments: list[str], launcher: list[str], timeout: float = 300, env: dict | None = None):
    command = [*launcher, str(REPO / "training" / "train_dpo.py"), *arguments]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_train_like_one_with_doubled_accumulation(assets, tmp_path):
    # Two CPU processes over gloo: `accelerate launch --cpu --num_processes 2` goes through mpirun (absent here, and
    # then it silently starts one process); torchrun's launcher with ACCELERATE_USE_CPU=1 needs nothing extra.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    # adam_epsilon 1e-4: Adam turns a near-zero gradient into a full-size step whose sign float noise decides; a
    # larger epsilon keeps such steps small, so that the comparison sees the gradients, not their rounding.
    two_processes = dpo_arguments(assets, tmp_path / "two", max_train_steps=3, adam_epsilon=1e-4)
    run_script(two_processes, launcher, env={"ACCELERATE_USE_CPU": "1"})
    config = train_dpo.DPOConfig(
        **common(
            assets,
            "sd",
            tmp_path / "one",
            num_candidates=2,
            train_batch_size=1,
            max_train_steps=3,
            learning_rate=1e-2,
            gradient_accumulation_steps=2,
            adam_epsilon=1e-4,
        )
    )
    train_dpo.train(config)

    two, one = lora_of(tmp_path / "two"), lora_of(tmp_path / "one")
    assert two.keys() == one.keys()
    moved = max(float(one[key].abs().max()) for key in one if "lora.up" in key)
    assert moved > 1e-3  # the runs trained (lora_B starts at zero)
    # The claim: both runs took the same steps. Their gradients are summed in another order (gloo's average of two
    # halves against one accumulation), so compare what training changed, the update from the shared initial
    # LoRA, as one vector: wrong averaging or data change it by ~1e-1 relative, float32 order by ~1e-5.
    initial = lora_state_dicts(setup_run(replace(config, output_dir=str(tmp_path / "initial"))).denoiser)[0]
    assert initial.keys() == one.keys()
    update_two = {key: two[key] - initial[key] for key in one}
    update_one = {key: one[key] - initial[key] for key in one}
    assert_relative_close(update_two, update_one, 1e-2, "LoRA update of 2 processes vs 1 with doubled accumulation")
    # Both saw the same examples: the data parts of two processes hold the one process's examples.
    assert sorted(p.name for p in (tmp_path / "two" / "data").iterdir()) == [
        "pairs-0-of-2.safetensors",
        "pairs-1-of-2.safetensors",
    ]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(assets, tmp_path):
    arguments = dpo_arguments(assets, tmp_path / "killed", checkpoint_every=2, checkpoints_total_limit=10)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "training" / "train_dpo.py"), *arguments],
        cwd=REPO,
        # CPU results depend on the thread count: the killed run must use this process's, as the resumed one does.
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
    assert written, "the run ended before writing a checkpoint"
    assert int(written[-1].name.split("-")[1]) < 6, "killed too late: the run had finished"
    assert not (tmp_path / "killed" / DIFFUSERS_WEIGHT_NAME).exists()

    base = common(
        assets,
        "sd",
        tmp_path / "killed",
        num_candidates=2,
        train_batch_size=1,
        max_train_steps=6,
        learning_rate=1e-2,
        checkpoint_every=2,
    )
    train_dpo.train(train_dpo.DPOConfig(**base, resume="latest"))
    train_dpo.train(train_dpo.DPOConfig(**{**base, "output_dir": str(tmp_path / "straight")}))

    resumed, straight = lora_of(tmp_path / "killed"), lora_of(tmp_path / "straight")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
    steps = [
        record["step"] for record in map(json.loads, (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # what the killed run logged after its checkpoint was dropped


@pytest.mark.slow
def test_prdp_resumes_at_an_epoch_exactly(assets, tmp_path):
    settings = {
        "epochs": 2,
        "inner_steps": 2,
        "prompts_per_epoch": 2,
        "samples_per_prompt": 2,
        "train_batch_size": 4,
        "learning_rate": 1e-2,
        "clip_eps": 1e-2,
        "beta": 1e-2,
        "checkpoint_every": 1,
    }
    straight = train_prdp.PRDPConfig(**common(assets, "sd", tmp_path / "straight", **settings))
    train_prdp.train(straight)
    first = replace(straight, output_dir=str(tmp_path / "split"), epochs=1)
    train_prdp.train(first)  # constant learning rate: a 1-epoch run is the first epoch of the 2-epoch run
    train_prdp.train(replace(first, epochs=2, resume="latest"))
    resumed, whole = lora_of(tmp_path / "split"), lora_of(tmp_path / "straight")
    assert all(torch.equal(resumed[key], whole[key]) for key in whole)


def test_a_run_never_mixes_with_another_runs_checkpoints(assets, tmp_path):
    config = configs(assets, "sd", tmp_path)["sft"]
    config = replace(config, max_train_steps=2, checkpoint_every=1)
    train_sft.train(config)
    with pytest.raises(TrainingConfigError, match="lora_rank"):
        train_sft.train(replace(config, lora_rank=8, resume="latest", max_train_steps=3))
    with pytest.raises(TrainingConfigError, match="checkpoints of an earlier run"):
        train_sft.train(replace(config, max_train_steps=3))  # a new run into the old run's folder


def test_sft_and_dpo_share_cached_candidates(assets, tmp_path, monkeypatch):
    """With one --candidate_cache, DPO reads the candidates SFT sampled (the same prompts, seeds and base model)
    and builds the very pairs it builds when sampling them itself; another LoRA state would sample anew."""
    from ganrm_diffusers.training import examples

    calls = []
    real = examples._sample_candidates
    monkeypatch.setattr(examples, "_sample_candidates", lambda *args: calls.append(1) or real(*args))
    settings = configs(assets, "sd", tmp_path)
    cache = str(tmp_path / "candidates")
    sft = replace(settings["sft"], candidate_cache=cache, max_train_steps=1)
    dpo = replace(settings["dpo"], candidate_cache=cache, max_train_steps=1)
    train_sft.train(sft)
    cached_run = setup_run(dpo)
    cached = examples.build_examples(cached_run, candidates=None, num_candidates=2, top_k=1, pairs=True)
    assert len(calls) == 1  # SFT sampled, DPO read them back
    fresh_run = setup_run(replace(dpo, candidate_cache=None, output_dir=str(tmp_path / "fresh")))
    fresh = examples.build_examples(fresh_run, candidates=None, num_candidates=2, top_k=1, pairs=True)
    assert len(calls) == 2 and torch.equal(cached.winners, fresh.winners) and torch.equal(cached.losers, fresh.losers)
    with torch.no_grad():  # a trained LoRA is another model: its candidates are not those
        next(p for n, p in cached_run.model.named_parameters() if "lora_B" in n).add_(0.1)
    key = examples.candidates_key(cached_run, PROMPTS, range(len(PROMPTS)), 2, 0)
    assert key != examples.candidates_key(fresh_run, PROMPTS, range(len(PROMPTS)), 2, 0)


# --------------------------------------------------------------------------------------------------------------
# PRDP's chunked gradient is the loss's exact gradient


def test_prdp_chunked_gradient_equals_the_direct_gradient(assets, tmp_path):
    config = configs(assets, "sd", tmp_path)["prdp"]
    config = replace(config, train_batch_size=2, prompts_per_epoch=2, samples_per_prompt=3)
    config.check()
    run = setup_run(config)
    with torch.no_grad():  # a LoRA away from its zero start, so that policy and reference differ
        for name, parameter in run.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    samples = train_prdp.sample_epoch(run, PROMPTS, epoch=0)
    with torch.no_grad():  # pretend theta moved since sampling, so that some ratios are clipped and some not
        for name, parameter in run.model.named_parameters():
            if "lora_A" in name:
                parameter.mul_(1.02)
    current = train_prdp.current_log_probs(run, samples)

    train_prdp.prdp_step(run, samples, current)
    chunked = {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)

    log_probs = torch.stack([run.sampler.log_prob(samples.trajectory, step, run.denoiser) for step in samples.steps], 1)
    shape = (-1, config.samples_per_prompt, len(samples.steps))
    direct_loss = prdp_loss(
        log_probs.view(shape),
        samples.old_log_probs.view(shape),
        samples.ref_log_probs.view(shape),
        samples.rewards.view(shape[:2]),
        config.beta,
        config.clip_eps,
    )
    direct_loss.backward()
    direct = {name: p.grad for name, p in run.model.named_parameters() if p.grad is not None}
    assert chunked.keys() == direct.keys() and chunked
    assert max(float(g.abs().max()) for g in direct.values()) > 0
    # The claim: the same gradient vector, summed in another order (chunks of train_batch_size samples x one step
    # against one graph over all). Single entries that are small differences of large terms keep few digits, and
    # fewer on another CPU, so the whole vector is compared (measured: 1e-6); a missing or misweighted chunk errs by ~1e-1.
    assert_relative_close(chunked, direct, rtol=1e-3, what="chunked PRDP gradient vs the direct gradient")


# --------------------------------------------------------------------------------------------------------------
# The GAN-RM round loop


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_rounds_keep_every_rounds_reward_model_and_lora(assets, tmp_path, tiny_backbone, model):
    config = train_rounds.RoundsConfig(
        **common(
            assets,
            model,
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
        finetune="dpo" if model == "sd" else "sft",
    )
    summary = train_rounds.train(config)
    out = Path(config.output_dir)
    heads, loras = [], []
    for index in range(2):
        folder = out / f"round-{index:02d}"
        model_ = GANRewardModel.from_pretrained(folder / "reward_model")
        heads.append(torch.cat([p.flatten() for p in model_.head.parameters()]))
        assert (folder / "lora" / COMFYUI_WEIGHT_NAME).is_file()
        loras.append(lora_of(folder / "lora"))
    assert not torch.allclose(heads[0], heads[1])  # round 1 retrained the reward model (bootstrapping)
    assert any(not torch.equal(loras[0][key], loras[1][key]) for key in loras[0])
    assert all(torch.equal(loras[1][key], value) for key, value in lora_of(out).items())  # the final LoRA
    assert [entry["round"] for entry in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["reward_model"]["val_auc"] >= 0.5
    # Each round's discriminator was trained against that round's generator, and is measured against it and G_0.
    for index, entry in enumerate(summary["rounds"]):
        data = out / f"round-{index:02d}" / "data"
        assert {path.name.split("-")[0] for path in data.glob("*.safetensors")} == {"selection", "negatives", "pool"}
        assert 0 <= entry["auc_vs_current"] <= 1 and 0 <= entry["auc_vs_base"] <= 1
        assert {"mean", "std", "p10", "p50", "p90"} <= set(entry["selection_rewards"])
    assert summary["rounds"][0]["auc_vs_current"] == summary["rounds"][0]["auc_vs_base"]  # G_0 is the base
    assert summary["rounds"][0]["previous_auc_vs_current"] is None
    assert 0 <= summary["rounds"][1]["previous_auc_vs_current"] <= 1

    # A restart finds both rounds done and changes nothing.
    again = train_rounds.train(replace(config, resume="latest"))
    assert again["rounds"] == summary["rounds"]
    assert all(torch.equal(loras[1][key], value) for key, value in lora_of(out).items())


def test_each_rounds_three_sample_sets_have_seeds_of_their_own():
    """The discriminator's negatives, its bootstrapping pool and the selection pool never share a seed, in a round
    or across rounds: the selection ranks images the head never trained on."""
    config = train_rounds.RoundsConfig(
        pretrained_model="p", target_dir="t", num_candidates=8, rm_negatives_per_prompt=2, rm_pool_per_prompt=3
    )
    prompts = 5
    counts = {train_rounds.NEGATIVES: 2, train_rounds.POOL: 3, train_rounds.SELECTION: 8}
    seen: set[int] = set()
    for index in range(3):
        for stream, count in counts.items():
            first = train_rounds.stream_seed(config, prompts, index, stream)
            seeds = {first + prompt * count + j for prompt in range(prompts) for j in range(count)}
            assert not seeds & seen, (index, stream)
            seen |= seeds
    # Round 0 ranks the candidates SFT and DPO draw from G_0 (`ganrm sample`'s seeds): a candidate cache shares them.
    first = train_rounds.stream_seed(config, prompts, 0, train_rounds.SELECTION)
    same = SampleSettings(num_candidates=8, seed=config.seed)
    assert [first + prompt * 8 + j for prompt in range(prompts) for j in range(8)] == [
        seed for prompt in range(prompts) for seed in same.seeds(prompt)
    ]


# --------------------------------------------------------------------------------------------------------------
# The `ganrm train` command


def test_ganrm_train_states_the_beta_conventions(capsys):
    from ganrm_diffusers.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "calls beta/2 its --beta_dpo" in text and "per element and per step" in text
    with pytest.raises(SystemExit):
        main(["train", "prdp", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--clip_eps" in text and "--reward_scale" in text and "3e-05" in text


def test_ganrm_train_runs_a_method(assets, tmp_path, capsys):
    from ganrm_diffusers.cli.main import main

    arguments = [f"--{key}={value}" for key, value in common(assets, "sd", tmp_path / "cli").items()]
    assert main(["train", "sft", *arguments, "--num_candidates=2", "--train_batch_size=2", "--max_train_steps=1"]) == 0
    assert (tmp_path / "cli" / DIFFUSERS_WEIGHT_NAME).is_file()
    assert "LoRA:" in capsys.readouterr().out
    # A user mistake is one line on stderr and exit status 2, not a traceback.
    assert main(["train", "sft", *arguments, "--max_train_steps=1"]) == 2
    assert "earlier run" in capsys.readouterr().err
