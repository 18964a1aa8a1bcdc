"""RewardGuidedPipeline / RewardGuidedXLPipeline: selection, seeds, chunking, pruning, round trips, LoRA checks."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

from ganrm_diffusers.errors import LoraCompatibilityError
from ganrm_diffusers.lora import add_lora, save_lora
from ganrm_diffusers.pipeline import (
    PipelineInputError,
    RewardGuidedPipeline,
    RewardGuidedXLPipeline,
    load_reward_guided_pipeline,
)
from ganrm_diffusers.pruning import FKResampling, PruneSchedule, ScheduleError, count_unet_rows
from ganrm_diffusers.reward_model import GANRewardModel
from ganrm_diffusers.world import World

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
STEPS = 6
GUIDANCE = 2.0
PLAIN_PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reward_model(kind: str, reduced_world: World, tiny_backbone: str) -> GANRewardModel:
    """An untrained head on the world's CLIP (SD: the world's digits) or on the tiny test CLIP (SDXL)."""
    torch.manual_seed(3)
    backbone = reduced_world.backbone if kind == "sd" else tiny_backbone
    return GANRewardModel(backbone=backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)


def make_base_pipe(kind: str, world: World):
    """A fresh plain diffusers pipeline: the world's SD-shaped digits model, or a tiny SDXL-shaped one."""
    base = world.load_pipeline() if kind == "sd" else tiny_sdxl_pipeline()
    base.set_progress_bar_config(disable=True)
    return base


@pytest.fixture(scope="module")
def base_pipe(kind: str, reduced_world: World):
    return make_base_pipe(kind, reduced_world)


@pytest.fixture(scope="module")
def pipe(kind: str, base_pipe, reward_model: GANRewardModel):
    cls = RewardGuidedPipeline if kind == "sd" else RewardGuidedXLPipeline
    return cls.from_pipe(base_pipe, reward_model=reward_model)


def sizes(pipe) -> tuple[int, int]:
    """(image size, latent size) in pixels of the pipeline's default output."""
    latent = pipe.unet.config.sample_size
    return latent * pipe.vae_scale_factor, latent


def call(pipe, **kwargs):
    settings = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "output_type": "pt"}
    return pipe(PROMPTS, **{**settings, **kwargs})


def test_selection_is_the_per_prompt_argmax_of_recomputed_scores(pipe, reward_model):
    out = call(pipe, num_candidates=4, top_k=2, seed=100, return_candidates=True)

    recomputed = reward_model.score(out.candidates)  # the returned candidates, scored from scratch
    assert torch.allclose(out.candidate_scores, recomputed, atol=1e-4)
    assert out.candidate_seeds == list(range(100, 108))
    expected_seeds, expected_scores = [], []
    for prompt in range(len(PROMPTS)):  # per prompt, never across prompts
        group = recomputed[prompt * 4 : (prompt + 1) * 4]
        best = group.argsort(descending=True, stable=True)[:2]
        expected_seeds += [100 + prompt * 4 + int(index) for index in best]
        expected_scores += group[best].tolist()
    assert out.seeds == expected_seeds
    assert torch.allclose(out.scores, torch.tensor(expected_scores), atol=1e-4)
    assert out.images.shape == (4, 3, sizes(pipe)[0], sizes(pipe)[0])
    assert out.candidate_steps == [STEPS] * 8


def test_selected_images_regenerate_with_the_plain_base_pipeline(kind, pipe, base_pipe):
    out = call(pipe, num_candidates=3, top_k=1, seed=7)
    plain = PLAIN_PIPELINES[kind](**base_pipe.components)
    for prompt, seed, image in zip(PROMPTS, out.seeds, out.images, strict=True):
        again = plain(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        ).images[0]
        assert torch.allclose(again, image, atol=1e-4)


def test_chunking_gives_the_result_of_one_batch(pipe):
    whole = call(pipe, num_candidates=5, top_k=2, seed=3, return_candidates=True)
    chunked = call(pipe, num_candidates=5, top_k=2, seed=3, return_candidates=True, candidate_batch_size=3)
    assert chunked.seeds == whole.seeds
    assert torch.allclose(chunked.candidate_scores, whole.candidate_scores, atol=1e-5)
    assert torch.allclose(chunked.candidates, whole.candidates, atol=1e-5)


def test_pruning_saves_the_expected_unet_evaluations_and_keeps_survivors_exact(pipe):
    schedule = PruneSchedule(at=(0.3, 0.6), keep=(0.5, 0.5))
    # 8 candidates for steps 1-2 (round(0.3 * 6) = 2), 4 for steps 3-4, 2 for steps 5-6; guidance doubles rows.
    assert schedule.live_counts(8, STEPS) == [8, 8, 4, 4, 2, 2]
    with count_unet_rows(pipe.unet) as full_rows:
        full = call(pipe, num_candidates=8, seed=50, return_candidates=True)
    with count_unet_rows(pipe.unet) as pruned_rows:
        pruned = call(pipe, num_candidates=8, seed=50, return_candidates=True, prune=schedule)
    assert full_rows[0] == 2 * len(PROMPTS) * 8 * STEPS
    assert pruned_rows[0] == 2 * len(PROMPTS) * (8 + 8 + 4 + 4 + 2 + 2)
    assert schedule.unet_evaluations(8, STEPS) == 28

    steps = torch.tensor(pruned.candidate_steps).view(len(PROMPTS), 8)
    assert (
        ((steps == 2).sum(1) == 4).all() and ((steps == 4).sum(1) == 2).all() and ((steps == STEPS).sum(1) == 2).all()
    )
    finished = torch.tensor(pruned.candidate_steps) == STEPS
    # A survivor is the very image its seed gives without pruning; the winner is the best survivor.
    assert torch.allclose(pruned.candidates[finished], full.candidates[finished], atol=1e-5)
    assert torch.allclose(pruned.candidate_scores[finished], full.candidate_scores[finished], atol=1e-5)
    for prompt in range(len(PROMPTS)):
        group = slice(prompt * 8, (prompt + 1) * 8)
        scores = torch.where(finished[group], pruned.candidate_scores[group], torch.tensor(-torch.inf))
        assert pruned.seeds[prompt] == 50 + prompt * 8 + int(scores.argmax())
    # Each checkpoint's scores are those the survivors were chosen by: the best half of the live candidates.
    assert sorted(pruned.checkpoint_scores) == [2, 4]
    first = pruned.checkpoint_scores[2].view(len(PROMPTS), 8)
    for row, survived in zip(first, steps > 2, strict=True):
        assert row[survived].min() >= row[~survived].max()


def test_a_probe_schedule_scores_every_candidate_and_prunes_none(pipe):
    probe = PruneSchedule(at=(0.3, 0.6), keep=(1.0, 1.0))
    full = call(pipe, num_candidates=3, seed=20, return_candidates=True)
    with count_unet_rows(pipe.unet) as rows:
        probed = call(pipe, num_candidates=3, seed=20, return_candidates=True, prune=probe)
    assert rows[0] == 2 * len(PROMPTS) * 3 * STEPS
    assert probed.seeds == full.seeds and torch.allclose(probed.candidate_scores, full.candidate_scores, atol=1e-5)
    assert all(not torch.isnan(scores).any() for scores in probed.checkpoint_scores.values())


def test_pruned_survivors_are_exact_with_a_stochastic_multistep_scheduler(base_pipe, reward_model, kind):
    """DPM-Solver++ keeps earlier model outputs per sample: they must follow the survivors; eta-style noise
    (SDE variant) must come from each survivor's own generator."""
    cls = RewardGuidedPipeline if kind == "sd" else RewardGuidedXLPipeline
    scheduler = DPMSolverMultistepScheduler.from_config(base_pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    pipe = cls.from_pipe(base_pipe, reward_model=reward_model, scheduler=scheduler)
    full = call(pipe, num_candidates=4, seed=9, return_candidates=True)
    pruned = call(pipe, num_candidates=4, seed=9, return_candidates=True, prune=PruneSchedule(at=(0.5,), keep=(0.5,)))
    finished = torch.tensor(pruned.candidate_steps) == STEPS
    assert finished.sum() == 4
    assert torch.allclose(pruned.candidates[finished], full.candidates[finished], atol=1e-5)


def test_fk_resampling_keeps_its_population_and_repeats_itself(pipe):
    schedule = FKResampling(at=(0.3, 0.6), lambda_=5.0)
    with count_unet_rows(pipe.unet) as rows:
        first = call(pipe, num_candidates=4, seed=1, eta=1.0, prune=schedule, return_candidates=True)
    assert rows[0] == 2 * len(PROMPTS) * 4 * STEPS  # resampling, not pruning: the same cost as best-of-4
    again = call(pipe, num_candidates=4, seed=1, eta=1.0, prune=schedule, return_candidates=True)
    assert first.seeds == again.seeds and torch.allclose(first.images, again.images, atol=1e-5)
    shrinking = FKResampling(at=(0.5,), keep=(0.5,))
    with count_unet_rows(pipe.unet) as rows:
        call(pipe, num_candidates=4, seed=1, eta=1.0, prune=shrinking)
    assert rows[0] == 2 * len(PROMPTS) * (4 * 3 + 2 * 3)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    out = call(pipe, num_candidates=2, top_k=1, seed=0, output_type=output_type, return_candidates=True)
    size, latent = sizes(pipe)
    if output_type == "pil":
        assert len(out.images) == 2 and all(isinstance(image, PIL.Image.Image) for image in out.images)
        assert len(out.candidates) == 4 and out.images[0].size == (size, size)
    elif output_type == "np":
        assert isinstance(out.images, np.ndarray) and out.images.shape == (2, size, size, 3)
        assert out.candidates.shape == (4, size, size, 3) and 0 <= out.images.min() and out.images.max() <= 1
    elif output_type == "pt":
        assert out.images.shape == (2, 3, size, size) and out.candidates.shape == (4, 3, size, size)
    else:
        assert out.images.shape == (2, 4, latent, latent) and out.candidates.shape == (4, 4, latent, latent)
    assert out.scores.shape == (2,) and len(out.seeds) == 2
    images, scores, seeds = call(pipe, num_candidates=2, seed=0, output_type=output_type, return_dict=False)
    assert seeds == out.seeds and torch.allclose(scores, out.scores)


def test_save_and_from_pretrained_round_trip_offline(kind, pipe, reward_model, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["reward_model"] == ["ganrm_diffusers", "GANRewardModel"]
    # diffusers' Hub download accepts the component (an unknown library would have to ship its code).
    files = [str(path.relative_to(tmp_path / "pipe")) for path in (tmp_path / "pipe").rglob("*") if path.is_file()]
    _get_custom_components_and_folders("someone/reward-guided", index, files)
    cls = type(pipe)
    loaded = cls.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.reward_model, GANRewardModel)
    loaded.set_progress_bar_config(disable=True)
    before, after = call(pipe, num_candidates=3, seed=5), call(loaded, num_candidates=3, seed=5)
    assert after.seeds == before.seeds and torch.allclose(after.scores, before.scores, atol=1e-5)
    assert isinstance(load_reward_guided_pipeline(tmp_path / "pipe"), cls)

    # A plain base pipeline folder plus a reward model given at load time.
    PLAIN_PIPELINES[kind](**{k: v for k, v in pipe.components.items() if k != "reward_model"}).save_pretrained(
        tmp_path / "base"
    )
    wrapped = cls.from_pretrained(tmp_path / "base", reward_model=reward_model)
    assert wrapped.reward_model is reward_model
    assert isinstance(load_reward_guided_pipeline(tmp_path / "base", reward_model=reward_model), cls)


def test_from_pipe_shares_the_loaded_modules(pipe, base_pipe, reward_model):
    assert pipe.unet is base_pipe.unet and pipe.vae is base_pipe.vae
    assert pipe.reward_model is reward_model
    bare = type(pipe).from_pipe(base_pipe)
    with pytest.raises(PipelineInputError, match="no reward model"):
        bare(PROMPTS[0], num_inference_steps=2)
    bare.set_reward_model(reward_model)
    assert bare.config.reward_model == ("ganrm_diffusers", "GANRewardModel")


def test_bad_arguments_are_named(pipe):
    with pytest.raises(PipelineInputError, match="top_k"):
        call(pipe, num_candidates=2, top_k=3)
    with pytest.raises(PipelineInputError, match="3 seeds for 4 candidates"):
        call(pipe, num_candidates=2, seeds=[1, 2, 3])
    with pytest.raises(PipelineInputError, match="output_type"):
        call(pipe, num_candidates=2, output_type="jpeg")
    with pytest.raises(ScheduleError, match="increasing"):
        PruneSchedule(at=(0.6, 0.3), keep=(0.5, 0.5))
    with pytest.raises(ScheduleError, match="one keep fraction"):
        PruneSchedule(at=(0.3,), keep=(0.5, 0.5))


def test_lora_for_another_base_model_fails_clearly(kind, pipe, tmp_path):
    other = tiny_sd_pipeline()  # another architecture than the world's digits model and than SDXL
    add_lora(other.unet, rank=2)
    lora_file = save_lora(other.unet, tmp_path / "other")[0]
    with pytest.raises(LoraCompatibilityError, match="another base model|was made for"):
        pipe.load_lora_weights(lora_file)
    assert not getattr(pipe.unet, "peft_config", None)  # nothing was loaded


def test_lora_for_this_base_model_loads(kind, reduced_world, reward_model, tmp_path):
    trained = make_base_pipe(kind, reduced_world)
    add_lora(trained.unet, rank=2)
    lora_file = save_lora(trained.unet, tmp_path / "same")[0]
    cls = RewardGuidedPipeline if kind == "sd" else RewardGuidedXLPipeline
    fresh = cls.from_pipe(make_base_pipe(kind, reduced_world), reward_model=reward_model)
    fresh.load_lora_weights(lora_file, adapter_name="style")
    assert "style" in fresh.unet.peft_config
