"""Reward-guided SD3.x, FLUX.1, FLUX.2 klein and Qwen-Image pipelines: seeds, chunking, pruning, FK, counting,
loading, family detection."""

from __future__ import annotations

import json

import pytest
import torch
from checks import assert_relative_close
from diffusers import DDIMScheduler, Flux2KleinPipeline, FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from tiny_models import tiny_flux2_klein_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline

from ganrm_diffusers.generation.pipeline import (
    FAMILIES,
    PipelineInputError,
    UnsupportedPipelineError,
    load_reward_guided_pipeline,
)
from ganrm_diffusers.generation.pipeline_flow import (
    RewardGuidedFlux2KleinPipeline,
    RewardGuidedFluxPipeline,
    RewardGuidedQwenImagePipeline,
    RewardGuidedSD3Pipeline,
)
from ganrm_diffusers.generation.pruning import FKResampling, PruneSchedule, ScheduleError, count_model_rows
from ganrm_diffusers.reward.model import GANRewardModel

PROMPTS = ["a handwritten digit 3", "a photo of a cat"]
STEPS = 6
SIZE = 32
# Another batch composition (the plain pipeline one seed at a time, another chunking) agrees to float32 accumulation
# order, amplified over a few steps; a wrong seed or a misplaced candidate errs by 1e-1 or more (see checks.py).
RTOL = 1e-4
FAMILY_BUILDS = {
    "sd3": (tiny_sd3_pipeline, RewardGuidedSD3Pipeline, StableDiffusion3Pipeline),
    "flux": (tiny_flux_pipeline, RewardGuidedFluxPipeline, FluxPipeline),
    "flux_schnell": (lambda: tiny_flux_pipeline(guidance_embeds=False), RewardGuidedFluxPipeline, FluxPipeline),
    "flux2_klein": (tiny_flux2_klein_pipeline, RewardGuidedFlux2KleinPipeline, Flux2KleinPipeline),
    "flux2_klein_distilled": (
        lambda: tiny_flux2_klein_pipeline(is_distilled=True),
        RewardGuidedFlux2KleinPipeline,
        Flux2KleinPipeline,
    ),
    "qwenimage": (tiny_qwenimage_pipeline, RewardGuidedQwenImagePipeline, QwenImagePipeline),
}
# Each family's own guidance, as its base pipeline takes it: SD3 batched CFG; FLUX.1's distilled guidance input;
# FLUX.2 klein's CFG in two calls against its "" negative (none for the step-distilled one); Qwen-Image's true CFG (a negative prompt, norm rescaled).
FAMILY_SETTINGS = {
    "sd3": {"guidance_scale": 4.0},
    "flux": {"guidance_scale": 3.5},
    "flux_schnell": {"guidance_scale": 3.5},
    "flux2_klein": {"guidance_scale": 4.0},
    "flux2_klein_distilled": {"guidance_scale": 1.0},  # step-distilled klein: no guidance
    "qwenimage": {"negative_prompt": "blurry", "true_cfg_scale": 4.0},
}
ROWS_PER_EVALUATION = {"sd3": 2, "flux2_klein": 2, "qwenimage": 2}  # guided: two rows of the transformer per step


@pytest.fixture(scope="module", params=sorted(FAMILY_BUILDS))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reward_model(tiny_backbone: str) -> GANRewardModel:
    torch.manual_seed(3)
    return GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)


@pytest.fixture(scope="module")
def base_pipe(family: str):
    return FAMILY_BUILDS[family][0]()


@pytest.fixture(scope="module")
def pipe(family: str, base_pipe, reward_model: GANRewardModel):
    guided = FAMILY_BUILDS[family][1].from_pipe(base_pipe, reward_model=reward_model)
    guided.set_progress_bar_config(disable=True)
    return guided


def settings(family: str) -> dict:
    common = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "max_sequence_length": 16}
    return {**common, **FAMILY_SETTINGS[family]}


def call(pipe, family: str, **kwargs):
    return pipe(PROMPTS, **{**settings(family), "output_type": "pt", **kwargs})


def test_returned_seeds_regenerate_with_the_plain_pipeline(family, pipe, base_pipe):
    out = call(pipe, family, num_candidates=3, top_k=2, seed=40, return_candidates=True)
    assert out.images.shape == (4, 3, SIZE, SIZE) and out.scores.shape == (4,)
    for index, seed in enumerate(out.seeds):
        plain = base_pipe(  # by keyword: FLUX.2 klein's first argument is an image
            prompt=PROMPTS[index // 2],
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            **settings(family),
        ).images
        assert_relative_close(out.images[index : index + 1], plain, RTOL, f"image of seed {seed}")
    # The best of each prompt's candidates, best first, scored as returned.
    for prompt in range(2):
        scores = out.candidate_scores[prompt * 3 : prompt * 3 + 3]
        assert torch.equal(out.scores[prompt * 2 : prompt * 2 + 2], scores.sort(descending=True).values[:2])


def test_chunking_does_not_change_the_result(family, pipe):
    whole = call(pipe, family, num_candidates=4, seed=7)
    chunked = call(pipe, family, num_candidates=4, seed=7, candidate_batch_size=3)
    assert chunked.seeds == whole.seeds
    assert_relative_close(chunked.images, whole.images, RTOL, "chunked images")


def test_pruned_survivors_are_bit_identical_to_the_unpruned_run(family, pipe):
    # One candidate per model call: the same computation for a survivor with or without pruning, bit for bit.
    schedule = PruneSchedule(at=(0.3,), keep=(0.5,))
    full = call(pipe, family, num_candidates=4, seed=3, candidate_batch_size=1, return_candidates=True)
    pruned = call(
        pipe, family, num_candidates=4, seed=3, candidate_batch_size=1, prune=schedule, return_candidates=True
    )
    finished = [index for index, steps in enumerate(pruned.candidate_steps) if steps == STEPS]
    assert len(finished) == 4  # two of each prompt's four
    assert torch.equal(pruned.candidates[finished], full.candidates[finished])
    assert torch.equal(pruned.candidate_scores[finished], full.candidate_scores[finished])


def test_transformer_evaluations_follow_the_schedule(family, pipe):
    schedule = PruneSchedule(at=(0.3,), keep=(0.5,))
    rows_per_evaluation = ROWS_PER_EVALUATION.get(family, 1)
    with count_model_rows(pipe.transformer) as full:
        call(pipe, family, num_candidates=4, seed=1)
    with count_model_rows(pipe.transformer) as pruned:
        call(pipe, family, num_candidates=4, seed=1, prune=schedule)
    assert full[0] == rows_per_evaluation * 2 * 4 * STEPS
    expected = schedule.unet_evaluations(4, STEPS) * 2  # two prompts
    assert pruned[0] == rows_per_evaluation * expected < full[0]


def test_fk_resampling_needs_the_stochastic_flow_step(family, pipe):
    with pytest.raises(ScheduleError, match="stochastic"):
        call(pipe, family, num_candidates=4, seed=0, prune=FKResampling())
    out = call(pipe, family, num_candidates=4, top_k=2, seed=0, eta=0.7, prune=FKResampling())
    assert out.images.shape == (4, 3, SIZE, SIZE) and len(out.lineages) == 4
    assert torch.isfinite(out.images).all()
    again = call(pipe, family, num_candidates=4, top_k=2, seed=0, eta=0.7, prune=FKResampling())
    assert torch.equal(again.images, out.images) and again.seeds == out.seeds  # repeatable from the same call
    with pytest.raises(PipelineInputError, match="noise level"):
        call(pipe, family, num_candidates=2, seed=0, eta=1.5)


def test_callback_latents_and_interrupt(family, pipe):
    seen = []

    def stop_after_two(p, step, t, tensors):
        seen.append(tuple(tensors["latents"].shape))
        if step == 1:
            p._interrupt = True
        return tensors

    call(pipe, family, num_candidates=2, seed=0, callback_on_step_end=stop_after_two)
    assert len(seen) == 2 and seen[0][0] == 4


def test_latent_output_is_what_the_plain_pipeline_returns(family, pipe, base_pipe):
    out = call(pipe, family, num_candidates=2, seed=11, output_type="latent")
    plain = base_pipe(
        prompt=PROMPTS[0],
        generator=torch.Generator("cpu").manual_seed(out.seeds[0]),
        output_type="latent",
        **settings(family),
    ).images
    assert out.images.shape[1:] == plain.shape[1:]
    assert_relative_close(out.images[:1], plain, RTOL, "latents")


def test_load_detects_the_family_and_round_trips(family, pipe, reward_model, tmp_path):
    _, reward_guided, plain = FAMILY_BUILDS[family]
    pipe.save_pretrained(tmp_path / "guided")
    loaded = load_reward_guided_pipeline(tmp_path / "guided")
    assert type(loaded) is reward_guided and isinstance(loaded.reward_model, GANRewardModel)
    loaded.set_progress_bar_config(disable=True)
    before, after = call(pipe, family, num_candidates=2, seed=5), call(loaded, family, num_candidates=2, seed=5)
    assert after.seeds == before.seeds
    assert_relative_close(after.images, before.images, RTOL, "images after a save/load round trip")
    # A plain base pipeline folder (SD3 without T5), with the reward model given at load time.
    components = {key: value for key, value in pipe.components.items() if key != "reward_model"}
    plain(**components).save_pretrained(tmp_path / "base")
    wrapped = load_reward_guided_pipeline(tmp_path / "base", reward_model=reward_model)
    assert type(wrapped) is reward_guided and wrapped.reward_model is reward_model


def test_unsupported_families_fail_naming_the_supported_ones(tmp_path):
    # FLUX.2 [dev] and Qwen-Image-Edit share a supported family's transformer class, but not its call.
    for class_name, denoiser in [
        ("QwenImageEditPipeline", ["diffusers", "QwenImageTransformer2DModel"]),
        ("Flux2Pipeline", ["diffusers", "Flux2Transformer2DModel"]),
        ("KandinskyV22Pipeline", None),
    ]:
        folder = tmp_path / class_name
        folder.mkdir()
        index = {"_class_name": class_name, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "X"]}
        if denoiser:
            index["transformer"] = denoiser
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(UnsupportedPipelineError, match=class_name) as error:
            load_reward_guided_pipeline(folder)
        assert all(name in str(error.value) for name in FAMILIES)
    # Detection reads the class, then the denoiser: a FLUX folder (which has a text_encoder_2, as SDXL does) is
    # never taken for SDXL, and a pipeline saved under another name is recognised by its transformer.
    from ganrm_diffusers.generation.pipeline import reward_guided_class_for

    flux_like = {"_class_name": "MyFluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    flux_like["text_encoder_2"] = ["transformers", "T5EncoderModel"]
    assert reward_guided_class_for(flux_like) is RewardGuidedFluxPipeline
    assert reward_guided_class_for({"_class_name": "FluxPipeline", "text_encoder_2": []}) is RewardGuidedFluxPipeline


def test_the_stochastic_step_refuses_a_foreign_scheduler(pipe, family):
    foreign = type(pipe).from_pipe(pipe, scheduler=DDIMScheduler())
    with pytest.raises(PipelineInputError, match="FlowMatchEulerDiscreteScheduler"):
        call(foreign, family, num_candidates=2, seed=0, eta=0.5)


def test_ganrm_sample_writes_a_flow_pipelines_candidates(reward_model, tmp_path):
    """`ganrm sample` on a saved SD3 reward-guided folder: the same imagefolder dataset as for UNet pipelines."""
    from ganrm_diffusers.cli.main import main

    folder = tmp_path / "sd3"
    RewardGuidedSD3Pipeline.from_pipe(tiny_sd3_pipeline(), reward_model=reward_model).save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 2\n")
    args = ["sample", "--pipeline", str(folder), "--prompts", str(prompts), "--num_candidates", "2"]
    args += ["--num_inference_steps", "3", "--seed", "7", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [record["seed"] for record in records] == [7, 8, 9, 10]
    assert sorted(record["rank"] for record in records[:2]) == [0, 1]
    assert all((tmp_path / "out" / record["file_name"]).is_file() for record in records)
