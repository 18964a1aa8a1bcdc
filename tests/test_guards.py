"""Guards against silently wrong results (issue #11): DPO pairs of one image, LCM UNets in the trainers' sampler,
NaN reward-model training, a false "initialized randomly" notice, prompt-aware training that could separate the
sides by their captions alone, FK-resampled images returned with seeds that do not regenerate them, and PRDP
targets R/beta on the wrong scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from checks import assert_relative_close, relative_error
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tiny_models import tiny_sd_pipeline

from ganrm_diffusers.generation.pipeline import RewardGuidedPipeline
from ganrm_diffusers.generation.pruning import FKResampling, ScheduleError, deterministic_steps
from ganrm_diffusers.generation.sampling import DDIMLogProbSampler
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import (
    PromptedImages,
    RewardDataset,
    RewardTrainingConfig,
    TrainingDivergedError,
    fit_reward_model,
    train_head,
)
from ganrm_diffusers.training import dpo as train_dpo
from ganrm_diffusers.training import prdp as train_prdp
from ganrm_diffusers.training import rounds as train_rounds
from ganrm_diffusers.training.config import TrainingConfigError
from ganrm_diffusers.training.examples import examples_from_candidates
from ganrm_diffusers.training.losses import normalize_rewards, prdp_loss, regression_scales
from ganrm_diffusers.utils.errors import ImageInputError

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


# --------------------------------------------------------------------------------------------------------------
# 1. DPO pairs


def test_dpo_needs_two_candidates_to_pair():
    with pytest.raises(TrainingConfigError, match="num_candidates must be at least 2"):
        train_dpo.DPOConfig(pretrained_model="some/pipeline", num_candidates=1).check()
    rounds = train_rounds.RoundsConfig(pretrained_model="p", target_dir="t", finetune="dpo", num_candidates=1)
    with pytest.raises(TrainingConfigError, match="num_candidates must be at least 2"):
        rounds.check()
    train_dpo.DPOConfig(pretrained_model="p", num_candidates=2).check()
    train_dpo.DPOConfig(pretrained_model="p", num_candidates=1, candidates="folder").check()  # not sampled here


def test_tied_and_self_pairs_are_left_out_and_counted():
    # Prompt 0: a tie (best and worst would both be candidate 0); prompt 1: a real pair; prompt 2: a 3-way tie.
    scores = torch.tensor([1.0, 1.0, 3.0, 0.0, 2.0, 2.0])
    latents = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 4, 2, 2)
    examples = examples_from_candidates(["a", "b", "c"], latents, scores, 2, 1, pairs=True)
    assert len(examples) == 1 and examples.dropped_pairs == 2
    assert examples.texts(torch.tensor([0])) == ["b"]
    assert examples.winners[0, 0, 0, 0] == 2 and examples.losers[0, 0, 0, 0] == 3
    assert bool((examples.winner_scores > examples.loser_scores).all())


@pytest.mark.slow
def test_dpo_run_logs_and_records_the_dropped_pairs(tmp_path, caplog):
    pipe_dir = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(pipe_dir)
    folder = tmp_path / "candidates"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    records = []
    # Prompt 0: two candidates with one score (dropped); prompts 1 and 2: real pairs.
    for prompt_index, scores in enumerate([(0.5, 0.5), (2.0, -1.0), (0.1, 0.3)]):
        for candidate, score in enumerate(scores):
            name = f"{prompt_index:06d}_{candidate:02d}.png"
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name)
            records.append(
                {"file_name": name, "prompt": f"prompt {prompt_index}", "prompt_index": prompt_index}
                | {"candidate": candidate, "seed": candidate, "score": score}
            )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    config = train_dpo.DPOConfig(
        pretrained_model=str(pipe_dir),
        candidates=str(folder),
        output_dir=str(tmp_path / "out"),
        train_batch_size=2,
        max_train_steps=1,
        eval_prompts=0,
    )
    with caplog.at_level(logging.WARNING):
        summary = train_dpo.train(config)
    assert summary["pairs"] == 2 and summary["dropped_pairs"] == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["dropped_pairs"] == 1
    assert any("left out 1 of 3" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# 2a. A guidance-distilled (LCM-style) UNet in the trainers' sampler


def lcm_style_pipeline() -> StableDiffusionPipeline:
    """The tiny SD pipeline with a UNet that takes its guidance scale as an embedding (time_cond_proj_dim)."""
    pipe = tiny_sd_pipeline()
    torch.manual_seed(1)
    config = {key: value for key, value in pipe.unet.config.items() if not key.startswith("_")}
    # Private keys out: `_use_default_values` would make from_config drop time_cond_proj_dim again.
    pipe.register_modules(unet=UNet2DConditionModel.from_config(config | {"time_cond_proj_dim": 32}))
    assert pipe.unet.time_embedding.cond_proj is not None
    return pipe


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sampler_passes_the_guidance_embedding_of_a_distilled_unet(eta):
    pipe = lcm_style_pipeline()
    seeds = [11, 12, 13, 14]
    sampler = DDIMLogProbSampler(pipe, num_inference_steps=3, guidance_scale=4.0, eta=eta)
    trajectory = sampler.sample(PROMPTS, seeds)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=4.0,
        eta=eta,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="latent",
    ).images
    # Our sampler against diffusers' pipeline: the same latents up to float32 order, compared as a whole (a missing
    # guidance embedding moves them by 1e-1 or more).
    assert_relative_close(trajectory.latents[:, -1], expected, 1e-4, "distilled UNet's latents vs diffusers'")
    # Rescoring a recorded step goes through the same prediction.
    if eta > 0:
        rescored = sampler.log_prob(trajectory, 1)
        assert_relative_close(rescored, trajectory.log_probs[:, 1], 1e-4, "rescored step of a distilled UNet")


def test_the_pipeline_passes_the_guidance_embedding_of_a_distilled_unet(tiny_reward_model):
    pipe = lcm_style_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seeds = [11, 12, 13, 14]
    common = {"num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent"}
    expected = pipe(
        PROMPTS, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(seed) for seed in seeds], **common
    ).images
    guided = RewardGuidedPipeline.from_pipe(pipe, reward_model=tiny_reward_model)
    out = guided(PROMPTS, num_candidates=2, seeds=seeds, return_candidates=True, **common)
    # Every candidate against diffusers' own image of its seed (a missing embedding moves them by 1e-1 or more).
    assert_relative_close(out.candidates, expected, 1e-4, "reward-guided candidates of a distilled UNet vs diffusers'")


# --------------------------------------------------------------------------------------------------------------
# 2b. NaN in reward-model training


def test_nan_from_the_first_epoch_is_a_clear_error(tiny_reward_model):
    generator = torch.Generator().manual_seed(0)
    positives = torch.nn.functional.normalize(torch.randn(16, 32, generator=generator), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(16, 32, generator=generator), dim=-1)
    positives[3] = float("nan")
    dataset = RewardDataset.from_sides(positives, negatives)
    with pytest.raises(TrainingDivergedError, match="NaN or infinite loss in epoch 0.*learning rate"):
        train_head(tiny_reward_model, dataset, RewardTrainingConfig(max_epochs=3, min_images_per_class=1))


# --------------------------------------------------------------------------------------------------------------
# 2c. A checkpoint that carries its backbone loads without "initialized randomly"


def test_checkpoint_with_its_backbone_loads_without_the_random_init_notice(tiny_backbone, tmp_path, caplog):
    torch.manual_seed(5)
    model = GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(8,))
    model.save_pretrained(tmp_path / "rm")
    assert model.config.backbone_in_checkpoint
    with caplog.at_level(logging.WARNING):
        loaded = GANRewardModel.from_pretrained(tmp_path / "rm")
    notices = ("initialized randomly", "no CLIP weights found")
    assert not [record for record in caplog.records if any(text in record.getMessage() for text in notices)]
    saved, restored = model.encoder.clip.state_dict(), loaded.encoder.clip.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[key], restored[key]) for key in saved)
    # Only that notice is silenced, and only while loading: open_clip still says it of a truly random model.
    import open_clip

    with caplog.at_level(logging.WARNING):
        open_clip.create_model(loaded.encoder.source, load_weights=False)
    assert any("initialized randomly" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# 3. Prompt-aware training needs real prompts on both sides and in pools


def write_captioned(folder: Path, images: list, prompt: str | None, skip: int = 0) -> Path:
    from conftest import write_images

    write_images(folder, images)
    if prompt is not None:
        names = sorted(path.name for path in folder.glob("*.png"))[skip:]
        lines = [json.dumps({"file_name": name, "text": prompt}) for name in names]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def prompt_aware_model(tiny_backbone: str) -> GANRewardModel:
    return GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(16,), prompt_aware=True)


FAST_RM = RewardTrainingConfig(max_epochs=2, min_images_per_class=4, bootstrap_m=2)


def test_prompt_aware_training_refuses_a_side_without_prompts(tmp_path, prompt_aware_model):
    from conftest import make_property_images

    positives = write_captioned(tmp_path / "pos", make_property_images(8, True, seed=1, size=32), "a red blob")
    negatives = write_captioned(tmp_path / "neg", make_property_images(8, False, seed=2, size=32), None)
    with pytest.raises(ImageInputError, match="8 of the 8 negatives images .* have no prompt"):
        fit_reward_model(positives, negatives, model=prompt_aware_model, config=FAST_RM)
    # One uncaptioned file is enough to refuse, and the error names the side.
    partial = write_captioned(tmp_path / "part", make_property_images(8, False, seed=3, size=32), "noise", skip=1)
    with pytest.raises(ImageInputError, match="1 of the 8 positives images"):
        fit_reward_model(partial, positives, model=prompt_aware_model, config=FAST_RM)
    # Images in memory need their prompts beside them.
    with pytest.raises(ImageInputError, match="positives images .* have no prompt"):
        fit_reward_model(make_property_images(8, True, seed=4, size=32), negatives, model=prompt_aware_model)


def test_prompt_aware_training_reads_prompts_on_both_sides_and_in_pools(tmp_path, prompt_aware_model):
    from conftest import make_property_images

    positives = write_captioned(tmp_path / "pos", make_property_images(8, True, seed=1, size=32), "a red blob")
    negatives = PromptedImages(make_property_images(8, False, seed=2, size=32), ["a red blob"] * 8)
    pool = write_captioned(tmp_path / "pool", make_property_images(4, False, seed=3, size=32), "a red blob")
    config = RewardTrainingConfig(max_epochs=2, min_images_per_class=4, bootstrap_rounds=1, bootstrap_m=2)
    pool_files = sorted(pool.glob("*.png"))  # a file list (as `train-rm --pool` splits it) finds its metadata
    model, report = fit_reward_model(positives, negatives, model=prompt_aware_model, config=config, pools=[pool_files])
    assert len(report.rounds) == 2 and report.dataset.text is not None
    bare_pool = write_captioned(tmp_path / "bare", make_property_images(4, False, seed=4, size=32), None)
    with pytest.raises(ImageInputError, match="pool images"):
        fit_reward_model(positives, negatives, model=model, config=config, pools=[bare_pool])


# --------------------------------------------------------------------------------------------------------------
# 4. FK resampling: lineages, seeds that regenerate, and no FK on deterministic steps


@pytest.fixture(scope="module")
def fk_pipe(tiny_backbone: str) -> RewardGuidedPipeline:
    torch.manual_seed(3)
    reward_model = GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)
    return RewardGuidedPipeline.from_pipe(tiny_sd_pipeline(), reward_model=reward_model)


def test_fk_refuses_deterministic_steps(fk_pipe):
    assert deterministic_steps(fk_pipe.scheduler, eta=0.0) and not deterministic_steps(fk_pipe.scheduler, eta=1.0)
    with pytest.raises(ScheduleError, match="stochastic sampler.*eta=0.0"):
        fk_pipe(PROMPTS[0], num_candidates=4, seed=0, num_inference_steps=4, prune=FKResampling(at=(0.5,)))


@pytest.mark.slow
def test_fk_returns_lineages_and_only_seeds_that_regenerate(fk_pipe):
    schedule = FKResampling(at=(0.25, 0.5), lambda_=50.0)  # sharp weights: most slots take another's latents
    kwargs = {"num_inference_steps": 8, "guidance_scale": 2.0, "eta": 1.0, "output_type": "pt"}
    out = fk_pipe(PROMPTS, num_candidates=4, top_k=4, seed=0, prune=schedule, return_candidates=True, **kwargs)
    seeds = out.candidate_seeds
    assert len(out.lineages) == len(out.seeds) == 8 and len(out.candidate_lineages) == 8
    plain = StableDiffusionPipeline(**{k: v for k, v in fk_pipe.components.items() if k != "reward_model"})
    checked: dict[bool, bool] = {}  # regenerate one image of each kind: with a seed, and without
    for image, seed, lineage in zip(out.images, out.seeds, out.lineages, strict=True):
        assert sorted(lineage.parents) == [2, 4]  # steps done at each resampling checkpoint
        assert lineage.ancestor_seed == seeds[lineage.ancestor] and lineage.ancestor == lineage.parents[2]
        assert lineage.seed == seed
        kept = set(lineage.parents.values()) == {lineage.slot}
        assert (seed == seeds[lineage.slot]) if kept else (seed is None)
        if kept in checked:
            continue
        generator = torch.Generator().manual_seed(seeds[lineage.slot])
        again = plain(PROMPTS[lineage.slot // 4], generator=generator, **kwargs).images[0]
        # A kept lineage is its seed's image (up to float32 order: regenerated alone, not in a batch of 8, so compared
        # as a whole); another lineage is not its slot's seed's image (the old `seeds`).
        checked[kept] = relative_error(again, image) < 1e-4
    assert checked == {True: True, False: False}


# --------------------------------------------------------------------------------------------------------------
# 5. PRDP: per-prompt reward standardisation, its default beta, and the target-scale warning


def prdp_inputs(prompts: int = 3, trajectories: int = 4, steps: int = 3):
    generator = torch.Generator().manual_seed(0)
    ref = -1.0 + 0.1 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    old = ref + 0.01 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    logp = old + 0.01 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    rewards = torch.randn(prompts, trajectories, generator=generator, dtype=torch.float64)
    return logp, old, ref, rewards


def test_rewards_are_standardised_within_each_prompt():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [100.0, 100.0, 400.0]])
    normalized = normalize_rewards(rewards)
    assert torch.allclose(normalized.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(normalized.std(dim=1, correction=0), torch.ones(2), atol=1e-3)
    assert torch.equal(normalize_rewards(rewards, "none"), rewards)
    assert torch.equal(normalize_rewards(torch.full((1, 4), 7.0)), torch.zeros(1, 4))  # a tie stays a tie


def test_standardised_prdp_loss_is_scale_invariant_and_pairs_within_prompts():
    logp, old, ref, rewards = prdp_inputs()
    loss = prdp_loss(logp, old, ref, rewards, beta=30.0, clip_eps=1e-2, reward_normalization="per_prompt")
    scaled = prdp_loss(logp, old, ref, rewards * 100, beta=30.0, clip_eps=1e-2, reward_normalization="per_prompt")
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-3)
    # Each prompt rescaled and shifted on its own changes nothing: pairs never cross prompts.
    per_prompt = rewards * torch.tensor([[0.5], [1.0], [50.0]], dtype=torch.float64) + torch.tensor([[3.0], [-9], [0]])
    moved = prdp_loss(logp, old, ref, per_prompt, beta=30.0, clip_eps=1e-2, reward_normalization="per_prompt")
    assert moved.item() == pytest.approx(loss.item(), rel=1e-3)
    # Without standardisation (the authors' loss, still available) the scale is the targets' scale.
    raw = prdp_loss(logp, old, ref, rewards, beta=30.0, clip_eps=1e-2)
    assert prdp_loss(logp, old, ref, rewards * 100, beta=30.0, clip_eps=1e-2).item() > 100 * raw.item()


def test_prdp_defaults_standardise_rewards_with_a_matching_beta(capsys):
    config = train_prdp.PRDPConfig(pretrained_model="p")
    assert config.reward_normalization == "per_prompt" and config.beta == 30.0
    from ganrm_diffusers.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "prdp", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--reward_normalization {per_prompt,none}" in text and "(default: 30.0)" in text
    assert "log-probs are means over latent elements and log-ratios means over the stochastic steps" in text


def test_target_scale_warning_names_the_mismatch():
    # GAN-RM logits (gaps about 1) with the authors' beta: targets about 3e4 against log-ratio gaps below 0.1.
    message = train_prdp.target_mismatch(3.3e4, 0.02, beta=3e-5)
    assert message and "R/beta" in message and "above" in message and "beta=3e-05" in message
    assert train_prdp.target_mismatch(0.04, 0.0, beta=30.0) is None  # a fresh LoRA: log-ratios still 0
    assert train_prdp.target_mismatch(0.04, 0.03, beta=30.0) is None
    assert "below" in train_prdp.target_mismatch(1e-6, 0.05, beta=1e6)
    scales = regression_scales(torch.tensor([[0.0, 0.1]]), torch.tensor([[1.0, 0.0]]), beta=10.0)
    assert scales.target == pytest.approx(0.1) and scales.log_ratio_gap == pytest.approx(0.1)


@pytest.mark.slow
def test_prdp_run_warns_on_the_authors_beta_with_raw_logits(tmp_path, tiny_reward_model, caplog):
    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    tiny_reward_model.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = {
        "pretrained_model": str(tmp_path / "sd"),
        "reward_model": str(tmp_path / "rm"),
        "prompts": str(tmp_path / "prompts.txt"),
        "num_inference_steps": 2,
        "eval_prompts": 0,
        "epochs": 1,
        "inner_steps": 1,
        "prompts_per_epoch": 2,
        "samples_per_prompt": 3,
        "train_batch_size": 6,
    }
    old = train_prdp.PRDPConfig(**common, output_dir=str(tmp_path / "old"), beta=3e-5, reward_normalization="none")
    with caplog.at_level(logging.WARNING):
        train_prdp.train(old)
    assert any("R/beta" in record.getMessage() for record in caplog.records)
    record = json.loads((tmp_path / "old" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["target_scale"] > 100 * max(record["log_ratio_gap"], 1e-3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_prdp.train(train_prdp.PRDPConfig(**common, output_dir=str(tmp_path / "new")))
    assert not any("R/beta" in record.getMessage() for record in caplog.records)
